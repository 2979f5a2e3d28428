"""MoE training step: our MiniCPM-MoE against transformers' MixtralForCausalLM with the same weights, CPU.

A random-init MoE (8 experts, top-2 by default) is exported with μP folded in (minicpm.interop.mixtral) and loaded
as MixtralForCausalLM, so both compute the same function and route the same way. One step = forward, cross-entropy
plus 0.01 × the balance loss (ours through the aux channel, the peer's with output_router_logits), backward. Runs
alternate ours/peer; the table gives the median wall time and tokens/s of each and the ratio.

    python benchmarks/moe_step.py                       # d=256, 4 layers, 8 experts, batch 4 x 256
    python benchmarks/moe_step.py --experts-impl eager  # the peer's per-expert mask loop explicitly
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F


def build_pair(args):
    from transformers import MixtralForCausalLM

    from minicpm.interop.mixtral import export_mixtral
    from minicpm.model.build import build_model
    from minicpm.model.config import ModelConfig

    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d * 5 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=args.d // 64,
                         num_key_value_heads=args.d // 64, num_experts=args.experts, num_experts_per_tok=args.top_k)
    ours = build_model(config, seed=0).train()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_mixtral(ours, tmp)
        kwargs = {"experts_implementation": args.experts_impl} if args.experts_impl else {}
        peer = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa",
                                                  output_router_logits=True, router_aux_loss_coef=0.01, **kwargs)
    return ours, peer.train()


def step_ours(model, ids, labels):
    aux = {}
    hidden = model.hidden_states(ids, aux_losses=aux)
    logits = F.linear(hidden, model.head_weight).float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + 0.01 * aux["load_balance"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_peer(model, ids, labels):
    out = model(input_ids=ids, labels=labels)  # CE + router_aux_loss_coef · balance loss
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
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
    parser.add_argument("--experts-impl", default=None, help="the peer's experts_implementation (eager, grouped_mm, ...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, peer = build_pair(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    ids, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        ours.eval(), peer.eval()
        error = (ours(ids) - peer(ids).logits).abs().max().item()
        ours.train(), peer.train()
    times = {"ours": [], "peer": []}
    for i in range(args.repeats + 1):  # the first round warms up, untimed
        for name, fn, model in (("ours", step_ours, ours), ("peer", step_peer, peer)):
            start = time.perf_counter()
            fn(model, ids, labels)
            if i:
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
    print(f"MoE training step, CPU, {torch.get_num_threads()} threads: d={args.d} L={args.layers} "
          f"E={args.experts} top-{args.top_k} vocab={args.vocab} batch {args.batch}x{args.seq}; "
          f"max |logit difference| {error:.2e}")
    print(f"{'figure':<28}{'ours':>12}{'peer':>12}{'ratio':>8}")
    print(f"{'median step time (s)':<28}{ours_s:>12.4f}{peer_s:>12.4f}{peer_s / ours_s:>8.2f}")
    print(f"{'tokens/s':<28}{tokens / ours_s:>12.0f}{tokens / peer_s:>12.0f}{peer_s / ours_s:>8.2f}")


if __name__ == "__main__":
    main()
