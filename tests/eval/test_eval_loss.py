"""`minicpm eval loss`: our per-token NLL against transformers' on a Llama export of an extended checkpoint."""

import json

import pytest
import torch

from minicpm.cli import main
from minicpm.data.tokenizer import byte_level_tokenizer, save_tokenizer
from minicpm.interop.export import export_checkpoint
from minicpm.interop.hf import save_model
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

TEXT = " ".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(60))


def extended_checkpoint(path, scaling: dict, max_positions: int):
    """A tiny untied model whose RoPE is scaled from an original 256 positions, with a byte-level tokenizer."""
    tok = save_tokenizer(byte_level_tokenizer(), path / "tok")
    config = ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16,
                         max_position_embeddings=max_positions, rope_scaling=scaling, tie_word_embeddings=False)
    model = build_model(config, seed=0)
    with torch.no_grad():  # sharper attention, so that a RoPE error shows in the losses
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4)
    return save_model(model, path / "ckpt", extra_files={"tokenizer.json": tok})


@pytest.mark.parametrize("scaling,max_positions", [
    pytest.param({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256}, 2048,
                 marks=pytest.mark.slow),
    ({"rope_type": "dynamic", "factor": 8.0}, 256),
])
def test_eval_loss_per_token_equals_transformers_on_the_llama_export(tmp_path, capsys, scaling, max_positions):
    ckpt = extended_checkpoint(tmp_path, scaling, max_positions)
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["eval", "loss", str(ckpt), "--text", str(tmp_path / "text.txt"), "--per-token", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["tokens"] > 2000  # well beyond the original 256 positions
    export_checkpoint(ckpt, tmp_path / "llama", to="llama")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["rope_scaling"]["rope_type"] == \
        scaling["rope_type"]
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    ids = torch.tensor([[t["id"] for t in ours["per_token"]]])
    ids = torch.cat([torch.tensor([[byte_level_tokenizer().encode(TEXT).ids[0]]]), ids], dim=1)
    with torch.no_grad():
        theirs = -torch.log_softmax(llama(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    mine = torch.tensor([t["nll"] for t in ours["per_token"]], dtype=torch.float64)
    assert (mine - theirs).abs().max().item() < 1e-4
    assert ours["total_nll"] == pytest.approx(float(theirs.sum()), abs=1e-4 * len(mine))
    assert ours["mean_nll"] == pytest.approx(ours["total_nll"] / ours["predicted"])


def test_eval_loss_text_output_and_missing_file(tmp_path, capsys):
    ckpt = extended_checkpoint(tmp_path, {"rope_type": "dynamic", "factor": 2.0}, 256)
    (tmp_path / "t.txt").write_text("hello world")
    assert main(["eval", "loss", str(ckpt), "--text", str(tmp_path / "t.txt"), "--per-token"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tokens 11, predicted 10: total NLL") and len(lines) == 11
    assert main(["eval", "loss", str(ckpt), "--text", str(tmp_path / "absent.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.txt: no such file" in err
