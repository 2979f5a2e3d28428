"""Training throughput on one device: tokens/s, MFU and peak memory, with torch.compile off and on.

    python benchmarks/gpu_throughput.py            # GPU: proxy-0.1b and minicpm-1.2b, seq 4096, bf16 (< 10 min)
    python benchmarks/gpu_throughput.py --tiny     # CPU smoke run of the same code on the tiny preset

Each (preset, compile) case runs in its own subprocess, so that peak memory, the compile cache and an
out-of-memory in one case do not leak into another. A step is the trainer's own public step
(TrainModule.train_step, built from a TrainConfig) on random tokens: bf16 autocast over fp32 master weights, the
chunked linear + cross-entropy, μP AdamW groups (fused where the device has it), compile per decoder block. The first steps (compilation, allocator warm-up) are not timed. MFU = model FLOPs per token
(ModelConfig.flops_per_token: 6·N + head + attention, no recomputation counted) × tokens/s / device peak
(datasheet bf16 dense peak for known GPUs, a measured matmul on CPU). Peak memory is
torch.cuda.max_memory_allocated on GPU and the process's RSS high-water mark on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from minicpm.train.config import load_config, model_config as trainer_model_config
from minicpm.model.config import ModelConfig, preset
from minicpm.train.distributed import init_distributed, resolve_dtype
from minicpm.train.metrics import device_peak_flops
from minicpm.train.module import TrainModule


@dataclass
class Case:
    preset: str
    compile: bool
    batch: int
    seq: int
    steps: int
    warmup: int
    loss_chunk: int
    activation_checkpointing: str
    device: str
    dtype: str
    tiny: bool


# micro-batch per preset at seq 4096 on an 80 GB GPU without activation checkpointing
GPU_BATCH = {"proxy-0.1b": 8, "minicpm-1.2b": 2}


def model_config(case: Case) -> ModelConfig:
    config = preset(case.preset)
    config.max_position_embeddings = max(config.max_position_embeddings, case.seq)
    return config


SCRATCH = tempfile.mkdtemp(prefix="gpu_throughput-")  # the run's out_dir: a compiled case keeps its graphs there


def train_config(case: Case):
    """The TrainConfig of a case: the preset at the case's sequence length, one micro-batch per step."""
    return load_config(None, [
        f"model.preset={case.preset}", f"model.max_position_embeddings={max(model_config(case).max_position_embeddings, case.seq)}",
        f"batch.seq_len={case.seq}", f"batch.tokens_per_step={case.batch * case.seq}",
        f"batch.micro_batch_size={case.batch}", f"parallel.compile={case.compile}",
        f"parallel.activation_checkpointing={case.activation_checkpointing}",
        f"parallel.loss_chunk_size={case.loss_chunk}", f"run.dtype={case.dtype}", f"run.device={case.device}",
        f"run.out_dir={SCRATCH}", "schedule.kind=constant"])


def run_case(case: Case) -> dict:
    """Train `case.warmup + case.steps` steps on random tokens in this process; time the last `case.steps`."""
    device = torch.device(case.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = train_config(case)
    config = trainer_model_config(cfg)
    module = TrainModule.build(cfg, config, init_distributed(case.device))
    fused = module.optimizer.defaults.get("fused") or False
    # the precision the trainer really computes in (run.dtype auto: bf16 where the device has native bf16 kernels)
    autocast_dtype = torch.bfloat16 if resolve_dtype(case.dtype, device) == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    tokens_per_step = case.batch * case.seq

    def step() -> float:
        # the trainer's own public step (it returns the loss as a number: the host sync is part of a step)
        ids = torch.randint(0, config.vocab_size, (case.batch, case.seq + 1), device=device, generator=generator)
        return module.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], lr=1e-3)["loss"]

    warmup_start = time.perf_counter()
    for _ in range(case.warmup):
        step()
    warmup_s = time.perf_counter() - warmup_start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [step() for _ in range(case.steps)]
    elapsed = time.perf_counter() - start
    tokens_per_s = case.steps * tokens_per_step / elapsed
    peak_flops = device_peak_flops(device, autocast_dtype)
    if device.type == "cuda":
        # the timed steps' peak: the optimizer state exists by now, so this is a steady-state step
        peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(
        params=config.total_params(), tokens_per_step=tokens_per_step, fused_adamw=fused, warmup_s=warmup_s,
        step_s=elapsed / case.steps, tokens_per_s=tokens_per_s,
        mfu=config.flops_per_token(case.seq) * tokens_per_s / peak_flops, peak_flops=peak_flops,
        peak_memory_gib=peak_memory / 2 ** 30, final_loss=losses[-1],
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def run_in_subprocess(case: Case, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        return {"error": last[-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cases(args: argparse.Namespace) -> list[Case]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    presets = ["tiny"] if args.tiny else args.presets.split(",")
    seq = args.seq or (64 if args.tiny else 4096)
    steps = args.steps or (3 if args.tiny else 24)
    out = []
    for name in presets:
        batch = args.batch or (2 if args.tiny else GPU_BATCH.get(name, 1))
        for compiled in args.compile:
            out.append(Case(preset=name, compile=compiled, batch=batch, seq=seq, steps=steps,
                            warmup=args.warmup or (1 if args.tiny else 3), loss_chunk=args.loss_chunk,
                            activation_checkpointing=args.activation_checkpointing, device=device,
                            dtype=args.dtype, tiny=args.tiny))
    return out


def print_table(rows: list[tuple[Case, dict]]) -> None:
    header = (f"{'preset':<14}{'compile':>8}{'batch x seq':>13}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}"
              f"{'step s':>9}{'warmup s':>10}")
    print(header)
    print("-" * len(header))
    for case, r in rows:
        shape = f"{case.batch}x{case.seq}"
        if "error" in r:
            print(f"{case.preset:<14}{'on' if case.compile else 'off':>8}{shape:>13}  error: {r['error']}")
            continue
        print(f"{case.preset:<14}{'on' if case.compile else 'off':>8}{shape:>13}{r['tokens_per_s']:>12,.0f}"
              f"{r['mfu']:>8.1%}{r['peak_memory_gib']:>10.2f}{r['step_s']:>9.3f}{r['warmup_s']:>10.1f}")
    by_preset: dict[str, dict[bool, dict]] = {}
    for case, r in rows:
        by_preset.setdefault(case.preset, {})[case.compile] = r
    for name, pair in by_preset.items():
        if all(k in pair and "error" not in pair[k] for k in (False, True)):
            on, off = pair[True], pair[False]
            print(f"{name}: compile on / off tokens/s = {on['tokens_per_s'] / off['tokens_per_s']:.2f}x")
            # the break-even parallel.compile: auto weighs (train/distributed.py COMPILE_COSTS): the compile time is
            # what the compiled warm-up took beyond the eager one
            compile_s, saved_s = on["warmup_s"] - off["warmup_s"], off["step_s"] - on["step_s"]
            pays = f"pays after {compile_s / saved_s:,.0f} steps" if saved_s > 0 else "never pays"
            print(f"{name}: compiling costs ~{compile_s:.0f} s and saves {saved_s:.3f} s a step: {pays}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at seq 64 for a CPU smoke run")
    parser.add_argument("--presets", default="proxy-0.1b,minicpm-1.2b", help="comma-separated model presets")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (default 4096; 64 with --tiny)")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default per preset)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per case (default 24; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed first steps (default 3; 1 with --tiny)")
    parser.add_argument("--compile", type=lambda s: [{"off": False, "on": True}[x] for x in s.split(",")],
                        default=[False, True], help="off,on (default), or one of them")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tokens per chunk of the linear + CE")
    parser.add_argument("--activation-checkpointing", default="none", help="none | block | selective")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="run.dtype (default auto: bf16 on GPUs and CPUs with native bf16 kernels, else fp32)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case before it is abandoned")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(Case(**json.loads(args.case)))))
        return 0
    todo = cases(args)
    rows = []
    for case in todo:
        print(f"running {case.preset} compile={'on' if case.compile else 'off'} on {case.device} ...",
              file=sys.stderr, flush=True)
        rows.append((case, run_in_subprocess(case, args.timeout)))
    device_name = next((r["device_name"] for _, r in rows if "device_name" in r), todo[0].device)
    print(f"device: {device_name}; run.dtype {todo[0].dtype}, fp32 master weights, chunked loss "
          f"({args.loss_chunk} tokens), activation checkpointing {args.activation_checkpointing}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"case": asdict(c), "result": r} for c, r in rows], f, indent=2)
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
