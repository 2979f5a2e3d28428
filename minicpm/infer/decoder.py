"""A MiniCPM's forward pass for decoding a batch: left-padded rows, each at its own positions, over a preallocated
KV cache, returning the logits of the last position only.

It runs the model's own modules (embedding, norms, MoE) and differs from MiniCPM.forward only where decoding needs
it: rotary positions count from each row's first real token and pad keys are masked out of attention, so that a
padded row computes what it computes alone; and, with `pack`, the matrices are multiplied in a layout made for a
few rows at a time. A test checks it against MiniCPM.forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm.model.config import rope_scaling_type
from minicpm.model.rope import apply_rope, original_length
from minicpm.model.transformer import MLP, MiniCPM


class _Packed:
    """One layer's matrices for decoding: q|k|v and gate|up fused, every matrix stored in_features-major.

    A decode step multiplies each matrix by a few rows only, which reads the whole matrix from memory for little
    arithmetic; CPU BLAS (MKL) streams an (in, out) row-major matrix about twice as fast as the (out, in) one that
    nn.Linear keeps (benchmarks/generate.py measures the end-to-end effect). Same products, summed in another order.
    """

    def __init__(self, layer):
        attn = layer.self_attn
        self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous()
        self.o = attn.o_proj.weight.t().contiguous()
        self.split = (attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim)
        dense = isinstance(layer.mlp, MLP)  # a MoE layer keeps its own forward
        self.gate_up = (torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).t().contiguous()
                        if dense else None)
        self.down = layer.mlp.down_proj.weight.t().contiguous() if dense else None


class Decoder:
    """One batch of generation: prefill(ids) once, then step(tokens) per new token, both -> fp32 logits (B, vocab).

    pads: how many pad positions open each row (left padding); max_len: prompt plus new tokens, the cache's size.
    pack: multiply with fused, in_features-major copies of the matrices, which holds a second copy of the weights
    while the Decoder lives; None packs where it was measured to pay: fp32 weights on the CPU (for bf16 weights
    on the CPU it costs 2-4x).
    compile: torch.compile the decode step (dynamic shapes: one compilation serves every batch and cache length in
    the process). Measured on a 20M model on the CPU: about 1.2x faster per token after a minute of compiling.
    """

    def __init__(self, model: MiniCPM, pads: list[int], max_len: int, *, pack: bool | None = None,
                 compile: bool = False):
        self.model, cfg = model, model.config
        device = model.head_weight.device
        if pack is None:
            pack = device.type == "cpu" and model.head_weight.dtype == torch.float32
        self.cache = model.new_cache(len(pads), max_len)
        self.length = 0  # positions filled in the cache, pads included
        self.pad_counts, self.pads = list(pads), torch.tensor(pads, device=device)
        # rows attend to keys from their first real token on; None when no row is padded (SDPA's fast path)
        self.valid = (torch.arange(max_len, device=device) >= self.pads[:, None]) if any(pads) else None
        self.gqa = cfg.num_key_value_heads != cfg.num_attention_heads
        with torch.no_grad():
            self.packed = [_Packed(layer) for layer in model.model.layers] if pack else None
            # the head is the largest matrix: for one row its in_features-major copy is fastest; for several rows,
            # vocab-major W @ h.T (nn.Linear's own layout, no copy) streams W once and writes each logit once,
            # where h @ W.T rewrites the whole (rows, vocab) output for every input feature (measured on MKL, fp32,
            # 320 x 32000 head: 1 row 4.0 vs 7.7 ms; 8 rows 13.8 vs 9.4 ms; 16 rows 18.8 vs 23.0 ms)
            self.head = model.head_weight.t().contiguous() if pack and not 1 < len(pads) <= 8 else None
            self.head_rows_last = pack and 1 < len(pads) <= 8
        # one compiled step for every cache length (dynamic shapes); the prefill runs eagerly
        self._step = torch.compile(self._forward, dynamic=True) if compile else self._forward

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T), left-padded; the cache must be empty."""
        T = ids.shape[1]
        cos, sin = self._rope(0, T)
        mask = None
        if self.valid is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            # a pad query attends to itself only: a row with no key at all would come out of softmax as NaN
            mask = (causal & self.valid[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=ids.device)
            mask = mask.unsqueeze(1)
        self.length = T
        return self._forward(ids, cos, sin, mask, 0)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,): the last chosen token of each row."""
        at = self.length
        cos, sin = self._rope(at, 1)
        mask = None if self.valid is None else self.valid[:, None, None, :at + 1]
        self.length += 1
        return self._step(tokens[:, None], cos, sin, mask, at)

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for cache slots start..start+T-1: from the model's own RotaryCache, (T, head_dim) when no
        row is padded; else (B, 1, T, head_dim), each row at its own positions (pad slots get position 0)."""
        model, cfg, device = self.model, self.model.config, self.pads.device
        if self.valid is None:
            return model.rotary.cos_sin(cfg, start, start + T, device)
        ends = [start + T - pad for pad in self.pad_counts]  # each row's length once these slots are filled
        kind = rope_scaling_type(cfg.rope_scaling)
        first = original_length(cfg.rope_scaling, cfg.max_position_embeddings)
        if (kind not in ("dynamic", "longrope") or max(ends) <= first
                or (kind == "longrope" and min(ends) > first)):
            # frequencies the same for every row's length: rows of one table
            cos, sin = model.rotary.cos_sin(cfg, 0, max(ends), device)
            positions = (torch.arange(start, start + T, device=device) - self.pads[:, None]).clamp(min=0)
            return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        # dynamic NTK past L0, longrope across it: each row's frequencies follow its own length
        tables = []
        for end in ends:
            real = min(T, end)
            cos, sin = model.rotary.cos_sin(cfg, end - real, end, device)
            pad = cos.new_zeros(T - real, cos.shape[1])
            tables.append((torch.cat([pad, cos]), torch.cat([pad, sin])))
        return (torch.stack([c for c, _ in tables]).unsqueeze(1), torch.stack([s for _, s in tables]).unsqueeze(1))

    def _forward(self, ids, cos, sin, mask, start: int) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        # paper Table 7: embedding output x scale_emb
        h = model.model.embed_tokens(ids) * cfg.scale_emb
        for i, (layer, cache) in enumerate(zip(model.model.layers, self.cache)):
            packed = self.packed[i] if self.packed else None
            x = layer.input_layernorm(h)
            h = h + layer.residual_scale * self._attention(layer.self_attn, packed, x, cos, sin, cache, start, mask)
            x = layer.post_attention_layernorm(h)
            h = h + layer.residual_scale * (self._mlp(packed, x) if packed and packed.down is not None else
                                            layer.mlp(x))
        # paper Table 7: logits divided by the width multiplier; only the last position is sampled from
        h = model.model.norm(h[:, -1]) / cfg.width_multiplier
        if self.head is not None:
            return (h @ self.head).float()
        if self.head_rows_last:
            return (model.head_weight @ h.t()).t().float()
        return F.linear(h, model.head_weight).float()

    def _attention(self, attn, packed, x, cos, sin, cache, start, mask):
        B, T, _ = x.shape
        if packed:
            q, k, v = (x @ packed.qkv).split(packed.split, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = k.view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        k, v = cache.update(k, v, start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=self.gqa)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return out @ packed.o if packed else attn.o_proj(out)

    @staticmethod
    def _mlp(packed, x):
        # SwiGLU, as minicpm.model.transformer.MLP: down(silu(gate(x)) * up(x))
        gate, up = (x @ packed.gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ packed.down
