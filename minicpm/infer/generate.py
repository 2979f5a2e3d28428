"""Generating from a MiniCPM: batches of prompts (left-padded) on a preallocated KV cache, stop tokens and stop
strings, repetition penalty, temperature, top-k, top-p, min-p; token ids, final texts, or text streamed piece by
piece for one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from minicpm.errors import MiniCPMError
from minicpm.infer.decoder import Decoder
from minicpm.infer.sampling import Sampling, next_tokens, penalize_repetition
from minicpm.infer.text import TextStream
from minicpm.model.transformer import MiniCPM

__all__ = ["Completion", "Sampling", "TextStream", "generate", "generate_batch", "generate_text", "sample_next",
           "stream_text"]


@dataclass
class Completion:
    """One prompt's continuation: its token ids (without the stop token), its text when the batch was given a
    decode function (cut where a stop string begins), and why it ended: "eos" (a stop token), "stop" (a stop
    string) or "length" (max_new_tokens)."""

    ids: list[int]
    text: str | None
    finish: str


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, **options) -> int:
    """One token id from fp32 logits (vocab,): greedy when temperature is 0, else sampled (options: top_k, min_p)."""
    sampling = Sampling(temperature=temperature, top_p=top_p, **options)
    return int(next_tokens(logits[None], sampling, generator)[0])


def _generators(batch: int, seed: int | Sequence[int] | None, generator: torch.Generator | None, device):
    if seed is not None and generator is not None:
        raise MiniCPMError("generate: give either seed or generator, not both")
    if generator is not None or seed is None:
        return generator
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    if len(seed) != batch:
        raise MiniCPMError(f"generate: {len(seed)} seeds for {batch} prompts (give one seed per prompt, or one int)")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


def _check_prompts(model: MiniCPM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MiniCPMError(f"generate: max_new_tokens {max_new_tokens} is not an integer >= 1")
    if len(prompts) == 0:
        raise MiniCPMError("generate: the prompt batch is empty (give at least one prompt)")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise MiniCPMError(f"generate: prompt {i} is empty (encode at least one token, e.g. the BOS id)")
        if max(prompt) >= vocab or min(prompt) < 0:
            bad = max(prompt) if max(prompt) >= vocab else min(prompt)
            raise MiniCPMError(f"generate: prompt {i} has token id {bad}, outside the model's vocabulary ({vocab})")
    _check_cache_fits(model, len(prompts), max(len(p) for p in prompts), max_new_tokens)


def _check_cache_fits(model: MiniCPM, batch: int, longest: int, max_new_tokens: int) -> None:
    """The key/value cache of prompt + max_new_tokens positions must fit in the memory free on the model's device,
    checked before it is allocated (a mistyped --max-new-tokens would otherwise fail deep inside torch)."""
    cfg = model.config
    positions = longest + max_new_tokens
    itemsize = model.head_weight.element_size()  # the cache holds keys and values in the weights' dtype
    needed = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.head_dim * positions * itemsize
    free = _free_memory(model.head_weight.device)
    if free is not None and needed > free:
        raise MiniCPMError(f"generate: max_new_tokens {max_new_tokens:,} with a {longest}-token prompt needs a "
                           f"{needed / 1e9:.1f} GB cache of {positions:,} positions, more than the {free / 1e9:.1f} GB "
                           f"free (the model was trained on {cfg.max_position_embeddings:,} positions)")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device, or available to this process on the host (Linux); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@torch.inference_mode()
def _token_steps(model: MiniCPM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling,
                 generators, use_cache: bool, pack: bool | None = None,
                 compile: bool | str = "auto") -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), max_new_tokens times (the caller stops early by closing it).

    Rows are left-padded to the longest prompt; the Decoder gives each row its own positions and hides the pads.
    Without use_cache every step recomputes the whole sequence with MiniCPM.forward (the reference the cache is
    tested against; prompts of one length only).
    """
    device = model.head_weight.device
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long, device=device)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in zip(seen, prompts):
            row[torch.tensor(list(prompt), device=device)] = True
    if use_cache:
        decoder = Decoder(model, pads, longest + max_new_tokens, pack=pack, compile=compile)
        logits = decoder.prefill(ids)
    elif any(pads):
        raise MiniCPMError("generate: use_cache=False recomputes unpadded rows only; give prompts of one length")
    else:
        logits = model(ids)[:, -1]
    rows = torch.arange(len(prompts), device=device)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
        tokens = next_tokens(logits, sampling, generators)
        yield tokens
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[rows, tokens] = True
        if use_cache:
            logits = decoder.step(tokens)
        else:
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            logits = model(ids)[:, -1]


def generate(model: MiniCPM, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             pack: bool | None = None, compile: bool | str = "auto", **sampling) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids for one prompt, one at a time (stops after yielding eos_id).

    sampling: the fields of Sampling (temperature, top_k, top_p, min_p, repetition_penalty); temperature 0 is
    greedy decoding. With use_cache the prompt is run once and each new token costs one position; without it every
    step recomputes the whole sequence. pack, compile (True, False or "auto": where it pays): see Decoder.
    """
    settings = Sampling(**sampling)
    _check_prompts(model, [prompt_ids], max_new_tokens)
    steps = _token_steps(model, [prompt_ids], max_new_tokens=max_new_tokens, sampling=settings,
                         generators=_generators(1, seed, generator, model.head_weight.device), use_cache=use_cache,
                         pack=pack, compile=compile)
    for tokens in steps:
        token = int(tokens[0])
        yield token
        if token == eos_id:
            steps.close()
            return


def generate_batch(model: MiniCPM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (), decode=None,
                   seed: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                   use_cache: bool = True, pack: bool | None = None, compile: bool | str = "auto",
                   **sampling) -> list[Completion]:
    """Continue every prompt (a list of token ids) at once; a row ends at a stop token, a stop string or
    max_new_tokens, and the batch when every row has ended.

    decode (ids -> text) gives each Completion its text; stop strings need it. seed: one int for the batch, or one
    per prompt (a row then samples as it would alone). sampling: the fields of Sampling (temperature, top_k, top_p,
    min_p, repetition_penalty). use_cache: as in generate(); pack, compile: see Decoder.
    """
    settings = Sampling(**sampling)
    _check_prompts(model, prompts, max_new_tokens)
    stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    if stop and decode is None:
        raise MiniCPMError("generate: stop strings need a decode function (token ids -> text)")
    stop_ids = set(stop_token_ids)
    ids: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    streams = [TextStream(decode, stop) for _ in prompts] if stop else None
    steps = _token_steps(model, prompts, max_new_tokens=max_new_tokens, sampling=settings,
                         generators=_generators(len(prompts), seed, generator, model.head_weight.device),
                         use_cache=use_cache, pack=pack, compile=compile)
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            if finish[row]:
                continue
            if token in stop_ids:
                finish[row] = "eos"
                continue
            ids[row].append(token)
            if streams is not None:
                streams[row].push(token)
                if streams[row].stopped:
                    finish[row] = "stop"
        if all(finish):
            steps.close()
            break
    texts = ([s.text if s.stopped else decode(s.ids) for s in streams] if streams is not None else
             [decode(row) for row in ids] if decode is not None else [None] * len(prompts))
    return [Completion(row, text, end or "length") for row, text, end in zip(ids, texts, finish)]


def _checked_codec(model: MiniCPM, codec):
    if codec.vocab_size > model.config.vocab_size:
        raise MiniCPMError(f"tokenizer has {codec.vocab_size} tokens but the model only {model.config.vocab_size}")


def generate_text(model: MiniCPM, codec, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                  stop_token_ids: Sequence[int] | None = None, **options) -> list[str]:
    """The continuation of every text prompt, as text, cut at the first stop string.

    codec: a minicpm.infer.tokenizer.TextCodec; stop_token_ids default to its eos id; options go to generate_batch.
    """
    _checked_codec(model, codec)
    if isinstance(prompts, str):
        prompts = [prompts]
    if stop_token_ids is None:
        stop_token_ids = () if codec.eos_id is None else (codec.eos_id,)
    done = generate_batch(model, [codec.encode(p) for p in prompts], max_new_tokens=max_new_tokens, stop=stop,
                          stop_token_ids=stop_token_ids, decode=codec.decode, **options)
    return [c.text for c in done]


def stream_text(model: MiniCPM, codec, prompt: str, *, stop: Sequence[str] = (), **kwargs) -> Iterator[str]:
    """Generate from a text prompt and yield the decoded continuation piece by piece (for `minicpm generate`).

    codec: a minicpm.infer.tokenizer.TextCodec; kwargs go to generate(); eos_id defaults to the codec's. Text that
    could be the start of a stop string is held back until it is known not to be; the stream ends before the
    first stop string.
    """
    _checked_codec(model, codec)
    kwargs.setdefault("eos_id", codec.eos_id)
    stream = TextStream(codec.decode, [stop] if isinstance(stop, str) else stop)
    yield from stream_pieces(generate(model, codec.encode(prompt), **kwargs), stream, kwargs["eos_id"])


def stream_checkpoint_text(checkpoint, prompt: str, *, tokenizer=None, dtype: str | None = None,
                           **kwargs) -> Iterator[str]:
    """stream_text with a checkpoint's weights (in `dtype`, else as stored) and its tokenizer (beside it, or
    `tokenizer`): `minicpm generate`."""
    from minicpm.infer.tokenizer import find_tokenizer, load_codec
    from minicpm.interop.hf import load_model

    codec = load_codec(find_tokenizer(checkpoint, tokenizer))
    yield from stream_text(load_model(checkpoint, dtype=dtype), codec, prompt, **kwargs)


def stream_pieces(tokens, stream: TextStream, stop_id: int | None) -> Iterator[str]:
    """The text of a token generator, piece by piece through `stream`, until `stop_id` or a stop string (then the
    generator is closed, so that no further token is computed)."""
    for token in tokens:
        if token == stop_id:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            tokens.close()
            return
    tail = stream.flush()
    if tail:
        yield tail
