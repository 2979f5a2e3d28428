"""A human-readable summary of a ModelConfig: fields, parameter counts, μP constants, training FLOPs per token."""

from __future__ import annotations

import dataclasses
import math

from minicpm.model.config import DEPTH_FIELDS, MOE_FIELDS, ModelConfig


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def _count(n: int) -> str:
    return f"{n:>15,}  ({n / 1e9:.3f}B)" if n >= 1e8 else f"{n:>15,}  ({n / 1e6:.2f}M)"


def describe(config: ModelConfig, *, seq_len: int | None = None, title: str = "model") -> str:
    """The config as a table, then parameters (total / embedding / non-embedding), μP constants and FLOPs/token."""
    seq_len = seq_len or config.max_position_embeddings
    fields = [(f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config)
              if (f.name not in MOE_FIELDS or config.num_experts)
              and (f.name not in DEPTH_FIELDS or config.depth_scaling != "minicpm")]
    fields.append(("head_dim", str(config.head_dim)))
    params = [("total", _count(config.total_params())),
              ("embedding", _count(config.embedding_params())),
              ("non-embedding (N)", _count(config.non_embedding_params()))]
    if config.num_experts:
        # paper section 6 counts MiniCPM-MoE without the embedding: 13.6B "total" is N (every expert, the routers
        # and the norm gains), 4B "active" is N with only top-k experts per layer
        params[-1] = ("non-embedding (N; the paper's MoE total)", _count(config.non_embedding_params()))
        params.append((f"active non-embedding (top-{config.num_experts_per_tok} experts)",
                       _count(config.active_non_embedding_params())))
    m = config.width_multiplier
    mup = [("width multiplier m = d/dim_model_base", f"{m:g}"),
           ("2-D init std  initializer_range/√m", f"{config.initializer_range / math.sqrt(m):.4g}"),
           ("2-D learning rate", f"base lr × {1 / m:.4g}"),
           ("embedding output ×", f"{config.scale_emb:g}"),
           ("residual branches ×  " + ("L_base/L" if config.depth_scaling == "completep" else "scale_depth/√L"),
            f"{config.residual_scale:.4g}"),
           ("logits ÷", f"{m:g}")]
    flops = config.flops_per_token(seq_len)
    lines = [title, *_rows(fields), "parameters", *_rows(params), "muP", *_rows(mup),
             f"training FLOPs per token at sequence {seq_len}: {flops:.4g}  "
             f"(6·N{'_active' if config.num_experts else ''} + 6·d·vocab for the head + 12·L·d·seq for attention)"]
    return "\n".join(lines)
