"""Faithful official import/export on the MiniCPM-2B-sft and -128K fixtures (tests/fixtures/README.md): SentencePiece
prompts start with BOS and tokenize as sentencepiece does around special tokens; the chat template, auto_map and
the official modeling files survive import and export; export --to minicpm writes only RoPE types the official
config accepts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.export import export_checkpoint
from minicpm.interop.hf import import_checkpoint, load_model, save_model
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
USER_TOKENS = ["<用户>", "<AI>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
          "你好，世界！今天天气很好。", "naïve café 😀 Ω and more words", "Hello world, hello there"] * 20

# a stand-in for the official remote code: enough for transformers to resolve auto_map and load the weights
CONFIGURATION_STUB = "from transformers import LlamaConfig\n\n\nclass MiniCPMConfig(LlamaConfig):\n    model_type = 'minicpm'\n"
MODELING_STUB = """from transformers import LlamaForCausalLM, LlamaModel

from .configuration_minicpm import MiniCPMConfig


class MiniCPMModel(LlamaModel):
    config_class = MiniCPMConfig


class MiniCPMForCausalLM(LlamaForCausalLM):
    config_class = MiniCPMConfig


class MiniCPMForSequenceClassification(LlamaModel):
    config_class = MiniCPMConfig
"""


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece BPE with Llama's settings and the official user-defined tokens."""
    root = tmp_path_factory.mktemp("sp")
    (root / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=USER_TOKENS, remove_extra_whitespaces=False)
    return root / "tokenizer.model"


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text(encoding="utf-8"))


def official_dir(tmp_path: Path, name: str, sp_model: Path, *, code: bool = True) -> Path:
    """An official-layout directory: the fixture's config.json with tiny shapes (every other field kept), random
    weights, the fixture's tokenizer_config.json, a SentencePiece tokenizer.model, and (code) the modeling files."""
    raw = dict(fixture_config(name), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=400, torch_dtype="float32")
    model = build_model(ModelConfig.from_hf_dict(raw), seed=0)
    src = tmp_path / name
    save_model(model, src)
    (src / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")
    shutil.copy(FIXTURES / name / "tokenizer_config.json", src / "tokenizer_config.json")
    shutil.copy(sp_model, src / "tokenizer.model")
    if code:
        (src / "configuration_minicpm.py").write_text(CONFIGURATION_STUB)
        (src / "modeling_minicpm.py").write_text(MODELING_STUB)
    return src


# ------------------------------------------------------------------------------------------ fixtures themselves

def test_fixture_configs_read_as_the_published_models():
    sft = ModelConfig.from_hf_dict(fixture_config("minicpm-2b-sft"))
    long = ModelConfig.from_hf_dict(fixture_config("minicpm-2b-128k"))
    assert sft.non_embedding_params() == 2_442_057_984  # paper Table 2
    assert (sft.vocab_size, sft.tie_word_embeddings, sft.width_multiplier) == (122_753, True, 9)
    assert (long.vocab_size, long.tie_word_embeddings) == (127_660, False)


# ------------------------------------------------------------------------------------------ tokenizer

def render(template: str, messages: list[dict], **kwargs) -> str:
    import jinja2

    return jinja2.Environment().from_string(template).render(messages=messages, **kwargs)


@pytest.mark.parametrize("name", ["minicpm-2b-sft", "minicpm-2b-128k"])
def test_sentencepiece_prompts_start_with_bos_and_encode_as_sentencepiece(tmp_path, sp_model, name):
    from minicpm.infer.tokenizer import load_codec

    src = official_dir(tmp_path, name, sp_model, code=False)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    codec = load_codec(src)
    template = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    chat = render(template, [{"role": "user", "content": "你好 world"}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "def add(a, b):"}], add_generation_prompt=True)
    assert ("<用户>" in chat) == (name == "minicpm-2b-sft") and ("<|im_start|>" in chat) == (name != "minicpm-2b-sft")
    texts = [chat, "Hello world", "<用户>你好<AI>", "a<|im_start|>b", "a <|im_start|> b", "  two leading",
             "x </s> y", "<s>hi</s>", "tab\tand\nnewline", "emoji 🙂 ok", "trailing  "]
    for text in texts:
        # add_bos_token: true in the official tokenizer_config.json; "<s>" inside a text stays text, as in sentencepiece
        assert codec.encode(text) == [1] + sp.encode(text), text
        assert codec.decode(codec.encode(text)[1:]) == sp.decode(sp.encode(text)), text


def test_add_bos_token_false_gives_no_bos(tmp_path, sp_model):
    from minicpm.infer.tokenizer import load_codec

    src = official_dir(tmp_path, "minicpm-2b-sft", sp_model, code=False)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    (src / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=False)), encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert load_codec(src).encode("<用户>hi<AI>") == sp.encode("<用户>hi<AI>")


# ------------------------------------------------------------------------------------------ import / export

@pytest.mark.parametrize("name", ["minicpm-2b-sft", "minicpm-2b-128k"])
def test_import_and_export_keep_the_chat_template_auto_map_and_modeling_files(tmp_path, sp_model, name):
    transformers = pytest.importorskip("transformers")
    src = official_dir(tmp_path, name, sp_model)
    imported = import_checkpoint(src, tmp_path / "imported")
    exported = export_checkpoint(imported, tmp_path / "exported", to="minicpm")
    source_config = fixture_config(name)
    for out in (imported, exported):
        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"] == source_config["auto_map"]
        for file in ("tokenizer_config.json", "tokenizer.model", "configuration_minicpm.py", "modeling_minicpm.py"):
            assert (out / file).read_bytes() == (src / file).read_bytes(), file
    loaded = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    assert type(loaded).__name__ == "MiniCPMForCausalLM"
    ours = load_model(src)
    assert torch.equal(loaded.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, ours.model.layers[1].mlp.down_proj.weight)
    # the folded Llama keeps the tokenizer and its template, and not MiniCPM's remote code
    llama = export_checkpoint(src, tmp_path / "llama", to="llama")
    assert (llama / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert "auto_map" not in json.loads((llama / "config.json").read_text())
    assert not (llama / "modeling_minicpm.py").exists()


def test_auto_map_is_dropped_when_its_modeling_files_are_absent(tmp_path, sp_model):
    out = import_checkpoint(official_dir(tmp_path, "minicpm-2b-sft", sp_model, code=False), tmp_path / "out")
    assert "auto_map" not in json.loads((out / "config.json").read_text())


# ------------------------------------------------------------------------------------------ RoPE

def rope_checkpoint(tmp_path, scaling) -> Path:
    config = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling=scaling)
    return save_model(build_model(config, seed=0), tmp_path / "src")


@pytest.mark.parametrize("scaling, written", [
    ({"rope_type": "dynamic", "factor": 4.0}, {"type": "dynamic", "factor": 4.0}),
    ({"type": "linear", "factor": 2}, {"type": "linear", "factor": 2.0}),
    ({"rope_type": "linear", "factor": 1.0}, None),
])
def test_export_to_minicpm_writes_the_official_two_field_rope_scaling(tmp_path, scaling, written):
    out = export_checkpoint(rope_checkpoint(tmp_path, scaling), tmp_path / "out", to="minicpm")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == written


def test_static_ntk_is_exported_as_the_rope_theta_it_means(tmp_path):
    src = rope_checkpoint(tmp_path, {"rope_type": "ntk", "factor": 4.0})
    out = export_checkpoint(src, tmp_path / "out", to="minicpm")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] is None and config["rope_theta"] == pytest.approx(10000 * 4 ** (32 / 30))  # head_dim 32
    ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_model(out)(ids), load_model(src)(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling, fragment", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "rope_scaling type 'yarn'"),
    ({"rope_type": "dynamic", "factor": 1.0}, "rope_scaling factor 1.0 must be > 1"),
])
def test_export_to_minicpm_refuses_other_rope_types_in_one_line(tmp_path, scaling, fragment, cli):
    src = rope_checkpoint(tmp_path, scaling)
    with pytest.raises(MiniCPMError, match=fragment):
        export_checkpoint(src, tmp_path / "out", to="minicpm")
    assert not (tmp_path / "out").exists()
    result = cli("export", src, tmp_path / "out", "--to", "minicpm")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    # import keeps what our layout computes
    imported = import_checkpoint(src, tmp_path / "imported")
    assert json.loads((imported / "config.json").read_text())["rope_scaling"] == scaling
