"""Sampling from a MiniCPM, token by token, with or without the KV cache; and streaming the decoded text."""

from __future__ import annotations

import math

from typing import Callable, Iterator, Sequence

import torch

from minicpm.errors import MiniCPMError
from minicpm.model.transformer import MiniCPM


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from fp32 logits (vocab,): greedy when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: MiniCPM, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             use_cache: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time (stops after eos_id).

    temperature 0 is greedy decoding. With use_cache the prompt is run once and each new token costs one position;
    without it every step recomputes the whole sequence (the reference the cache is tested against).
    """
    if not prompt_ids:
        raise MiniCPMError("generate: the prompt is empty (encode at least one token, e.g. the BOS id)")
    if not 0.0 < top_p <= 1.0:
        raise MiniCPMError(f"generate: top_p {top_p} is not in (0, 1]")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MiniCPMError(f"generate: temperature {temperature} is not a finite number >= 0 (0 is greedy)")
    if max_new_tokens < 0:
        raise MiniCPMError(f"generate: max_new_tokens {max_new_tokens} is negative")
    vocab = model.config.vocab_size
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise MiniCPMError(f"generate: prompt token id {max(prompt_ids)} is outside the model's vocabulary ({vocab})")
    device = model.head_weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = model.new_cache(1, ids.shape[1] + max_new_tokens) if use_cache else None
    logits = model(ids, cache=cache)[0, -1]
    position = ids.shape[1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
        yield token
        if token == eos_id or step == max_new_tokens - 1:
            return
        new = torch.tensor([[token]], dtype=torch.long, device=device)
        if use_cache:
            logits = model(new, cache=cache, start_pos=position)[0, -1]
        else:
            ids = torch.cat([ids, new], dim=1)
            logits = model(ids)[0, -1]
        position += 1


class TextStream:
    """Turns token ids into printable pieces of text as they arrive, holding back the bytes of an unfinished
    UTF-8 character (a byte-level tokenizer splits one character over several tokens)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece, self.printed = text[self.printed:], len(text)
        return piece


def stream_text(model: MiniCPM, codec, prompt: str, **kwargs) -> Iterator[str]:
    """Generate from a text prompt and yield the decoded continuation piece by piece (for `minicpm generate`).

    codec: a minicpm.infer.tokenizer.TextCodec; kwargs go to generate(); eos_id defaults to the codec's.
    """
    if codec.vocab_size > model.config.vocab_size:
        raise MiniCPMError(f"tokenizer has {codec.vocab_size} tokens but the model only {model.config.vocab_size}")
    kwargs.setdefault("eos_id", codec.eos_id)
    stream = TextStream(codec.decode)
    for token in generate(model, codec.encode(prompt), **kwargs):
        if token == kwargs["eos_id"]:
            break
        piece = stream.push(token)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail
