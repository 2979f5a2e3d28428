"""Parallelism applied from outside the model: activation checkpointing, compile, FSDP2 (2 gloo processes).

Run as a script under torchrun, this file is the FSDP worker that the 2-process test launches.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minicpm.data import IGNORE_INDEX
from minicpm.errors import MiniCPMError
from minicpm.model.config import preset
from minicpm.model.transformer import MiniCPM
from minicpm.train import distributed
from minicpm.train.distributed import apply_activation_checkpointing, apply_compile
from minicpm.train.losses import lm_loss


def _batch(vocab: int, rows: int = 4, seq: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX  # rows carry different numbers of loss tokens
    return ids, labels


def _loss_and_grads(model, ids, labels, chunk_size=None):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model.hidden_states(ids), model.head_weight, labels, chunk_size) / (labels != IGNORE_INDEX).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return MiniCPM(preset("tiny"))


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_gives_plain_loss_and_gradients(tiny, mode):
    ids, labels = _batch(tiny.config.vocab_size)
    plain = _loss_and_grads(tiny, ids, labels)
    keys = list(tiny.state_dict())
    apply_activation_checkpointing(tiny, mode)
    assert list(tiny.state_dict()) == keys  # official names survive
    _assert_same(_loss_and_grads(tiny, ids, labels), plain)
    _assert_same(_loss_and_grads(tiny, ids, labels, chunk_size=7), plain)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_op_counts(model, ids, labels):
    loss = lm_loss(model.hidden_states(ids), model.head_weight, labels)
    with _OpCounter() as counter:
        loss.backward()
    return counter.counts


@pytest.mark.parametrize("mode", ["none", "block", "selective"])
def test_checkpointing_modes_recompute_what_they_promise(tiny, mode):
    ids, labels = _batch(tiny.config.vocab_size)
    plain = _backward_op_counts(copy.deepcopy(tiny), ids, labels)
    counts = _backward_op_counts(apply_activation_checkpointing(tiny, mode), ids, labels)
    layers = tiny.config.num_hidden_layers
    extra_silu = counts.get("silu", 0) - plain.get("silu", 0)
    extra_mm = counts.get("mm", 0) - plain.get("mm", 0)
    # per block: SiLU once in the MLP; 7 projections are matmuls, of which the recomputation needs 6 (it stops
    # early: down_proj's output is saved for nothing)
    assert extra_silu == {"none": 0, "block": layers, "selective": layers}[mode]
    assert extra_mm == {"none": 0, "block": 6 * layers, "selective": 0}[mode]


def test_unknown_checkpointing_mode_is_a_user_error(tiny):
    with pytest.raises(MiniCPMError, match="activation_checkpointing"):
        apply_activation_checkpointing(tiny, "everything")


@pytest.mark.slow
def test_compiled_blocks_give_eager_loss_and_gradients(tiny):
    ids, labels = _batch(tiny.config.vocab_size)
    eager = _loss_and_grads(tiny, ids, labels)
    keys = list(tiny.state_dict())
    apply_activation_checkpointing(tiny, "block")
    apply_compile(tiny)
    assert list(tiny.state_dict()) == keys
    # inductor may fuse and reorder float ops: equal to float32 rounding, not bitwise
    _assert_same(_loss_and_grads(tiny, ids, labels), eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- FSDP2 with 2 gloo processes

@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(tmp_path):
    """FSDP2 + selective checkpointing + chunked loss + fused AdamW on 2 ranks == plain model on the whole batch."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sharded"] and result["world_size"] == 2
    assert result["max_loss_diff"] < 1e-5, result
    assert result["max_grad_norm_diff"] < 1e-5, result
    assert result["max_grad_diff"] < 1e-5, result
    # Adam's first steps are nearly lr * sign(grad): last-bit differences in near-zero gradients move a weight by
    # a fraction of lr (1e-2) at most; a sharding error would move many by the full lr
    assert result["max_param_diff"] < 1e-3, result


def _fsdp_worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    info = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    model = MiniCPM(preset("tiny"))
    reference = copy.deepcopy(model)
    apply_activation_checkpointing(model, "selective")
    distributed.apply_fsdp(model, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    rows = 4
    diffs = {"max_loss_diff": 0.0, "max_grad_norm_diff": 0.0, "max_grad_diff": 0.0, "max_param_diff": 0.0}
    for step in range(3):
        ids, labels = _batch(model.config.vocab_size, rows=rows, seed=step)
        count = (labels != IGNORE_INDEX).sum()
        mine = slice(info.rank * rows // info.world_size, (info.rank + 1) * rows // info.world_size)
        loss = lm_loss(model.hidden_states(ids[mine]), model.head_weight, labels[mine], 5) / count
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = loss.detach().clone()
        dist.all_reduce(total)

        ref_loss = lm_loss(reference.hidden_states(ids), reference.head_weight, labels) / count
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            diffs["max_grad_diff"] = max(diffs["max_grad_diff"], (grad - ref_grads[name]).abs().max().item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        diffs["max_loss_diff"] = max(diffs["max_loss_diff"], abs(total.item() - ref_loss.item()))
        diffs["max_grad_norm_diff"] = max(diffs["max_grad_norm_diff"], abs(norm.item() - ref_norm.item()))
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        diffs["max_param_diff"] = max(diffs["max_param_diff"], (full - ref_params[name]).abs().max().item())
    if info.is_main:
        result = {**diffs, "sharded": distributed.fsdp_applied(model), "world_size": info.world_size}
        Path(out).write_text(json.dumps(result))
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])


@pytest.mark.parametrize("switch, expected", [("bf16", "bf16"), ("fp32", "fp32")])
def test_auto_dtype_resolves_as_the_environment_switch_says_and_explicit_dtypes_stay(monkeypatch, switch, expected):
    monkeypatch.setenv("MINICPM_AUTO_DTYPE", switch)
    cpu = torch.device("cpu")
    assert distributed.resolve_dtype("auto", cpu) == expected
    assert (distributed.resolve_dtype("fp32", cpu), distributed.resolve_dtype("bf16", cpu)) == ("fp32", "bf16")
    monkeypatch.setenv("MINICPM_AUTO_DTYPE", "fp7")
    with pytest.raises(MiniCPMError, match="MINICPM_AUTO_DTYPE='fp7': expected bf16 or fp32"):
        distributed.resolve_dtype("auto", cpu)
    monkeypatch.delenv("MINICPM_AUTO_DTYPE")
    assert distributed.resolve_dtype("auto", cpu) == ("bf16" if distributed.has_fast_bf16(cpu) else "fp32")
