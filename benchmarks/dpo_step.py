"""One DPO optimizer step: ours (cached reference log-probs) against the loop a user writes with transformers.

    python benchmarks/dpo_step.py                          # CPU, the quickstart's model shapes (d=128, 4 layers)
    python benchmarks/dpo_step.py --device cuda --dtype bf16 --pairs-per-step 64

Ours is the real thing: pairs prepared by `prepare_pairs`, the reference's log-probs computed once by
`precompute_reference` (timed separately: a one-time cost, like tokenization), then TrainModule.train_step under the
`dpo` objective with reference: cached, its batches from PairsData (the policy alone runs, one forward over chosen
and rejected rows together, the head applied to answer tokens only).
The peer is the loop a person writes with transformers (TRL's shape without TRL): LlamaForCausalLM of identical
shapes as the policy and a frozen copy as the reference; per step the batch is collated (chosen and rejected rows
right-padded to the batch's longest, attention mask), the policy and the reference each run a forward pass, the
answers' log-probs are gathered from log_softmax of the full logits, the sigmoid DPO loss, backward,
clip_grad_norm_, AdamW.
Both get the same pairs and the same number of pairs per step and live in one process; their steps alternate so
that both see the same share of a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import describe as describe_machine


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pre-tokenized pairs with prompts of 32-96 tokens and answers of 16-64."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),  # noqa: E731
                                        generator=g).tolist()
    return [{"prompt_ids": draw(32, 96), "chosen_ids": draw(16, 64), "rejected_ids": draw(16, 64)} for _ in range(n)]


def ours(args, tmp: Path, pairs: list[dict]):
    from minicpm.train.config import ObjectiveConfig, load_config, model_config
    from minicpm.data.pairs import PairsData, prepare_pairs
    from minicpm.interop.hf import save_model
    from minicpm.model.build import build_model
    from minicpm.train.distributed import init_distributed
    from minicpm.train.dpo import precompute_reference
    from minicpm.train.module import TrainModule

    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = load_config(None, [
        "model.preset=tiny", f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.hidden * 5 // 2}", f"model.num_hidden_layers={args.layers}",
        f"model.num_attention_heads={args.hidden // 64}", f"model.num_key_value_heads={args.hidden // 64}",
        "model.max_position_embeddings=1024", f"batch.seq_len={args.seq}",
        f"batch.tokens_per_step={args.seq * args.pairs_per_step}", f"batch.micro_batch_size={args.pairs_per_step}",
        f"run.device={args.device}", f"run.dtype={args.dtype}", f"run.out_dir={tmp / 'run'}", "optim.lr=1e-5",
        "optim.mup_lr_scaling=false", "schedule.kind=constant", "schedule.total_steps=1000000", "run.progress=false",
        "data.stable={}", "data.decay=null", "data.tokenizer=null", "evaluators=[]"])
    config = model_config(cfg)
    start = save_model(build_model(config, seed=0), tmp / "start")
    prepare_pairs(tmp / "pairs.jsonl", tmp / "prepared", seq_len=args.seq, val_fraction=0.0)
    began = time.perf_counter()
    precompute_reference(start, tmp / "prepared", batch_size=args.pairs_per_step, device=args.device,
                         dtype=args.dtype)
    precompute_s = time.perf_counter() - began
    cfg.objective = ObjectiveConfig(kind="dpo", options={"reference": "cached", "beta": 0.1})
    cfg.run.init_weights_from = str(start)
    module = TrainModule.build(cfg, config, init_distributed(args.device))
    module.load_weights(start)
    data = PairsData(tmp / "prepared", seed=0, seq_len=args.seq)
    from minicpm.data.pairs import read_reference, reference_fingerprint

    data.attach_reference(read_reference(tmp / "prepared", reference_fingerprint(start, args.dtype), "train", how="-"))
    counter = {"step": 0}

    def step() -> float:
        batch = data.next_batch(counter["step"], args.pairs_per_step)
        counter["step"] += 1
        return module.train_step([batch], lr=1e-5)["loss"]

    return config, start, precompute_s, step


def peer(args, config, start: Path, pairs: list[dict], device: torch.device):
    from transformers import LlamaForCausalLM

    from minicpm.interop.llama import export_llama

    llama_dir = export_llama(start, start.parent / "llama")  # the same weights, μP folded into a plain Llama
    policy = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa", torch_dtype=torch.float32).to(device)
    reference = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa",
                                                 torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    beta, counter = 0.1, {"step": 0}
    n = len(pairs)

    def collate(chunk):
        rows, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for p in chunk:
                rows.append(p["prompt_ids"] + p[side])
                masks.append([0] * len(p["prompt_ids"]) + [1] * len(p[side]))
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        answer = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        return ids.to(device), attention.to(device), answer.to(device)

    def logps(model, ids, attention, answer):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token * answer[:, 1:]).sum(-1)

    def step() -> float:
        first = counter["step"] * args.pairs_per_step % n
        counter["step"] += 1
        chunk = [pairs[(first + i) % n] for i in range(args.pairs_per_step)]
        ids, attention, answer = collate(chunk)
        k = len(chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            pol = logps(policy, ids, attention, answer)
            with torch.no_grad():
                ref = logps(reference, ids, attention, answer)
        loss = -F.logsigmoid(beta * ((pol[:k] - ref[:k]) - (pol[k:] - ref[k:]))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return sum(p.numel() for p in policy.parameters()), step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (default 4096, the quickstart's)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="longest prompt + answer (default 256)")
    p.add_argument("--pairs-per-step", type=int, default=16)
    p.add_argument("--pairs", type=int, default=256, help="pairs in the data set (default 256)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    args = p.parse_args(argv)

    device = torch.device(args.device)
    pairs = make_pairs(args.pairs, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        config, start, precompute_s, our_step = ours(args, Path(tmp), pairs)
        peer_params, peer_step = peer(args, config, start, pairs, device)
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        losses: dict[str, list[float]] = {"ours": [], "peer": []}
        steps = {"ours": our_step, "peer": peer_step}
        order = ["ours", "peer", "peer", "ours"]
        for _ in range(args.warmup):
            for name in ("ours", "peer"):
                steps[name]()
        for i in range(args.steps):
            for name in (order[(2 * i) % 4], order[(2 * i + 1) % 4]):
                _sync(device)
                began = time.perf_counter()
                losses[name].append(steps[name]())
                _sync(device)
                times[name].append(time.perf_counter() - began)

    median = {k: statistics.median(v) for k, v in times.items()}
    print(describe_machine())
    print(f"model: {config.total_params() / 1e6:.2f}M parameters (peer {peer_params / 1e6:.2f}M; d={config.hidden_size}, "
          f"L={config.num_hidden_layers}, vocab {config.vocab_size}); {args.pairs_per_step} pairs/step, prompts 32-96 "
          f"and answers 16-64 tokens; {args.dtype} on {device} ({torch.get_num_threads()} threads); {args.steps} "
          f"timed steps each, interleaved")
    print(f"{'figure':<26}{'ours':>12}{'peer':>12}{'ratio':>9}")
    print(f"{'pairs/s (median step)':<26}{args.pairs_per_step / median['ours']:>12.1f}"
          f"{args.pairs_per_step / median['peer']:>12.1f}{median['peer'] / median['ours']:>8.2f}x")
    print(f"{'step time (median, s)':<26}{median['ours']:>12.3f}{median['peer']:>12.3f}")
    print(f"{'reference, once (s)':<26}{precompute_s:>12.2f}{'-':>12}   ({args.pairs} pairs, before training)")
    print(f"{'loss first -> last':<26}{losses['ours'][0]:>6.3f}>{losses['ours'][-1]:<5.3f}"
          f"{losses['peer'][0]:>6.3f}>{losses['peer'][-1]:<5.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
