"""Peak memory of one training step: MiniCPM with the chunked linear + cross-entropy vs transformers' Llama.

    python benchmarks/memory.py                 # vocab 122,753, seq 4096, 2 layers of width 512, batch 1

The cases are the same shapes (same vocabulary, width, depth, heads, tied embedding, same tokens):
  - ours, chunked loss: MiniCPM.hidden_states + lm_loss(chunk_size=...), the (tokens x vocab) logits never exist;
  - ours, chunked loss with selective activation checkpointing (parallel.activation_checkpointing: selective: the
    matmul and attention outputs kept, the norms, RoPE, SiLU and products recomputed in the backward), and with
    block checkpointing (each block recomputed whole);
  - ours, plain loss: the same model with the logits materialised (shows what chunking alone buys);
  - transformers LlamaForCausalLM (SDPA attention) with labels=..., its own loss.
A step is forward, backward and one AdamW step (so the optimizer state is allocated inside the step, equally
for all: the parameter counts are equal), each side with its AdamW as it runs by default: ours fused where the
device has the kernel (as the trainer builds it: no per-parameter temporaries), the peer torch.optim.AdamW's
defaults (a loop over the parameters on CPU, whose temporaries for the embedding are a quarter GiB here).

How memory is measured, honestly: each case runs in a fresh subprocess. On GPU the figure is
torch.cuda.max_memory_allocated over the step plus the weights (tensors only, no allocator cache). On CPU it is
the process's resident-set high-water mark (getrusage ru_maxrss), which counts everything the process touched:
the Python interpreter and torch (~0.3-0.5 GiB), weights, gradients, optimizer state and activations; large
tensors are mmap'd by glibc and returned on free, so the high-water mark follows the live tensors. "step growth"
is that peak minus the RSS just before the step (after the model is built), i.e. what the step itself added.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from machine import describe as describe_machine

CASES = ("ours-chunked", "ours-selective", "ours-block", "ours-plain", "transformers-llama")
CHECKPOINTING = {"ours-selective": "selective", "ours-block": "block"}
"""parallel.activation_checkpointing of the cases that recompute (the others keep every activation)."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build(case: str, args: argparse.Namespace, device: torch.device):
    """(model, step function) for one case; the step function runs forward + backward on (ids, labels)."""
    heads = args.width // 64
    if case.startswith("ours"):
        from minicpm.model.config import ModelConfig
        from minicpm.model.build import build_model
        from minicpm.train.losses import lm_loss

        config = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 5 // 2,
                             num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=args.seq, tie_word_embeddings=True)
        model = build_model(config, device=device, seed=0)
        if case in CHECKPOINTING:
            from minicpm.train.distributed import apply_activation_checkpointing

            apply_activation_checkpointing(model, CHECKPOINTING[case])
        chunk = None if case == "ours-plain" else args.chunk

        def forward_backward(ids, labels):
            loss = lm_loss(model.hidden_states(ids), model.head_weight, labels, chunk) / labels.numel()
            loss.backward()
            return loss
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 5 // 2,
                             num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=args.seq, tie_word_embeddings=True, attention_bias=False,
                             mlp_bias=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device)

        def forward_backward(ids, labels):
            # transformers shifts the labels itself: pass the unshifted ids
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss
    model.train()
    return model, forward_backward


def run_case(case: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, forward_backward = build(case, args, device)
    params = sum(p.numel() for p in model.parameters())
    fused = None
    if case.startswith("ours"):
        from minicpm.train.distributed import fused_adamw_supported

        fused = fused_adamw_supported(device) or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        loss = forward_backward(inputs, labels)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_rss_bytes()
    return {"case": case, "params": params, "loss": loss.item(), "before_bytes": before, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory of one training step, chunked loss (and activation "
                                                 "checkpointing) vs transformers.")
    parser.add_argument("--vocab", type=int, default=122753, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--width", type=int, default=512, help="hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the step")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the linear + cross-entropy")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0

    results = {}
    shape = ["--vocab", args.vocab, "--seq", args.seq, "--width", args.width, "--layers", args.layers,
             "--batch", args.batch, "--chunk", args.chunk, "--dtype", args.dtype, "--device", args.device]
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")
        print(f"running {case} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *map(str, shape), "--case", case],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])

    how = ("torch.cuda.max_memory_allocated" if args.device == "cuda"
           else "process RSS high-water mark (getrusage), one subprocess per case")
    print(f"one training step (forward, backward, AdamW): vocab {args.vocab:,}, seq {args.seq}, batch {args.batch}, "
          f"{args.layers} layers of width {args.width}, {args.dtype}, chunk {args.chunk} tokens, {args.device}")
    print(f"memory: {how}")
    print(describe_machine())
    peer = results.get("transformers-llama")
    header = f"{'case':<20}{'params':>12}{'loss':>9}{'peak GiB':>10}{'step growth GiB':>17}{'peak ratio':>12}{'growth ratio':>14}"
    print(header)
    print("-" * len(header))
    gib = 2 ** 30
    for case, r in results.items():
        growth = r["peak_bytes"] - r["before_bytes"]
        ratios = ("", "")
        if peer:
            peer_growth = peer["peak_bytes"] - peer["before_bytes"]
            ratios = (f"{r['peak_bytes'] / peer['peak_bytes']:.2f}x", f"{growth / peer_growth:.2f}x")
        print(f"{case:<20}{r['params']:>12,}{r['loss']:>9.3f}{r['peak_bytes'] / gib:>10.2f}{growth / gib:>17.2f}"
              f"{ratios[0]:>12}{ratios[1]:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
