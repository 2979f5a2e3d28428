"""MiniCPM-MoE demo (paper section 6 at toy scale): upcycle the quickstart's stable checkpoint to 8 experts, top-2,
and continue training it; next to it the dense model continued from the same checkpoint for the same tokens with
the same schedule. Prints the held-out loss and tokens/s of each.

    python benchmarks/moe_upcycle_demo.py --out /tmp/moe-demo                       # the quickstart's stable run
    python benchmarks/moe_upcycle_demo.py --out /tmp/moe-demo --stable-steps 48 --continue-steps 24 \
        --tokens-per-step 4096 --file-stride 4

The stable phase is configs/quickstart.yaml (1.3M parameters, 8192 tokens/step, constant lr); --stable-steps,
--tokens-per-step and --file-stride shrink it for a loaded machine. Both continuations are weights-only starts with a
WSD schedule (warmup, then the last 20% an exponential decay); the MoE one also learns its balance loss (× 0.01).
Existing stages under --out are reused (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stable-steps", type=int, default=240, help="the quickstart's stable run (default 240)")
    parser.add_argument("--continue-steps", type=int, default=60)
    parser.add_argument("--tokens-per-step", type=int, default=8192, help="the quickstart's 8192 by default")
    parser.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences (the quickstart's 64)")
    parser.add_argument("--file-stride", type=int, default=1, help="read every n-th stdlib file (default 1)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from minicpm.data.stdlib_corpus import write_corpus
    from minicpm.stages.upcycle import upcycle
    from minicpm.demos.quickstart import Recipe, quickstart_config, quickstart_datasets, quickstart_tokenizer
    from minicpm.train.loop import train

    out = Path(args.out)
    batch = (f"batch.tokens_per_step={args.tokens_per_step}", f"data.eval_sequences={args.eval_sequences}",
             f"batch.micro_batch_size={min(16, args.tokens_per_step // 256)}")
    recipe = Recipe(file_stride=args.file_stride, overrides=(*batch, f"schedule.total_steps={args.stable_steps}",
                                                              f"run.checkpoint_every={args.stable_steps}",
                                                              f"run.eval_every={args.stable_steps}"))
    corpus = write_corpus(out / "corpus", recipe.file_stride)
    tokenizer = quickstart_tokenizer(corpus, out / "tokenizer", recipe.vocab_size)
    quickstart_datasets(corpus, tokenizer, out / "data")
    stable_cfg = quickstart_config(out, args.device, recipe)
    stable = Path(stable_cfg.run.out_dir)
    if not (stable / "checkpoints").is_dir():
        train(stable_cfg)
    checkpoint = max((stable / "checkpoints").glob("step_*"))
    moe_dir = out / "upcycled"
    if not moe_dir.is_dir():
        upcycle(checkpoint, moe_dir, experts=args.experts, top_k=args.top_k)

    n = args.continue_steps
    common = [*batch, "schedule.kind=wsd", f"schedule.total_steps={n}", f"schedule.warmup_steps={max(1, n // 10)}",
              f"schedule.decay_start={n - n // 5}", f"run.eval_every={max(1, n // 2)}", "run.checkpoint_every=0",
              "run.log_every=2"]
    results = {}
    for name, source, extra in (("dense", checkpoint, []),
                                ("moe", moe_dir, [f"model.num_experts={args.experts}",
                                                  f"model.num_experts_per_tok={args.top_k}"])):
        run_dir = out / "runs" / name
        cfg = quickstart_config(out, args.device, Recipe(file_stride=args.file_stride,
                                                         overrides=(*common, *extra,
                                                                    f"run.init_weights_from={source}")))
        cfg.run.out_dir = str(run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            start = time.perf_counter()
            train(cfg)
            print(f"{name}: {time.perf_counter() - start:.0f} s")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        results[name] = {"train_loss": train_rows[-1]["loss"], "eval_loss": evals[-1]["eval_loss"],
                         "eval_bpb": evals[-1]["eval_bpb"],
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows),
                         "tokens": train_rows[-1]["tokens"]}
    stable_eval = [json.loads(line) for line in (stable / "metrics.jsonl").read_text().splitlines()]
    stable_eval = [r for r in stable_eval if "eval_loss" in r][-1]
    print(f"stable checkpoint {checkpoint}: held-out loss {stable_eval['eval_loss']:.4f}")
    print(f"continued {results['dense']['tokens']:,} tokens each ({n} steps, WSD):")
    print(f"{'run':<8}{'train loss':>12}{'held-out loss':>15}{'bits/byte':>11}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<8}{r['train_loss']:>12.4f}{r['eval_loss']:>15.4f}{r['eval_bpb']:>11.4f}"
              f"{r['tokens_per_s']:>10.0f}")
    (out / "demo.json").write_text(json.dumps({"stable_eval_loss": stable_eval["eval_loss"], **results}, indent=2))


if __name__ == "__main__":
    main()
