"""The MiniCPM decoder: a Llama-style transformer with the three muP multipliers where they act.

Module names match the official HF checkpoint keys (model.embed_tokens, model.layers.{i}.self_attn.q_proj, ...),
so a dense model's state_dict is the official layout with no renaming (an MoE stacks its experts: model/moe.py). The model knows nothing of training or devices.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F
from torch import nn

from minicpm.model.config import ModelConfig
from minicpm.model.packing import DocumentMask, document_positions
from minicpm.model.param_roles import GAIN, HIDDEN, VOCABULARY
from minicpm.model.rope import RotaryCache, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # variance in fp32, as the official rms_layernorm
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def mup_roles(self) -> dict[str, str]:
        return {"weight": GAIN}


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked for position {end - 1}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        d, kv = config.hidden_size, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def mup_roles(self) -> dict[str, str]:
        return {f"{name}.weight": HIDDEN for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0,
                documents: DocumentMask | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
            if T == 1:
                causal = False  # one new token attends to everything cached
            elif start_pos > 0:
                # queries sit at positions start_pos.. : bottom-right aligned causal mask
                causal = False
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        # paper section 3.1: the standard 1/sqrt(head_dim) attention scale, no muP 1/d; grouped-query heads share
        # their K/V inside SDPA (enable_gqa) instead of copies of them
        if documents is not None:  # packed documents: each attends only to itself
            out = documents.attend(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). A dense MLP reports no auxiliary loss (an MoE layer adds its balance
    loss to `aux_losses`, the channel the training objective reads)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def mup_roles(self) -> dict[str, str]:
        return {f"{name}.weight": HIDDEN for name in ("gate_proj", "up_proj", "down_proj")}

    def forward(self, x: torch.Tensor, aux_losses: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_experts:
            from minicpm.model.moe import MoE  # MoE models only

            self.mlp = MoE(config, layer_index)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        # model.depth_scaling: each residual branch × scale_depth/√L (minicpm, paper Table 7) or × L_base/L
        # (completep, Dey et al. 2025)
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0,
                aux_losses: dict[str, torch.Tensor] | None = None, documents: DocumentMask | None = None):
        x = x + self.residual_scale * self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, documents)
        x = x + self.residual_scale * self.mlp(self.post_attention_layernorm(x), aux_losses)
        return x


class AuxChannel(MutableMapping):
    """The caller's aux-loss dict as the layers see it: every read and write goes to that dict. It is not a dict
    itself because FSDP2's pre-forward hook rebuilds the dicts (lists, dataclasses) among a block's inputs that hold
    tensors requiring grad: after the first layer had added a loss, the next would write into a copy."""

    def __init__(self, target: dict):
        self._target = target

    def __getitem__(self, key):
        return self._target[key]

    def __setitem__(self, key, value):
        self._target[key] = value

    def __delitem__(self, key):
        del self._target[key]

    def __iter__(self):
        return iter(self._target)

    def __len__(self):
        return len(self._target)


def _embedding(config: ModelConfig) -> nn.Embedding:
    # nn.Embedding's own N(0, 1) init is replaced by N(0, initializer_range) (the HF _init_weights; the muP init is
    # optim.mup.init_weights) and skipped on the meta device, where it alone took over a second (torch loads its
    # reference kernels for a meta normal_), so that building even the 2.4B on meta is instant
    weight = torch.empty(config.vocab_size, config.hidden_size)
    if not weight.is_meta:
        nn.init.normal_(weight, std=config.initializer_range)
    return nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)


class MiniCPM(nn.Module):
    """MiniCPM decoder-only language model.

    forward(input_ids) -> fp32 logits (B, T, vocab). For losses that never materialise the logits,
    `hidden_states(input_ids)` returns the final normed, muP-scaled hidden state and `head_weight` the output
    matrix, so that logits = hidden_states @ head_weight.T.

    Packed rows: pass `doc_ids` (B, T), equal on each document's positions, and every document attends only to
    itself, at positions counted from its own start (minicpm.model.packing).

    Auxiliary losses (an MoE's load balance) come out through one channel: pass a dict as `aux_losses` and the
    layers that have such a loss add theirs into it by name (each a per-token mean over the batch); the training
    objective weighs and adds them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=_embedding(config),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.rotary = RotaryCache()
        self.step_balance = None
        """MoE: over whose tokens the balance loss counts its f (a moe.StepBalance the train module sets for the
        length of an optimizer step); None: each forward's own, as Mixtral."""
        self.balance_form = "per_layer"
        """MoE: the balance loss per layer, summed (Switch's) or pooled over layers (Mixtral's); moe.balance_loss."""

    def mup_roles(self) -> dict[str, str]:
        # the vocabulary matrices; every other parameter's role is declared by its own module
        return {"model.embed_tokens.weight": VOCABULARY} | ({} if self.lm_head is None else {"lm_head.weight": VOCABULARY})

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None, start_pos: int = 0,
                      aux_losses: dict[str, torch.Tensor] | None = None,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        cos, sin = self.rotary.cos_sin(cfg, start_pos, start_pos + input_ids.shape[1], input_ids.device)
        documents = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) are for training and scoring, not with a KV cache")
            positions = document_positions(doc_ids)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, head_dim)
            documents = DocumentMask(doc_ids)
        # paper Table 7: embedding output x scale_emb
        h = self.model.embed_tokens(input_ids) * cfg.scale_emb
        aux_losses = None if aux_losses is None else AuxChannel(aux_losses)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, None if cache is None else cache[i], start_pos, aux_losses, documents)
        if aux_losses is not None and cfg.num_experts:
            from minicpm.model.moe import pool_router_losses

            # the balance loss from every layer's routing, f over the step's tokens when set
            pool_router_losses(aux_losses, self.step_balance, self.balance_form)
        # paper Table 7: logits divided by the width multiplier d/dim_model_base
        return self.model.norm(h) / cfg.width_multiplier

    def forward(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None,
                start_pos: int = 0, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, cache, start_pos, doc_ids=doc_ids)
        return F.linear(h, self.head_weight).float()

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        cfg, ref = self.config, self.model.embed_tokens.weight
        return [KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype or ref.dtype, device or ref.device)
                for _ in range(cfg.num_hidden_layers)]
