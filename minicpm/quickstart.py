"""`minicpm quickstart`: the whole recipe in a few minutes on a laptop CPU, on the Python standard library.

1. corpus     the stdlib's .py files in two datasets: `library` (the modules) and `tests` (their test suites)
2. tokenizer  a 4096-token byte-level BPE trained on both
3. data       each dataset tokenized into shards, 2% of the files held out
4. pretrain   a ~4M-parameter MiniCPM (muP, lr 0.01): one stable run at a constant learning rate, then two
              exponential decays branched from its checkpoints (paper section 4.3: one stable run, many decays)
5. evaluate   held-out loss and bits per byte, before and after each decay; a few generated samples
6. report     report.html with the stable run and both decays on one plot

Two-stage data (paper section 5): the decay mixes in more of the higher-quality data. Here the library modules
play that part: written for reading, with docstrings and varied code, where the test suites are long runs of
near-identical assertions. The stable mix is half and half, the decay mix 80/20 in favour of the library.

Run it again with the same --out and it picks up where it stopped.
"""

from __future__ import annotations

import json
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from minicpm.config import (BatchConfig, DataConfig, ModelSection, OptimConfig, ParallelConfig, RunConfig,
                            ScheduleConfig, TrainConfig, write_text_atomic)

VOCAB_SIZE = 4096
STABLE_STEPS = 160
DECAY_STEPS = 16       # 10% of the stable run (paper section 4.3), 5 half-lives
EVAL_EVERY = 16
PROMPTS = ("def ", "class ", "import ")


def quickstart_config(out: Path, device: str = "auto") -> TrainConfig:
    """The stable run's recipe; configs/quickstart.yaml is this with out = quickstart."""
    data = out / "data"
    return TrainConfig(
        model=ModelSection(preset="tiny", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
        data=DataConfig(stable={str(data / "library"): 0.5, str(data / "tests"): 0.5},
                        decay={str(data / "library"): 0.8, str(data / "tests"): 0.2},
                        tokenizer=str(out / "tokenizer" / "tokenizer.json"), eval_sequences=32),
        optim=OptimConfig(lr=0.01),
        # the stable phase only; the decays are branched from its checkpoints
        schedule=ScheduleConfig(kind="constant", total_steps=STABLE_STEPS, warmup_steps=10),
        batch=BatchConfig(tokens_per_step=8192, seq_len=256, micro_batch_size=16),
        run=RunConfig(out_dir=str(out / "runs" / "stable"), log_every=4, eval_every=EVAL_EVERY,
                      checkpoint_every=STABLE_STEPS // 2, keep_last=0, device=device, dtype="bf16"),
        parallel=ParallelConfig())


# ------------------------------------------------------------------------------------------ corpus

def _is_test(relative: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]) or \
        relative.name.startswith("test_")


def write_corpus(out: Path) -> dict[str, Path]:
    """The stdlib's .py files as two JSON-lines corpora, library modules and test suites."""
    from minicpm.data.sources import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = {"library": out / "library.jsonl", "tests": out / "tests.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    lines: dict[str, list[str]] = {"library": [], "tests": []}
    for file in stdlib_files():
        try:
            text = file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the few deliberately mis-encoded test files
        relative = file.relative_to(root)
        lines["tests" if _is_test(relative) else "library"].append(json.dumps({"text": text, "path": str(relative)}))
    for name, path in paths.items():
        write_text_atomic(path, "\n".join(lines[name]) + "\n")
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


def _tokenizer(corpus: dict[str, Path], out: Path) -> Path:
    from minicpm.data.tokenizer import train_tokenizer

    path = out / "tokenizer.json"
    if path.is_file():
        return path
    return train_tokenizer([str(p) for p in corpus.values()], VOCAB_SIZE, out)


def _datasets(corpus: dict[str, Path], tokenizer: Path, out: Path) -> dict[str, Path]:
    from minicpm.data.prepare import prepare

    made = {}
    for name, source in corpus.items():
        target = out / name
        if not (target / "meta.json").is_file():
            prepare([str(source)], tokenizer, target, val_fraction=0.02, progress=False)
        made[name] = target
    return made


def _train(cfg: TrainConfig):
    from minicpm.train.trainer import train

    return train(cfg, resume=True)


def _branch(source_run: Path, step: int, out: Path):
    from minicpm.train.checkpoint import checkpoint_name
    from minicpm.train.launch import launch_config

    cfg = launch_config(None, [], out=str(out), resume=True,
                        init_from=str(source_run / "checkpoints" / checkpoint_name(step)), decay_steps=DECAY_STEPS)
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
    return [(prompt, "".join(stream_text(model, codec, prompt, max_new_tokens=60, temperature=0.8, top_p=0.95,
                                         seed=i)))
            for i, prompt in enumerate(PROMPTS)]


def run_quickstart(out: str | Path = "quickstart", *, device: str = "auto") -> dict:
    """Run every step into `out`; print and return a summary (also written to OUT/summary.json)."""
    from minicpm.report import write_report

    out = Path(out)
    timer = Timer()
    _say(f"writing everything under {out}/")
    corpus = timer.run("corpus", write_corpus, out / "corpus")
    _say(f"corpus: {', '.join(f'{p} ({p.stat().st_size / 1e6:.1f} MB)' for p in corpus.values())}")
    tokenizer = timer.run("tokenizer", _tokenizer, corpus, out / "tokenizer")
    _say(f"tokenizer: {tokenizer} ({VOCAB_SIZE} tokens)")
    datasets = timer.run("data", _datasets, corpus, tokenizer, out / "data")
    _say(f"datasets: {', '.join(str(p) for p in datasets.values())}")

    cfg = quickstart_config(out, device)
    stable_run = Path(cfg.run.out_dir)
    _say(f"stable phase: {STABLE_STEPS} steps at a constant learning rate -> {stable_run}")
    timer.run("train", _train, cfg)
    runs = [stable_run]
    decays = {}
    for step in (STABLE_STEPS // 2, STABLE_STEPS):
        target = out / "runs" / f"decay-from-{step}"
        _say(f"decay branch: {DECAY_STEPS} steps of exponential decay from step {step}, decay data mix -> {target}")
        decays[step] = timer.run("train", _branch, stable_run, step, target)
        runs.append(target)

    final = decays[STABLE_STEPS].checkpoint
    samples = timer.run("samples", _samples, final, tokenizer, device)
    written = timer.run("report", write_report, runs, out / "report")

    plateau = _eval_at(stable_run, STABLE_STEPS)
    decayed = decays[STABLE_STEPS].last_eval
    mid_step = STABLE_STEPS // 2 + DECAY_STEPS
    mid_stable, mid_decayed = _eval_at(stable_run, mid_step), decays[STABLE_STEPS // 2].last_eval
    summary = {
        "seconds": {k: round(v, 1) for k, v in timer.seconds.items()}, "total_seconds": round(timer.total(), 1),
        "stable_eval_loss": plateau.get("eval_loss"), "decayed_eval_loss": decayed.get("eval_loss"),
        "stable_eval_bpb": plateau.get("eval_bpb"), "decayed_eval_bpb": decayed.get("eval_bpb"),
        "mid_stable_eval_loss": mid_stable.get("eval_loss"), "mid_decayed_eval_loss": mid_decayed.get("eval_loss"),
        "final_checkpoint": str(final), "report": str(out / "report" / "report.html"),
        "samples": [{"prompt": p, "text": t} for p, t in samples],
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out, runs, tokenizer, datasets, written, mid_step)
    return summary


def _print_summary(s: dict, out: Path, runs: list[Path], tokenizer: Path, datasets: dict[str, Path],
                   written: list[Path], mid_step: int) -> None:
    minutes, seconds = divmod(int(round(s["total_seconds"])), 60)
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
    print(f"\nminicpm quickstart: done in {minutes}m{seconds:02d}s ({parts})")
    if s["stable_eval_loss"] is not None and s["decayed_eval_loss"] is not None:
        drop = s["stable_eval_loss"] - s["decayed_eval_loss"]
        print(f"held-out loss at the end of the stable phase (step {STABLE_STEPS}): {s['stable_eval_loss']:.3f} "
              f"nats/token ({s['stable_eval_bpb']:.3f} bits/byte)\n"
              f"after {DECAY_STEPS} decay steps (step {STABLE_STEPS + DECAY_STEPS}): {s['decayed_eval_loss']:.3f} "
              f"({s['decayed_eval_bpb']:.3f} bits/byte): the decay lowered it by {drop:.3f} "
              f"({drop / s['stable_eval_loss']:.1%})")
    if s["mid_stable_eval_loss"] is not None and s["mid_decayed_eval_loss"] is not None:
        print(f"at step {mid_step}, the same tokens: stable {s['mid_stable_eval_loss']:.3f}, decayed from step "
              f"{STABLE_STEPS // 2} {s['mid_decayed_eval_loss']:.3f}")
    print("\nsamples from the decayed model:")
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
          f"  minicpm generate {s['final_checkpoint']} --prompt 'def '\n"
          f"  minicpm train --from {runs[0]}/checkpoints --decay-steps 32 --out {out}/runs/longer-decay")
