"""GGUF export, read back with the gguf package's own reader: every tensor, shape and key against the checkpoint."""

import json
import math

import numpy as np
import pytest
import torch

from minicpm.data.tokenizer import byte_level_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer, vocab_size
from minicpm.errors import MiniCPMError
from minicpm.interop.hf import read_checkpoint, save_model
from minicpm.interop.llama import fold_mup
from minicpm.model.config import ModelConfig
from minicpm.model.rope import apply_rope, rope_cos_sin
from minicpm.model.build import build_model

gguf = pytest.importorskip("gguf")
from minicpm.interop.gguf import export_gguf  # noqa: E402  (after the skip: it needs gguf)


CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "The quick brown fox jumps over the lazy dog. 1234567890 naïve café 日本語 😀\n",
    "\tindented with tabs\n\t\tand more tabs\n" * 3,
] * 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ROWS = 408  # embedding rows: more than the tokenizer's tokens, as GGUF pads


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CORPUS):
        (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return train_tokenizer([str(corpus)], 400, tmp_path_factory.mktemp("tok")).parent


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=ROWS, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, max_position_embeddings=128,
                  rope_theta=5000.0, scale_emb=10.0, scale_depth=1.2)
    fields.update(overrides)
    return ModelConfig(**fields)


def write_checkpoint(path, config, tokenizer_dir):
    model = build_model(config, seed=0)
    with torch.no_grad():  # gains away from 1 so that a misplaced norm weight shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return save_model(model, path, extra_files={n: tokenizer_dir / n for n in TOKENIZER_FILES})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """Tied head, GQA; more embedding rows than the tokenizer has tokens."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", small_config(), tokenizer_dir)


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    """A GGUF tensor as fp32 in torch's [out, in] order (GGUF lists dimensions innermost first)."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert array.shape == tuple(reversed([int(n) for n in tensor.shape]))
    return array


def interleave_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Within each head, row 2i+j takes row j·head_dim/2 + i: the order ggml's adjacent-pair RoPE needs."""
    head_dim = w.shape[0] // heads
    order = [h * head_dim + j * (head_dim // 2) + i for h in range(heads) for i in range(head_dim // 2)
             for j in range(2)]
    return w[order]


def expected_tensors(checkpoint, arch):
    config, state = read_checkpoint(checkpoint)
    state = fold_mup(config, state) if arch == "llama" else {k: v.float() for k, v in state.items()}
    w = {k: v.numpy() for k, v in state.items()}
    out = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w:
        out["output.weight"] = w["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": w[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": interleave_halves(w[p + "self_attn.q_proj.weight"], config.num_attention_heads),
            f"blk.{i}.attn_k.weight": interleave_halves(w[p + "self_attn.k_proj.weight"], config.num_key_value_heads),
            f"blk.{i}.attn_v.weight": w[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": w[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": w[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": w[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": w[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": w[p + "mlp.down_proj.weight"],
        }
    return config, out


GGML_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def assert_close_for_type(got: np.ndarray, want: np.ndarray, dtype: str, name: str):
    if dtype == "f32":
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif dtype == "f16":
        np.testing.assert_allclose(got, want, rtol=2**-11, atol=1e-7, err_msg=name)
    elif dtype == "bf16":
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-30, err_msg=name)
    else:
        # q8_0: each block of 32 values is int8 multiples of step = max|block|/127, stored as fp16: half a step
        # of rounding, plus up to 127 steps times the step's own fp16 rounding (relative 2^-11)
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        error = np.abs(got.reshape(-1, 32) - blocks)
        assert (error <= step * (0.5 + 127 * 2**-11)).all(), name
        assert error.max() > 0, name  # and it is quantized


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_every_tensor_reads_back_as_the_checkpoints(checkpoint, tmp_path, arch, dtype):
    out = export_gguf(checkpoint, tmp_path / "model.gguf", arch=arch, dtype=dtype)
    _, tensors = read_gguf(out)
    config, want = expected_tensors(checkpoint, arch)
    # a tied head stays tied in the minicpm arch (llama.cpp reuses token_embd); folding μP unties it
    assert ("output.weight" in tensors) == (arch == "llama")
    assert tensors.keys() == want.keys()
    for name, tensor in tensors.items():
        if want[name].ndim == 1:  # norm gains stay f32, as llama.cpp expects
            assert tensor.tensor_type.name == "F32", name
            np.testing.assert_array_equal(values(tensor), want[name], err_msg=name)
        else:
            assert tensor.tensor_type.name == GGML_TYPES[dtype], name
            assert_close_for_type(values(tensor), want[name], dtype, name)
    assert values(tensors["token_embd.weight"]).shape == (config.vocab_size, config.hidden_size)


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_metadata_describes_the_model_and_its_mup_scales(checkpoint, tmp_path, arch):
    fields, _ = read_gguf(export_gguf(checkpoint, tmp_path / "model.gguf", arch=arch, dtype="f16"))
    config = small_config()
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == 1  # LlamaFileType.MOSTLY_F16
    expected = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 160,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "vocab_size": ROWS}
    for key, value in expected.items():
        assert fields[f"{arch}.{key}"] == value, key
    assert fields[f"{arch}.rope.freq_base"] == 5000.0
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    scales = {f"{arch}.embedding_scale", f"{arch}.residual_scale", f"{arch}.logit_scale"}
    if arch == "minicpm":
        assert fields["minicpm.embedding_scale"] == pytest.approx(10.0)
        assert fields["minicpm.residual_scale"] == pytest.approx(1.2 / math.sqrt(2))
        assert fields["minicpm.logit_scale"] == pytest.approx(64 / 16)  # llama.cpp divides the logits by it
        assert config.width_multiplier == 4
    else:  # folded into the weights
        assert not scales & fields.keys()


def test_the_byte_level_tokenizer_is_embedded_whole(checkpoint, tokenizer_dir, tmp_path):
    fields, _ = read_gguf(export_gguf(checkpoint, tmp_path / "model.gguf", dtype="q8_0"))
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"  # llama.cpp's name for our split pattern
    n = vocab_size(load_tokenizer(tokenizer_dir))
    assert 300 < n < ROWS
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == [vocab[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, ROWS)]
    # the 16 special tokens are CONTROL (3), the learned ones NORMAL (1), the padding UNUSED (5)
    assert fields["tokenizer.ggml.token_type"] == [3] * 16 + [1] * (n - 16) + [5] * (ROWS - n)
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                               for m in spec["model"]["merges"]]
    assert len(fields["tokenizer.ggml.merges"]) > 50
    assert (fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.bos_token_id"],
            fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (0, 1, 2, 3)
    assert fields["tokenizer.ggml.add_bos_token"] is False  # our documents start without <s>
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


def ggml_rope(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """ggml's NORM RoPE on one head's vector: dimensions 2i and 2i+1 rotate together by position·θ^(-2i/d)."""
    d = x.shape[-1]
    angle = position * theta ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_q_and_k_give_our_attention_scores_under_ggml_rope(checkpoint, tmp_path):
    _, tensors = read_gguf(export_gguf(checkpoint, tmp_path / "model.gguf", dtype="f32"))
    config, state = read_checkpoint(checkpoint)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    x = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([3, 11])
    # ours: HF rotate_half RoPE on the checkpoint's q/k, query at position 11 against the key at position 3
    q = (x @ state["model.layers.0.self_attn.q_proj.weight"].T).view(1, 2, heads, head_dim).transpose(1, 2)
    k = (x @ state["model.layers.0.self_attn.k_proj.weight"].T).view(1, 2, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, head_dim, config.rope_theta, None)
    q, k = apply_rope(q, k, cos, sin)
    ours = (q[0, :, 1] * k[0, :, 0].repeat_interleave(heads // kv_heads, dim=0)).sum(-1)
    # llama.cpp's: adjacent-pair RoPE on the GGUF's q/k
    gq = (x.numpy() @ values(tensors["blk.0.attn_q.weight"]).T).reshape(2, heads, head_dim)
    gk = (x.numpy() @ values(tensors["blk.0.attn_k.weight"]).T).reshape(2, kv_heads, head_dim)
    theirs = (ggml_rope(gq[1], 11, config.rope_theta) *
              np.repeat(ggml_rope(gk[0], 3, config.rope_theta), heads // kv_heads, axis=0)).sum(-1)
    np.testing.assert_allclose(theirs, ours.numpy(), rtol=1e-5, atol=1e-6)


def test_q8_0_writes_rows_that_are_not_whole_blocks_as_f16_and_says_so(tmp_path, tokenizer_dir):
    ckpt = write_checkpoint(tmp_path / "ckpt", small_config(intermediate_size=144), tokenizer_dir)
    with pytest.warns(UserWarning, match=r"2 tensors .* not whole q8_0 blocks; written as f16.*: "
                                         r"blk\.0\.ffn_down\.weight, blk\.1\.ffn_down\.weight$"):
        out = export_gguf(ckpt, tmp_path / "model.gguf", dtype="q8_0")
    _, tensors = read_gguf(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # rows of 144 = 4.5 blocks
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"  # rows of 64 = 2 blocks


def test_untied_head_and_linear_rope_scaling_are_written(tmp_path, tokenizer_dir):
    config = small_config(tie_word_embeddings=False, rope_scaling={"type": "linear", "factor": 4.0})
    ckpt = write_checkpoint(tmp_path / "ckpt", config, tokenizer_dir)
    fields, tensors = read_gguf(export_gguf(ckpt, tmp_path / "model.gguf", dtype="f32"))
    head = read_checkpoint(ckpt)[1]["lm_head.weight"].numpy()
    np.testing.assert_array_equal(values(tensors["output.weight"]), head)
    assert fields["minicpm.rope.scaling.type"] == "linear" and fields["minicpm.rope.scaling.factor"] == 4.0


def test_ntk_scaling_becomes_the_rope_base(tmp_path, tokenizer_dir):
    config = small_config(rope_scaling={"type": "ntk", "factor": 4.0})
    ckpt = write_checkpoint(tmp_path / "ckpt", config, tokenizer_dir)
    fields, _ = read_gguf(export_gguf(ckpt, tmp_path / "model.gguf", arch="llama", dtype="f32"))
    # NTK-aware scaling is a static base change: θ·factor^(d/(d-2)) (model/rope.py)
    assert fields["llama.rope.freq_base"] == pytest.approx(5000.0 * 4.0 ** (16 / 14), rel=1e-6)
    assert "llama.rope.scaling.type" not in fields


def test_sentencepiece_tokenizer_is_embedded_as_a_llama_vocab(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:3] * 10), encoding="utf-8")
    # Llama's and MiniCPM's SentencePiece settings: no normalisation beyond the dummy prefix
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1,
                                   eos_id=2, unk_id=0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    model = build_model(small_config(vocab_size=sp.get_piece_size() + 2), seed=0)
    ckpt = save_model(model, tmp_path / "ckpt", extra_files={"tokenizer.model": tmp_path / "tokenizer.model"})
    fields, _ = read_gguf(export_gguf(ckpt, tmp_path / "model.gguf", dtype="f16"))
    n = sp.get_piece_size()
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)] + [f"[PAD{n}]", f"[PAD{n + 1}]"]
    np.testing.assert_allclose(fields["tokenizer.ggml.scores"][:n], [sp.get_score(i) for i in range(n)])
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # <unk> UNKNOWN, <s> and </s> CONTROL
    assert [i for i in range(n) if types[i] == 6] == [i for i in range(n) if sp.is_byte(i)]
    assert types[n:] == [5, 5]
    assert "tokenizer.ggml.merges" not in fields
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True  # as the official MiniCPM tokenizer does
    assert fields["tokenizer.ggml.add_space_prefix"] is True


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP saving in one process, as intended
def test_a_sharded_checkpoint_exports_like_its_safetensors_twin(checkpoint, tmp_path, tokenizer_dir):
    import torch.distributed.checkpoint as dcp

    config, state = read_checkpoint(checkpoint)
    sharded = tmp_path / "tiny"  # the same directory name: general.name is the checkpoint's name
    dcp.save({"model": state}, checkpoint_id=sharded / "dcp", no_dist=True)
    config.save(sharded / "config.json")
    one = export_gguf(checkpoint, tmp_path / "one.gguf", dtype="f16")
    two = export_gguf(sharded, tmp_path / "two.gguf", dtype="f16", tokenizer=tokenizer_dir)
    assert one.read_bytes() == two.read_bytes()


def test_bad_requests_are_one_line_errors(checkpoint, tmp_path, tokenizer_dir):
    def error(*args, **kwargs) -> str:
        with pytest.raises(MiniCPMError) as info:
            export_gguf(*args, **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "'q4_k'" in error(checkpoint, tmp_path / "m.gguf", dtype="q4_k")
    assert "'gpt2'" in error(checkpoint, tmp_path / "m.gguf", arch="gpt2")
    yarn = write_checkpoint(tmp_path / "yarn", small_config(rope_scaling={"type": "yarn", "factor": 4.0}),
                            tokenizer_dir)
    assert "'yarn'" in error(yarn, tmp_path / "m.gguf")
    bare = save_model(build_model(small_config(), seed=0), tmp_path / "bare")
    assert "no tokenizer.json or tokenizer.model" in error(bare, tmp_path / "m.gguf")
    save_tokenizer(byte_level_tokenizer(), tmp_path / "untrained")
    assert "no merges" in error(checkpoint, tmp_path / "m.gguf", tokenizer=tmp_path / "untrained")
    too_small = save_model(build_model(small_config(vocab_size=300), seed=0), tmp_path / "small",
                           extra_files={n: tokenizer_dir / n for n in TOKENIZER_FILES})
    assert "embedding has 300 rows" in error(too_small, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_replaces_the_file_whole_or_not_at_all(checkpoint, tmp_path, monkeypatch):
    out = export_gguf(checkpoint, tmp_path / "model.gguf", dtype="f16")
    before = out.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
        with pytest.raises(OSError):
            export_gguf(checkpoint, out, dtype="f32")
    assert out.read_bytes() == before
    export_gguf(checkpoint, out, dtype="f32")
    assert read_gguf(out)[0]["general.file_type"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left behind
