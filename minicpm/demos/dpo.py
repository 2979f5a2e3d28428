"""The DPO step of the align demo: stdlib docstring pairs, a cached reference, one epoch of DPO from a checkpoint,
and the held-out preference accuracy before and after.

`run_dpo_demo(checkpoint, out)` is what `minicpm quickstart --align` runs after SFT (and `minicpm dpo demo CKPT`
runs alone on any checkpoint with a tokenizer). It trains configs/dpo.yaml — the paper's recipe: cosine, one epoch,
plain learning rates — with the demo's sizes; only the learning rate differs from the paper's 1e-5, which is for a
2.4B model trained on ~100K pairs: a 1.3M-parameter model and ~1000 pairs need a larger one to move in one epoch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from minicpm.files import write_atomic

RECIPE = Path(__file__).parents[1] / "configs" / "dpo.yaml"


@dataclass(frozen=True)
class DemoSizes:
    """The demo's sizes (the defaults take about a minute on an idle 2-core CPU for the quickstart's model)."""

    pairs: int = 1200
    """Stdlib pairs built; val_fraction of them are held out."""
    val_fraction: float = 0.1
    seq_len: int = 128
    """Tokens a prompt + answer may take (longer pairs are skipped)."""
    pairs_per_step: int = 16
    lr: float = 1e-4
    beta: float = 0.1
    kind: str = "truncated"
    """Which preference (minicpm.data.stdlib_pairs): truncated (a complete summary over one cut mid-sentence) or
    mismatched (a function's own summary over another function's)."""


def _say(line: str) -> None:
    print(f"[dpo] {line}", flush=True)


def run_dpo_demo(checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                 pairs: int | None = None, device: str = "auto", sizes: DemoSizes = DemoSizes(),
                 template: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """Pairs → prepared directory → cached reference → DPO (one epoch) → held-out accuracy before and after;
    prints and returns the summary (also OUT/dpo_summary.json). A rerun on the same `out` reuses its pairs and
    cached reference when they are the same, and trains afresh.

    template: after SFT on conversations, the chat template the SFT model was trained with (minicpm.data.chat):
    each prompt becomes a user turn rendered by it, each answer an assistant turn. None: plain-text prompts."""
    import shutil

    from minicpm.train.config import load_config
    from minicpm.data.pairs import (META_FILE, PreparedPairs, epoch_steps, prepare_pairs, reference_file,
                                    reference_fingerprint)
    from minicpm.data.stdlib_pairs import write_stdlib_pairs
    from minicpm.infer.tokenizer import find_tokenizer
    from minicpm.train.distributed import init_distributed, resolve_dtype
    from minicpm.checkpoints.verify import resolve_verified_weights
    from minicpm.train.dpo import precompute_reference
    from minicpm.train.loop import Trainer

    out = Path(out)
    started = time.perf_counter()
    checkpoint = resolve_verified_weights(checkpoint)
    tokenizer = Path(tokenizer) if tokenizer else find_tokenizer(checkpoint)
    n = pairs or sizes.pairs
    source = out / "stdlib_pairs.jsonl"
    previous = source.read_bytes() if source.is_file() else None
    write_stdlib_pairs(source, n, as_messages=template is not None, kind=sizes.kind)
    pairs_dir = out / "pairs"
    if previous != source.read_bytes() or not (pairs_dir / META_FILE).is_file():  # else: a rerun, same pairs
        prepared = prepare_pairs(source, pairs_dir, seq_len=sizes.seq_len, tokenizer=tokenizer,
                                 val_fraction=sizes.val_fraction, template=template, overwrite=True)
        _say(f"pairs: {prepared.counts['train']} train, {prepared.counts['val']} held out "
             f"({prepared.skipped} longer than {sizes.seq_len} tokens skipped) -> {pairs_dir}")
    counts = PreparedPairs(pairs_dir).meta["pairs"]
    dist = init_distributed(device)
    dtype = resolve_dtype("auto", dist.device)
    if not reference_file(pairs_dir, reference_fingerprint(checkpoint, dtype)).is_file():
        precompute_reference(checkpoint, pairs_dir, batch_size=32, device=device, dtype=dtype)
    _say(f"reference log-probs cached in {pairs_dir / 'reference'}")
    steps = epoch_steps(pairs_dir, sizes.pairs_per_step)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(RECIPE, [
        f"run.out_dir={run_dir}", f"run.device={device}", f"run.dtype={dtype}", f"data.tokenizer={tokenizer}",
        f"batch.seq_len={sizes.seq_len}", f"batch.tokens_per_step={sizes.seq_len * sizes.pairs_per_step}",
        f"batch.micro_batch_size={sizes.pairs_per_step}", f"optim.lr={sizes.lr}", f"objective.options.beta={sizes.beta}",
        f"schedule.total_steps={steps}", f"schedule.warmup_steps={max(1, steps // 10)}", "run.eval_every=0",
        f"run.log_every={max(1, steps // 8)}", "run.checkpoint_every=0", "run.progress=false", *overrides])
    cfg.data.stable = {str(pairs_dir): 1.0}
    cfg.run.init_weights_from = str(checkpoint)
    cfg.evaluators = [{"kind": "preference", "batch_size": 32}]
    trainer = Trainer(cfg)
    trainer.module.load_weights(checkpoint)
    before = trainer.evaluators[0](trainer.module)
    _say(f"before DPO: held-out preference accuracy {before['accuracy_per_token']:.3f} per answer token "
         f"({before['accuracy']:.3f} summed)")
    _say(f"DPO: {steps} steps (one epoch) of {sizes.pairs_per_step} pairs, lr {sizes.lr:g} cosine, beta "
         f"{sizes.beta:g} -> {run_dir}")
    result = trainer.fit()
    after = {k.removeprefix("eval/preference/"): v for k, v in result.last_eval.items()
             if k.startswith("eval/preference/")}
    summary = {"checkpoint": str(checkpoint), "pairs": counts, "steps": steps,
               "before": before, "after": after, "run": str(run_dir), "final_checkpoint": str(result.checkpoint),
               "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(out / "dpo_summary.json", json.dumps(summary, indent=2) + "\n")
    _say(f"after DPO: held-out preference accuracy {after.get('accuracy_per_token', float('nan')):.3f} per answer "
         f"token ({after.get('accuracy', float('nan')):.3f} summed) "
         f"(reward accuracy {after.get('reward_accuracy', float('nan')):.3f}, margin "
         f"{after.get('margin', float('nan')):.3f}); {summary['seconds']:.0f} s")
    return summary
