"""Rotary position embedding (HF rotate_half convention, computed in fp32) and its long-context scalings.

Scalings, selected by ModelConfig.rope_scaling["type"]:
  ABF     a larger rope_theta, no scaling entry (paper section 7.4: the 128K model changes the base)
  linear  positions divided by `factor` (position interpolation)
  ntk     NTK-aware base change: theta · factor^(d/(d-2))
  yarn    YaRN: per-frequency interpolation between extrapolation and `factor`-interpolation, with the
          attention temperature folded into cos/sin (Peng et al. 2023, eqs. 19-21)
"""

from __future__ import annotations

import math

import torch

from minicpm.model.config import rope_scaling_type as scaling_type


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies (fp32, head_dim/2) and the attention factor applied to cos/sin."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    kind = scaling_type(scaling)
    if kind is None:
        return 1.0 / theta**exponents, 1.0
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return 1.0 / (factor * theta**exponents), 1.0
    if kind in ("ntk", "dynamic"):
        return 1.0 / (theta * factor ** (head_dim / (head_dim - 2))) ** exponents, 1.0
    # yarn
    original = float(scaling.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    # the correction range is clipped to head_dim - 1 (not head_dim/2 - 1), as in the YaRN reference code
    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), head_dim - 1)
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / max(high - low, 1e-3)
    extrapolate = 1.0 - ramp.clamp(0, 1)
    base = 1.0 / theta**exponents
    inv_freq = base / factor * (1 - extrapolate) + base * extrapolate
    default_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(scaling.get("attention_factor") or default_factor)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None):
    """cos and sin of shape (T, head_dim) in fp32 for integer positions of shape (T,)."""
    inv_freq, attention_factor = inv_frequencies(head_dim, theta, scaling, device=positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k (B, heads, T, head_dim) in fp32 and cast back (the official models set RoPE to fp32)."""
    dtype = q.dtype
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + _rotate_half(q32) * sin
    k_out = k32 * cos + _rotate_half(k32) * sin
    return q_out.to(dtype), k_out.to(dtype)
