"""MoE training step: our MiniCPM-MoE against transformers' MixtralForCausalLM with the same weights, CPU.

A random-init MoE (8 experts, top-2 by default) is exported with μP folded in (minicpm.interop.mixtral) and loaded
as MixtralForCausalLM, so both compute the same function and route the same way. One step = forward, cross-entropy
plus 0.01 × the balance loss (ours through the aux channel, the peer's with output_router_logits), backward. Two
peers: transformers' `eager` experts (a Python loop over the experts, each selecting its tokens with a mask: the
peer the MoE issue names) and its `grouped_mm` experts (stacked weights, one grouped matmul; transformers' default).
Runs alternate ours/peers; the table gives the median step time and tokens/s of each and the ratios, for each
--dtype: `auto` (the default, first) is what the trainer runs here, bf16 autocast over fp32 weights where the CPU
has native bf16 (both sides under the same autocast: Mixtral's grouped_mm experts then cast their input to the fp32
weights, since grouped_mm is not an autocast op; ours cast to bf16), then both in fp32.

--clock cpu measures the process's CPU time instead of wall time: on a shared, loaded machine the wall time mostly
measures the other processes; CPU time (with --threads 1) is what the step itself costs.

    python benchmarks/moe_step.py                          # d=256, 4 layers, 8 experts, batch 4 x 256, wall clock
    python benchmarks/moe_step.py --threads 1 --clock cpu  # on a loaded machine
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from machine import describe as describe_machine
import torch.nn.functional as F


def build_models(args):
    from transformers import MixtralForCausalLM

    from minicpm.interop.mixtral import export_mixtral
    from minicpm.model.build import build_model
    from minicpm.model.config import ModelConfig

    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d * 5 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=args.d // 64,
                         num_key_value_heads=args.d // 64, num_experts=args.experts, num_experts_per_tok=args.top_k)
    ours = build_model(config, seed=0).train()
    peers = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_mixtral(ours, tmp)
        for impl in args.peers:
            peers[impl] = MixtralForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="sdpa", output_router_logits=True,
                router_aux_loss_coef=0.01, experts_implementation=impl).train()
    return ours, peers


def step_ours(model, ids, labels, autocast):
    aux = {}
    with autocast():
        hidden = model.hidden_states(ids, aux_losses=aux)
        logits = F.linear(hidden, model.head_weight).float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + 0.01 * aux["load_balance"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_peer(model, ids, labels, autocast):
    with autocast():
        out = model(input_ids=ids, labels=labels)  # CE + router_aux_loss_coef · balance loss
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def autocast_for(dtype: str):
    """The autocast both sides run under: bf16 autocast over fp32 weights (the trainer's mixed precision), or none."""
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def time_steps(runs, ids, labels, autocast, repeats, clock) -> dict[str, float]:
    """Median step time of each (name, step, model), the runs alternating round by round; round 0 warms up."""
    times = {name: [] for name, _, _ in runs}
    for i in range(repeats + 1):
        for name, fn, model in runs:
            start = clock()
            fn(model, ids, labels, autocast)
            if i:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    from minicpm.train.distributed import resolve_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", nargs="+", choices=("auto", "fp32", "bf16"), default=["auto", "fp32"],
                        help="the precision(s) both sides run in, each its own table: bf16 = bf16 autocast over fp32 "
                             "weights; auto = the trainer's default here (bf16 where the CPU has native bf16, else "
                             "fp32) (default: %(default)s)")
    parser.add_argument("--peers", nargs="+", default=["eager", "grouped_mm"],
                        help="the peer's experts_implementation(s) (default: %(default)s)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (for a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    ours, peers = build_models(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    ids, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        ours.eval()
        reference = ours(ids)
        error = max((reference - peer.eval()(ids).logits).abs().max().item() for peer in peers.values())
        ours.train(), [peer.train() for peer in peers.values()]
    runs = [("ours", step_ours, ours)] + [(f"peer {impl}", step_peer, peer) for impl, peer in peers.items()]
    tokens = args.batch * args.seq
    print(describe_machine())
    print(f"MoE training step, CPU, {torch.get_num_threads()} threads, {args.clock} clock: d={args.d} L={args.layers} "
          f"E={args.experts} top-{args.top_k} vocab={args.vocab} batch {args.batch}x{args.seq}; "
          f"max |logit difference| {error:.2e}")
    print(f"{'figure':<44}{'ours':>10}{'peer':>10}{'ratio':>8}")
    for dtype in dict.fromkeys(args.dtype):
        precision = resolve_dtype(dtype, torch.device("cpu"))
        median = time_steps(runs, ids, labels, autocast_for(precision), args.repeats, clock)
        label = f"{dtype} = {precision}" if dtype == "auto" else dtype
        for impl in peers:
            o, p = median["ours"], median[f"peer {impl}"]
            print(f"{f'step time (s), {label}, peer {impl}':<44}{o:>10.4f}{p:>10.4f}{p / o:>8.2f}")
            print(f"{f'tokens/s, {label}, peer {impl}':<44}{tokens / o:>10.0f}{tokens / p:>10.0f}{p / o:>8.2f}")


if __name__ == "__main__":
    main()
