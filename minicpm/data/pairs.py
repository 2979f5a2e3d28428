"""Preference pairs for DPO: read JSONL, check, tokenize, write a prepared pairs directory, and serve batches.

A source line is one JSON object, in one of three shapes:
  {"prompt": str, "chosen": str, "rejected": str}                     plain text (prompt_format may wrap the prompt)
  {"messages": [{"role", "content"}...], "chosen": str, "rejected": str}  a conversation; the chat template renders
                                                                      it with the assistant's turn opened
  {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}   pre-tokenized, used as given
Text answers are followed by the end of the answer (EOS; in a conversation the template's end of turn), so that the
model learns where an answer stops. Prompt and answer are tokenized separately: the prompt's tokens are exactly
the prefix of both sequences (TRL tokenizes them whole and splits).

Bad lines stop the run with one MiniCPMError naming FILE:LINE (a missing or empty field, chosen identical to
rejected, a prompt that leaves no room for an answer within seq_len); a pair whose prompt + answer exceeds seq_len
is skipped and counted, as a user expects of over-long examples.

A prepared pairs directory (`prepare_pairs`) holds meta.json and pairs.safetensors (per split, the flat token ids
of prompts, chosen and rejected answers with their offsets), and under reference/ the reference model's log-probs
that `minicpm dpo precompute-ref` computed once (one file per reference checkpoint and precision).

Every row of a batch is padded to the dataset's longest pair (pad_to): a pair's log-probs then never depend on
which other pairs share its batch, so the cached reference log-probs equal the frozen reference's bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from minicpm.data import IGNORE_INDEX
from minicpm.errors import MiniCPMError
from minicpm.files import check_output, json_object_line, output_directory, read_json_object, write_atomic

FORMAT = "minicpm-pairs"
VERSION = 1
META_FILE = "meta.json"
PAIRS_FILE = "pairs.safetensors"
REFERENCE_DIR = "reference"
SPLITS = ("train", "val")
FIELDS = ("prompt", "chosen", "rejected")
PAD_MULTIPLE = 8
"""Rows are padded to a multiple of this (friendlier matmul shapes)."""


@dataclass(frozen=True)
class Pair:
    """One tokenized preference pair."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairsReadResult:
    pairs: list[Pair] = field(default_factory=list)
    skipped: int = 0
    """Pairs whose prompt + answer exceeds seq_len."""


# ---------------------------------------------------------------------------------------------------- reading

def read_pairs(path: str | Path, *, seq_len: int, tokenizer=None, prompt_format: Callable[[str], str] | None = None,
               template: str | None = None, tokenizer_dir: str | Path | None = None) -> PairsReadResult:
    """Every pair of a JSONL file, tokenized and checked (see the module docstring). `tokenizer` (a tokenizers
    Tokenizer) is needed for text; `template` names the chat template of `messages` lines (minicpm.data.chat)."""
    path = Path(path)
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such pairs file")
    encoder = _TextEncoder(tokenizer, prompt_format, template, tokenizer_dir)
    result = PairsReadResult()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            pair = _tokenized(json_object_line(line, where), where, encoder)
            if pair.chosen == pair.rejected:
                raise MiniCPMError(f"{where}: chosen and rejected are identical; a pair must prefer one answer "
                                   f"over a different one")
            if len(pair.prompt) >= seq_len:
                raise MiniCPMError(f"{where}: the prompt is {len(pair.prompt)} tokens, leaving no room for an answer "
                                   f"within seq_len {seq_len}")
            if pair.longest > seq_len:
                result.skipped += 1
                continue
            result.pairs.append(pair)
    return result


def _tokenized(record: dict[str, Any], where: str, encoder: "_TextEncoder") -> Pair:
    if any(f"{name}_ids" in record for name in FIELDS):
        ids = [_token_ids(record, f"{name}_ids", where) for name in FIELDS]
        return Pair(*ids)
    for name in ("chosen", "rejected"):
        if name not in record:
            raise MiniCPMError(f"{where}: no {name!r} field (a pair has prompt or messages, chosen and rejected; "
                               f"or prompt_ids, chosen_ids and rejected_ids)")
    chosen, rejected = (_answer_text(record[name], f"{where}: {name}") for name in ("chosen", "rejected"))
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise MiniCPMError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        prompt = encoder.conversation(messages, where)
        end = encoder.end_of_turn
    elif "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise MiniCPMError(f"{where}: prompt is empty (or not a string)")
        prompt, end = encoder.prompt(text), None
    else:
        raise MiniCPMError(f"{where}: no 'prompt' or 'messages' field")
    return Pair(prompt, encoder.answer(chosen, end), encoder.answer(rejected, end))


def _token_ids(record: dict[str, Any], name: str, where: str) -> list[int]:
    if name not in record:
        raise MiniCPMError(f"{where}: no {name!r} field (pre-tokenized pairs give prompt_ids, chosen_ids and "
                           f"rejected_ids)")
    ids = record[name]
    if not isinstance(ids, list) or not ids:
        raise MiniCPMError(f"{where}: {name} is empty (or not a list of token ids)")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise MiniCPMError(f"{where}: {name} must hold non-negative integer token ids")
    return ids


def _answer_text(value: Any, where: str) -> str:
    """An answer as text: a string, or (TRL's conversational shape) one assistant message or a list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise MiniCPMError(f"{where} is empty (or not a string)")
    return value


class _TextEncoder:
    """Text to ids with the run's tokenizer: prompts (optionally formatted), conversations through the chat
    template (imported only when a line has messages), answers followed by EOS or the template's end of turn."""

    def __init__(self, tokenizer, prompt_format, template, tokenizer_dir):
        self.tokenizer, self.prompt_format = tokenizer, prompt_format
        self.template_name, self.tokenizer_dir = template, tokenizer_dir
        self._template = None

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise MiniCPMError("text pairs need a tokenizer (--tokenizer); pre-tokenized pairs give *_ids")

    def _encode(self, text: str) -> list[int]:
        self._need_tokenizer()
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, text: str) -> list[int]:
        return self._encode(self.prompt_format(text) if self.prompt_format else text)

    def conversation(self, messages: list, where: str) -> list[int]:
        from minicpm.data.chat import get_template, render_prompt

        self._need_tokenizer()
        if self._template is None:
            self._template = get_template(self.template_name or "minicpm", tokenizer_dir=self.tokenizer_dir)
        try:
            return list(render_prompt(messages, self._template, self.tokenizer))
        except MiniCPMError as e:
            raise MiniCPMError(f"{where}: {e}") from None

    @property
    def end_of_turn(self) -> str | None:
        return None if self._template is None else self._template.end_of_turn

    def answer(self, text: str, end_of_turn: str | None) -> list[int]:
        from minicpm.data.tokenizer import eos_id

        if end_of_turn is not None:
            return self._encode(text + end_of_turn)
        return self._encode(text) + [eos_id(self.tokenizer)]


# ---------------------------------------------------------------------------------------------------- preparing

@dataclass
class PairsPrepared:
    out: Path
    counts: dict[str, int]
    skipped: int
    pad_to: int


def prepare_pairs(source: str | Path, out: str | Path, *, seq_len: int, tokenizer: str | Path | None = None,
                  val_fraction: float = 0.05, prompt_format: Callable[[str], str] | None = None,
                  template: str | None = None, overwrite: bool = False) -> PairsPrepared:
    """Read, check and tokenize a pairs JSONL into a prepared pairs directory (written under a temporary name and
    renamed when complete: a bad line leaves nothing behind)."""
    from minicpm.data.prepare import is_held_out

    out = Path(out)
    if seq_len <= 1:
        raise MiniCPMError(f"--seq-len {seq_len}: must be at least 2")
    if not 0 <= val_fraction < 1:
        raise MiniCPMError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    check_output(out, inputs=[source, tokenizer], overwrite=overwrite)
    tok, tok_hash, pad_id, vocab = None, None, 0, None
    if tokenizer is not None:
        from minicpm.data.tokenizer import load_tokenizer, tokenizer_hash, vocab_size

        tok = load_tokenizer(tokenizer)
        tok_hash, vocab = tokenizer_hash(tok), vocab_size(tok)
        pad_id = tok.token_to_id("<pad>") or 0
    tokenizer_dir = Path(tokenizer).parent if tokenizer is not None and Path(tokenizer).is_file() else tokenizer
    read = read_pairs(source, seq_len=seq_len, tokenizer=tok, prompt_format=prompt_format, template=template,
                      tokenizer_dir=tokenizer_dir)
    if not read.pairs:
        raise MiniCPMError(f"{source}: no pair fits seq_len {seq_len} ({read.skipped} skipped as too long)")
    if vocab is not None:
        for i, pair in enumerate(read.pairs):
            top = max(max(pair.prompt), max(pair.chosen), max(pair.rejected))
            if top >= vocab:
                raise MiniCPMError(f"{source}: pair {i + 1} has token id {top}, past the tokenizer's {vocab}")
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)
    splits: dict[str, list[Pair]] = {"train": [], "val": []}
    for i, pair in enumerate(read.pairs):
        splits["val" if fraction and is_held_out(i, fraction) else "train"].append(pair)
    if not splits["train"]:
        raise MiniCPMError(f"{source}: every pair was held out by val_fraction {val_fraction}; nothing to train on")
    longest = max(p.longest for p in read.pairs) - 1  # a row's inputs: the sequence without its last token
    pad_to = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, seq_len)
    meta = {"format": FORMAT, "version": VERSION, "source": str(Path(source).resolve()), "seq_len": seq_len,
            "pad_to": pad_to, "pad_id": pad_id, "tokenizer_hash": tok_hash,
            "pairs": {name: len(items) for name, items in splits.items()}, "skipped": read.skipped}
    if template is not None:  # what a DPO run's checkpoints carry, as an SFT run's do (data.prepare_chat)
        from minicpm.data.chat import get_template

        meta["chat"] = get_template(template, tokenizer_dir=tokenizer_dir).describe()
    with output_directory(out, inputs=[source, tokenizer], overwrite=overwrite) as tmp:
        _write_pairs(tmp / PAIRS_FILE, splits)
        write_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
    return PairsPrepared(out, meta["pairs"], read.skipped, pad_to)


def _write_pairs(path: Path, splits: dict[str, list[Pair]]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for split, pairs in splits.items():
        for name in FIELDS:
            seqs = [getattr(p, name) for p in pairs]
            lengths = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int64)
            tensors[f"{split}/{name}/offsets"] = lengths.cumsum(0)
            tensors[f"{split}/{name}/tokens"] = torch.tensor([t for s in seqs for t in s] or [0][:0],
                                                             dtype=torch.int64)
    save_file(tensors, str(path))


# ---------------------------------------------------------------------------------------------------- loading

class PairSplit(Sequence[Pair]):
    """One split's pairs, kept as flat token tensors with offsets; a Pair is made only when indexed."""

    def __init__(self, tensors: dict[str, torch.Tensor], split: str):
        self.tokens = {name: tensors[f"{split}/{name}/tokens"] for name in FIELDS}
        self.offsets = {name: tensors[f"{split}/{name}/offsets"].tolist() for name in FIELDS}

    def __len__(self) -> int:
        return len(self.offsets["prompt"]) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return Pair(*(self.tokens[name][self.offsets[name][index]:self.offsets[name][index + 1]].tolist()
                      for name in FIELDS))

    def max_token(self) -> int:
        return max((int(t.max()) for t in self.tokens.values() if t.numel()), default=-1)


class PreparedPairs:
    """A prepared pairs directory: its meta and each split's pairs (PairSplit: index it for Pair objects)."""

    def __init__(self, directory: str | Path):
        from safetensors.torch import load_file

        self.dir = Path(directory)
        self.meta = read_json_object(self.dir / META_FILE, missing="; not a prepared pairs directory "
                                                                   "(minicpm dpo prepare)")
        if self.meta.get("format") != FORMAT:
            raise MiniCPMError(f"{self.dir / META_FILE}: not a pairs directory (format {self.meta.get('format')!r}, "
                               f"expected {FORMAT!r}); DPO reads directories written by `minicpm dpo prepare`")
        tensors = load_file(str(self.dir / PAIRS_FILE))
        self.pad_to, self.pad_id = int(self.meta["pad_to"]), int(self.meta["pad_id"])
        self.splits: dict[str, PairSplit] = {split: PairSplit(tensors, split) for split in SPLITS}

    def __len__(self) -> int:
        return len(self.splits["train"])

    def max_token(self) -> int:
        return max(split.max_token() for split in self.splits.values())


def pair_rows(pairs: Sequence[Pair], pad_to: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs and labels of each pair's two sequences, (pairs, pad_to) each: labels hold the answer's tokens only
    (IGNORE_INDEX on the prompt and the padding), so a log-prob summed over labels is the answer's."""
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((len(pairs), pad_to), pad_id, dtype=torch.int64)
        labels = torch.full((len(pairs), pad_to), IGNORE_INDEX, dtype=torch.int64)
        for row, pair in enumerate(pairs):
            full = pair.prompt + getattr(pair, side)
            n = len(full) - 1
            ids[row, :n] = torch.tensor(full[:-1])
            labels[row, len(pair.prompt) - 1:n] = torch.tensor(full[len(pair.prompt):])
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


class PairsData:
    """The DPO run's data source: the train split's pairs in a fresh seeded order each epoch, a pure function of
    the step (so a resumed run continues the same stream with no state), and, with a cached reference, each pair's
    reference log-probs beside it (ref_chosen_logps, ref_rejected_logps)."""

    def __init__(self, directory: str | Path, *, seed: int, seq_len: int, tokenizer_hash: str | None = None,
                 split: str = "train"):
        self.prepared = PreparedPairs(directory)
        meta = self.prepared.meta
        if tokenizer_hash and meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer_hash:
            raise MiniCPMError(f"{self.prepared.dir}: prepared with tokenizer {meta['tokenizer_hash']}, the run's "
                               f"data.tokenizer is {tokenizer_hash}")
        if self.prepared.pad_to > seq_len:
            raise MiniCPMError(f"{self.prepared.dir}: its pairs need {self.prepared.pad_to} positions, more than "
                               f"batch.seq_len {seq_len}")
        self.pairs = self.prepared.splits[split]
        self.split, self.seed = split, seed
        self.reference: dict[str, torch.Tensor] | None = None

    def attach_reference(self, reference: dict[str, torch.Tensor]) -> None:
        """Serve the cached reference log-probs of this split ({"chosen", "rejected"}: one float32 per pair)."""
        self.reference = reference

    def stage(self, step: int) -> str:
        return "dpo"

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pairs), generator=g)

    def indices(self, step: int, sequences: int) -> list[int]:
        n, orders = len(self.pairs), {}
        out = []
        for g in range(step * sequences, (step + 1) * sequences):
            epoch = g // n
            if epoch not in orders:
                orders[epoch] = self.order(epoch).tolist()
            out.append(orders[epoch][g % n])
        return out

    def next_batch(self, step: int, sequences: int) -> dict[str, torch.Tensor]:
        picked = self.indices(step, sequences)
        batch = pair_rows([self.pairs[i] for i in picked], self.prepared.pad_to, self.prepared.pad_id)
        if self.reference is not None:
            index = torch.tensor(picked)
            batch["ref_chosen_logps"] = self.reference["chosen"][index]
            batch["ref_rejected_logps"] = self.reference["rejected"][index]
        return batch

    def check_token_ids(self, vocab_size: int) -> None:
        top = self.prepared.max_token()
        if top >= vocab_size:
            raise MiniCPMError(f"{self.prepared.dir}: has token id {top}, past the model's vocabulary of {vocab_size}")

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("pairs", len(self.pairs))) != len(self.pairs):
            raise MiniCPMError(f"{self.prepared.dir}: the checkpoint was trained on {state['pairs']} pairs, this "
                               f"directory holds {len(self.pairs)}; resume on the same data")


def reference_fingerprint(source: str | Path, dtype: str) -> str:
    """Names a reference's cached log-probs: SHA-256 over the weight files of the resolved source and the precision
    the log-probs were computed in."""
    import hashlib

    from minicpm.checkpoints.integrity import sha256_file
    from minicpm.checkpoints.verify import resolve_verified_weights

    root = resolve_verified_weights(source)
    digest = hashlib.sha256(f"dtype={dtype}\n".encode())
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in (".safetensors", ".distcp")
                                                                  or p.name in (".metadata", "config.json")))
    if not files:
        raise MiniCPMError(f"{root}: no weight files to fingerprint")
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()} {sha256_file(path)}\n".encode())
    return digest.hexdigest()[:20]


def reference_file(directory: str | Path, fingerprint: str) -> Path:
    """Where a prepared directory keeps the log-probs of the reference model with this fingerprint."""
    return Path(directory) / REFERENCE_DIR / f"{fingerprint}.safetensors"


def write_reference(directory: str | Path, fingerprint: str, logps: dict[str, dict[str, torch.Tensor]],
                    info: dict[str, str]) -> Path:
    """Save {split: {"chosen", "rejected"}} reference log-probs (float32, one per pair) atomically."""
    from safetensors.torch import save

    tensors = {f"{split}/{side}": t.float().contiguous() for split, sides in logps.items() for side, t in sides.items()}
    return write_atomic(reference_file(directory, fingerprint), save(tensors, metadata=info))


def read_reference(directory: str | Path, fingerprint: str, split: str, *, how: str) -> dict[str, torch.Tensor]:
    """The cached reference log-probs of one split; `how` tells the user how to compute them when missing."""
    from safetensors.torch import load_file

    path = reference_file(directory, fingerprint)
    if not path.is_file():
        raise MiniCPMError(f"{directory}: no cached reference log-probs for this reference ({path.name} missing); "
                           f"compute them once with `{how}`")
    tensors = load_file(str(path))
    return {side: tensors[f"{split}/{side}"] for side in ("chosen", "rejected")}


def epoch_steps(directory: str | Path, pairs_per_step: int) -> int:
    """Optimizer steps of one epoch over a prepared directory's train split (the paper's DPO: one epoch)."""
    return max(1, len(PreparedPairs(directory)) // pairs_per_step)
