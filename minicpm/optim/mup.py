"""μP as MiniCPM applies it (paper Table 7, DESIGN §3): AdamW parameter groups and the coordinate check.

With the width multiplier m = hidden_size / dim_model_base:
  2-D hidden weights   learning rate lr/m, weight decay
  1-D weights          (RMSNorm gains) the base learning rate, no weight decay
  MoE router           lr/m, weight decay (its own group, "router")
  vocabulary matrices  (the embedding, and the head when untied) the base learning rate, weight decay: classic μP
                       (default); `embedding_in_2d_group=True` gives them lr/m (the literal reading of Table 7)
The initialisation is minicpm/model/build.py; the forward-pass multipliers (scale_emb, scale_depth/√L, logits ÷ m)
live in the model. The coordinate check below tells the two readings apart: under the literal one the embedding
output shrinks like 1/√m and the logits like 1/m as the width grows; under classic μP both stay flat
(tests/test_mup.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig
from minicpm.model.shapes import WidthRule
from minicpm.model.param_roles import GAIN, HIDDEN, ROUTER, VOCABULARY, parameter_roles
from minicpm.model.transformer import MiniCPM


def param_groups(model: MiniCPM, *, lr: float, weight_decay: float,
                 embedding_in_2d_group: bool = False, mup_lr_scaling: bool = True) -> list[dict]:
    """AdamW parameter groups by the μP role each module declares (model/param_roles.py). Each carries `lr_scale`
    (its lr over the base lr) and a `name`, so that a schedule sets `group["lr"] = base_lr * factor * group["lr_scale"]`.
    mup_lr_scaling=False gives every group the base lr (plain fine-tuning, the paper's DPO); the groups and their
    weight decay stay as they are."""
    m = model.config.width_multiplier if mup_lr_scaling else 1.0
    members: dict[str, list] = {HIDDEN: [], VOCABULARY: [], GAIN: [], ROUTER: []}
    for _, p, role in parameter_roles(model):
        if p.requires_grad:
            members[HIDDEN if role == VOCABULARY and embedding_in_2d_group else role].append(p)
    groups = [
        dict(name="matrices", params=members[HIDDEN], lr=lr / m, lr_scale=1.0 / m, weight_decay=weight_decay),
        dict(name="vocabulary", params=members[VOCABULARY], lr=lr, lr_scale=1.0, weight_decay=weight_decay),
        dict(name="gains", params=members[GAIN], lr=lr, lr_scale=1.0, weight_decay=0.0),
        dict(name="router", params=members[ROUTER], lr=lr / m, lr_scale=1.0 / m, weight_decay=weight_decay),
    ]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------- coordinate check

def coord_check_config(width: int, *, mup: bool, base_width: int, layers: int = 2, head_dim: int = 16,
                       vocab_size: int = 256, seq_len: int = 32) -> ModelConfig:
    """The model of one width in a coordinate check. Standard parametrisation is μP with the base width equal to
    the width (m = 1 at every width: constant init std and learning rate, no logit divisor)."""
    return ModelConfig(vocab_size=vocab_size, **WidthRule(head_dim=head_dim).fields(width, layers),
                       max_position_embeddings=seq_len, dim_model_base=base_width if mup else width)


def coord_check(widths: Sequence[int], *, steps: int, mup: bool, base_width: int | None = None, layers: int = 2,
                head_dim: int = 16, vocab_size: int = 256, seq_len: int = 32, batch_size: int = 4,
                lr: float = 0.01, seed: int = 0, embedding_in_2d_group: bool = False) -> dict[int, dict[str, list[float]]]:
    """Activation scales per width, module and step: {width: {module: [mean|x| at t=0, ..., t=steps]}}.

    t=0 is the initialisation, t=k the forward after k AdamW steps on one fixed batch (as in microsoft/mup's
    coord check). Modules: "embedding" (after scale_emb), "layers.{i}.attn" and "layers.{i}.mlp" (branch outputs
    before the residual multiplier), "layers.{i}" (the residual stream after block i) and "logits".
    Under μP the scales stay flat in width; under standard parametrisation they grow with it.
    """
    base_width = base_width or min(widths)
    data = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=data)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    result: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        config = coord_check_config(width, mup=mup, base_width=base_width, layers=layers, head_dim=head_dim,
                                    vocab_size=vocab_size, seq_len=seq_len)
        model = build_model(config, seed=seed, embedding_in_2d_group=embedding_in_2d_group)
        optimizer = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.0,
                                                   embedding_in_2d_group=embedding_in_2d_group), betas=(0.9, 0.95))
        scales: dict[str, list[float]] = {}
        hooks = _record_scales(model, scales)
        try:
            for t in range(steps + 1):
                logits = model(inputs)
                scales.setdefault("logits", []).append(logits.detach().abs().mean().item())
                if t == steps:
                    break
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            for hook in hooks:
                hook.remove()
        result[width] = scales
    return result


def _record_scales(model: MiniCPM, scales: dict[str, list[float]]) -> list:
    def recorder(name: str, multiplier: float = 1.0):
        def hook(module, args, output):
            scales.setdefault(name, []).append(output.detach().abs().mean().item() * multiplier)
        return hook

    hooks = [model.model.embed_tokens.register_forward_hook(recorder("embedding", model.config.scale_emb))]
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(recorder(f"layers.{i}.attn")))
        hooks.append(layer.mlp.register_forward_hook(recorder(f"layers.{i}.mlp")))
        hooks.append(layer.register_forward_hook(recorder(f"layers.{i}")))
    return hooks


def width_spread(result: dict[int, dict[str, list[float]]], module: str, t: int = -1) -> float:
    """max/min over widths of one module's scale at step t: 1 is perfectly flat in width."""
    values = [scales[module][t] for scales in result.values()]
    return max(values) / min(values)
