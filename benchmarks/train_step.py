"""Optimizer-step throughput of our trainer against a plain transformers Llama + torch AdamW loop.

    python benchmarks/train_step.py                       # CPU: the quickstart's model and batch (d=128, 4 layers)
    python benchmarks/train_step.py --preset proxy-9m --seq 512 --micro 8       # a 10.7M-parameter proxy (vocab 4096)
    python benchmarks/train_step.py --dtype fp32 --threads 1 --clock cpu   # steadier on a machine busy with other work
    python benchmarks/train_step.py --preset proxy-0.1b --seq 1024 --tokens-per-step 65536 --micro 16 --device cuda

Ours is the real thing: the trainer's TrainModule built from a TrainConfig, timed through its public train_step
(lr per muP group, gradient accumulation over micro-batches, bf16 autocast over fp32 weights, loss normalised by
the batch's token count, the objective's metrics reduced, clipping, NaN check, fused AdamW where the device has it).
The peer is the loop a person would write with transformers: LlamaForCausalLM of identical shapes (tied
embedding, SDPA attention, no biases; the same parameter count), labels=..., loss / accumulation, backward,
clip_grad_norm_, torch.optim.AdamW with its defaults, zero_grad.

Both get the same batches (random token rows drawn once), the same micro-batch, accumulation and autocast, and live
in one process; their steps alternate (ours, peer, peer, ours, ...) so that both see the same share of a busy
machine. tokens/s = tokens per step / median step time. MFU = ModelConfig.flops_per_token(seq) × tokens/s / peak,
the peak being the datasheet bf16 figure on known GPUs and a measured matmul on CPU (DESIGN section 6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import describe as describe_machine


from minicpm.train.config import config_to_yaml, load_config, model_config
from minicpm.demos.quickstart import quickstart_config
from minicpm.data.pretrain import rows_to_batch
from minicpm.train.distributed import init_distributed
from minicpm.train.metrics import device_peak_flops
from minicpm.train.module import TrainModule


class FixedRows:
    """The benchmark's data: the same pre-drawn rows for both loops, cycled."""

    def __init__(self, rows: torch.Tensor, per_step: int):
        self.rows, self.per_step, self.position = rows, per_step, 0

    def next_rows(self) -> torch.Tensor:
        start = self.position % (len(self.rows) // self.per_step) * self.per_step
        self.position += 1
        return self.rows[start:start + self.per_step]


def our_config(args, out_dir: str):
    """The quickstart's TrainConfig (--preset quickstart) or a preset's, with the benchmark's shapes."""
    overrides = [f"batch.seq_len={args.seq}", f"batch.tokens_per_step={args.tokens_per_step}",
                 f"batch.micro_batch_size={args.micro}", f"run.device={args.device}", f"run.dtype={args.dtype}",
                 f"run.out_dir={out_dir}/run", f"schedule.total_steps={10 ** 6}", "schedule.kind=constant",
                 # the package's default for a long run (the quickstart's recipe pins eager for its 240 steps)
                 "parallel.compile=auto",
                 "run.progress=false", "data.stable={}", "data.decay=null", "data.tokenizer=null",
                 f"model.vocab_size={args.vocab}", *args.set]
    recipe = None
    if args.preset == "quickstart":
        recipe = Path(out_dir) / "quickstart.yaml"
        recipe.write_text(config_to_yaml(quickstart_config(Path(out_dir))))
    else:
        overrides.append(f"model.preset={args.preset}")
    return load_config(recipe, overrides)


def ours(cfg, rows: torch.Tensor):
    """The trainer's own step: TrainModule.build from the TrainConfig, timed through its public train_step."""
    module = TrainModule.build(cfg, model_config(cfg), init_distributed(cfg.run.device))
    print(f"ours: blocks {module.compile_choice.reason}", flush=True)
    data = FixedRows(rows, cfg.batch.tokens_per_step // cfg.batch.seq_len)
    mb = cfg.batch.micro_batch_size
    lr = cfg.optim.lr * cfg.schedule.resolve()(100)  # a step past the warmup

    def step() -> float:
        batch = rows_to_batch(data.next_rows())
        micro = [{k: v[i:i + mb] for k, v in batch.items()} for i in range(0, len(batch["input_ids"]), mb)]
        return module.train_step(micro, lr=lr)["loss"]

    return step


def peer(args, config, rows: torch.Tensor, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                     max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                     rope_theta=config.rope_theta, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                     hidden_act="silu")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = FixedRows(rows, args.tokens_per_step // args.seq)
    accumulation = args.tokens_per_step // args.seq // args.micro

    def step() -> float:
        batch = data.next_rows()
        total = 0.0
        for i in range(accumulation):
            micro = batch[i * args.micro:(i + 1) * args.micro].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = _llama_loss(model, micro)
            (loss / accumulation).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / accumulation

    return sum(p.numel() for p in model.parameters()), step


def _llama_loss(model, micro: torch.Tensor) -> torch.Tensor:
    # inputs and next-token targets given explicitly (transformers shifts `labels` itself; passing the already
    # shifted targets as labels would shift twice), the loss transformers' own ForCausalLMLoss computes
    logits = model(input_ids=micro[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart",
                   help="quickstart (default: the quickstart's whole TrainConfig) or a model preset name")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096, the quickstart's)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--micro", type=int, default=16, help="micro-batch (sequences)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further overrides of our TrainConfig, e.g. parallel.loss_chunk_size=null")
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: CPU seconds of this process (with --threads 1 on a machine busy "
                        "with other work, far steadier than wall time: a step is charged only for its own work)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(args, tmp)
        config = model_config(cfg)
        sequences = args.tokens_per_step // args.seq
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, config.vocab_size, (sequences * 4, args.seq + 1), generator=g)
        our_step = ours(cfg, rows)
        peer_params, peer_step = peer(args, config, rows, device)
        ours_params = config.total_params()
        assert ours_params == peer_params, (ours_params, peer_params)
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        losses: dict[str, list[float]] = {"ours": [], "peer": []}
        order = ["ours", "peer", "peer", "ours"]
        steps = {"ours": our_step, "peer": peer_step}
        for i in range(args.warmup):
            for name in ("ours", "peer"):
                steps[name]()
        for i in range(args.steps):
            for name in (order[(2 * i) % 4], order[(2 * i + 1) % 4]):
                _sync(device)
                start = clock()
                losses[name].append(steps[name]())
                _sync(device)
                times[name].append(clock() - start)

    peak = device_peak_flops(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    flops = config.flops_per_token(args.seq)
    speed = {k: args.tokens_per_step / statistics.median(v) for k, v in times.items()}
    mfu = {k: v * flops / peak for k, v in speed.items()}
    print(describe_machine())
    print(f"model: {ours_params / 1e6:.2f}M parameters (d={config.hidden_size}, L={config.num_hidden_layers}, "
          f"vocab {config.vocab_size}); {args.tokens_per_step} tokens/step = {sequences} x {args.seq}, micro-batch "
          f"{args.micro}; {args.dtype} on {device} ({torch.get_num_threads()} threads); {args.steps} timed steps each, "
          f"interleaved, {args.clock} clock; peak {peak / 1e12:.3g} TFLOP/s")
    print(f"{'figure':<22}{'ours':>14}{'peer':>14}{'ratio':>9}")
    print(f"{'tokens/s (median)':<22}{speed['ours']:>14,.0f}{speed['peer']:>14,.0f}{speed['ours'] / speed['peer']:>8.2f}x")
    print(f"{'MFU':<22}{mfu['ours']:>14.2%}{mfu['peer']:>14.2%}{mfu['ours'] / mfu['peer']:>8.2f}x")
    print(f"{'step time (median, s)':<22}{statistics.median(times['ours']):>14.3f}"
          f"{statistics.median(times['peer']):>14.3f}")
    print(f"{'loss first -> last':<22}{losses['ours'][0]:>7.3f}>{losses['ours'][-1]:<6.3f}"
          f"{losses['peer'][0]:>7.3f}>{losses['peer'][-1]:<6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
