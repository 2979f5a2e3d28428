"""GGUF export of a MiniCPM-MoE: llama.cpp's MoE tensors (router ffn_gate_inp, experts stacked as ffn_gate_exps /
ffn_up_exps / ffn_down_exps) and expert counts, read back with gguf's reader; the read-back tensors compute our MoE
layer's output."""

import numpy as np
import pytest
import torch

from minicpm.interop.hf import read_checkpoint
from minicpm.interop.mixtral import fold_mup_moe

gguf = pytest.importorskip("gguf")
from minicpm.interop.gguf import export_gguf  # noqa: E402  (after the skip: it needs gguf)
from test_gguf import (GGML_TYPES, assert_close_for_type, read_gguf, small_config, tokenizer_dir,  # noqa: E402,F401
                       values, write_checkpoint)

EXPERTS, TOP_K = 4, 2


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer_dir):  # noqa: F811 (the fixture imported above)
    config = small_config(num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return write_checkpoint(tmp_path_factory.mktemp("moe") / "tiny-moe", config, tokenizer_dir)


def expected_moe_tensors(checkpoint, arch):
    """The MoE tensors llama.cpp reads, from the checkpoint: (E, out, in) stacks of each matrix of the experts."""
    config, state = read_checkpoint(checkpoint)
    state = {k: v.float() for k, v in state.items()}
    if arch == "llama":  # the same fold as the Mixtral export (w2 × scale_depth/√L), official names kept
        state = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in fold_mup_moe(config, state).items()}
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        out[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "gate.weight"].numpy()
        for gguf_name, ours in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            out[f"blk.{i}.{gguf_name}.weight"] = torch.stack(
                [state[f"{p}experts.{e}.{ours}.weight"] for e in range(EXPERTS)]).numpy()
    return out


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_moe_tensors_read_back_as_the_checkpoints_stacked_experts(moe_checkpoint, tmp_path, arch, dtype):
    fields, tensors = read_gguf(export_gguf(moe_checkpoint, tmp_path / "moe.gguf", arch=arch, dtype=dtype))
    assert fields[f"{arch}.expert_count"] == EXPERTS and fields[f"{arch}.expert_used_count"] == TOP_K
    want = expected_moe_tensors(moe_checkpoint, arch)
    assert not any(".ffn_gate.weight" in n or ".ffn_up.weight" in n or ".ffn_down.weight" in n for n in tensors)
    for name, array in want.items():
        got = values(tensors[name])
        assert got.shape == array.shape, name  # ggml's ne: (in, out, E), innermost first
        if dtype == "q8_0" and "ffn_gate_inp" in name:  # 4 x 64: rows of whole blocks, quantized too
            assert tensors[name].tensor_type.name == "Q8_0"
        assert_close_for_type(got, array, dtype, name)
    assert {n for n in tensors if n.startswith("blk.0.")} == {
        f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                      "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}


def test_the_gguf_experts_compute_our_moe_layer(moe_checkpoint, tmp_path):
    """llama.cpp's MoE FFN from the read-back tensors (softmax → top-k → renormalise, SwiGLU of the stacked
    experts) on the same inputs gives our layer's output: the stacks are in the order llama.cpp indexes them."""
    _, tensors = read_gguf(export_gguf(moe_checkpoint, tmp_path / "moe.gguf", arch="minicpm", dtype="f32"))
    from minicpm.interop.hf import load_model

    model = load_model(moe_checkpoint)
    config = model.config
    moe = model.model.layers[1].mlp
    x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = moe(x).numpy()
    router, gate, up, down = (values(tensors[f"blk.1.{n}.weight"]).astype(np.float64)
                              for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    xs = x.double().numpy()
    logits = xs @ router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(xs)
    for t in range(len(xs)):
        top = np.argsort(-probs[t])[:TOP_K]
        for e in top:
            h = gate[e] @ xs[t]
            out[t] += probs[t, e] / probs[t, top].sum() * (down[e] @ (h / (1 + np.exp(-h)) * (up[e] @ xs[t])))
    np.testing.assert_allclose(ours, out, rtol=1e-4, atol=1e-5)


def test_minicpm_export_to_gguf_writes_an_moe(moe_checkpoint, tmp_path, cli):
    out = tmp_path / "moe.gguf"
    result = cli("export", moe_checkpoint, out, "--to", "gguf", "--gguf-type", "f32")
    assert result.returncode == 0, result.stderr
    fields, tensors = read_gguf(out)
    assert fields["minicpm.expert_count"] == EXPERTS
    assert values(tensors["blk.0.ffn_down_exps.weight"]).shape == (EXPERTS, 64, 160)
