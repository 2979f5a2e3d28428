"""Forward+backward throughput and peak memory: our MiniCPM against transformers' LlamaForCausalLM.

Both models get identical shapes (tied embedding, SDPA attention, no biases) and the identical loss
(fp32 cross-entropy over the logits each forward returns); neither takes an optimizer step. Every (size,
precision, model) case runs in a fresh subprocess, and the cases alternate ours/peer over --rounds rounds;
the table keeps each case's best round, which is the least disturbed by other work on the machine.

Peak memory. On CUDA: torch.cuda.max_memory_allocated over the steps, minus the memory held before them.
On CPU: the growth of the process's resident-set high-water mark (VmHWM in /proc/self/status) over its size
just before the first step, with the mark reset at that moment by writing 5 to /proc/self/clear_refs. It counts
what the steps add (activations, gradients, autocast copies, allocator slack), not the weights or the imports.

    python benchmarks/model_step.py                 # 20M and 100M, fp32 and bf16 autocast, sequence 512
    python benchmarks/model_step.py --sizes 20M --precisions fp32 --steps 2 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SIZES = {
    # paper Table 8 shapes (d_ff = 2.5 d, head_dim 64) with a 32K vocabulary
    "20M": dict(hidden_size=320, intermediate_size=800, num_hidden_layers=8, num_attention_heads=5),
    "100M": dict(hidden_size=768, intermediate_size=1920, num_hidden_layers=12, num_attention_heads=12),
}
VOCAB = 32000


def _memory_kib() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def _build(impl: str, size: str, seq: int, device: str):
    import torch

    shape = dict(SIZES[size], vocab_size=VOCAB, num_key_value_heads=SIZES[size]["num_attention_heads"],
                 max_position_embeddings=seq, tie_word_embeddings=True)
    if impl == "ours":
        from minicpm.model.config import ModelConfig
        from minicpm.optim.mup import build_model

        model = build_model(ModelConfig(**shape), device=device)
        return model, lambda ids: model(ids)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    device, seq, batch = case["device"], case["seq"], case["batch"]
    torch.manual_seed(0)
    model, logits_of = _build(case["impl"], case["size"], seq, device)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=case["precision"] == "bf16")

    def step():
        with autocast:
            logits = logits_of(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _memory_kib()["VmRSS"] * 1024
    times = []
    for i in range(case["warmup"] + case["steps"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _memory_kib()["VmHWM"] * 1024
    params = sum(p.numel() for p in model.parameters())
    return dict(case, params=params, tokens_per_s=batch * seq / statistics.median(times), peak_bytes=peak - before)


def _subprocess(case: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(f"case {case} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="repeat every case; the best round is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device "
          f"{args.device}, batch {args.batch} x seq {args.seq}, median of {args.steps} steps, best of "
          f"{args.rounds} rounds", flush=True)
    results: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for size in args.sizes:
            for precision in args.precisions:
                impls = ("ours", "llama") if round_ % 2 == 0 else ("llama", "ours")
                for impl in impls:
                    case = dict(impl=impl, size=size, precision=precision, seq=args.seq, batch=args.batch,
                                steps=args.steps, warmup=args.warmup, device=args.device)
                    r = _subprocess(case)
                    print(f"  round {round_ + 1}: {size:>4} {precision} {impl:<5} {r['tokens_per_s']:8.0f} tok/s "
                          f"{r['peak_bytes'] / 2**20:8.0f} MiB", file=sys.stderr, flush=True)
                    results.setdefault((size, precision, impl), []).append(r)
    best = {key: dict(runs[0], tokens_per_s=max(r["tokens_per_s"] for r in runs),
                      peak_bytes=min(r["peak_bytes"] for r in runs)) for key, runs in results.items()}

    print(f"\n| model | params | precision | figure | ours | transformers Llama | ours/Llama |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for precision in args.precisions:
            ours, peer = best[(size, precision, "ours")], best[(size, precision, "llama")]
            assert ours["params"] == peer["params"], (ours["params"], peer["params"])
            print(f"| {size} | {ours['params'] / 1e6:.1f}M | {precision} | tokens/s | {ours['tokens_per_s']:.0f} | "
                  f"{peer['tokens_per_s']:.0f} | {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x |")
            print(f"| {size} | | {precision} | peak memory MiB | {ours['peak_bytes'] / 2**20:.0f} | "
                  f"{peer['peak_bytes'] / 2**20:.0f} | {ours['peak_bytes'] / peer['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
