"""A MiniCPM's forward pass for decoding a batch: left-padded rows, each at its own positions, over a preallocated
KV cache, returning the logits of the last position only.

It runs the model's own modules (embedding, norms, MoE) and differs from MiniCPM.forward only where decoding needs
it: rotary positions count from each row's first real token and pad keys are masked out of attention, so that a
padded row computes what it computes alone; and, with `pack`, the matrices are multiplied in a layout made for a
few rows at a time. A test checks it against MiniCPM.forward.
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch
import torch.nn.functional as F

from minicpm.model.compiling import CompileChoice, CompileCosts, can_compile, choose_compile
from minicpm.model.config import rope_scaling_type
from minicpm.model.rope import apply_rope, original_length, rotate
from minicpm.model.transformer import MLP, MiniCPM


ROWS_LAST_MAX = 8
"""Up to this many rows (2 and more) a product runs as W @ x.T over nn.Linear's (out, in) layout."""


class _Packed:
    """One layer's matrices for decoding, q|k|v and gate|up fused, in the layout a few rows multiply fastest.

    A decode step multiplies each matrix by a few rows only, which reads the whole matrix from memory for little
    arithmetic. On CPU BLAS (MKL), one row streams an (in, out) row-major copy fastest (x @ W_t); from 2 to 8 rows,
    W @ x.T over nn.Linear's own (out, in) layout does (measured, fp32, proxy-9m's 1600 x 320 gate|up of 16 layers
    from cold caches: 1 row 149 us (x @ W_t) against 262 (F.linear); 8 rows 271 (W @ x.T) against 318 (x @ W_t) and
    441 (F.linear)). Same products, summed in another order (benchmarks/generate.py measures the end to end).
    """

    def __init__(self, layer, rows_last: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.rows_last = rows_last
        layout = (lambda w: w) if rows_last else (lambda w: w.t().contiguous())
        self.qkv = layout(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        self.o = layout(attn.o_proj.weight)
        dense = isinstance(mlp, MLP)  # a MoE layer keeps its own forward
        self.gate_up = layout(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])) if dense else None
        self.down = layout(mlp.down_proj.weight) if dense else None

    def product(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (..., in) times one of the matrices: (..., out)."""
        if not self.rows_last:
            return x @ w
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > ROWS_LAST_MAX:  # the prefill of a batch: many rows
            return F.linear(x, w)
        return (w @ rows.t()).t().reshape(*x.shape[:-1], w.shape[0])


_PACKED: "weakref.WeakKeyDictionary[MiniCPM, tuple]" = weakref.WeakKeyDictionary()
"""The packed matrices of each model, kept while the model lives and its weights are unchanged: a chat or a
benchmark decodes many batches, and packing reads every weight once (47 ms a call on proxy-9m at vocab 32K, 8% of
a 64-token generation)."""


def _weights_signature(model: MiniCPM) -> tuple:
    # storage and in-place version of every parameter: changes when a weight is replaced or updated in place
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _packed_matrices(model: MiniCPM, rows_last: bool) -> tuple[list[_Packed], torch.Tensor | None]:
    """(each layer's packed matrices, the head's (in, out) copy for one row or None) of the model, from the cache."""
    key = (_weights_signature(model), rows_last)
    cached = _PACKED.get(model)
    if cached is None or cached[0] != key:
        head = None if rows_last else model.head_weight.t().contiguous()
        cached = (key, [_Packed(layer, rows_last) for layer in model.model.layers], head)
        _PACKED[model] = cached
    return cached[1], cached[2]


DECODE_COMPILE_COSTS = {
    # measured on a 2-core AVX-512-BF16 CPU, shared, fp32, proxy-9m shapes at vocab 32K (benchmarks/generate.py
    # --compile): the first compiled step 36.5 s (wall) from an empty compile cache, 6.8 s from a warm one; a token
    # 8.09 -> 7.17 ms at batch 1 and 17.5 -> 14.8 ms at batch 8 (the smaller gain taken)
    "cpu": CompileCosts(compile_seconds=37.0, cached_compile_seconds=7.0, speedup=1.13),
}
"""What compiling the decode step costs and saves, by device type; a device not listed decodes eagerly under
compile="auto" (on CUDA: not measured yet)."""
AUTO_TIMED_STEPS = 4
"""compile="auto": the eager decode steps timed before the rule decides for the rest of the generation."""
_compiled_before: set[tuple] = set()
"""(device type, rows, cache length, dtype) of the decode steps this process has compiled: compiling one of those
again finds its graph in the compile cache."""


class Decoder:
    """One batch of generation: prefill(ids) once, then step(tokens) per new token, both -> fp32 logits (B, vocab).

    pads: how many pad positions open each row (left padding); max_len: prompt plus new tokens, the cache's size.
    pack: multiply with fused, in_features-major copies of the matrices, a second copy of the weights that is kept
    with the model for the next batch until a weight changes; None packs where it was measured to pay: fp32
    weights on the CPU (for bf16 weights on the CPU it costs 2-4x).
    compile: torch.compile the decode step: True, False, or "auto", which times the first AUTO_TIMED_STEPS eager
    steps and compiles for the rest where the steps left earn the compile time back (DECODE_COMPILE_COSTS; the
    rule is model/compiling.py's). The compiled step is static: it writes its keys and values at a position given
    as a tensor and attends over the whole preallocated cache, the slots not yet written masked out, so that one
    graph serves every position; its tokens are the eager step's.
    """

    def __init__(self, model: MiniCPM, pads: list[int], max_len: int, *, pack: bool | None = None,
                 compile: bool | str = "auto"):
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
        # the head is the largest matrix: for one row its in_features-major copy is fastest; for several rows,
        # vocab-major W @ h.T (nn.Linear's own layout, no copy) streams W once and writes each logit once,
        # where h @ W.T rewrites the whole (rows, vocab) output for every input feature (measured on MKL, fp32,
        # 320 x 32000 head: 1 row 4.0 vs 7.7 ms; 8 rows 13.8 vs 9.4 ms; 16 rows 18.8 vs 23.0 ms)
        self.head_rows_last = bool(pack) and 1 < len(pads) <= ROWS_LAST_MAX
        with torch.no_grad():
            self.packed, self.head = _packed_matrices(model, self.head_rows_last) if pack else (None, None)
        # fp32 RMSNorm as one op with its gain (the same numbers as model.RMSNorm, which upcasts other dtypes)
        self.fused_norm = model.head_weight.dtype == torch.float32
        # the prefill runs eagerly; the decode steps eagerly or as one static compiled graph
        self.slots = torch.arange(max_len, device=device)
        self.costs = DECODE_COMPILE_COSTS.get(device.type) if can_compile() else None
        self.compile_choice: CompileChoice | None = None
        """Whether the decode step is compiled and why; None while compile="auto" is still timing steps."""
        self._eager_seconds: list[float] = []
        self._compiled = None
        if compile != "auto" or self.costs is None:
            self._choose(choose_compile(compile, steps=max_len, step_seconds=0.0, costs=self.costs,
                                        what="generate: compile"))

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
        self.length += 1
        if self._compiled is not None:
            written = self.slots <= at
            mask = (written if self.valid is None else written & self.valid)[..., None, None, :]
            return self._compiled(tokens[:, None], cos, sin, mask, self.slots[at:at + 1])
        mask = None if self.valid is None else self.valid[:, None, None, :at + 1]
        if self.compile_choice is not None:
            return self._forward(tokens[:, None], cos, sin, mask, at)
        start = time.perf_counter()
        logits = self._forward(tokens[:, None], cos, sin, mask, at)
        self._eager_seconds.append(time.perf_counter() - start)  # on the CPU: the step is done when it returns
        if len(self._eager_seconds) == AUTO_TIMED_STEPS:  # the first is a warm-up
            key = (self.slots.device.type, len(self.pad_counts), len(self.slots), self.model.head_weight.dtype)
            self._choose(choose_compile("auto", steps=len(self.slots) - self.length,
                                        step_seconds=statistics.median(self._eager_seconds[1:]), costs=self.costs,
                                        cached=key in _compiled_before, what="generate: compile"), key)
        return logits

    def _choose(self, choice: CompileChoice, key: tuple | None = None) -> None:
        self.compile_choice = choice
        if choice.compile:
            self._compiled = torch.compile(self._forward, dynamic=False)
            if key is not None:
                _compiled_before.add(key)

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
            x = self._norm(layer.input_layernorm, h)
            h = h + layer.residual_scale * self._attention(layer.self_attn, packed, x, cos, sin, cache, start, mask)
            x = self._norm(layer.post_attention_layernorm, h)
            h = h + layer.residual_scale * (self._mlp(packed, x) if packed and packed.down is not None else
                                            layer.mlp(x))
        # paper Table 7: logits divided by the width multiplier; only the last position is sampled from
        h = self._norm(model.model.norm, h[:, -1]) / cfg.width_multiplier
        if self.head is not None:
            return (h @ self.head).float()
        if self.head_rows_last:
            return (model.head_weight @ h.t()).t().float()
        return F.linear(h, model.head_weight).float()

    def _norm(self, norm, x):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps) if self.fused_norm else norm(x)

    def _attention(self, attn, packed, x, cos, sin, cache, start, mask):
        B, T, _ = x.shape
        if packed:
            # q and k side by side in the fused product: rotated as one tensor of n_heads + n_kv_heads heads
            qkv = packed.product(x, packed.qkv)
            heads = attn.n_heads + attn.n_kv_heads
            qk = qkv[..., :heads * attn.head_dim].view(B, T, heads, attn.head_dim).transpose(1, 2)
            qk = rotate(qk, cos, sin)
            q, k = qk[:, :attn.n_heads], qk[:, attn.n_heads:]
            v = qkv[..., heads * attn.head_dim:].view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = k.view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            v = v.view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, k, cos, sin)
        if isinstance(start, torch.Tensor):  # the static step: written at a tensor position, the whole cache read
            cache.k.index_copy_(2, start, k)
            cache.v.index_copy_(2, start, v)
            k, v = cache.k, cache.v
        else:
            k, v = cache.update(k, v, start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=self.gqa)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return packed.product(out, packed.o) if packed else attn.o_proj(out)

    @staticmethod
    def _mlp(packed, x):
        # SwiGLU, as minicpm.model.transformer.MLP: down(silu(gate(x)) * up(x))
        gate, up = packed.product(x, packed.gate_up).chunk(2, dim=-1)
        return packed.product(F.silu(gate) * up, packed.down)
