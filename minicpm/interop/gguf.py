"""Export a checkpoint to one GGUF file for llama.cpp, through the `gguf` package (llama.cpp's own writer).

Two architectures:
  minicpm  llama.cpp's MiniCPM graph, with the three μP multipliers as metadata: `minicpm.embedding_scale`
           (scale_emb), `minicpm.residual_scale` (scale_depth/√L) and `minicpm.logit_scale` (d/dim_model_base;
           llama.cpp divides the logits by it). The head stays tied when the checkpoint's is.
  llama    a plain Llama with μP folded into the weights (interop.hf.fold_mup): no scale keys, head untied.
An MoE model goes in either arch as llama.cpp's converter writes MiniCPM-MoE and Mixtral: per layer the router
(ffn_gate_inp) and the experts stacked (ffn_gate_exps, ffn_up_exps, ffn_down_exps), with expert_count and
expert_used_count.

The tokenizer beside the checkpoint goes in: a byte-level BPE tokenizer.json as `tokenizer.ggml.model = "gpt2"`
(tokens, types, merges, the pre-tokenizer's llama.cpp name), a SentencePiece tokenizer.model as "llama" (pieces,
scores, types). Weights: f32, f16, bf16 or q8_0; norm gains (1-D) stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.formats import GGUF_ARCHES, GGUF_TYPES
from minicpm.files import plain_permissions, read_json_object
from minicpm.interop.hf import PathLike, official_state, tokenizer_files
from minicpm.interop.llama import fold_mup
from minicpm.interop.mixtral import fold_mup_moe
from minicpm.model.config import ModelConfig
from minicpm.model.rope import transformers_rope
from minicpm.model.transformer import MiniCPM

ARCHES = GGUF_ARCHES
DTYPES = GGUF_TYPES


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MiniCPMError("GGUF export needs the gguf package: pip install 'minicpm[gguf]'") from None
    return gguf


def export_gguf(checkpoint_dir: PathLike, out_file: PathLike, *, arch: str = "minicpm", dtype: str = "f16",
                tokenizer: PathLike | None = None) -> Path:
    """Write `out_file` (one .gguf, atomically) from a checkpoint directory of either format (safetensors or DCP
    shards) and the tokenizer beside it (or `tokenizer`: a tokenizer.json, tokenizer.model or a directory).

    dtype f16 is the default of llama.cpp's converter. With q8_0, weights whose rows are not a whole number of
    32-value blocks are written as f16 instead, as llama.cpp's converter does, and one warning names them.
    """
    from minicpm.checkpoints.weights import consolidate

    gguf = _gguf()
    if arch not in ARCHES:
        raise MiniCPMError(f"GGUF arch {arch!r} is not one of {', '.join(ARCHES)}")
    if dtype not in DTYPES:
        raise MiniCPMError(f"GGUF type {dtype!r}: the {arch} export writes {', '.join(DTYPES)}; for k-quants "
                           f"(q4_k_m, ...) run llama.cpp's llama-quantize on an f16 export")
    root = Path(checkpoint_dir)
    config, state = consolidate(root)
    rope_theta, rope_scaling = _rope(config)
    vocab = read_vocab(_tokenizer_path(root, tokenizer), config.vocab_size)
    with torch.device("meta"):  # the model's own order (embedding, blocks 0..L-1, norm, head), whatever the file's
        order = [*official_state(MiniCPM(config)), "lm_head.weight"]
    state = {key: state[key] for key in order if key in state}
    if config.num_experts:
        state = stack_experts(config, state)
    if arch == "llama":
        state = fold_mup_moe(config, state) if config.num_experts else fold_mup(config, state)

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, arch)
        _add_model_keys(writer, gguf, config, arch, dtype, root.resolve().name, rope_theta, rope_scaling)
        _add_vocab_keys(writer, vocab)
        as_f16 = [name for name, array in _gguf_tensors(gguf, config, arch, state)
                  if not _add_tensor(writer, gguf, name, array, dtype)]
        if as_f16:
            warnings.warn(f"{len(as_f16)} tensors have rows that are not whole {dtype} blocks; written as f16, as "
                          f"llama.cpp's converter does: {', '.join(as_f16)}", stacklevel=4)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_file_atomically(Path(out_file), write)


def _write_file_atomically(out_file: Path, write) -> Path:
    """write(path) fills a temporary file beside out_file, which is then renamed into place (or removed)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(plain_permissions(tmp), out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_file


def stack_experts(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MoE layers as llama.cpp holds them: each layer's E experts' w1 / w3 / w2 stacked into one (E, out, in)
    tensor (ffn_gate_exps / ffn_up_exps / ffn_down_exps, under the Mixtral names gguf's map knows), the router as
    ffn_gate_inp; the order of `state` is kept (each stack where its expert 0 was)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, dot, rest = key.partition(".mlp.experts.")
        if not dot:
            out[key] = tensor
            continue
        expert, matrix = rest.split(".", 1)  # "{e}", "w1.weight"
        if expert == "0":
            out[f"{prefix}.block_sparse_moe.experts.{matrix}"] = torch.stack(
                [state[f"{prefix}.mlp.experts.{e}.{matrix}"] for e in range(config.num_experts)])
    return out


def _rope(config: ModelConfig) -> tuple[float, float | None]:
    """(base, linear factor or None): our RoPE as a Llama computes it (static NTK is a base change there, the one
    formula the Llama export uses too); llama.cpp has no dynamic NTK, and YaRN, LongRoPE and Llama-3 scaling do
    not export yet."""
    theta, scaling = transformers_rope(config)
    if scaling and scaling["rope_type"] != "linear":
        raise MiniCPMError(f"rope_scaling type {scaling['rope_type']!r} does not export to GGUF yet "
                           f"(plain RoPE, ABF, static NTK and linear do)")
    return theta, scaling["factor"] if scaling else None


# ---------------------------------------------------------------- model metadata and tensors

def _add_model_keys(writer, gguf, config: ModelConfig, arch: str, dtype: str, name: str, rope_theta: float,
                    linear_factor: float | None) -> None:
    writer.add_name(name)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.num_experts:  # llama.cpp's MoE graph for both arches: softmax → top-k → renormalise, as ours
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(rope_theta)
    if linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_factor)
    if arch == "minicpm":
        # llama.cpp's MiniCPM graph (the Granite one) multiplies the embedding by embedding_scale, every residual
        # branch by residual_scale, and divides the logits by logit_scale; its default for the last is 256/d,
        # the inverse of MiniCPM's d/dim_model_base, so the key is always written
        writer.add_embedding_scale(config.scale_emb)
        writer.add_residual_scale(config.residual_scale)
        writer.add_logit_scale(config.width_multiplier)


def _permute_rows_for_ggml_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Our RoPE rotates dimension i with i + head_dim/2 (HF rotate_half); ggml's NORM RoPE rotates 2i with 2i+1.
    Interleaving the two halves of each head's rows of W_q / W_k makes the two the same."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensors(gguf, config: ModelConfig, arch: str, state: Mapping[str, torch.Tensor]):
    """(GGUF name, fp32 numpy array in torch's [out, in] order) for every weight, named by gguf's own map of
    HF tensor names, checked against the tensors the architecture declares."""
    model_arch = {"minicpm": gguf.MODEL_ARCH.MINICPM, "llama": gguf.MODEL_ARCH.LLAMA}[arch]
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[model_arch])
    for key, tensor in state.items():
        found = names.get_type_and_name(key, try_suffixes=(".weight",))
        if found is None or found[0] not in allowed:
            raise MiniCPMError(f"tensor {key} has no place in llama.cpp's {arch} architecture")
        kind, name = found
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            array = _permute_rows_for_ggml_rope(array, config.num_attention_heads)
        elif kind == gguf.MODEL_TENSOR.ATTN_K:
            array = _permute_rows_for_ggml_rope(array, config.num_key_value_heads)
        yield name, array


def _add_tensor(writer, gguf, name: str, array: np.ndarray, dtype: str) -> bool:
    """Add one tensor in `dtype` (1-D ones in f32); False when its rows are not whole blocks of `dtype` and it
    went in as f16 instead."""
    types = gguf.GGMLQuantizationType
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    if array.ndim <= 1:
        qtype = types.F32  # norm gains: llama.cpp's converter keeps every 1-D tensor in f32
    try:
        data, whole = gguf.quants.quantize(array, qtype), True
    except gguf.quants.QuantError:
        qtype, data, whole = types.F16, gguf.quants.quantize(array, types.F16), False
    writer.add_tensor(name, data, raw_dtype=qtype)
    return whole


# ---------------------------------------------------------------- tokenizer

@dataclass
class Vocab:
    """What GGUF stores of a tokenizer: one token per embedding row (padded with unused tokens), and its keys."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre: llama.cpp's name for the pre-tokenizer
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None  # SentencePiece only
    merges: list[str] | None  # BPE only, "left right"
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None = None  # SentencePiece only
    chat_template: str | None = None


def _tokenizer_path(root: Path, explicit: PathLike | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
            if not found:
                raise MiniCPMError(f"{path}: holds neither tokenizer.json nor tokenizer.model")
            return found[0]
        if not path.is_file():
            raise MiniCPMError(f"{path}: no such tokenizer file")
        return path
    files = tokenizer_files(root)
    for name in ("tokenizer.json", "tokenizer.model"):
        if name in files:
            return files[name]
    raise MiniCPMError(f"{root}: no tokenizer.json or tokenizer.model beside the checkpoint; a GGUF embeds its "
                       f"tokenizer, so pass one (tokenizer=...)")


def read_vocab(path: Path, rows: int) -> Vocab:
    """The GGUF vocabulary of a tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece), padded to
    `rows` tokens (the embedding's rows) with unused [PAD{i}] tokens, as llama.cpp's converter pads."""
    config_file = path.parent / "tokenizer_config.json"
    tok_config = read_json_object(config_file) if config_file.is_file() else {}
    vocab = _sentencepiece_vocab(path, tok_config) if path.suffix == ".model" else _bpe_vocab(path, tok_config)
    if len(vocab.tokens) > rows:
        raise MiniCPMError(f"{path}: {len(vocab.tokens)} tokens, but the model's embedding has {rows} rows")
    unused = 5  # gguf.TokenType.UNUSED
    for i in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(unused)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    vocab.chat_template = tok_config.get("chat_template") if isinstance(tok_config.get("chat_template"), str) else None
    return vocab


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bpe_pre_name(path: Path, spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (it re-implements each split regex in C++ by name)."""
    from minicpm.data.tokenizer import SPLIT_PATTERN

    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if normalizer is None:
        if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN
                and not steps[1].get("use_regex", True)):
            return "qwen2"  # our tokenizers (minicpm.data.tokenizer): the Qwen2 split, then bytes
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return "gpt-2"
    raise MiniCPMError(f"{path}: pre-tokenizer {' + '.join(map(str, kinds))} is not one llama.cpp is known to "
                       f"split the same way (ours, Qwen2's, or GPT-2's byte-level split)")


def _bpe_vocab(path: Path, tok_config: dict) -> Vocab:
    from tokenizers import Tokenizer

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # json's or tokenizers' error
        raise MiniCPMError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MiniCPMError(f"{path}: a {model.get('type')} tokenizer; GGUF export takes a byte-level BPE "
                           f"tokenizer.json or a SentencePiece tokenizer.model")
    pre = _bpe_pre_name(path, spec)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise MiniCPMError(f"{path}: a BPE with no merges (the untrained byte-level tokenizer of `minicpm init`); "
                           f"llama.cpp cannot load one; train a tokenizer first")
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    normal, control, user_defined, unused = 1, 3, 4, 5  # gguf.TokenType
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        text = by_id.get(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        types.append(unused if text is None else
                     (control if added[text] else user_defined) if text in added else normal)
    special = {}
    for kind, default in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>")):
        text = _token_text(tok_config.get(f"{kind}_token")) or default
        if tok.token_to_id(text) is not None:
            special[kind] = tok.token_to_id(text)
    return Vocab("gpt2", pre, tokens, types, None, merges, special,
                 add_bos=bool(tok_config.get("add_bos_token", False)),
                 add_eos=bool(tok_config.get("add_eos_token", False)))


def _sentencepiece_vocab(path: Path, tok_config: dict) -> Vocab:
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError:
        raise MiniCPMError(f"{path}: reading a SentencePiece model needs sentencepiece and protobuf "
                           "(pip install 'minicpm[hf]')") from None
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise MiniCPMError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise MiniCPMError(f"{path}: not a SentencePiece model (no pieces)")
    # SentencePiece's piece types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) are
    # GGUF's token types, number for number
    tokens = [p.piece for p in proto.pieces]
    norm = proto.normalizer_spec
    if norm.remove_extra_whitespaces or norm.name not in ("", "identity"):
        # llama.cpp's SentencePiece tokenizer only adds the dummy prefix and maps spaces to ▁ (as Llama's and
        # MiniCPM's own models do); a normalizer beyond that is skipped, so such text tokenizes differently there
        warnings.warn(f"{path}: llama.cpp does not apply this model's normalizer ({norm.name or 'custom'}"
                      f"{', remove_extra_whitespaces' if norm.remove_extra_whitespaces else ''}); text it would "
                      f"change (repeated spaces, newlines, compatibility characters) tokenizes differently there",
                      stacklevel=4)
    spec = proto.trainer_spec
    special = {kind: i for kind, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id),
                                        ("pad", spec.pad_id)) if 0 <= i < len(tokens)}
    # the official MiniCPM tokenizer starts every prompt with <s> (LlamaTokenizer's add_bos_token default)
    return Vocab("llama", "default", tokens, [p.type for p in proto.pieces], [p.score for p in proto.pieces],
                 None, special, add_bos=bool(tok_config.get("add_bos_token", True)),
                 add_eos=bool(tok_config.get("add_eos_token", False)),
                 add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _add_vocab_keys(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
