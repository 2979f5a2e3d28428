"""The `minicpm` command. Subcommands are thin: parse arguments, call one library function.

Each section below registers the subcommands of one part of the library; nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys

from minicpm.errors import MiniCPMError

# ---------------------------------------------------------------- model: info, init, export, import, generate

def register_model_commands(sub) -> None:
    """info, init, export, import, generate (model issue)."""


# ---------------------------------------------------------------- data: tokenizer, prepare, data inspect

def register_data_commands(sub) -> None:
    """tokenizer train, prepare, data inspect (data issue)."""


# ---------------------------------------------------------------- training: train, quickstart, report

def register_training_commands(sub) -> None:
    """train, quickstart, report (trainer issue)."""


# ---------------------------------------------------------------- experiments: scaling

def register_experiment_commands(sub) -> None:
    """scaling fit, fit-curve, predict-curve (scaling-law issue)."""


# ---------------------------------------------------------------- entry point

REGISTER = [
    # each entry: a function(subparsers) that adds one or more subcommands and sets `handler`
    register_model_commands,
    register_data_commands,
    register_training_commands,
    register_experiment_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpm", description="Train small language models with the MiniCPM recipe.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except MiniCPMError as e:
        print(f"minicpm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minicpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
