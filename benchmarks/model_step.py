"""Forward+backward throughput and peak memory: our MiniCPM against transformers' LlamaForCausalLM.

Both models get identical shapes (tied embedding, SDPA attention, no biases, same parameter count) and the
identical loss: fp32 cross-entropy over the logits each forward returns (fp32 from ours, as DESIGN §3 asks; bf16
from the peer under autocast). Neither takes an optimizer step.

Throughput. Both models live in one process and their steps alternate (ours, peer, peer, ours, ...), so that
both see the same share of a busy machine; each model's tokens/s is batch·seq over its median step time.

Peak memory, what a step adds above the weights (activations, gradients, autocast copies), two ways:
  tensors   exact: the peak of live tensor bytes in the torch profiler's memory timeline of one step
            (on CUDA: torch.cuda.max_memory_allocated)
  RSS       what the OS saw (CPU only): in a fresh process per model, the growth of the resident-set
            high-water mark (VmHWM, /proc/self/status) over the size just before the first step, the mark
            reset then via /proc/self/clear_refs; it adds the allocator's slack and is noisier

    python benchmarks/model_step.py                    # 20M and 100M, fp32 and bf16 autocast, sequence 512
    python benchmarks/model_step.py --sizes 20M --precisions fp32 --steps 3     # a quick look
    python benchmarks/model_step.py --threads 1        # steadier on a machine shared with other work
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

SIZES = {
    # paper Table 8 shapes (d_ff = 2.5 d, head_dim 64) with a 32K vocabulary
    "20M": dict(hidden_size=320, intermediate_size=800, num_hidden_layers=8, num_attention_heads=5),
    "100M": dict(hidden_size=768, intermediate_size=1920, num_hidden_layers=12, num_attention_heads=12),
    # grouped-query attention at MiniCPM-1.2B's ratio (24 query heads share 8 K/V heads): 3 queries per K/V head
    "100M-gqa": dict(hidden_size=768, intermediate_size=1920, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4),
}
VOCAB = 32000
IMPLS = ("ours", "llama")


def build(impl: str, size: str, seq: int, device: str):
    """(model, function input_ids -> logits) with the shapes of SIZES[size]."""
    shape = dict({"num_key_value_heads": SIZES[size]["num_attention_heads"]}, **SIZES[size], vocab_size=VOCAB,
                 max_position_embeddings=seq, tie_word_embeddings=True)
    torch.manual_seed(0)
    if impl == "ours":
        from minicpm.model.config import ModelConfig
        from minicpm.model.build import build_model

        model = build_model(ModelConfig(**shape), device=device)
        return model, lambda ids: model(ids)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def make_step(model, logits_of, batch: int, seq: int, precision: str, device: str):
    ids = torch.randint(0, VOCAB, (batch, seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")

    def loss():
        with autocast:
            logits = logits_of(inputs)
        # the logits die with this frame, as in a training loop: only what autograd saved stays for backward
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step():
        loss().backward()
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def tensor_peak(step, device: str) -> int:
    """Peak of live tensor bytes during one step, above the level before it."""
    if device.startswith("cuda"):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof.export_memory_timeline(f"{tmp}/timeline.json", device=device)
        _, sizes = json.loads(open(f"{tmp}/timeline.json").read())
    totals = [sum(row) for row in sizes]
    return int(max(totals) - totals[0])


def compare(size: str, precision: str, args) -> dict:
    """Interleaved timing and exact tensor peaks of both models, in this process."""
    models = {impl: build(impl, size, args.seq, args.device) for impl in IMPLS}
    params = {impl: sum(p.numel() for p in m.parameters()) for impl, (m, _) in models.items()}
    assert params["ours"] == params["llama"], params
    steps = {impl: make_step(m, f, args.batch, args.seq, precision, args.device) for impl, (m, f) in models.items()}
    for _ in range(args.warmup):
        for impl in IMPLS:
            steps[impl]()
    times = {impl: [] for impl in IMPLS}
    for i in range(args.steps):
        for impl in (IMPLS if i % 2 == 0 else IMPLS[::-1]):
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    return {impl: dict(params=params[impl], tokens_per_s=args.batch * args.seq / statistics.median(times[impl]),
                       tensor_peak=tensor_peak(steps[impl], args.device)) for impl in IMPLS}


def _memory_kib() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def rss_growth(case: dict) -> int:
    """Bytes the resident-set high-water mark grows by over two steps of one model, in this fresh process."""
    model, logits_of = build(case["impl"], case["size"], case["seq"], "cpu")
    step = make_step(model, logits_of, case["batch"], case["seq"], case["precision"], "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _memory_kib()["VmRSS"]
    step()
    step()
    return (_memory_kib()["VmHWM"] - before) * 1024


def rss_growth_in_subprocess(case: dict) -> int:
    command = [sys.executable, __file__, "--rss-case", json.dumps(case), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"case {case} failed:\n{out.stderr}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["20M", "100M"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_case:
        print(rss_growth(json.loads(args.rss_case)))
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device "
          f"{args.device}, batch {args.batch} x seq {args.seq}, median of {args.steps} interleaved steps")
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            r = compare(size, precision, args)
            if not args.device.startswith("cuda"):
                for impl in IMPLS:
                    r[impl]["rss"] = rss_growth_in_subprocess(dict(impl=impl, size=size, precision=precision,
                                                                   seq=args.seq, batch=args.batch))
            print(f"  {size} {precision}: " + ", ".join(f"{impl} {r[impl]['tokens_per_s']:.0f} tok/s"
                                                       for impl in IMPLS), file=sys.stderr, flush=True)
            rows.append((size, precision, r))

    print("\n| model | params | precision | figure | ours | transformers Llama | ours/Llama |")
    print("|---|---|---|---|---|---|---|")
    for size, precision, r in rows:
        ours, peer = r["ours"], r["llama"]
        print(f"| {size} | {ours['params'] / 1e6:.1f}M | {precision} | tokens/s | {ours['tokens_per_s']:.0f} | "
              f"{peer['tokens_per_s']:.0f} | {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x |")
        for key, figure in (("tensor_peak", "peak tensor memory MiB"), ("rss", "peak RSS growth MiB")):
            if key in ours:
                print(f"| {size} | | {precision} | {figure} | {ours[key] / 2**20:.0f} | {peer[key] / 2**20:.0f} | "
                      f"{ours[key] / peer[key]:.2f}x |")


if __name__ == "__main__":
    main()
