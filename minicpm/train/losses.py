"""Training losses. Language modelling takes the final hidden state and the head weight, so that a chunked
implementation can avoid materialising the (tokens x vocab) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm.data import IGNORE_INDEX


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
            chunk_size: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != IGNORE_INDEX (divide by the token count outside).

    hidden: (B, T, d) final normed, muP-scaled hidden states; head_weight: (vocab, d); labels: (B, T).
    chunk_size: when set, tokens are processed `chunk_size` at a time and the full (tokens x vocab) logits never
    exist, in the forward or the backward pass; the result and the gradients equal the plain path.
    """
    if chunk_size:
        return chunked_lm_loss(hidden, head_weight, labels, chunk_size)
    logits = F.linear(hidden, head_weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """lm_loss over token chunks: peak extra memory is one (chunk_size x vocab) fp32 block, not (tokens x vocab)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, head_weight, flat_labels, chunk_size,
                                            grad_enabled and flat_hidden.requires_grad,
                                            grad_enabled and head_weight.requires_grad)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Linear head + summed cross-entropy, chunk by chunk over tokens.

    The gradients are computed during the forward pass, one chunk at a time, while the chunk's logits exist
    (d loss / d logits = softmax - onehot); backward only scales them by the incoming gradient. This costs the
    same three matmuls per chunk as the plain path and never keeps more than one chunk of logits alive.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, want_hidden_grad, want_weight_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight_grad else None
        compute_dtype = _matmul_dtype(hidden, weight)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            # the same ops as the plain path: matmul in the input (or autocast) dtype, softmax math in fp32
            logits = F.linear(h, weight).float()
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            # logsumexp as torch computes it (max + log Σ exp(x - max)), keeping exp(x - max) in place of the logits
            # for the softmax: one pass of exp over the (chunk x vocab) block instead of two
            peak = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            lse = (peak + sums.log()).squeeze(1)
            total += torch.where(valid, lse - target_logit, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                del logits, exps  # freed before the next chunk's logits exist: one chunk of them alive at a time
                continue
            probs = exps.div_(sums)  # softmax, in place of the logits
            probs[torch.arange(len(y), device=y.device), target] -= valid.to(probs.dtype)
            grad_logits = probs.mul_(valid[:, None]).to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight.to(compute_dtype)
            if grad_weight is not None:
                if grad_weight.dtype == compute_dtype:  # accumulated in place: no (vocab x d) temporary per chunk
                    grad_weight.addmm_(grad_logits.T, h.to(compute_dtype))
                else:
                    grad_weight += grad_logits.T @ h.to(compute_dtype)
            del logits, exps, probs, grad_logits  # as above: one chunk of logits alive at a time
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in here: the autocast dtype when autocast is on, else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)
