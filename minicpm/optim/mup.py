"""μP as MiniCPM applies it (paper Table 7, DESIGN §3): initialisation, AdamW parameter groups, coordinate check.

With the width multiplier m = hidden_size / dim_model_base:
  2-D weights   init N(0, (initializer_range/√m)²), learning rate lr/m, weight decay
  1-D weights   (RMSNorm gains) init 1, the base learning rate, no weight decay
The forward-pass multipliers (scale_emb, scale_depth/√L, logits ÷ m) live in the model.

Whether the vocabulary matrices (the embedding, and the head when untied) count as 2-D weights is the switch
`embedding_in_2d_group`. True is the literal reading of Table 7 ("each 2-D tensor"), the default; False is classic
μP, where they are "vector-like": init N(0, initializer_range²), base learning rate (weight decay kept).
The coordinate check below tells them apart: under the literal reading the embedding output shrinks like 1/√m
and the logits like 1/m as the width grows; under classic μP both stay flat (tests/test_mup.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from minicpm.model.config import ModelConfig
from minicpm.model.transformer import MiniCPM

VOCAB_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


def _scaled_as_hidden(name: str, embedding_in_2d_group: bool) -> bool:
    # endswith: a wrapped model (torch.compile, FSDP) prefixes the names
    return embedding_in_2d_group or not name.endswith(VOCAB_MATRICES)


@torch.no_grad()
def init_weights(model: MiniCPM, *, embedding_in_2d_group: bool = True,
                 generator: torch.Generator | None = None) -> MiniCPM:
    """μP initialisation in place (also right after `to_empty`, whose memory holds garbage). Returns the model."""
    cfg = model.config
    hidden_std = cfg.initializer_range / math.sqrt(cfg.width_multiplier)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = hidden_std if _scaled_as_hidden(name, embedding_in_2d_group) else cfg.initializer_range
            p.normal_(0.0, std, generator=generator)
        else:
            p.fill_(1.0)
    return model


def param_groups(model: MiniCPM, *, lr: float, weight_decay: float,
                 embedding_in_2d_group: bool = True) -> list[dict]:
    """AdamW parameter groups. Each carries `lr_scale` (its lr over the base lr) and a `name`, so that a schedule
    sets `group["lr"] = base_lr * factor * group["lr_scale"]`."""
    m = model.config.width_multiplier
    hidden, vocab, gains = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            gains.append(p)
        elif _scaled_as_hidden(name, embedding_in_2d_group):
            hidden.append(p)
        else:
            vocab.append(p)
    groups = [
        dict(name="matrices", params=hidden, lr=lr / m, lr_scale=1.0 / m, weight_decay=weight_decay),
        dict(name="vocabulary", params=vocab, lr=lr, lr_scale=1.0, weight_decay=weight_decay),
        dict(name="gains", params=gains, lr=lr, lr_scale=1.0, weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


def build_model(config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int = 0, embedding_in_2d_group: bool = True) -> MiniCPM:
    """A μP-initialised model, built on the meta device and materialised once (no second copy of the weights)."""
    with torch.device("meta"):
        model = MiniCPM(config)
    if dtype is not None:
        model.to(dtype=dtype)  # still on meta: free
    model.to_empty(device=device)
    generator = None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)
    return init_weights(model, embedding_in_2d_group=embedding_in_2d_group, generator=generator)


# ---------------------------------------------------------------- coordinate check

def coord_check_config(width: int, *, mup: bool, base_width: int, layers: int = 2, head_dim: int = 16,
                       vocab_size: int = 256, seq_len: int = 32) -> ModelConfig:
    """The model of one width in a coordinate check. Standard parametrisation is μP with the base width equal to
    the width (m = 1 at every width: constant init std and learning rate, no logit divisor)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 5 // 2,
                       num_hidden_layers=layers, num_attention_heads=width // head_dim,
                       num_key_value_heads=width // head_dim, max_position_embeddings=seq_len,
                       dim_model_base=base_width if mup else width)


def coord_check(widths: Sequence[int], *, steps: int, mup: bool, base_width: int | None = None, layers: int = 2,
                head_dim: int = 16, vocab_size: int = 256, seq_len: int = 32, batch_size: int = 4,
                lr: float = 0.01, seed: int = 0, embedding_in_2d_group: bool = True) -> dict[int, dict[str, list[float]]]:
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
