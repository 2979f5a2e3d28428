"""`minicpm export --to mixtral`: an MoE model as transformers' MixtralForCausalLM, μP folded in, equal logits."""

import pytest
import torch
from transformers import MixtralForCausalLM

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import save_model
from minicpm.interop.mixtral import export_mixtral
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig, preset



def tiny_moe(**overrides):
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, rope_theta=50000.0)
    return ModelConfig(**(fields | overrides))


@pytest.mark.parametrize("tied", [True, False])
def test_mixtral_export_matches_our_logits(tmp_path, tied, cli):
    model = build_model(tiny_moe(tie_word_embeddings=tied), seed=3).eval()
    save_model(model, tmp_path / "moe")
    result = cli("export", tmp_path / "moe", tmp_path / "mx", "--to", "mixtral")
    assert result.returncode == 0, result.stderr
    reference = MixtralForCausalLM.from_pretrained(tmp_path / "mx", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    # as the dense Llama export is held (tests/test_interop.py): relative error of the whole logit tensor; every
    # logit also agrees to 1e-4 (fp32 rounding of the folded weights)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    assert (ours - theirs).abs().max().item() < 1e-4


def test_a_dense_model_does_not_export_as_mixtral(tmp_path):
    with pytest.raises(MiniCPMError, match="dense"):
        export_mixtral(build_model(preset("tiny")), tmp_path / "mx")
