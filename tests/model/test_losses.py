"""The chunked linear + cross-entropy equals the plain path, and never holds the full logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minicpm.data import IGNORE_INDEX
from minicpm.model.config import preset
from minicpm.model.transformer import MiniCPM
from minicpm.train.losses import lm_loss


def _problem(tokens: int = 37, d: int = 16, vocab: int = 101, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, d, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :12] = IGNORE_INDEX  # a whole chunk of ignored tokens, and a few scattered ones
    labels[1, ::5] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1000])
def test_chunked_loss_and_gradients_equal_plain(chunk_size):
    hidden, weight, labels = _problem()
    plain = lm_loss(hidden, weight, labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    chunked = lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_loss_scales_gradients_by_upstream_gradient():
    hidden, weight, labels = _problem()
    plain_grads = torch.autograd.grad(lm_loss(hidden, weight, labels) * 0.25, (hidden, weight))
    chunked_grads = torch.autograd.grad(lm_loss(hidden, weight, labels, chunk_size=8) * 0.25, (hidden, weight))
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_without_grad_matches_and_all_ignored_is_zero():
    hidden, weight, labels = _problem()
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(hidden, weight, labels, chunk_size=5), lm_loss(hidden, weight, labels))
    ignored = torch.full_like(labels, IGNORE_INDEX)
    loss = lm_loss(hidden, weight, ignored, chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


def test_chunked_loss_under_bf16_autocast_is_close_to_plain():
    hidden, weight, labels = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm_loss(hidden, weight, labels)
        plain_grads = torch.autograd.grad(plain, (hidden, weight))
        chunked = lm_loss(hidden, weight, labels, chunk_size=9)
        chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-3)
    for got, want in zip(chunked_grads, plain_grads):
        assert got.dtype == want.dtype == torch.float32
        # the plain path rounds the whole weight-gradient matmul to bf16 once; the chunked one accumulates in fp32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_tied_model_gradients_equal_plain():
    torch.manual_seed(0)
    model = MiniCPM(preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def grads(chunk_size):
        model.zero_grad(set_to_none=True)
        # the trainer's normalisation: summed loss / loss tokens
        loss = lm_loss(model.hidden_states(ids), model.head_weight, labels, chunk_size) / (labels >= 0).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = grads(None)
    chunked_loss, chunked = grads(10)
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_materialises_full_logits():
    tokens, d, vocab, chunk = 256, 8, 300, 32
    hidden = torch.randn(1, tokens, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    for chunk_size, bound in ((None, tokens * vocab), (chunk, chunk * vocab)):
        with _LargestTensor() as mode:
            lm_loss(hidden, weight, labels, chunk_size).backward()
        assert mode.largest == bound
