"""Generation throughput: our generate_batch against transformers' `generate` on the same weights.

A random-init MiniCPM of a preset's shapes is exported with μP folded in (minicpm.interop.llama.export_llama) and
loaded as transformers' LlamaForCausalLM (SDPA attention), so that both compute the same function. Both decode
greedily a fixed number of new tokens (no stop token), from the same left-padded prompts of mixed lengths, with
their KV caches; a run is timed from the prompt ids to the last new token. Runs alternate ours/peer; tokens/s is
batch·new_tokens over the run's wall time, best and median of the repeats, and over its CPU time (process time),
which a machine shared with other work disturbs less. The table also counts the rows whose tokens agree between
the two.

Ours runs twice: with the library's defaults (on fp32 CPU weights: packed matrices; compile="auto", which
decodes eagerly unless the tokens left earn the compile time back, see minicpm.infer.decoder), and with the best
flags (the decode step compiled: its warm-up run, untimed, pays for the compilation). --no-pack changes both;
--variants picks which run.

    python benchmarks/generate.py                           # proxy-9m shapes, 32K vocabulary, batch 1 and 8
    python benchmarks/generate.py --vocab 0                 # the preset's own vocabulary (122,753 for proxy-9m)
    python benchmarks/generate.py --threads 2 --repeats 7   # more threads, more repeats
    python benchmarks/generate.py --variants default    # only our defaults (no compiled run)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from machine import describe as describe_machine


def build_pair(preset: str, vocab: int, dtype: torch.dtype):
    """(our MiniCPM, transformers' LlamaForCausalLM of its μP-folded export), both in eval mode."""
    from transformers import LlamaForCausalLM

    from minicpm.interop.llama import export_llama
    from minicpm.model.config import preset as named_preset
    from minicpm.model.build import build_model

    config = named_preset(preset)
    if vocab:
        config = dataclasses.replace(config, vocab_size=vocab)
    ours = build_model(config, seed=0).to(dtype).requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_llama(ours, tmp)
        peer = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    return ours, peer.requires_grad_(False).eval()


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    """Random prompts, lengths spread over [length/2, length] (the longest first) so that rows are left-padded."""
    g = torch.Generator().manual_seed(batch)
    lengths = [length - (i * length // 2) // max(batch - 1, 1) for i in range(batch)]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_ours(model, prompts, new_tokens: int, pack: bool | None, compile: bool | str) -> list[list[int]]:
    from minicpm.infer.generate import generate_batch

    return [c.ids for c in generate_batch(model, prompts, max_new_tokens=new_tokens, temperature=0, pack=pack,
                                          compile=compile)]


def run_peer(model, prompts, new_tokens: int) -> list[list[int]]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, longest:].tolist()


VARIANTS = {"default": "auto", "compiled": True}
"""Our runs: the library's defaults, and the decode step compiled."""


def measure(ours, peer, batch: int, args) -> dict:
    prompts = prompts_for(batch, args.prompt_len, ours.config.vocab_size)
    pack = False if args.no_pack else None
    runs = {f"ours {v}": (lambda v=v: run_ours(ours, prompts, args.new_tokens, pack, VARIANTS[v]))
            for v in args.variants}
    runs["peer"] = lambda: run_peer(peer, prompts, args.new_tokens)
    outputs = {name: run() for name, run in runs.items()}  # warm-up (and the compilation of the compiled variant)
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for i in range(args.repeats):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = batch * args.new_tokens
    agree = {n: sum(a == b for a, b in zip(outputs[n], outputs["peer"])) for n in runs if n != "peer"}
    return {"tokens/s (best)": {n: tokens / min(t) for n, t in wall.items()},
            "tokens/s (median)": {n: tokens / statistics.median(t) for n, t in wall.items()},
            "tokens per CPU-second (best)": {n: tokens / min(t) for n, t in cpu.items()}, "agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy-9m", help="model shapes (a minicpm preset name)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size; 0 keeps the preset's")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32, help="the longest prompt; others down to half")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (best and median kept)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-pack", action="store_true", help="our decoder multiplies nn.Linear's own matrices")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="our runs: the defaults (compile auto), the decode step compiled (default: both)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: steadier numbers on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours, peer = build_pair(args.preset, args.vocab, dtype)
    import transformers

    params = sum(p.numel() for p in ours.parameters())
    print(describe_machine())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; {args.preset} shapes, vocab {ours.config.vocab_size}, "
          f"{params / 1e6:.1f}M parameters, {args.dtype}; greedy, prompts of {args.prompt_len // 2}-"
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} alternating runs each"
          f"{'; ours unpacked' if args.no_pack else ''}")
    rows = []
    for batch in args.batches:
        r = measure(ours, peer, batch, args)
        best = r["tokens/s (best)"]
        print(f"  batch {batch}: " + ", ".join(f"{n} {v:.0f}" for n, v in best.items()) + " tokens/s (best)",
              file=sys.stderr, flush=True)
        rows.append((batch, r))
    print("\n| figure | ours | transformers generate | ours/transformers |")
    print("|---|---|---|---|")
    for batch, r in rows:
        for variant in args.variants:
            name = f"ours {variant}"
            for figure in ("tokens/s (best)", "tokens/s (median)", "tokens per CPU-second (best)"):
                o, p = r[figure][name], r[figure]["peer"]
                print(f"| batch {batch} {figure}, ours {variant} | {o:.0f} | {p:.0f} | {o / p:.2f}x |")
            print(f"| batch {batch} rows with the peer's tokens, ours {variant} | {r['agree'][name]}/{batch} | | |")


if __name__ == "__main__":
    main()
