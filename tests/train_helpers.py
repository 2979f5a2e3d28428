"""Shared by the trainer tests (and the subprocesses they start): a tiny config and an in-memory data source."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minicpm.train.config import load_config
from minicpm.data.pretrain import rows_to_batch

TIMING_KEYS = ("tokens_per_s", "mfu")


def tiny_config(out_dir, *overrides):
    return load_config(None, [
        "model.preset=tiny", "batch.seq_len=32", "batch.tokens_per_step=256", "batch.micro_batch_size=4",
        "schedule.total_steps=12", "schedule.warmup_steps=2", "schedule.decay_start=8", "run.log_every=2",
        "run.checkpoint_every=3", "run.eval_every=0", "run.keep_last=0", "run.progress=false", "run.device=cpu",
        f"run.out_dir={out_dir}", *overrides])


class PatternData:
    """Two streams of learnable rows (an arithmetic progression mod the vocabulary from a random start and
    stride), one per stage, each a pure function of its seed and how many rows it has handed out."""

    def __init__(self, schedule, vocab_size=512, seq_len=32, seed=0):
        self.schedule, self.vocab, self.seq_len, self.seed = schedule, vocab_size, seq_len, seed
        self.drawn = {"stable": 0, "decay": 0}

    def stage(self, step):
        return "decay" if self.schedule.in_decay(step) else "stable"

    def next_batch(self, step, sequences):
        stage = self.stage(step)
        g = torch.Generator().manual_seed(self.seed * 7919 + (stage == "decay") * 104729 + self.drawn[stage])
        self.drawn[stage] += sequences
        start = torch.randint(0, self.vocab, (sequences, 1), generator=g)
        stride = torch.randint(1, 5 if stage == "stable" else 3, (sequences, 1), generator=g)
        rows = (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        return rows_to_batch(rows)

    def state_dict(self):
        return dict(self.drawn)

    def load_state_dict(self, state):
        self.drawn = dict(state)


class Crash(Exception):
    pass


class CrashingData(PatternData):
    """Fails when asked for the batch of `crash_step`, like a process killed during that step."""

    def __init__(self, schedule, crash_step):
        super().__init__(schedule)
        self.crash_step = crash_step

    def next_batch(self, step, sequences):
        if step == self.crash_step:
            raise Crash(step)
        return super().next_batch(step, sequences)


def metrics_without_timing(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega value index count total "
         "return yield import class def self print range list dict").split()


def write_corpus(directory, *, documents, seed, style):
    """Small text files from a seeded grammar: 'code' lines look like Python, 'prose' lines like sentences."""
    import random

    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        lines = []
        for _ in range(rng.randint(4, 12)):
            a, b, c = rng.sample(WORDS, 3)
            if style == "code":
                lines.append(f"    {a} = {b}({c}, {rng.randint(0, 9)})")
            else:
                lines.append(f"The {a} of the {b} is a {c}.")
        (directory / f"doc{i:04d}.txt").write_text("\n".join(lines) + "\n")
    return directory


def make_datasets(root, vocab_size=512):
    """A tokenizer and two prepared datasets ('code' and 'prose') under root; returns their paths."""
    from minicpm.data.prepare import prepare
    from minicpm.data.tokenizer import train_tokenizer

    root = Path(root)
    code = write_corpus(root / "text/code", documents=120, seed=1, style="code")
    prose = write_corpus(root / "text/prose", documents=120, seed=2, style="prose")
    tokenizer = train_tokenizer([str(code), str(prose)], vocab_size, root / "tokenizer")
    out = {}
    for name, source in (("code", code), ("prose", prose)):
        out[name] = prepare([str(source)], tokenizer, root / name, val_fraction=0.1, workers=1, progress=False).out
    return tokenizer, out["code"], out["prose"]
