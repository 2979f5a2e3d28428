"""The runs of `minicpm reproduce`: one recipe (OUT/recipe.yaml), the overrides that make each run, the jobs that
train them, and what is read back from them.

Every run is a job of minicpm.jobs: an ordinary run directory that resumes where it stopped, so the same command
again continues a killed reproduction, and a finished run is only read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.jobs.job import Job
from minicpm.reproduce.plan import SEQ_LEN, SHAPE, Plan
from minicpm.rundir import RunDir, is_complete
from minicpm.scaling.campaign import FINAL_ONLY, STABLE_OVERRIDES
from minicpm.scaling.decay import branch_decay, train_stable_stages

RECIPE = Path(__file__).parents[1] / "configs" / "reproduce.yaml"
SFT_RECIPE = Path(__file__).parents[1] / "configs" / "sft.yaml"
MICRO_BATCH_ROWS = 16


@dataclass
class Corpus:
    """The prepared data every run trains on: the quickstart's standard-library text (`minicpm quickstart --out DIR`
    writes DIR/corpus/{library,tests,sample}.jsonl), tokenized anew with a small vocabulary (plan.vocab_size: at
    widths of 16 to 256 a 4096-token vocabulary spends most of each step on the logits)."""

    library: Path
    tests: Path
    tokenizer: Path

    def mixture(self) -> dict[str, float]:
        """The one mixture every run trains on (no decay-stage switch: every arm sees the same data)."""
        return {str(self.library.resolve()): 0.5, str(self.tests.resolve()): 0.5}


def quickstart_text(root: str | Path) -> dict[str, Path]:
    """The quickstart's corpus files, checked before anything is written."""
    root = Path(root)
    files = {name: root / "corpus" / f"{name}.jsonl" for name in ("library", "tests", "sample")}
    missing = [p for p in files.values() if not p.is_file()]
    if missing:
        raise MiniCPMError(f"{missing[0]}: missing; run `minicpm quickstart --out {root}` first (reproduce trains on "
                           f"its standard-library corpus), or give --data its directory")
    return files


def prepare_corpus(text: dict[str, Path], out: Path, vocab_size: int) -> Corpus:
    """OUT/data: a byte-level BPE of vocab_size tokens trained on the quickstart's sample, and the library and tests
    text tokenized with it (each kept when already made)."""
    from minicpm.data.prepare import prepare
    from minicpm.data.stdlib_corpus import VAL_FRACTION
    from minicpm.data.tokenizer import train_tokenizer

    root = out / "data"
    tokenizer = root / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = train_tokenizer([str(text["sample"])], vocab_size, root / "tokenizer")
    for name in ("library", "tests"):
        if not (root / name / "meta.json").is_file():
            prepare([str(text[name])], tokenizer, root / name, val_fraction=float(VAL_FRACTION), workers=1,
                    progress=False, overwrite=True)
    return Corpus(root / "library", root / "tests", tokenizer)


def write_recipe(out: Path, corpus: Corpus, plan: Plan) -> Path:
    """OUT/recipe.yaml: configs/reproduce.yaml on the corpus, the base of every run."""
    from minicpm.train.config import config_to_yaml, load_config

    cfg = load_config(RECIPE, [f"data.tokenizer={corpus.tokenizer.resolve()}",
                               f"data.eval_sequences={plan.eval_sequences}", f"batch.seq_len={SEQ_LEN}",
                               f"schedule.warmup_steps={plan.warmup_steps}"])
    cfg.data.stable = corpus.mixture()
    cfg.data.decay = None
    return write_atomic(out / "recipe.yaml", config_to_yaml(cfg))


def shape(width: int, depth: int, *, base_width: int) -> list[str]:
    """The model of a run: heads of 16, d_ff = 2.5·d, μP base width `base_width`."""
    return [f"model.{k}={v}" for k, v in SHAPE.fields(width, depth).items()] + [f"model.dim_model_base={base_width}"]


def non_embedding_params(width: int, depth: int) -> int:
    import dataclasses

    from minicpm.model.config import preset

    return dataclasses.replace(preset("tiny"), **SHAPE.fields(width, depth)).non_embedding_params()


def batch(tokens_per_step: int) -> list[str]:
    rows = tokens_per_step // SEQ_LEN
    return [f"batch.tokens_per_step={tokens_per_step}", f"batch.micro_batch_size={min(MICRO_BATCH_ROWS, rows)}"]


def lr(log2_lr: float) -> str:
    return f"optim.lr={2.0 ** log2_lr!r}"


@dataclass
class Run:
    """A planned run: its job and the step its result is read at."""

    job: Job
    final_step: int
    key: str = "eval_loss"
    """The metric its final evaluation logs (an SFT run: eval_answer_loss)."""

    @property
    def run_dir(self) -> Path:
        return self.job.run_dir

    def done(self) -> bool:
        if self.job.work is train_stable_stages:
            return all(is_complete(RunDir(self.run_dir).checkpoint_dir(s)) for s in self.job.kwargs["stages"])
        return final_eval(self.run_dir, self.final_step, self.key) is not None


def single_run(name: str, run_dir: Path, recipe: Path, overrides: Sequence[str], final_step: int) -> Run:
    """A run from scratch with one evaluation, at its end."""
    return Run(Job(name, run_dir, {"config": str(recipe), "overrides": [*overrides, *FINAL_ONLY],
                                   "run_dir": str(run_dir)}), final_step)


def stable_run(name: str, run_dir: Path, recipe: Path, overrides: Sequence[str], stages: Sequence[int]) -> Run:
    """A constant-LR run checkpointed (and evaluated) at every step of `stages` (paper §4.3: one stable run, decays
    branched from it)."""
    stages = sorted(set(stages))
    return Run(Job(name, run_dir, {"config": str(recipe), "overrides": [*overrides, *STABLE_OVERRIDES],
                                   "run_dir": str(run_dir), "stages": stages}, work=train_stable_stages), stages[-1])


def branch_run(name: str, run_dir: Path, stable: Run, step: int, decay_steps: int, decay: str,
               overrides: Sequence[str] = ()) -> Run:
    """A decay of decay_steps branched from the stable run's checkpoint at `step` (its optimizer and data state)."""
    source = RunDir(stable.run_dir).checkpoint_dir(step)
    return Run(Job(name, run_dir, {"source": str(source), "decay_steps": decay_steps, "out": str(run_dir),
                                   "overrides": [*FINAL_ONLY, *overrides], "decay": decay},
                   work=branch_decay, ready=lambda: is_complete(source), blocked_by=stable.job.name),
               step + decay_steps)


def continue_constant(source: str, steps: int, out: str, overrides: Sequence[str] = ()):
    """Continue a stable run's checkpoint at its constant LR for `steps` more steps into a new run directory: the
    control arm beside a decay branched from the same checkpoint."""
    from minicpm.rundir import checkpoint_step
    from minicpm.train.launch import launch_config
    from minicpm.train.loop import train

    start = checkpoint_step(source)
    cfg = launch_config(None, [*overrides, f"schedule.total_steps={start + steps}"], out=out, resume=True,
                        init_from=source)
    return train(cfg, resume=True)


def continue_run(name: str, run_dir: Path, stable: Run, step: int, steps: int, overrides: Sequence[str] = ()) -> Run:
    source = RunDir(stable.run_dir).checkpoint_dir(step)
    return Run(Job(name, run_dir, {"source": str(source), "steps": steps, "out": str(run_dir),
                                   "overrides": [*FINAL_ONLY, *overrides]},
                   work=continue_constant, ready=lambda: is_complete(source), blocked_by=stable.job.name),
               step + steps)


def after_run(name: str, run_dir: Path, recipe: Path, overrides: Sequence[str], final_step: int, first: Run,
              key: str = "eval_loss") -> Run:
    """A run from `recipe` that starts once `first` has finished (SFT on a decayed model); `key`: what its final
    evaluation logs."""
    return Run(Job(name, run_dir, {"config": str(recipe), "overrides": list(overrides), "run_dir": str(run_dir)},
                   ready=first.done, blocked_by=first.job.name), final_step, key)


def final_eval(run_dir: Path, step: int, key: str = "eval_loss") -> dict | None:
    if not RunDir(run_dir).metrics_file.is_file():
        return None
    return RunDir(run_dir).last_eval(key, step=step)


def final_loss(run_dir: Path, step: int, key: str = "eval_loss") -> float | None:
    """The held-out loss at `step`; None when the run has not got there, nan when it diverged."""
    record = final_eval(run_dir, step, key)
    if record is None:
        return None
    value = float(record[key])
    return value if math.isfinite(value) else math.nan


def last_checkpoint(run: Run) -> Path:
    return RunDir(run.run_dir).checkpoint_dir(run.final_step)


# ------------------------------------------------------------------------------- learning-rate optima

def optimum_log2_lr(losses: dict[float, float | None]) -> tuple[float | None, bool]:
    """The log₂ learning rate of the lowest loss on a grid, refined by the vertex of the parabola through it and its
    two neighbours (losses are smooth in log lr near the optimum); (None, False) with no finished point. The bool
    says the optimum lies at the grid's edge (the true optimum may lie beyond)."""
    done = {k: v for k, v in losses.items() if v is not None and math.isfinite(v)}
    if not done:
        return None, False
    grid = sorted(losses)
    best = min(done, key=done.get)
    i = grid.index(best)
    if i in (0, len(grid) - 1):
        return float(best), True
    x = np.array(grid[i - 1:i + 2], dtype=float)
    y = np.array([losses[k] for k in grid[i - 1:i + 2]], dtype=float)
    if not np.all(np.isfinite(y)):
        return float(best), False
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 <= 0:
        return float(best), False
    return float(np.clip(-c1 / (2 * c2), x[0], x[-1])), False


def write_json(path: Path, doc) -> Path:
    return write_atomic(path, json.dumps(doc, indent=1, sort_keys=False, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")
