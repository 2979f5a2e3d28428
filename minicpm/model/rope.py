"""Rotary position embedding (HF rotate_half convention, in fp32) and its long-context scalings, computed as
transformers computes them (transformers.modeling_rope_utils, v5: same formulas, same fp32 operation order).

The type is ModelConfig.rope_scaling["rope_type"] (or the 4.x key "type"); d = head_dim, i = 0..d/2-1,
inv_freq_i = theta^(-2i/d), L0 = max_position_embeddings unless the scaling names original_max_position_embeddings:
  (none)    plain RoPE; ABF (paper section 7.4) is only a larger rope_theta
  linear    position interpolation: inv_freq / factor
  ntk       static NTK-aware base change theta * factor^(d/(d-2)) (bloc97); not a transformers type, so a Llama
            export writes it as rope_theta
  dynamic   dynamic NTK: for a sequence of n > L0 = max_position_embeddings tokens the base is
            theta * (factor*n/L0 - (factor-1))^(d/(d-2)); no change up to L0, so it depends on the current length
  yarn      YaRN (Peng et al. 2023, eqs. 19-21): dims rotating more than beta_fast times over L0 keep their
            frequency, those below beta_slow are interpolated by factor, a linear ramp between; cos and sin are both
            multiplied by the attention factor (0.1 ln(factor) + 1 unless given), so q.k scales by its square
  longrope  LongRoPE (su): inv_freq_i / short_factor_i up to L0 tokens, / long_factor_i beyond; cos and sin times
            sqrt(1 + ln(s)/ln(L0)), s = max_position_embeddings / L0 (or factor)
  llama3    Llama 3.1: wavelengths above L0/low_freq_factor interpolated by factor, below L0/high_freq_factor kept,
            smoothly in between

Where transformers keeps state (dynamic: the frequencies of the longest sequence seen until one shorter than L0
comes; longrope: the long factors while a sequence is longer than L0), RotaryCache computes from the current
length alone; the two agree for a fresh transformers model and during one generation (lengths only grow).
"""

from __future__ import annotations

import json
import math

import torch

from minicpm.model.config import ModelConfig, rope_scaling_type as scaling_type


def _exponents(head_dim: int, device) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """The NTK-aware base: theta * factor^(d/(d-2)), so that the slowest dimension is interpolated by `factor`."""
    return theta * factor ** (head_dim / (head_dim - 2))


def original_length(scaling: dict | None, max_position_embeddings: int | None) -> int | None:
    """L0: the length the scaling extends from (the scaling's original_max_position_embeddings, as transformers
    fills it in for yarn, longrope and llama3; max_position_embeddings otherwise)."""
    if scaling and scaling.get("original_max_position_embeddings") and scaling_type(scaling) != "dynamic":
        return int(scaling["original_max_position_embeddings"])
    return max_position_embeddings


def _needs(value, what: str):
    if value is None:
        raise ValueError(f"RoPE scaling needs {what}")
    return value


def _factor_and_original(scaling: dict, max_position_embeddings: int | None) -> tuple[float, int]:
    # yarn and longrope without a factor take it as max_position_embeddings / L0 (DeepSeek-V3, Phi-3 configs)
    original = _needs(original_length(scaling, max_position_embeddings), "max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:
        factor = _needs(max_position_embeddings, "max_position_embeddings") / original
    return factor, original


def _yarn_attention_factor(scaling: dict, factor: float) -> float:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
    return float(mscale(factor))


def _longrope_attention_factor(scaling: dict, factor: float, original: int) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn(head_dim: int, theta: float, scaling: dict, max_position_embeddings: int | None,
          device) -> tuple[torch.Tensor, float]:
    factor, original = _factor_and_original(scaling, max_position_embeddings)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original length
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    # clipped to head_dim - 1 (not head_dim/2 - 1), as in transformers and the YaRN reference code
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    extrapolate = 1 - ramp
    wavelengths = theta ** _exponents(head_dim, device)
    inv_freq = 1.0 / (factor * wavelengths) * (1 - extrapolate) + 1.0 / wavelengths * extrapolate
    return inv_freq, _yarn_attention_factor(scaling, factor)


def _longrope(head_dim: int, theta: float, scaling: dict, max_position_embeddings: int | None, seq_len: int | None,
              device) -> tuple[torch.Tensor, float]:
    factor, original = _factor_and_original(scaling, max_position_embeddings)
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
    return 1.0 / (ext * theta ** _exponents(head_dim, device)), _longrope_attention_factor(scaling, factor, original)


def _llama3(head_dim: int, theta: float, scaling: dict, device) -> torch.Tensor:
    inv_freq = 1.0 / theta ** _exponents(head_dim, device)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(medium, smoothed, scaled)


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None, *,
                    max_position_embeddings: int | None = None,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies (fp32, head_dim/2) and the attention factor applied to cos/sin, for a
    sequence of `seq_len` tokens (None: at most L0, as transformers at initialisation)."""
    kind = scaling_type(scaling)
    if kind is None:
        return 1.0 / theta ** _exponents(head_dim, device), 1.0
    if kind == "linear":
        return 1.0 / theta ** _exponents(head_dim, device) / scaling["factor"], 1.0
    if kind == "ntk":
        return 1.0 / ntk_theta(theta, scaling["factor"], head_dim) ** _exponents(head_dim, device), 1.0
    if kind == "dynamic":
        original = _needs(max_position_embeddings, "max_position_embeddings")
        n = max(seq_len or original, original)
        factor = scaling["factor"]
        base = theta * ((factor * n / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** _exponents(head_dim, device), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_position_embeddings, device)
    if kind == "longrope":
        return _longrope(head_dim, theta, scaling, max_position_embeddings, seq_len, device)
    return _llama3(head_dim, theta, scaling, device), 1.0


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None, *,
                 max_position_embeddings: int | None = None, seq_len: int | None = None):
    """cos and sin of shape (T, head_dim) in fp32 for integer positions of shape (T,) in a sequence of `seq_len`
    tokens (default: the last position + 1)."""
    if seq_len is None and positions.numel():
        seq_len = int(positions.max()) + 1
    inv_freq, attention_factor = inv_frequencies(head_dim, theta, scaling, device=positions.device,
                                                 max_position_embeddings=max_position_embeddings, seq_len=seq_len)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def transformers_rope(config: ModelConfig) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling for a transformers model that computes this config's RoPE, with every default
    written out (so that transformers versions that fill in defaults differently read the same numbers)."""
    kind, scaling = scaling_type(config.rope_scaling), config.rope_scaling or {}
    if kind is None:
        return config.rope_theta, None
    if kind == "ntk":
        # a static base change, which any Llama expresses as rope_theta
        return ntk_theta(config.rope_theta, scaling["factor"], config.head_dim), None
    out: dict = {"rope_type": kind}
    if kind in ("linear", "dynamic"):
        out["factor"] = float(scaling["factor"])
    elif kind == "yarn":
        factor, original = _factor_and_original(scaling, config.max_position_embeddings)
        out.update(factor=float(factor), original_max_position_embeddings=original,
                   beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
                   attention_factor=_yarn_attention_factor(scaling, factor))
        if not scaling.get("truncate", True):
            out["truncate"] = False
    elif kind == "longrope":
        factor, original = _factor_and_original(scaling, config.max_position_embeddings)
        out.update(short_factor=[float(x) for x in scaling["short_factor"]],
                   long_factor=[float(x) for x in scaling["long_factor"]], factor=float(factor),
                   original_max_position_embeddings=original,
                   attention_factor=_longrope_attention_factor(scaling, factor, original))
    else:  # llama3
        out.update({key: scaling[key] for key in ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")})
    return config.rope_theta, out


class RotaryCache:
    """cos/sin tables for one model, kept per (device, dtype) and frequency regime instead of recomputed each
    forward; owned by the model, so they go with it.

    A table holds positions 0..length-1 and is rebuilt longer when a longer sequence comes; a call returns rows
    start..end-1 of a sequence of `end` tokens. Frequencies depend on the length only for dynamic beyond L0 (new
    ones for every length: only the latest such rows are kept) and longrope (short factors up to L0, long beyond).
    A change of the config's RoPE fields empties the cache.
    """

    def __init__(self):
        self._key = None
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latest: dict[tuple, tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}

    def clear(self) -> None:
        self._tables.clear()
        self._latest.clear()

    def cos_sin(self, config: ModelConfig, start: int, end: int, device=None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        key = (config.head_dim, config.rope_theta, config.max_position_embeddings,
               json.dumps(config.rope_scaling, sort_keys=True))
        if key != self._key:
            self.clear()
            self._key = key
        device = torch.device(device or "cpu")
        kind, original = scaling_type(config.rope_scaling), original_length(config.rope_scaling,
                                                                            config.max_position_embeddings)

        def compute(first: int, last: int):
            with torch.inference_mode(False):  # tables made during evaluation serve training forwards too
                cos, sin = rope_cos_sin(torch.arange(first, last, device=device), config.head_dim,
                                        config.rope_theta, config.rope_scaling,
                                        max_position_embeddings=config.max_position_embeddings, seq_len=end)
                return cos.to(dtype), sin.to(dtype)

        if kind == "dynamic" and end > original:
            latest = self._latest.get((device, dtype))
            if latest is None or latest[0] != (start, end):
                latest = ((start, end), compute(start, end))
                self._latest[(device, dtype)] = latest
            return latest[1]
        regime = "long" if kind == "longrope" and end > original else "short"
        table = self._tables.get((regime, device, dtype))
        if table is None or table[0].shape[0] < end:
            # grown geometrically, so that token-by-token decoding rebuilds it log(n) times
            length = end if table is None else max(end, 2 * table[0].shape[0])
            if kind in ("dynamic", "longrope") and regime == "short":
                length = min(length, original)  # beyond L0 the frequencies change
            table = self._tables[(regime, device, dtype)] = compute(0, length)
        cos, sin = table
        if start == 0 and end == cos.shape[0]:
            return cos, sin
        return cos[start:end], sin[start:end]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads (B, heads, T, head_dim) in fp32 and cast back (the official models set RoPE to fp32)."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k (B, heads, T, head_dim): `rotate` of each."""
    return rotate(q, cos, sin), rotate(k, cos, sin)
