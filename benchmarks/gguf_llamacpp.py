"""GGUF exports run by llama.cpp itself: its tokens, logits and greedy continuation against ours.

    pip install --no-deps llama-cpp-cffi cffi     # a prebuilt llama.cpp (CPU) behind its C API; nothing compiles
    python benchmarks/gguf_llamacpp.py

A tiny MiniCPM (d=64, GQA, untied head, scale_emb 3, scale_depth 2, dim_model_base 16, a 400-token byte-level
BPE trained here) is exported for each arch and type and loaded by llama.cpp's C API (llama_model_load_from_file,
llama_tokenize, llama_decode with logits at every position, f32 KV cache). The table gives whether llama.cpp
tokenizes a mixed text (code, digits, accents, emoji, tabs) to our ids, the largest logit difference over that
text and how often the two argmaxes agree there, and how many of 16 greedy tokens after an 8-token prompt agree
before the first difference. bf16 and q8_0 round the weights (q8_0 also the activations inside llama.cpp), so a
random model's near-ties can flip a greedy token; f32 and f16 must agree throughout.

Only llama-cpp-cffi's compiled extension is used (its Python package pulls in transformers<5): it is loaded by
path. Its build needs glibc 2.34 and a GCC 14 libstdc++; on an older libstdc++ the one missing symbol,
__cxa_call_terminate, can be supplied by preloading a two-line shim (see --help).
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minicpm.data.tokenizer import load_tokenizer, train_tokenizer
from minicpm.interop.gguf import export_gguf
from minicpm.interop.hf import load_model, save_model
from minicpm.model.config import ModelConfig
from minicpm.model.build import build_model

TEXT = "def add(a, b):\n    return a + b  # 42 naïve café 😀\n\tThe quick brown fox"
CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "The quick brown fox jumps over the lazy dog. 1234567890 naïve café 日本語 😀\n",
    "\tindented with tabs\n\t\tand more tabs\n" * 3,
] * 20
SHIM = ("""printf '#include <exception>\\nextern "C" void __cxa_call_terminate(void*) noexcept """
        """{ std::terminate(); }\\n' > shim.cc && g++ -shared -fPIC -o libshim.so shim.cc && """
        """LD_PRELOAD=$PWD/libshim.so python benchmarks/gguf_llamacpp.py""")


def llama_cpp_lib():
    spec = importlib.util.find_spec("llama")
    found = [p for d in (spec.submodule_search_locations if spec else []) for p in glob.glob(f"{d}/_llama_cpp_cpu*.so")]
    if not found:
        sys.exit("llama-cpp-cffi is not installed: pip install --no-deps llama-cpp-cffi cffi")
    loader = importlib.machinery.ExtensionFileLoader("_llama_cpp_cpu", found[0])
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_llama_cpp_cpu", loader))
    loader.exec_module(module)
    lib, ffi = module.lib, module.ffi

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def quiet(level, text, user_data):  # llama.cpp logs every key it loads; keep the table readable
        pass

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    return lib, ffi


class LlamaCpp:
    """One GGUF in llama.cpp: tokenize, and logits at every position of a decoded batch."""

    def __init__(self, lib, ffi, path: Path, n_ctx: int = 128):
        self.lib, self.ffi = lib, ffi
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_ctx, self.ctx = n_ctx, None
        self.reset()
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def reset(self):
        """A fresh context: an empty KV cache."""
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        params.n_threads = params.n_threads_batch = 1
        params.type_k = params.type_v = 0  # GGML_TYPE_F32: the default f16 KV cache would blur the comparison
        self.ctx = self.lib.llama_init_from_model(self.model, params)

    def close(self):
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = self.ffi.new(f"llama_token[{len(data) + 16}]")
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(data) + 16, False, False)
        return [out[i] for i in range(n)]

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, 1
            batch.seq_id[i][0] = 0
        status = self.lib.llama_decode(self.ctx, batch)
        self.lib.llama_batch_free(batch)
        if status:
            raise RuntimeError(f"llama_decode returned {status}")
        return np.stack([np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.ctx, i), 4 * self.n_vocab),
                                       dtype=np.float32) for i in range(len(ids))])

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        out, last = list(prompt), self.logits(prompt)[-1]
        for _ in range(n):
            out.append(int(last.argmax()))
            last = self.logits([out[-1]], start=len(out) - 1)[-1]
        return out[len(prompt):]


def our_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(prompt):]


def tiny_checkpoint(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer([str(corpus)], 400, root / "tokenizer").parent
    config = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, scale_emb=3.0,
                         scale_depth=2.0, max_position_embeddings=128, tie_word_embeddings=False)
    model = build_model(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # gains away from 1, so that a misplaced norm shows
        model.lm_head.weight.mul_(16)  # spread the logits, so that greedy decoding is not one repeated token
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return save_model(model, root / "ckpt", extra_files={n: tokenizer / n for n in names})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"libstdc++ shim: {SHIM}")
    parser.parse_args()
    lib, ffi = llama_cpp_lib()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp))
        ours_ids = load_tokenizer(ckpt).encode(TEXT).ids
        model = load_model(ckpt, dtype="fp32").eval()
        with torch.no_grad():
            reference = model(torch.tensor([ours_ids]))[0].numpy()
        ours_greedy = our_greedy(model, ours_ids[:8], 16)
        print(f"{'arch':8} {'type':5} {'same ids':>8} {'max |Δlogit|':>12} {'max |logit|':>11} {'same argmax':>11} "
              f"{'greedy prefix':>13}")
        for arch in ("minicpm", "llama"):
            for dtype in ("f32", "f16", "bf16", "q8_0"):
                path = export_gguf(ckpt, Path(tmp) / f"{arch}-{dtype}.gguf", arch=arch, dtype=dtype)
                runner = LlamaCpp(lib, ffi, path)
                same_ids = runner.tokenize(TEXT) == ours_ids
                logits = runner.logits(ours_ids)
                diff = np.abs(logits - reference).max()
                argmax = (logits.argmax(-1) == reference.argmax(-1)).mean()
                runner.reset()
                theirs = runner.greedy(ours_ids[:8], len(ours_greedy))
                runner.close()
                prefix = next((i for i, (a, b) in enumerate(zip(theirs, ours_greedy)) if a != b), len(ours_greedy))
                print(f"{arch:8} {dtype:5} {str(same_ids):>8} {diff:12.2e} {np.abs(reference).max():11.2f} "
                      f"{argmax:11.0%} {f'{prefix}/{len(ours_greedy)}':>13}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
