"""Packed sequences without leaks: several documents in one row, each attending only to itself, its positions
counted from its own start, as if it were alone in the row.

A row's documents are given by `doc_ids` (B, T): equal ids on each document's run of positions (the data loader
numbers them 0, 1, 2, ... along the row). Attention then uses a block-diagonal causal mask: SDPA with a dense
boolean mask everywhere (the reference, and the CPU path), FlexAttention with a block mask on CUDA where torch has
it (it skips the blocks the mask empties, where SDPA computes them and throws them away).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own document (B, T): 0 at every document's first token."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_compiled_flex = None


def _flex():
    # FlexAttention is fast only compiled; compiled once per process
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class DocumentMask:
    """Attention that stays inside each document: built once per forward pass, used by every layer.

    backend: "sdpa" (a dense (B, 1, T, T) boolean mask), "flex" (FlexAttention's block mask; compiled on CUDA,
    eager elsewhere, where it serves the test against SDPA) or "auto" (flex on CUDA when torch has it, else sdpa).
    """

    def __init__(self, doc_ids: torch.Tensor, backend: str = "auto"):
        if backend == "auto":
            backend = "flex" if flex_available(doc_ids.device) else "sdpa"
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"document attention backend {backend!r}: expected auto, sdpa or flex")
        self.backend = backend
        B, T = doc_ids.shape
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            ids = doc_ids

            def same_document_causal(b, h, q, k):
                return (ids[b, q] == ids[b, k]) & (q >= k)

            self.block_mask = create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            self.dense = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, enable_gqa: bool) -> torch.Tensor:
        """softmax(q·kᵀ/√d + mask)·v for q (B, heads, T, d), k and v (B, kv_heads, T, d)."""
        if self.backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            run = _flex() if q.device.type == "cuda" else flex_attention
            return run(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=enable_gqa)
