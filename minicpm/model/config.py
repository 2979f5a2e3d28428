"""ModelConfig with the official HF `config.json` field names, and the presets (paper Tables 2 and 8)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object
from minicpm.model.shapes import WidthRule


# transformers' rope_type names (modeling_rope_utils.ROPE_INIT_FUNCTIONS) plus our static NTK-aware "ntk";
# computed in model/rope.py exactly as transformers computes them
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3", "ntk")
_ROPE_TYPE_ALIASES = {"su": "longrope"}  # Phi-3's first name for LongRoPE, kept by the MiniCPM-1B re-release


def _named_type(scaling: dict) -> Any:
    kind = scaling.get("rope_type", scaling.get("type"))
    return _ROPE_TYPE_ALIASES.get(kind, kind) if isinstance(kind, str) else kind


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rope_scaling_type(scaling: dict | None) -> str | None:
    """The scaling's type (None for plain RoPE), under either HF key ("type" in v4 configs, "rope_type" in v5)."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise MiniCPMError(f"model config: rope_scaling {scaling!r} is not an object")
    kind = _named_type(scaling)
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise MiniCPMError(f"model config: rope_scaling type {kind!r} is not one of default, "
                           f"{', '.join(ROPE_SCALING_TYPES)} (or su)")
    return kind


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(scaling: dict | None, head_dim: int, max_position_embeddings: int) -> None:
    """One-line MiniCPMError for a rope_scaling that transformers would reject or compute into nonsense."""
    kind = rope_scaling_type(scaling)
    if kind is None:
        return

    def bad(key: str, expected: str) -> MiniCPMError:
        return MiniCPMError(f"model config: rope_scaling {key} {scaling.get(key)!r} for type {kind}: "
                            f"expected {expected}")

    required = {"linear": ("factor",), "dynamic": ("factor",), "ntk": ("factor",), "yarn": (),
                "longrope": ("short_factor", "long_factor"),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in required[kind]:
        if key not in scaling:
            raise MiniCPMError(f"model config: rope_scaling of type {kind} needs {key!r}")
    factor = scaling.get("factor")
    if factor is not None and (not _is_number(factor) or factor < 1):
        raise bad("factor", "a number >= 1")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original <= 0):
        raise bad("original_max_position_embeddings", "a positive integer")
    if kind == "dynamic" and original not in (None, max_position_embeddings):
        # transformers' dynamic NTK scales from max_position_embeddings and ignores this key
        raise bad("original_max_position_embeddings", f"max_position_embeddings ({max_position_embeddings}), the "
                  f"length dynamic NTK scales from; set max_position_embeddings instead")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
                "high_freq_factor"):
        if scaling.get(key) is not None and not _is_number(scaling[key]):
            raise bad(key, "a number")
    if scaling.get("attention_factor") is not None and scaling["attention_factor"] <= 0:
        raise bad("attention_factor", "a number > 0")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise bad("high_freq_factor", f"more than low_freq_factor ({scaling['low_freq_factor']})")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            values = scaling[key]
            if not (isinstance(values, list) and len(values) == head_dim // 2 and all(map(_is_number, values))):
                raise bad(key, f"a list of {head_dim // 2} numbers (head_dim/2)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad("partial_rotary_factor", "1.0 (MiniCPM rotates the whole head)")


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "router_z_loss", "router_jitter_noise")
"""Fields that only an MoE model uses (left out of a dense model's config.json and summary)."""

DEPTH_SCALINGS = ("minicpm", "completep")
DEPTH_FIELDS = ("depth_scaling", "depth_base")
"""Fields of a depth scaling other than MiniCPM's (left out of config.json and the summary under "minicpm", so that the
official layout round-trips unchanged)."""
COMPLETEP_ALPHA = 1.0
"""CompleteP's depth exponent α (Dey et al. 2025, "Don't be lazy", arXiv:2505.01618): residual branches × (L_base/L)^α,
α = 1; its authors' reference (EleutherAI/nanoGPT-mup, branch completep) takes α in [0.5, 1]."""


@dataclass
class ModelConfig:
    """Architecture of a MiniCPM decoder; field names follow the official HF config.json."""

    vocab_size: int = 122753
    """Number of token ids (embedding rows)."""
    hidden_size: int = 2304
    """Width d of the residual stream."""
    intermediate_size: int = 5760
    """SwiGLU hidden width (2.5·d in every MiniCPM model)."""
    num_hidden_layers: int = 40
    """Number of decoder blocks L."""
    num_attention_heads: int = 36
    """Query heads; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int = 36
    """Key/value heads (GQA when fewer than the query heads)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for."""
    rope_theta: float = 10000.0
    """RoPE base; raising it is the ABF long-context change."""
    rope_scaling: Optional[dict] = None
    """None, or transformers' rope_scaling: {"rope_type" (or "type"): linear|dynamic|yarn|longrope|llama3|ntk,
    "factor": f, ...} (see model/rope.py)."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    scale_emb: float = 12.0
    """muP: the embedding output is multiplied by this (paper Table 7)."""
    scale_depth: float = 1.4
    """muP: each residual branch is multiplied by scale_depth/sqrt(L) (paper Table 7; depth_scaling minicpm)."""
    depth_scaling: str = "minicpm"
    """How the residual branches scale with depth L: "minicpm" (× scale_depth/√L, paper Table 7) or "completep"
    (× depth_base/L, Dey et al. 2025, with AdamW's epsilon × depth_base/L; optim/mup.py)."""
    depth_base: Optional[int] = None
    """depth_scaling completep: the depth L_base the base hyperparameters were tuned at (its multiplier is 1 there)."""
    dim_model_base: int = 256
    """muP: base width; logits are divided by hidden_size/dim_model_base."""
    initializer_range: float = 0.1
    """muP: init std of 2-D weights at the base width (divided by sqrt(width multiplier))."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output head (both released dense models do)."""
    num_experts: int = 0
    """MoE experts per layer; 0 means a dense MLP."""
    num_experts_per_tok: int = 2
    """MoE top-k routing."""
    router_z_loss: bool = False
    """MoE: also report the router z-loss (ST-MoE: mean squared logsumexp of the router logits) as aux loss
    `router_z` (weighted by objective.aux_loss_weights.router_z)."""
    router_jitter_noise: float = 0.0
    """MoE: in training, the router's input is multiplied by U(1-eps, 1+eps) noise (Mixtral's field); 0: off."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in (HF field)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "dim_model_base", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise MiniCPMError(f"model config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "scale_emb", "scale_depth", "initializer_range"):
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
                raise MiniCPMError(f"model config: {name} must be a positive finite number, got {value!r}")
        if not _is_int(self.num_experts) or self.num_experts < 0:
            raise MiniCPMError(f"model config: num_experts must be an integer >= 0, got {self.num_experts!r}")
        top_k = self.num_experts_per_tok
        if not _is_int(top_k) or top_k < 1 or (self.num_experts and top_k > self.num_experts):
            raise MiniCPMError(f"model config: num_experts_per_tok must be an integer in 1..num_experts, got {top_k!r}")
        if not isinstance(self.router_z_loss, bool):
            raise MiniCPMError(f"model config: router_z_loss must be true or false, got {self.router_z_loss!r}")
        jitter = self.router_jitter_noise
        if not _is_number(jitter) or not 0 <= jitter < 1:
            raise MiniCPMError(f"model config: router_jitter_noise must be a number in [0, 1), got {jitter!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise MiniCPMError(f"model config: tie_word_embeddings must be true or false, "
                               f"got {self.tie_word_embeddings!r}")
        if not isinstance(self.torch_dtype, str):
            raise MiniCPMError(f"model config: torch_dtype must be a string, got {self.torch_dtype!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise MiniCPMError(f"model config: rope_scaling must be null or an object, got {self.rope_scaling!r}")
        if self.depth_scaling not in DEPTH_SCALINGS:
            raise MiniCPMError(f"model config: depth_scaling must be one of {', '.join(DEPTH_SCALINGS)}, "
                               f"got {self.depth_scaling!r}")
        if self.depth_scaling == "completep" and (not _is_int(self.depth_base) or self.depth_base <= 0):
            raise MiniCPMError(f"model config: depth_scaling completep needs depth_base, the depth the base "
                               f"hyperparameters were tuned at (a positive integer), got {self.depth_base!r}")
        if self.depth_scaling == "minicpm" and self.depth_base is not None:
            raise MiniCPMError(f"model config: depth_base {self.depth_base!r} is only for depth_scaling completep")
        if self.hidden_size % self.num_attention_heads:
            raise MiniCPMError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                               f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniCPMError(f"model config: num_attention_heads {self.num_attention_heads} is not divisible by "
                               f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise MiniCPMError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        check_rope_scaling(self.rope_scaling, self.head_dim, self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def width_multiplier(self) -> float:
        """m = d / dim_model_base: the muP width ratio (DESIGN section 3)."""
        return self.hidden_size / self.dim_model_base

    @property
    def depth_multiplier(self) -> float:
        """L / L_base under completep; 1 under minicpm (whose depth rule is in residual_scale alone)."""
        return self.num_hidden_layers / self.depth_base if self.depth_scaling == "completep" else 1.0

    @property
    def residual_scale(self) -> float:
        """The multiplier of every residual branch."""
        if self.depth_scaling == "completep":
            # Dey et al. 2025 (CompleteP): (L/L_base)^-α with α = 1, so L·(1/L) branch contributions stay O(1)
            # in the update as well as at init
            return self.depth_multiplier ** -COMPLETEP_ALPHA
        return self.scale_depth / math.sqrt(self.num_hidden_layers)  # paper Table 7

    # --- parameter counts (the paper's N excludes the embedding) ---
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def non_embedding_params(self) -> int:
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * self.intermediate_size * max(1, self.num_experts)
        router = d * self.num_experts
        return self.num_hidden_layers * (attn + mlp + router + 2 * d) + d

    def total_params(self) -> int:
        return self.non_embedding_params() + self.embedding_params()

    def active_non_embedding_params(self) -> int:
        """Non-embedding parameters a token passes through (top-k experts for MoE)."""
        if not self.num_experts:
            return self.non_embedding_params()
        inactive = 3 * self.hidden_size * self.intermediate_size * (self.num_experts - self.num_experts_per_tok)
        return self.non_embedding_params() - self.num_hidden_layers * inactive

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_active (+ the head) plus attention scores, as in PaLM's MFU appendix."""
        head = 6 * self.hidden_size * self.vocab_size
        attention = 12 * self.num_hidden_layers * self.hidden_size * seq_len
        return 6 * self.active_non_embedding_params() + head + attention

    # --- HF config.json ---
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_act="silu",
                 bos_token_id=1, eos_token_id=2, use_cache=True, attention_bias=False, attention_dropout=0.0)
        if not self.num_experts:
            for key in MOE_FIELDS:
                d.pop(key)
        if self.depth_scaling == "minicpm":
            for key in DEPTH_FIELDS:
                d.pop(key)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise MiniCPMError(f"{source}: missing field {missing[0]!r}")
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs.update(_rope_fields(d))
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        if "intermediate_size" not in kwargs:
            raise MiniCPMError(f"{source}: missing field 'intermediate_size'")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise MiniCPMError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(read_json_object(path), source=str(path))


def _rope_fields(d: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling as transformers reads them: from v5's `rope_parameters` (theta inside) when
    there is no rope_scaling, with Phi-3's top-level `original_max_position_embeddings` moved into the scaling
    (transformers prefers it to the scaling's own key)."""
    fields: dict[str, Any] = {}
    scaling, rope = d.get("rope_scaling"), d.get("rope_parameters")
    if isinstance(rope, dict) and not scaling:
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if not isinstance(scaling, dict) or _named_type(scaling) in (None, "default"):
        return fields
    fields["rope_scaling"] = dict(scaling)
    if d.get("original_max_position_embeddings") is not None and _named_type(scaling) in ("yarn", "longrope", "llama3"):
        fields["rope_scaling"]["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    return fields


def _proxy(d: int, layers: int, vocab: int = 122753) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, **WidthRule().fields(d, layers))  # paper Table 8


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # paper Table 8 (wind-tunnel / scaling-curve proxies)
    "proxy-9m": _proxy(320, 8),
    "proxy-30m": _proxy(512, 12),
    "proxy-70m": _proxy(640, 14),
    "proxy-0.1b": _proxy(768, 16),
    "proxy-0.17b": _proxy(896, 18),
    "proxy-0.2b": _proxy(1024, 20),
    "proxy-0.5b": _proxy(1344, 24),
    # paper Table 2
    "minicpm-1.2b": ModelConfig(vocab_size=73440, hidden_size=1536, intermediate_size=3840, num_hidden_layers=52,
                                num_attention_heads=24, num_key_value_heads=8),
    "minicpm-2.4b": ModelConfig(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
                                num_attention_heads=36, num_key_value_heads=36),
    # paper section 6: the 2.4B upcycled to 8 experts, top-2 (13.6B non-embedding parameters, 4B active)
    "minicpm-moe-8x2b": ModelConfig(vocab_size=122753, hidden_size=2304, intermediate_size=5760,
                                    num_hidden_layers=40, num_attention_heads=36, num_key_value_heads=36,
                                    num_experts=8, num_experts_per_tok=2),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise MiniCPMError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
