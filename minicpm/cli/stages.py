"""`minicpm extend | curriculum | upcycle`: a checkpoint's next stage (longer context, more experts)."""

from __future__ import annotations

import argparse

from minicpm.cli.parser import LibraryFunction
from minicpm.errors import MiniCPMError


def weighted_dir(text: str) -> tuple[str, float]:
    """DIR or DIR:WEIGHT (weight 1 when left out)."""
    path, _, weight = text.partition(":")
    try:
        return path, float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DIR or DIR:WEIGHT, got {text!r}") from None


def memory_size(text: str) -> int:
    """Bytes from 80GB, 80GiB, 512MB or a plain number of bytes."""
    from minicpm.stages.extend import parse_memory

    try:
        return parse_memory(text)
    except MiniCPMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_stage_commands(sub) -> None:
    """extend, curriculum, upcycle."""
    from minicpm.stages.extend_options import METHODS

    p = sub.add_parser("extend", help="extend a checkpoint's context: untie the head, new RoPE, a training plan",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write OUT/model (head untied, logits unchanged; the new RoPE and "
                                   "max_position_embeddings), OUT/data/synthetic (passkey, key-value and\nfile "
                                   "questions), OUT/train.yaml (one run at the new length, weights-only start) and "
                                   "OUT/curriculum.yaml (sequence-length stages), e.g.\n"
                                   "  minicpm extend runs/stable --to-length 1024 --method yarn --out ext\n"
                                   "  minicpm curriculum ext/curriculum.yaml\n"
                                   "Methods: abf (rope_theta = --base), ntk (static NTK-aware base), yarn, dynamic "
                                   "(inference-time NTK; no training planned), abf-ntk (MiniCPM-128K: ABF to\n"
                                   "--abf-length, then NTK and a length curriculum to N).")
    library = LibraryFunction("minicpm.stages.extend:extend_checkpoint")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--to-length", type=int, required=True, metavar="N", help="the new context length in tokens")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--base", type=float, default=None,
                   help="abf, abf-ntk: the new rope_theta (default 50 x theta: Xiong et al. 2023's 10,000 -> 500,000)")
    p.add_argument("--abf-length", type=int, default=None, metavar="M",
                   help="abf-ntk: where the ABF step ends and NTK takes over (default N/4: 4K -> 32K -> 128K)")
    p.add_argument("--factor", type=float, default=None, help="scaling factor s > 1 (default N / trained length)")
    p.add_argument("--out", required=True, help="new directory for the model, data and configs")
    p.add_argument("--stages", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="N1,N2,..",
                   help="curriculum lengths, increasing, ending at N (default: N/2,N when N/2 exceeds the trained "
                        "length, else N)")
    p.add_argument("--steps-per-stage", type=int, default=library.default("steps_per_stage"),
                   help="optimizer steps per stage (default %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="tokens per step (default max(8N, 8192))")
    p.add_argument("--micro-batch-size", type=int, default=library.default("micro_batch_size"),
                   help="sequences of N tokens per forward pass; checked against memory (default %(default)s)")
    p.add_argument("--long-data", nargs="*", default=[], metavar="DIR",
                   help="prepared long-document datasets besides the synthetic one")
    p.add_argument("--short-data", type=weighted_dir, nargs="*", default=None, metavar="DIR[:WEIGHT]",
                   help="short-context datasets (default: the source run's data.stable)")
    p.add_argument("--long-share", type=float, default=library.default("long_share"),
                   help="share of long data in the mix (default %(default)s, MiniCPM-128K's 44/56)")
    p.add_argument("--synthetic-documents", type=int, default=library.default("synthetic_documents"),
                   help="synthetic long examples generated (default %(default)s)")
    p.add_argument("--synthetic-tasks", type=lambda t: t.split(","), default=None, metavar="T1,T2",
                   help="synthetic tasks, taken in turn (default: all of minicpm/data/synthetic_long.py's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the source run's, else 0.01)")
    p.add_argument("--device", default=library.default("device"),
                   help="where training will run, for the memory check (default %(default)s)")
    p.add_argument("--memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory to plan for, e.g. 80GB (default: the device's)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=library.default("dtype"),
                   help="training precision assumed by the memory check (default %(default)s)")
    p.add_argument("--activation-checkpointing", choices=("none", "block", "selective"),
                   default=library.default("activation_checkpointing"),
                   help="parallel.activation_checkpointing of the training config (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--seed", type=int, default=library.default("seed"),
                   help="seed of the synthetic data and the runs (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    def extend(args) -> int:
        from minicpm.stages.extend import extend_checkpoint

        result = extend_checkpoint(
            args.checkpoint, args.out, to_length=args.to_length, method=args.method, base=args.base,
            factor=args.factor, stages=args.stages, steps_per_stage=args.steps_per_stage,
            tokens_per_step=args.tokens_per_step, micro_batch_size=args.micro_batch_size, long_data=args.long_data,
            short_data=None if args.short_data is None else dict(args.short_data), long_share=args.long_share, synthetic_documents=args.synthetic_documents,
            synthetic_tasks=args.synthetic_tasks, lr=args.lr,
            device=args.device, memory=args.memory, dtype=args.dtype,
            activation_checkpointing=args.activation_checkpointing, tokenizer=args.tokenizer, seed=args.seed,
            overwrite=args.overwrite, abf_length=args.abf_length)
        print(result.summary())
        return 0

    p.set_defaults(handler=extend)

    p = sub.add_parser("curriculum", help="train a sequence-length curriculum (written by minicpm extend)",
                       description="Train each stage of CURRICULUM in order, each an ordinary run starting from the "
                                   "weights of the previous stage's final checkpoint; finished stages are skipped "
                                   "and a started one resumes, so the same command continues an interrupted "
                                   "curriculum.")
    p.add_argument("curriculum", metavar="CURRICULUM", help="curriculum.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of its training config")

    def curriculum(args) -> int:
        from minicpm.stages.extend import run_curriculum

        for result in run_curriculum(args.curriculum, args.overrides):
            if result.is_main:
                print(result.summary())
        return 0

    p.set_defaults(handler=curriculum)
    register_upcycle_command(sub)


def register_upcycle_command(sub) -> None:
    """upcycle (sparse upcycling to MoE)."""

    def upcycle(args):
        from minicpm.stages.upcycle import upcycle as upcycle_checkpoint

        out = upcycle_checkpoint(args.dense_checkpoint, args.out, experts=args.experts, top_k=args.top_k,
                                 seed=args.seed, noise=args.noise, reinit_fraction=args.reinit_fraction,
                                 overwrite=args.overwrite)
        print(f"wrote {out} ({args.experts} experts, top-{args.top_k}); continue training with "
              f"`minicpm train CONFIG model.num_experts={args.experts} model.num_experts_per_tok={args.top_k} "
              f"run.init_weights_from={out}`")

    p = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE one (sparse upcycling)",
                       description="Write an MoE checkpoint in the official MiniCPM-MoE layout: every tensor of "
                                   "DENSE_CKPT copied, each MLP copied into every expert, a fresh router "
                                   "N(0, 0.1²) per layer. Its logits at step 0 equal the dense model's (unless "
                                   "--noise or --reinit-fraction). Identical experts give the router no task "
                                   "gradient at first (a flat start); the two options are the usual remedies.")
    library = LibraryFunction("minicpm.stages.upcycle:upcycle")
    p.add_argument("dense_checkpoint", metavar="DENSE_CKPT",
                   help="a dense checkpoint (ours, sharded, or an official HF MiniCPM directory), or a run directory "
                        "(its newest checkpoint that verifies)")
    p.add_argument("--out", required=True, help="new MoE checkpoint directory")
    p.add_argument("--experts", type=int, default=library.default("experts"),
                   help="experts per layer (default %(default)s, MiniCPM-MoE's)")
    p.add_argument("--top-k", type=int, default=library.default("top_k"),
                   help="experts per token (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"),
                   help="seed of the routers and the options' noise (default %(default)s)")
    p.add_argument("--noise", type=float, default=library.default("noise"), metavar="S",
                   help="add Gaussian noise of S × each matrix's std to every expert copy (default %(default)s: "
                        "exact copies)")
    p.add_argument("--reinit-fraction", type=float, default=library.default("reinit_fraction"), metavar="F",
                   help="Drop-Upcycling: re-draw a random fraction F of each expert's intermediate units from the "
                        "dense matrix's mean and std (default %(default)s; the paper's best is 0.5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and is not empty, once the new one is complete")
    p.set_defaults(handler=upcycle)
