"""A model's shape from its width: the one rule behind the proxy presets, the scaling campaign's sizes, the
planner's snapped shapes, the wind tunnel's widths and the coordinate check.

Paper Table 8 shapes its proxies so: heads of a fixed size (64), d_ff = 2.5·d, multi-head attention, and a depth
that grows with the width; a family keeps its share of key/value heads (GQA) at every width. The depth of a
family follows depth = c·width^k, fitted on its members (or on Table 8).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from minicpm.errors import MiniCPMError

HEAD_DIM = 64
FFN_RATIO = 2.5
"""Paper Table 8: head size 64, d_ff = 2.5·d (every MiniCPM model's ratio)."""
TABLE8 = ((320, 8), (512, 12), (640, 14), (768, 16), (896, 18), (1024, 20), (1344, 24))
"""Paper Table 8: (width, depth) of the scaling-curve proxies."""
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
"""The ModelConfig fields a shape sets; the others (vocabulary, μP constants, RoPE, ...) belong to the family."""


@dataclass(frozen=True)
class WidthRule:
    """How a family's width sets its heads and feed-forward size."""

    head_dim: int = HEAD_DIM
    """Attention head size: a width of d has d / head_dim query heads."""
    ffn_ratio: float = FFN_RATIO
    """intermediate_size = ffn_ratio · width, rounded."""
    kv_groups: int = 1
    """Query heads per key/value head (1: multi-head attention); a width whose heads it does not divide gets
    multi-head attention."""
    kv_heads: Optional[int] = None
    """A fixed number of key/value heads at every width, instead of kv_groups."""

    def heads(self, width: int) -> int:
        return width // self.head_dim

    def key_value_heads(self, width: int) -> int:
        heads = self.heads(width)
        if self.kv_heads is not None:
            return self.kv_heads
        return heads // self.kv_groups if heads % self.kv_groups == 0 else heads

    def intermediate_size(self, width: int) -> int:
        return max(1, round(self.ffn_ratio * width))

    def fields(self, width: int, depth: Optional[int] = None) -> dict[str, int]:
        """The shape's ModelConfig fields, in SHAPE_FIELDS order (without num_hidden_layers when depth is None)."""
        shape = {"hidden_size": width, "intermediate_size": self.intermediate_size(width),
                 "num_hidden_layers": depth, "num_attention_heads": self.heads(width),
                 "num_key_value_heads": self.key_value_heads(width)}
        return {k: v for k, v in shape.items() if v is not None}

    def overrides(self, width: int, depth: Optional[int] = None) -> list[str]:
        """The shape as training-config overrides (model.hidden_size=..., ...)."""
        return [f"model.{k}={v}" for k, v in self.fields(width, depth).items()]

    def widths_to_compare(self, widths) -> list[int]:
        """The distinct widths of a comparison across widths (the wind tunnel's), sorted: two or more, each a
        positive multiple of the head size; a one-line error naming --widths otherwise."""
        widths = sorted(set(widths))
        if len(widths) < 2:
            raise MiniCPMError(f"--widths: give at least two widths, got {widths}")
        for width in widths:
            if width <= 0 or width % self.head_dim:
                raise MiniCPMError(f"--widths: {width} is not a positive multiple of the head size {self.head_dim}")
        return widths


def width_rule_of(model: Any) -> WidthRule:
    """The rule a ModelConfig follows: its head size, its d_ff ratio and its query heads per key/value head."""
    return WidthRule(model.head_dim, model.intermediate_size / model.hidden_size,
                     model.num_attention_heads // model.num_key_value_heads)


@dataclass(frozen=True)
class DepthRule:
    """depth = c·width^k."""

    c: float
    k: float

    def depth(self, width: int) -> int:
        return max(1, round(self.c * width ** self.k))


def fit_depth_rule(pairs) -> DepthRule:
    """The depth rule through (width, depth) pairs: least squares in log-log."""
    import numpy as np

    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    k, log_c = np.polyfit(x, y, 1)
    return DepthRule(float(math.exp(log_c)), float(k))


@dataclass(frozen=True)
class Family:
    """Models that share everything but width and depth (head size, d_ff ratio, GQA ratio, μP constants,
    vocabulary), and the rule giving depth from width."""

    base: Any
    """A ModelConfig of the family, whose other fields a shape keeps."""
    width_rule: WidthRule
    depth_rule: DepthRule
    rule_source: str
    """Where the depth rule comes from (the family's own sizes, or paper Table 8)."""

    @property
    def head_dim(self) -> int:
        return self.width_rule.head_dim

    def depth(self, width: int) -> int:
        return self.depth_rule.depth(width)

    def shape(self, width: int):
        """The family's ModelConfig of this width."""
        return dataclasses.replace(self.base, **self.width_rule.fields(width, self.depth(width)))


def family_of(models: list) -> Family:
    """The family of some ModelConfigs (any order): the largest one's width rule, and the depth rule fitted on
    their (width, depth), or Table 8's when they vary fewer than two widths."""
    largest = max(models, key=lambda m: m.non_embedding_params())
    pairs = sorted({(m.hidden_size, m.num_hidden_layers) for m in models})
    if len({w for w, _ in pairs}) >= 2:
        rule, source = fit_depth_rule(pairs), "the campaign's sizes"
    else:
        rule, source = fit_depth_rule(TABLE8), "paper Table 8"
    return Family(largest, width_rule_of(largest), rule, source)


def snap_shape(family: Family, n_target: float):
    """The buildable shape of the family whose non-embedding parameters are nearest n_target (in log)."""
    best, k = None, 1
    while True:
        model = family.shape(k * family.head_dim)
        n = model.non_embedding_params()
        if best is None or abs(math.log(n / n_target)) < abs(math.log(best.non_embedding_params() / n_target)):
            best = model
        if n > 2 * n_target:
            return best
        k += 1
