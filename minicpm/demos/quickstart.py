"""`minicpm quickstart`: the whole recipe in a few minutes on a laptop CPU, on the Python standard library.

1. corpus     the stdlib's .py files in two datasets: `library` (the modules) and `tests` (their test suites)
2. tokenizer  a 4096-token byte-level BPE trained on both
3. data       each dataset tokenized into shards, 2% of the files held out for evaluation
4. pretrain   configs/quickstart.yaml: a 1.3M-parameter MiniCPM (muP, lr 0.01, 2M tokens), one stable run at a
              constant learning rate, then two exponential decays branched from its checkpoints at the middle and
              the end (paper section 4.3: one stable run, many decays; experiments/scaling.py)
5. evaluate   held-out loss and bits per byte, before and after each decay; a few generated samples
6. report     report.html with the stable run and both decays on one plot

Two-stage data (paper section 5): the decay mixes in more of the higher-quality data. Here the library modules
play that part: written for reading, with docstrings and varied code, where the test suites are long runs of
near-identical assertions. The stable mix is half and half, the decay mix 80/20 in favour of the library.

Run it again with the same --out and it picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from minicpm.train.config import TrainConfig, load_config
from minicpm.files import write_atomic

RECIPE = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
RECIPE_ROOT = "quickstart"
"""The recipe's paths lie under this directory; a quickstart with another --out moves them there."""
PROMPTS = ("import", "def", "class")


@dataclass(frozen=True)
class Recipe:
    """What the quickstart adds to configs/quickstart.yaml; the defaults take ~4 minutes on an idle 2-core CPU."""

    vocab_size: int = 4096
    """Tokens of the BPE tokenizer trained on the corpus."""
    decay_steps: int = 24
    """Steps of each decay branch: 10% of the stable run (paper section 4.3), 5 half-lives."""
    file_stride: int = 1
    """Read every n-th stdlib file (a small corpus for tests)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides of the recipe file (tests shrink the model and the run with them)."""


def quickstart_config(out: Path, device: str = "auto", recipe: Recipe = Recipe()) -> TrainConfig:
    """The stable run's config: configs/quickstart.yaml with its paths moved under `out`."""
    cfg = load_config(RECIPE, [f"run.device={device}", *recipe.overrides])
    move = lambda p: str(out / Path(p).relative_to(RECIPE_ROOT))  # noqa: E731
    cfg.data.stable = {move(k): v for k, v in cfg.data.stable.items()}
    cfg.data.decay = {move(k): v for k, v in cfg.data.decay.items()}
    cfg.data.tokenizer = move(cfg.data.tokenizer)
    cfg.run.out_dir = move(cfg.run.out_dir)
    return cfg


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


def quickstart_tokenizer(corpus: dict[str, Path], out: Path, vocab_size: int) -> Path:
    from minicpm.data.tokenizer import train_tokenizer

    path = out / "tokenizer.json"
    if path.is_file():
        return path
    return train_tokenizer([str(corpus["sample"])], vocab_size, out)


def quickstart_datasets(corpus: dict[str, Path], tokenizer: Path, out: Path) -> dict[str, Path]:
    from minicpm.data.prepare import prepare
    from minicpm.data.stdlib_corpus import VAL_FRACTION

    made = {}
    for name in ("library", "tests"):
        target = out / name
        if not (target / "meta.json").is_file():
            prepare([str(corpus[name])], tokenizer, target, val_fraction=float(VAL_FRACTION), progress=False)
        made[name] = target
    return made


def _eval_at(run: Path, step: int) -> dict:
    from minicpm.rundir import RunDir

    return RunDir(run).last_eval(step=step) or {}


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
    from minicpm.data.stdlib_corpus import write_corpus
    from minicpm.scaling.decay import stable_with_decays
    from minicpm.report.run import write_report

    out = Path(out)
    timer = Timer()
    _say(f"writing everything under {out}/")
    corpus = timer.run("corpus", write_corpus, out / "corpus", recipe.file_stride)
    _say(f"corpus: {', '.join(f'{p} ({p.stat().st_size / 1e6:.1f} MB)' for p in corpus.values())}")
    tokenizer = timer.run("tokenizer", quickstart_tokenizer, corpus, out / "tokenizer", recipe.vocab_size)
    _say(f"tokenizer: {tokenizer} ({recipe.vocab_size} tokens)")
    datasets = timer.run("data", quickstart_datasets, corpus, tokenizer, out / "data")
    _say(f"datasets: {', '.join(str(p) for p in datasets.values())}")

    cfg = quickstart_config(out, device, recipe)
    stable_run, stable_steps, decay_steps = Path(cfg.run.out_dir), cfg.schedule.total_steps, recipe.decay_steps
    _say(f"stable phase: {stable_steps} steps at a constant learning rate -> {stable_run}")
    announce = lambda step, target: _say(  # noqa: E731
        f"decay branch: {decay_steps} steps of exponential decay from step {step}, decay data mix -> {target}")
    # a few evaluations along each decay, so that the report draws its curve
    trained = timer.run("train", stable_with_decays, cfg, [stable_steps // 2, stable_steps], decay_steps,
                        out / "runs", decay_overrides=[f"run.eval_every={max(1, decay_steps // 4)}"],
                        on_branch=announce)
    runs = trained.runs

    final = trained.decays[stable_steps].checkpoint
    samples = timer.run("samples", _samples, final, tokenizer, device)
    written = timer.run("report", write_report, runs, out / "report")

    mid_step = stable_steps // 2 + decay_steps
    plateau, mid_stable = _eval_at(stable_run, stable_steps), _eval_at(stable_run, mid_step)
    decayed = _eval_at(runs[2], stable_steps + decay_steps)
    mid_decayed = _eval_at(runs[1], mid_step)
    summary = {
        "seconds": {k: round(v, 1) for k, v in timer.seconds.items()}, "total_seconds": round(timer.total(), 1),
        "stable_steps": stable_steps, "decay_steps": decay_steps, "tokens_per_step": cfg.batch.tokens_per_step,
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
