"""μP as MiniCPM applies it (paper Table 7, DESIGN §3): AdamW parameter groups and the coordinate check.

With the width multiplier m = hidden_size / dim_model_base:
  2-D hidden weights   learning rate lr/m, weight decay
  1-D weights          (RMSNorm gains) the base learning rate, no weight decay
  MoE router           lr/m, weight decay (its own group, "router")
  vocabulary matrices  (the embedding, and the head when untied) the base learning rate, weight decay: classic μP
                       (default); `embedding_in_2d_group=True` gives them lr/m (the literal reading of Table 7)
The initialisation is minicpm/model/build.py; the forward-pass multipliers (scale_emb, the residual multiplier,
logits ÷ m) live in the model.

Depth (model.depth_scaling): under "minicpm" nothing here depends on L (the branches × scale_depth/√L). Under
"completep" (Dey et al. 2025, arXiv:2505.01618; the rules as in its authors' reference, EleutherAI/nanoGPT-mup branch
completep) the branches are × (L/L_base)^-α, the hidden matrices' and the blocks' gains' learning rates
× (L/L_base)^(α-1) (= 1 at CompleteP's α = 1) and AdamW's epsilon × (L/L_base)^-α; inits do not depend on depth.
(That reference also scales epsilon and the hidden weight decay with width, rules MiniCPM's width μP does not apply.) The coordinate check below tells the two readings apart: under the literal one the embedding
output shrinks like 1/√m and the logits like 1/m as the width grows; under classic μP both stay flat
(tests/test_mup.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from minicpm.model.build import build_model
from minicpm.model.config import COMPLETEP_ALPHA, ModelConfig
from minicpm.model.shapes import WidthRule
from minicpm.model.param_roles import GAIN, HIDDEN, ROUTER, VOCABULARY, parameter_roles
from minicpm.model.transformer import MiniCPM


def depth_lr_scale(config: ModelConfig) -> float:
    """CompleteP's learning-rate factor for the parameters inside the blocks: (L/L_base)^(α-1); 1 under minicpm."""
    if config.depth_scaling != "completep":
        return 1.0
    return config.depth_multiplier ** (COMPLETEP_ALPHA - 1)


def depth_eps_scale(config: ModelConfig) -> float:
    """CompleteP's AdamW epsilon factor (L/L_base)^-α (an update of size O(1/L) per block is not swamped by a fixed
    epsilon in deep models); 1 under minicpm."""
    return config.depth_multiplier ** -COMPLETEP_ALPHA if config.depth_scaling == "completep" else 1.0


def param_groups(model: MiniCPM, *, lr: float, weight_decay: float, embedding_in_2d_group: bool = False,
                 mup_lr_scaling: bool = True, eps: float | None = None) -> list[dict]:
    """AdamW parameter groups by the μP role each module declares (model/param_roles.py). Each carries `lr_scale`
    (its lr over the base lr) and a `name`, so that a schedule sets `group["lr"] = base_lr * factor * group["lr_scale"]`.
    mup_lr_scaling=False gives every group the base lr (plain fine-tuning, the paper's DPO); the groups and their
    weight decay stay as they are. With `eps` (the base AdamW epsilon) each group also gets its epsilon, scaled by
    depth under completep."""
    config = model.config
    m = config.width_multiplier if mup_lr_scaling else 1.0
    depth = depth_lr_scale(config) if mup_lr_scaling else 1.0
    members: dict[str, list] = {HIDDEN: [], VOCABULARY: [], GAIN: [], ROUTER: []}
    for _, p, role in parameter_roles(model):
        if p.requires_grad:
            members[HIDDEN if role == VOCABULARY and embedding_in_2d_group else role].append(p)
    # the gains group holds the final norm's gain too: CompleteP leaves it at the base lr, which equals the blocks'
    # gains' (L/L_base)^(α-1) at α = 1
    groups = [
        dict(name="matrices", params=members[HIDDEN], lr_scale=depth / m, weight_decay=weight_decay),
        dict(name="vocabulary", params=members[VOCABULARY], lr_scale=1.0, weight_decay=weight_decay),
        dict(name="gains", params=members[GAIN], lr_scale=1.0, weight_decay=0.0),
        dict(name="router", params=members[ROUTER], lr_scale=depth / m, weight_decay=weight_decay),
    ]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
        if eps is not None:
            group["eps"] = eps * depth_eps_scale(config)
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
            train_steps(model, optimizer, inputs, labels, steps,
                        lambda logits: scales.setdefault("logits", []).append(logits.detach().abs().mean().item()))
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


# ---------------------------------------------------------------- coordinate check across depth

def depth_coord_check(depths: Sequence[int], *, steps: int, depth_scaling: str, depth_base: int | None = None,
                      width: int = 64, head_dim: int = 16, vocab_size: int = 256, seq_len: int = 32,
                      batch_size: int = 4, lr: float = 0.01, seed: int = 0) -> dict[int, dict[str, float]]:
    """The blocks' share of the residual stream, per coordinate, across depth: {depth: {"init": mean|b| at
    initialisation, "update": mean|b_t - b_0| after `steps` AdamW steps on one fixed batch}}, where b is the residual
    stream after the last block (the final norm's input) less the embedding output: the sum of every branch × its
    multiplier. The width is fixed; depth_base (completep) defaults to the smallest depth.

    CompleteP keeps the update flat in depth: L branch updates, correlated, each × L_base/L, add up to O(1); at init
    the L independent branches add in quadrature, so the blocks' share shrinks like 1/√L. Under minicpm's
    scale_depth/√L the init is flat and the coherent update grows like √L."""
    data = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=data)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    base = (depth_base or min(depths)) if depth_scaling == "completep" else None
    result: dict[int, dict[str, float]] = {}
    for depth in depths:
        config = ModelConfig(vocab_size=vocab_size, **WidthRule(head_dim=head_dim).fields(width, depth),
                             max_position_embeddings=seq_len, dim_model_base=width, depth_scaling=depth_scaling,
                             depth_base=base)
        model = build_model(config, seed=seed)
        optimizer = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.0, eps=1e-8), betas=(0.9, 0.95))
        streams: list[torch.Tensor] = []
        embedded: list[torch.Tensor] = []
        hooks = [model.model.norm.register_forward_pre_hook(lambda module, args: streams.append(args[0].detach())),
                 model.model.embed_tokens.register_forward_hook(
                     lambda module, args, output: embedded.append(output.detach() * config.scale_emb))]
        try:
            train_steps(model, optimizer, inputs, labels, steps)
        finally:
            for hook in hooks:
                hook.remove()
        blocks = [stream - embedding for stream, embedding in zip(streams, embedded)]  # what the blocks added
        result[depth] = {"init": blocks[0].abs().mean().item(), "update": (blocks[-1] - blocks[0]).abs().mean().item()}
    return result


def depth_spread(result: dict[int, dict[str, float]], key: str) -> float:
    """max/min over depths of one size ("init" or "update"): 1 is perfectly flat in depth."""
    values = [sizes[key] for sizes in result.values()]
    return max(values) / min(values)


def train_steps(model, optimizer, inputs: torch.Tensor, labels: torch.Tensor, steps: int, observe=None) -> None:
    """`steps` plain next-token steps of a coordinate check, then one more forward (the state after the last
    update); `observe(logits)` sees every forward's logits."""
    for t in range(steps + 1):
        logits = model(inputs)
        if observe is not None:
            observe(logits)
        if t == steps:
            return
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
