"""Official HF layout in and out, broken checkpoints, and the folded Llama export against transformers."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import INDEX, WEIGHTS, import_checkpoint, load_model, read_checkpoint, save_model
from minicpm.interop.llama import export_llama
from minicpm.model.config import ModelConfig
from minicpm.model.build import build_model

transformers = pytest.importorskip("transformers")



def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, dim_model_base=16, max_position_embeddings=128)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int = 0):
    model = build_model(config, seed=seed)
    with torch.no_grad():  # gains away from 1 so that a misplaced norm weight shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied
    dict(num_key_value_heads=4, tie_word_embeddings=False),  # MHA, untied
    dict(num_key_value_heads=1, tie_word_embeddings=False, rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_scaling={"type": "ntk", "factor": 4.0}),
    # theta 500 puts YaRN's correction range past head_dim/2, where implementations that clip early differ
    dict(rope_theta=500.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
], ids=["gqa-tied", "mha-untied", "mqa-linear", "ntk", "yarn"])
def test_llama_export_matches_reference_logits(tmp_path, overrides):
    model = random_model(small_config(**overrides))
    export_llama(model, tmp_path / "llama")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(model(ids), reference(ids).logits) < 1e-5


def test_llama_export_from_a_checkpoint_directory_in_bf16_carries_the_tokenizer(tmp_path):
    model = random_model(small_config())
    save_model(model, tmp_path / "ckpt", extra_files={"tokenizer.json": "{}"})
    export_llama(tmp_path / "ckpt", tmp_path / "llama", dtype="bf16")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"
    assert (tmp_path / "llama" / "tokenizer.json").read_text() == "{}"
    tensors = load_file(tmp_path / "llama" / WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and "lm_head.weight" in tensors


def test_exported_llama_imports_back_with_identical_logits(tmp_path):
    model = random_model(small_config(tie_word_embeddings=True))
    export_llama(model, tmp_path / "llama")
    back = load_model(import_checkpoint(tmp_path / "llama", tmp_path / "back"))
    assert back.config.scale_emb == 1.0 and back.config.width_multiplier == 1.0
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        assert relative_error(back(ids), model(ids)) < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
def test_official_layout_round_trips(tmp_path, dtype, max_shard_bytes):
    model = random_model(small_config(tie_word_embeddings=False))
    out = save_model(model, tmp_path / "ckpt", dtype=dtype, max_shard_bytes=max_shard_bytes)
    assert (out / "config.json").exists() and (out / INDEX).exists() == bool(max_shard_bytes)
    config, tensors = read_checkpoint(out)
    assert config == model.config.__class__(**{**model.config.__dict__, "torch_dtype": config.torch_dtype})
    expected = {k: v.to(tensors[k].dtype) for k, v in model.state_dict().items()}
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = load_model(out, dtype="fp32")
    assert all(torch.equal(loaded.state_dict()[k], expected[k].float()) for k in expected)


def test_saving_into_an_existing_directory_replaces_stale_shards(tmp_path):
    model = random_model(small_config())
    save_model(model, tmp_path / "ckpt", max_shard_bytes=60_000)
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"kept")
    save_model(model, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", WEIGHTS, "optimizer.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_import_accepts_an_official_hf_directory(tmp_path):
    """The official repos add remote-code fields, may store the tied head as lm_head.weight, and old ones saved
    rotary inv_freq buffers."""
    model = random_model(small_config(tie_word_embeddings=True))
    src = tmp_path / "official"
    src.mkdir()
    hf = model.config.to_hf_dict() | {"auto_map": {"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
                                      "torch_dtype": "bfloat16", "_name_or_path": "openbmb/MiniCPM-2B-sft-bf16"}
    (src / "config.json").write_text(json.dumps(hf))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, src / WEIGHTS)
    (src / "tokenizer.model").write_bytes(b"sentencepiece")
    out = import_checkpoint(src, tmp_path / "ours", dtype="fp32")
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece"
    loaded = load_model(out)
    assert loaded.head_weight.dtype == torch.float32
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16().float())


# ---------------------------------------------------------------- broken checkpoints: one line naming key or file

@pytest.fixture
def checkpoint(tmp_path):
    return save_model(random_model(small_config(tie_word_embeddings=False)), tmp_path / "ckpt")


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def expect_error(path, *fragments):
    with pytest.raises(MiniCPMError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(MiniCPMError):
        load_model(path)


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint / WEIGHTS, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(checkpoint, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_wrong_shape_is_named(checkpoint):
    rewrite(checkpoint / WEIGHTS, lambda t: t.update({"lm_head.weight": torch.zeros(100, 64)}))
    expect_error(checkpoint, "model.safetensors", "lm_head.weight", "[100, 64]", "[101, 64]")


def test_unknown_dtype_is_named(checkpoint):
    rewrite(checkpoint / WEIGHTS, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.float64)}))
    expect_error(checkpoint, "model.norm.weight", "F64")


def test_unexpected_tensor_is_named(checkpoint):
    rewrite(checkpoint / WEIGHTS, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(2)}))
    expect_error(checkpoint, "unexpected tensor model.layers.2.mlp.up_proj.weight")


def test_not_safetensors_is_named(checkpoint):
    (checkpoint / WEIGHTS).write_bytes(b"PK\x03\x04 a zip archive, not safetensors")
    expect_error(checkpoint, "model.safetensors: not a safetensors file")


def test_truncated_file_is_named(checkpoint):
    data = (checkpoint / WEIGHTS).read_bytes()
    (checkpoint / WEIGHTS).write_bytes(data[:-100])
    expect_error(checkpoint, "model.safetensors: truncated")


def test_a_tied_config_with_a_different_head_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    expect_error(checkpoint, "lm_head.weight differs from model.embed_tokens.weight")


def test_missing_config_is_named(checkpoint):
    (checkpoint / "config.json").unlink()
    expect_error(checkpoint, "config.json: no such file")


def test_bad_config_dtype_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"torch_dtype": "int4"}))
    expect_error(checkpoint, "config.json: torch_dtype 'int4'")


def test_pickled_weights_are_refused_not_loaded(checkpoint, monkeypatch):
    (checkpoint / WEIGHTS).unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    expect_error(checkpoint, "pytorch_model.bin: not safetensors")


def test_a_header_that_lies_about_its_length_is_not_safetensors(checkpoint):
    (checkpoint / WEIGHTS).write_bytes(struct.pack("<Q", 10**12) + b"{}")
    expect_error(checkpoint, "not a safetensors file")


def test_import_reads_a_llama_that_transformers_saved(tmp_path):
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config)
    llama.save_pretrained(tmp_path / "hf")
    ours = load_model(import_checkpoint(tmp_path / "hf", tmp_path / "ours"))
    assert ours.config.rope_theta == 5000.0 and ours.config.rope_scaling["factor"] == 2.0
    ids = torch.randint(0, 101, (1, 50))
    with torch.no_grad():
        assert relative_error(ours(ids), llama(ids).logits) < 1e-5
