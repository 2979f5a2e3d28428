"""`minicpm quickstart`: the whole recipe in a few minutes on a laptop CPU, on the Python standard library.

1. corpus     the stdlib's .py files in two datasets: `library` (the modules) and `tests` (their test suites)
2. tokenizer  a 4096-token byte-level BPE trained on both
3. data       each dataset tokenized into shards, 2% of the files held out for evaluation
4. pretrain   a 1.3M-parameter MiniCPM (muP, lr 0.01, 2M tokens): one stable run at a constant learning rate,
              then two exponential decays branched from its checkpoints at the middle and the end (paper section
              4.3: one stable run, many decays)
5. evaluate   held-out loss and bits per byte, before and after each decay; a few generated samples
6. report     report.html with the stable run and both decays on one plot

Two-stage data (paper section 5): the decay mixes in more of the higher-quality data. Here the library modules
play that part: written for reading, with docstrings and varied code, where the test suites are long runs of
near-identical assertions. The stable mix is half and half, the decay mix 80/20 in favour of the library.

Run it again with the same --out and it picks up where it stopped.
"""

from __future__ import annotations

import json
import random
import sysconfig
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from minicpm.config import (BatchConfig, DataConfig, ModelSection, OptimConfig, ParallelConfig, RunConfig,
                            ScheduleConfig, TrainConfig)
from minicpm.files import write_atomic

PIECE_CHARS = 1500
VAL_FRACTION = Fraction(1, 50)
TOKENIZER_SAMPLE_EVERY = 3   # the tokenizer learns from every third piece (~10 MB)
PROMPTS = ("import", "def", "class")


@dataclass(frozen=True)
class Recipe:
    """The sizes of a quickstart; the defaults take ~4 minutes on an idle 2-core CPU.

    Small and wide enough to learn fast: at this compute a 1.3M-parameter model ends lower than a 2.5M or 4M one
    (measured: held-out 4.39 vs 4.45 vs 4.72 nats/token), and only its stable phase flattens enough in a few
    minutes for the decay to show the paper's drop.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    seq_len: int = 256
    tokens_per_step: int = 8192
    micro_batch_size: int = 16
    stable_steps: int = 240
    decay_steps: int = 24          # 10% of the stable run (paper section 4.3); 5 half-lives
    warmup_steps: int = 10
    eval_every: int = 24
    eval_sequences: int = 64
    file_stride: int = 1           # read every n-th stdlib file (a small corpus for tests)


def quickstart_config(out: Path, device: str = "auto", recipe: Recipe = Recipe()) -> TrainConfig:
    """The stable run's config; configs/quickstart.yaml is this with out = quickstart."""
    data, d = out / "data", recipe.hidden_size
    return TrainConfig(
        model=ModelSection(preset="tiny", hidden_size=d, intermediate_size=d * 5 // 2,
                           num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=max(1, d // 64),
                           num_key_value_heads=max(1, d // 64), max_position_embeddings=1024),
        data=DataConfig(stable={str(data / "library"): 0.5, str(data / "tests"): 0.5},
                        decay={str(data / "library"): 0.8, str(data / "tests"): 0.2},
                        tokenizer=str(out / "tokenizer" / "tokenizer.json"), eval_sequences=recipe.eval_sequences),
        optim=OptimConfig(lr=0.01),
        # the stable phase only; the decays are branched from its checkpoints
        schedule=ScheduleConfig(kind="constant", total_steps=recipe.stable_steps, warmup_steps=recipe.warmup_steps),
        batch=BatchConfig(tokens_per_step=recipe.tokens_per_step, seq_len=recipe.seq_len,
                          micro_batch_size=recipe.micro_batch_size),
        run=RunConfig(out_dir=str(out / "runs" / "stable"), log_every=4, eval_every=recipe.eval_every,
                      checkpoint_every=recipe.stable_steps // 2, keep_last=0, device=device, dtype="bf16"),
        # the chunked loss never holds the fp32 logits and is ~8% faster on a CPU (benchmarks/train_step.py)
        parallel=ParallelConfig(loss_chunk_size=2048))


# ------------------------------------------------------------------------------------------ corpus

def _is_test(relative: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]) or \
        relative.name.startswith("test_")


def split_into_pieces(text: str, min_chars: int = PIECE_CHARS) -> list[str]:
    """A source file cut at blank lines into pieces of at least min_chars characters (the last may be shorter)."""
    pieces, current = [], ""
    for block in text.split("\n\n"):
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            pieces.append(current)
            current = ""
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def _holdout_order(files: list[list[str]], fraction: Fraction, seed: int) -> list[str]:
    """The pieces of all files in one order such that prepare's held-out rule (is_held_out) takes whole files:
    held-out files are drawn at random until they fill the held-out positions (only the last one drawn may spill
    pieces into training). Their pieces are shuffled, so the first held-out windows span many files."""
    from minicpm.data.prepare import is_held_out

    rng = random.Random(seed)
    slots = [is_held_out(i, fraction) for i in range(sum(len(pieces) for pieces in files))]
    wanted = sum(slots)
    picked = list(range(len(files)))
    rng.shuffle(picked)
    held: list[str] = []
    chosen = set()
    for index in picked:
        if len(held) >= wanted:
            break
        held += files[index]
        chosen.add(index)
    train = held[wanted:] + [p for i, pieces in enumerate(files) if i not in chosen for p in pieces]
    held = held[:wanted]
    rng.shuffle(held)
    held_it, train_it = iter(held), iter(train)
    return [next(held_it) if slot else next(train_it) for slot in slots]


def _generated(text: str) -> bool:
    # the codec tables in encodings/ are generated data (gencodec.py), not code anyone wrote
    return "gencodec.py" in text[:2000]


def write_corpus(out: Path, file_stride: int = 1) -> dict[str, Path]:
    """The stdlib's .py files as JSON-lines corpora: `library` (the modules), `tests` (the test suites) and a
    `sample` of both to train the tokenizer on.

    Files are cut at blank lines into pieces of ~1.5-2 KB, so that the document shuffle of each epoch mixes code
    from many files within every training window. The held-out split is made of whole files.
    """
    from minicpm.data.sources import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = {name: out / f"{name}.jsonl" for name in ("library", "tests", "sample")}
    if all(p.is_file() for p in paths.values()):
        return paths
    files: dict[str, list[list[str]]] = {"library": [], "tests": []}
    for file in stdlib_files()[::file_stride]:
        try:
            text = file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the few deliberately mis-encoded test files
        pieces = split_into_pieces(text)
        if pieces and not _generated(text):
            files["tests" if _is_test(file.relative_to(root)) else "library"].append(pieces)
    documents = {name: _holdout_order(pieces, VAL_FRACTION, seed=0) for name, pieces in files.items()}
    documents["sample"] = [d for name in ("library", "tests") for d in documents[name][::TOKENIZER_SAMPLE_EVERY]]
    for name, path in paths.items():
        write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in documents[name]))
    return paths


# ------------------------------------------------------------------------------------------ the steps

@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())


def _say(line: str) -> None:
    print(f"[quickstart] {line}", flush=True)


def _tokenizer(corpus: dict[str, Path], out: Path, vocab_size: int) -> Path:
    from minicpm.data.tokenizer import train_tokenizer

    path = out / "tokenizer.json"
    if path.is_file():
        return path
    return train_tokenizer([str(corpus["sample"])], vocab_size, out)


def _datasets(corpus: dict[str, Path], tokenizer: Path, out: Path) -> dict[str, Path]:
    from minicpm.data.prepare import prepare

    made = {}
    for name in ("library", "tests"):
        target = out / name
        if not (target / "meta.json").is_file():
            prepare([str(corpus[name])], tokenizer, target, val_fraction=float(VAL_FRACTION), progress=False)
        made[name] = target
    return made


def _train(cfg: TrainConfig):
    from minicpm.train.trainer import train

    return train(cfg, resume=True)


def _branch(source_run: Path, step: int, decay_steps: int, out: Path):
    from minicpm.train.checkpoint import checkpoint_name
    from minicpm.train.launch import launch_config

    # a few evaluations along the decay, so that the report draws its curve
    cfg = launch_config(None, [f"run.eval_every={max(1, decay_steps // 4)}"], out=str(out), resume=True,
                        init_from=str(source_run / "checkpoints" / checkpoint_name(step)), decay_steps=decay_steps)
    return _train(cfg)


def _eval_at(run: Path, step: int) -> dict:
    from minicpm.train.metrics import read_metrics

    for record in read_metrics(run):
        if record.get("step") == step and "eval_loss" in record:
            return record
    return {}


def _samples(checkpoint: Path, tokenizer: Path, device: str) -> list[tuple[str, str]]:
    from minicpm.infer.generate import stream_text
    from minicpm.infer.tokenizer import load_codec
    from minicpm.interop.hf import load_model
    from minicpm.train.distributed import init_distributed

    model = load_model(checkpoint, device=init_distributed(device).device).eval()
    codec = load_codec(tokenizer)
    return [(prompt, "".join(stream_text(model, codec, prompt, max_new_tokens=60, temperature=0.7, top_p=0.95,
                                         seed=i)))
            for i, prompt in enumerate(PROMPTS)]


def run_quickstart(out: str | Path = "quickstart", *, device: str = "auto", recipe: Recipe = Recipe()) -> dict:
    """Run every step into `out`; print and return a summary (also written to OUT/summary.json)."""
    from minicpm.report import write_report

    out = Path(out)
    timer = Timer()
    _say(f"writing everything under {out}/")
    corpus = timer.run("corpus", write_corpus, out / "corpus", recipe.file_stride)
    _say(f"corpus: {', '.join(f'{p} ({p.stat().st_size / 1e6:.1f} MB)' for p in corpus.values())}")
    tokenizer = timer.run("tokenizer", _tokenizer, corpus, out / "tokenizer", recipe.vocab_size)
    _say(f"tokenizer: {tokenizer} ({recipe.vocab_size} tokens)")
    datasets = timer.run("data", _datasets, corpus, tokenizer, out / "data")
    _say(f"datasets: {', '.join(str(p) for p in datasets.values())}")

    cfg = quickstart_config(out, device, recipe)
    stable_run, stable_steps, decay_steps = Path(cfg.run.out_dir), recipe.stable_steps, recipe.decay_steps
    _say(f"stable phase: {stable_steps} steps at a constant learning rate -> {stable_run}")
    timer.run("train", _train, cfg)
    runs, decays = [stable_run], {}
    for step in (stable_steps // 2, stable_steps):
        target = out / "runs" / f"decay-from-{step}"
        _say(f"decay branch: {decay_steps} steps of exponential decay from step {step}, decay data mix -> {target}")
        decays[step] = timer.run("train", _branch, stable_run, step, decay_steps, target)
        runs.append(target)

    final = decays[stable_steps].checkpoint
    samples = timer.run("samples", _samples, final, tokenizer, device)
    written = timer.run("report", write_report, runs, out / "report")

    mid_step = stable_steps // 2 + decay_steps
    plateau, mid_stable = _eval_at(stable_run, stable_steps), _eval_at(stable_run, mid_step)
    decayed = _eval_at(runs[2], stable_steps + decay_steps)
    mid_decayed = _eval_at(runs[1], mid_step)
    summary = {
        "seconds": {k: round(v, 1) for k, v in timer.seconds.items()}, "total_seconds": round(timer.total(), 1),
        "stable_steps": stable_steps, "decay_steps": decay_steps, "tokens_per_step": recipe.tokens_per_step,
        "stable_eval_loss": plateau.get("eval_loss"), "decayed_eval_loss": decayed.get("eval_loss"),
        "stable_eval_bpb": plateau.get("eval_bpb"), "decayed_eval_bpb": decayed.get("eval_bpb"),
        "mid_step": mid_step, "mid_stable_eval_loss": mid_stable.get("eval_loss"),
        "mid_decayed_eval_loss": mid_decayed.get("eval_loss"),
        "final_checkpoint": str(final), "report": str(written[-1]),
        "samples": [{"prompt": p, "text": t} for p, t in samples],
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out, runs, tokenizer, datasets, written)
    return summary


def _print_summary(s: dict, out: Path, runs: list[Path], tokenizer: Path, datasets: dict[str, Path],
                   written: list[Path]) -> None:
    minutes, seconds = divmod(int(round(s["total_seconds"])), 60)
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
    stable, decay = s["stable_steps"], s["decay_steps"]
    print(f"\nminicpm quickstart: done in {minutes}m{seconds:02d}s ({parts})")
    if s["stable_eval_loss"] is not None and s["decayed_eval_loss"] is not None:
        drop = s["stable_eval_loss"] - s["decayed_eval_loss"]
        print(f"held-out loss at the end of the stable phase (step {stable}): {s['stable_eval_loss']:.3f} nats/token "
              f"({s['stable_eval_bpb']:.3f} bits/byte)\n"
              f"after {decay} decay steps (step {stable + decay}): {s['decayed_eval_loss']:.3f} nats/token "
              f"({s['decayed_eval_bpb']:.3f} bits/byte): the decay took off {drop:.3f} ({drop / s['stable_eval_loss']:.1%})")
    if s["mid_stable_eval_loss"] is not None and s["mid_decayed_eval_loss"] is not None:
        print(f"at step {s['mid_step']}, after the same tokens: stable {s['mid_stable_eval_loss']:.3f}, decayed from "
              f"step {stable // 2} {s['mid_decayed_eval_loss']:.3f}")
    print("\nsamples from the decayed model (temperature 0.7):")
    for sample in s["samples"]:
        text = (sample["prompt"] + sample["text"]).rstrip()
        print("  | " + "\n  | ".join(text.splitlines()) + "\n")
    print(f"where everything went:\n"
          f"  corpus      {out / 'corpus'}\n"
          f"  tokenizer   {tokenizer}\n"
          f"  datasets    {', '.join(str(p) for p in datasets.values())}\n"
          f"  runs        {', '.join(str(r) for r in runs)}  (config.yaml, metrics.jsonl, checkpoints/)\n"
          f"  report      {written[-1]}  ({', '.join(p.name for p in written[:-1])} beside it)\n"
          f"  summary     {out / 'summary.json'}\n"
          f"next:\n"
          f"  minicpm generate {s['final_checkpoint']} --prompt 'def'\n"
          f"  minicpm train --from {runs[0]} --decay-steps {2 * decay} --out {out / 'runs' / 'longer-decay'}\n"
          f"  minicpm report {' '.join(str(r) for r in runs)} {out / 'runs' / 'longer-decay'}")
