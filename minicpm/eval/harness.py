"""MiniCPM inside lm-evaluation-harness: an `lm_eval.api.model.LM` over our own model, registered as "minicpm".

Importing this module registers the model, after which
``lm_eval.simple_evaluate(model="minicpm", model_args="pretrained=CKPT,batch_size=8,device=cpu,dtype=fp32", ...)``
works. The three request types lm-eval makes:

- loglikelihood(context, continuation): requests are sorted by length (longest first), right-padded into
  batches (padding after the last real token cannot change a causal model's earlier positions), and only the
  continuation's positions go through the output head; requests that share context + continuation[:-1] are
  scored once (lm-eval's Collator), which cuts single-token multiple choice by the number of choices.
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows of max_length, each scored as above.
- generate_until(context, gen_kwargs): batched greedy (or temperature) decoding with a KV cache. Prompts of
  different lengths are not padded (the model takes no attention mask): the batch is prefilled up to the
  shortest prompt, and a row whose prompt is longer is fed its own next prompt token until its prompt runs out.
  Sorting by length keeps those tails short.

Inputs longer than the model's context are cut from the left, as lm-eval's HF model does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from minicpm.data.tokenizer import eos_id, load_tokenizer, vocab_size
from minicpm.errors import MiniCPMError
from minicpm.infer.tokenizer import find_tokenizer
from minicpm.interop.hf import load_model, parse_dtype
from minicpm.model.transformer import MiniCPM

log = logging.getLogger(__name__)

# The model_args the constructor takes besides `pretrained`, for the error on a misspelt one.
_OPTIONS = ("tokenizer", "batch_size", "device", "dtype", "max_length", "max_gen_toks", "prefix_token_id",
            "add_bos_token", "max_batch_size")


@register_model("minicpm")
class MiniCPMLM(TemplateLM):
    """lm-eval's model interface over a MiniCPM checkpoint directory (or an in-memory MiniCPM, for evaluators
    that run during training: then `tokenizer` is required).

    model_args: pretrained=CKPT_DIR, tokenizer=FILE_OR_DIR (default: beside the checkpoint), batch_size=8,
    device=cpu, dtype=fp32|bf16|fp16 (default: as stored), max_length (default: max_position_embeddings),
    max_gen_toks=256, prefix_token_id (what an empty context and the first rolling window condition on; default:
    the BOS the tokenizer adds itself, else the end-of-document token, which is what our shards put between
    documents), add_bos_token=false (encode with the tokenizer's own special tokens).
    """

    def __init__(self, pretrained: str | Path | MiniCPM, tokenizer: str | Path | Tokenizer | None = None,
                 batch_size: int | str = 8, device: str = "cpu", dtype: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, prefix_token_id: int | None = None,
                 add_bos_token: bool = False, max_batch_size: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise MiniCPMError(f"model_args: unknown option {sorted(unknown)[0]!r}; "
                               f"accepted: pretrained, {', '.join(_OPTIONS)}")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.add_special_tokens = bool(add_bos_token)
        if isinstance(pretrained, MiniCPM):
            if tokenizer is None:
                raise MiniCPMError("model_args: an in-memory model needs tokenizer=FILE_OR_DIR")
            self.model, self.checkpoint = pretrained, None
        else:
            self.checkpoint = str(pretrained)
            self.model = load_model(pretrained, device=device, dtype=parse_dtype(dtype, "model_args dtype")).eval()
        self.max_length = _positive_int(max_length or self.model.config.max_position_embeddings, "max_length")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(
            find_tokenizer(self.checkpoint, tokenizer))
        if vocab_size(self.tokenizer) > self.model.config.vocab_size:
            raise MiniCPMError(f"the tokenizer has {vocab_size(self.tokenizer)} tokens "
                               f"but the model only {self.model.config.vocab_size}")
        self._eot = eos_id(self.tokenizer)
        self._prefix = self._default_prefix() if prefix_token_id is None else int(prefix_token_id)

    # ------------------------------------------------------------------ what TemplateLM asks of a model

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def device(self) -> torch.device:
        return self.model.head_weight.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint or "minicpm")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=special).ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """Added to the results' "config" by simple_evaluate."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.head_weight.dtype).removeprefix("torch."),
                "max_length": self.max_length}

    def _default_prefix(self) -> int:
        with_specials = self.tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        added = with_specials[:len(with_specials) - len(plain)] if with_specials[-len(plain):] == plain else []
        return added[0] if added else self._eot

    # ------------------------------------------------------------------ scoring

    def _continuation_logprobs(self, inputs: list[list[int]], lengths: list[int]) -> list[torch.Tensor]:
        """Log-probabilities (fp32, (n, vocab)) at the last lengths[i] positions of each input, in one batch."""
        width = len(max(inputs, key=len))
        batch = torch.full((len(inputs), width), self._eot, dtype=torch.long)
        for i, ids in enumerate(inputs):
            batch[i, :len(ids)] = torch.tensor(ids)
        hidden = self.model.hidden_states(batch.to(self.device))
        out = []
        for i, (ids, n) in enumerate(zip(inputs, lengths)):
            # our forward's logits (F.linear in the model dtype, then fp32), at the scored positions only
            logits = F.linear(hidden[i, len(ids) - n:len(ids)], self.model.head_weight).float()
            out.append(F.log_softmax(logits, dim=-1))
        return out

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []

        def longest_first(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        # one forward for requests with the same context + continuation[:-1] (lm-eval's one-token cache)
        order = Collator(requests, sort_fn=longest_first, group_by="contexts",
                         group_fn=lambda request: request[1] + request[2][:-1])
        for chunk in order.get_batched(n=self.batch_size):
            inputs, scored = [], []
            for _, context, continuation in chunk:
                if not continuation:
                    raise MiniCPMError("loglikelihood: a request has an empty continuation")
                if len(continuation) > self.max_length:
                    raise MiniCPMError(f"loglikelihood: a continuation of {len(continuation)} tokens is longer "
                                       f"than max_length {self.max_length}")
                # the last token is only predicted; cut from the left past max_length (as lm-eval's HF model)
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
                scored.append(len(continuation))
            for (strings, context, continuation), logprobs in zip(chunk, self._continuation_logprobs(inputs, scored)):
                for strings, continuation, rows in order.get_cache(req_str=strings, cxt_toks=context,
                                                                   cont_toks=continuation,
                                                                   logits=logprobs.unsqueeze(0)):
                    rows = rows[0, -len(continuation):]
                    target = torch.tensor(continuation, device=rows.device)
                    answer = (float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all()))
                    results.append(answer)
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        order = Collator([request.args for request in requests], group_by="gen_kwargs",
                         sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]), group_fn=lambda args: args[1])
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            if not isinstance(all_kwargs[0], dict):
                raise MiniCPMError(f"generate_until: generation kwargs must be a dict, got {all_kwargs[0]!r}")
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            stops = handle_stop_sequences(kwargs.pop("until", None),
                                          eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise MiniCPMError(f"generate_until: max_gen_toks {max_new} leaves no room for a prompt within "
                                   f"max_length {self.max_length}")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-(self.max_length - max_new):]
                       for c in contexts]
            for context, kw, tokens in zip(contexts, all_kwargs, self._generate(prompts, max_new, stops, temperature)):
                text = postprocess_generated_text(self.tok_decode(tokens), stop=stops, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kw), text)
        return order.get_original(results)

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], max_new: int, stops: list[str],
                  temperature: float) -> list[list[int]]:
        """New token ids per prompt, up to the first stop string, end-of-document token, or max_new tokens."""
        model, device = self.model, self.device
        start = min(map(len, prompts))
        cache = model.new_cache(len(prompts), max(map(len, prompts)) + max_new)
        prefix = torch.tensor([p[:start] for p in prompts], device=device)
        logits = self._last_logits(model.hidden_states(prefix, cache))
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        position = start
        while True:
            step = []
            for i, prompt in enumerate(prompts):
                if position < len(prompt):
                    step.append(prompt[position])  # this row is still reading its own prompt
                    continue
                if not done[i]:
                    token = self._pick(logits[i], temperature)
                    new[i].append(token)
                    done[i] = (token == self.eot_token_id or len(new[i]) >= max_new
                               or any(s and s in self.tok_decode(new[i]) for s in stops))
                    step.append(token)
                else:
                    step.append(self.eot_token_id)  # a finished row idles until the batch is done
            if all(done):
                return new
            ids = torch.tensor(step, device=device)[:, None]
            logits = self._last_logits(model.hidden_states(ids, cache, start_pos=position))
            position += 1

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden[:, -1], self.model.head_weight).float()

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))


def _positive_int(value, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MiniCPMError(f"model_args: {name} must be a positive integer, got {value!r}")
    return value
