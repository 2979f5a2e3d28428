"""Sparse upcycling (Komatsuzaki et al. 2022; paper section 6): a dense checkpoint becomes an MoE checkpoint.

Every tensor of the dense model is copied; each layer's MLP becomes E experts, each an exact copy of it
(gate_proj → w1, up_proj → w3, down_proj → w2, the official MiniCPM-MoE keys), and each layer gets a fresh router
N(0, 0.1²). With softmax → top-k → renormalise the top-k weights sum to 1, so identical experts compute the dense
MLP exactly: the MoE's logits at step 0 are the dense model's. Training continues from the written directory as a
weights-only start (`run.init_weights_from`), with the MoE's model.* fields.

The flat start: while the experts are identical the output does not depend on the router's weights, so the task
loss gives the router no gradient; only the balance loss moves it, and the experts drift apart slowly, through the
different tokens each receives. Two remedies, off by default (either breaks the step-0 equality):
  noise            each expert's copy gets independent Gaussian noise of `noise` × the std of its matrix;
  reinit_fraction  Drop-Upcycling (Nakamura et al. 2025, r = 0.5 best there): in each expert an independent random
                   fraction r of the intermediate units is re-drawn from N(mean, std²) of the dense matrix (those
                   rows of w1 and w3 and the same columns of w2); the rest stays copied.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import PathLike, save_state
from minicpm.model.config import ModelConfig
from minicpm.model.param_roles import ROUTER_INIT_STD

_DENSE_TO_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def moe_config(dense: ModelConfig, *, experts: int, top_k: int) -> ModelConfig:
    """The dense config with E experts of top-k routing (a one-line error for a bad pair or an MoE source)."""
    if dense.num_experts:
        raise MiniCPMError(f"upcycle: the checkpoint is already an MoE ({dense.num_experts} experts)")
    if not isinstance(experts, int) or experts < 1:
        raise MiniCPMError(f"upcycle: --experts must be an integer >= 1, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise MiniCPMError(f"upcycle: --top-k must be an integer in 1..{experts} (the experts), got {top_k!r}")
    return dataclasses.replace(dense, num_experts=experts, num_experts_per_tok=top_k)


def upcycle_state(dense: ModelConfig, state: Mapping[str, torch.Tensor], *, experts: int = 8, top_k: int = 2,
                  seed: int = 0, noise: float = 0.0, reinit_fraction: float = 0.0
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(MoE config, MoE state dict in the official keys) from a dense config and state dict."""
    config = moe_config(dense, experts=experts, top_k=top_k)
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise MiniCPMError(f"upcycle: --noise must be a finite number >= 0, got {noise!r}")
    if not (isinstance(reinit_fraction, (int, float)) and 0 <= reinit_fraction <= 1):
        raise MiniCPMError(f"upcycle: --reinit-fraction must be a number in [0, 1], got {reinit_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state.items() if ".mlp." not in k}
    for i in range(dense.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp"
        dense_mlp = {}
        for name, expert_name in _DENSE_TO_EXPERT.items():
            key = f"{prefix}.{name}.weight"
            if key not in state:
                raise MiniCPMError(f"upcycle: the dense checkpoint has no tensor {key}")
            dense_mlp[expert_name] = state[key]
        dtype = dense_mlp["w1"].dtype
        out[f"{prefix}.gate.weight"] = (torch.randn(experts, dense.hidden_size, generator=generator)
                                        * ROUTER_INIT_STD).to(dtype)
        for e in range(experts):
            copies = _expert_copy(dense_mlp, noise, reinit_fraction, generator)
            for expert_name, tensor in copies.items():
                out[f"{prefix}.experts.{e}.{expert_name}.weight"] = tensor
    return config, out


def _expert_copy(dense: dict[str, torch.Tensor], noise: float, reinit_fraction: float,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    copies = {name: w.detach().float().clone() for name, w in dense.items()}
    if noise:
        for name, w in copies.items():
            w += noise * dense[name].float().std() * torch.randn(w.shape, generator=generator)
    drop = round(reinit_fraction * copies["w1"].shape[0])
    if drop:
        units = torch.randperm(copies["w1"].shape[0], generator=generator)[:drop]
        for name in ("w1", "w3"):  # rows: the intermediate units' input weights
            ref = dense[name].float()
            copies[name][units] = ref.mean() + ref.std() * torch.randn(drop, ref.shape[1], generator=generator)
        ref = dense["w2"].float()  # columns: their output weights
        copies["w2"][:, units] = ref.mean() + ref.std() * torch.randn(ref.shape[0], drop, generator=generator)
    return {name: w.to(dense[name].dtype) for name, w in copies.items()}


def upcycle(dense_checkpoint: PathLike, out_dir: PathLike, *, experts: int = 8, top_k: int = 2, seed: int = 0,
            noise: float = 0.0, reinit_fraction: float = 0.0, overwrite: bool = False) -> Path:
    """Write an MoE checkpoint (official MiniCPM-MoE layout, the dense checkpoint's dtype and tokenizer files) to
    `out_dir` from a dense checkpoint of any layout (ours, DCP shards, official HF; a run directory gives its newest
    checkpoint that verifies). `out_dir` follows files.check_output: new (or an empty directory) unless overwrite,
    never the source."""
    from minicpm.checkpoints.verify import resolve_verified_weights, warn_on_stderr
    from minicpm.checkpoints.weights import consolidate
    from minicpm.files import check_output, output_directory
    from minicpm.interop.hf import TOKENIZER_FILES

    inputs = [dense_checkpoint, resolve_verified_weights(dense_checkpoint, warn_on_stderr)]
    dense_checkpoint = inputs[-1]
    check_output(out_dir, inputs=inputs, overwrite=overwrite)  # before the weights are read
    dense, state = consolidate(dense_checkpoint)
    config, moe_state = upcycle_state(dense, state, experts=experts, top_k=top_k, seed=seed, noise=noise,
                                      reinit_fraction=reinit_fraction)
    source = Path(dense_checkpoint)
    tokenizer = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    with output_directory(out_dir, inputs=inputs, overwrite=overwrite) as tmp:
        save_state(config, moe_state, tmp, dtype=next(iter(state.values())).dtype, extra_files=tokenizer)
    return Path(out_dir)
