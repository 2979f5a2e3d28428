"""`minicpm train`: pretrain (WSD), resume, continue or branch a decay from a checkpoint."""

from __future__ import annotations

import argparse


def register_train_commands(sub) -> None:
    """train."""

    from minicpm.optim.schedule import DECAYS

    def train(args):
        from minicpm.train.launch import launch_config, split_config_and_overrides
        from minicpm.train.loop import train as run_training

        config, overrides = split_config_and_overrides(args.config_and_overrides)
        cfg = launch_config(config, overrides, out=args.out, resume=args.resume, init_from=args.init_from,
                            decay_steps=args.decay_steps, decay=args.decay, half_life=args.half_life,
                            strict=args.strict)
        result = run_training(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
        if result.is_main:  # under torchrun, rank 0 alone prints the summary
            print(result.summary())

    def config_keys() -> str:
        from minicpm.train.config import describe_fields

        return "config keys (section.key = default):\n" + describe_fields()

    p = sub.add_parser(
        "train", help="pretrain (WSD), resume, continue or branch a decay from a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a MiniCPM from a YAML recipe plus key=value overrides, e.g.\n"
                    "  minicpm train configs/proxy-9m.yaml optim.lr=0.02 --out runs/lr0.02\n"
                    "  minicpm train --resume --out runs/lr0.02\n"
                    "  minicpm train --from runs/lr0.02/checkpoints/step_00000500 --decay-steps 50 --out runs/d500\n"
                    "Under torchrun the same command trains on several processes.",
        epilog=config_keys)
    p.add_argument("config_and_overrides", nargs="*", metavar="CONFIG|KEY=VALUE",
                   help="a YAML recipe (optional with --resume or --from) followed by dotted overrides")
    p.add_argument("--out", help="run directory (run.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run directory's latest checkpoint (from step 0 if it has none)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: train on with a config that differs from the one the run recorded (refused "
                        "otherwise); the change and its step go to RUN/config_changes.jsonl")
    p.add_argument("--strict", action="store_true",
                   help="refuse a checkpoint without a SHA-256 manifest instead of warning (run.strict_checkpoints)")
    p.add_argument("--from", dest="init_from", metavar="CHECKPOINT",
                   help="start from this checkpoint (or a run's latest) in a new --out: weights, optimizer, "
                        "data position and step; the source run is never modified")
    p.add_argument("--decay-steps", type=int, metavar="M",
                   help="with --from: branch a WSD decay of M steps from the checkpoint's step, on data.decay")
    p.add_argument("--decay", choices=DECAYS,
                   help="decay shape (schedule.decay; default exp, the paper's)")
    p.add_argument("--half-life", type=float, metavar="STEPS",
                   help="exponential decay half-life in steps (schedule.half_life; default decay_steps/5)")
    p.set_defaults(handler=train)
