"""The `minicpm` command. Subcommands are thin: parse arguments, call one library function, print its result.

Each module of this package registers the subcommands of one part of the library and imports that part only
inside its handlers, so that building the parser (and `minicpm --help`) stays fast; an option's default is the
default of the library parameter it feeds, read when the subcommand runs (cli/parser.py). Nothing in the library
imports this package.
"""

from __future__ import annotations

import sys

from minicpm.cli.data import register_data_commands
from minicpm.cli.demos import register_demo_commands
from minicpm.cli.dpo import register_dpo_commands
from minicpm.cli.eval import register_eval_commands
from minicpm.cli.infer import register_infer_commands
from minicpm.cli.interop import register_interop_commands
from minicpm.cli.parser import CommandParser
from minicpm.cli.report import register_report_commands
from minicpm.cli.reproduce import register_reproduce_command
from minicpm.cli.scaling import register_scaling_commands
from minicpm.cli.stages import register_stage_commands
from minicpm.cli.sweep import register_sweep_commands
from minicpm.cli.train import register_train_commands
from minicpm.cli.windtunnel import register_windtunnel_commands
from minicpm.errors import MiniCPMError

__all__ = ["build_parser", "describe_os_error", "main"]

REGISTER = [
    # each entry: a function(subparsers) that adds one or more subcommands and sets `handler`
    register_interop_commands,
    register_infer_commands,
    register_data_commands,
    register_train_commands,
    register_report_commands,
    register_demo_commands,
    register_eval_commands,
    register_stage_commands,
    register_sweep_commands,
    register_windtunnel_commands,
    register_scaling_commands,
    register_dpo_commands,
    register_reproduce_command,
]


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="minicpm", description="Train small language models with the MiniCPM recipe.")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, print its traceback (also: MINICPM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Every failure is one line on stderr and a non-zero exit: 2 for bad input or a failing
    file system (the project's errors, OSError, undecodable text), 1 for an unexpected error (its traceback with
    --debug or MINICPM_DEBUG=1), 130 for an interrupt. Temporary files are removed by the writers themselves
    (write_atomic, atomic_directory, the checkpoint writer) as the exception passes."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("MINICPM_DEBUG", "") not in ("", "0")
    lead = f"minicpm {args.command}"
    try:
        result = args.handler(args)
    except MiniCPMError as e:
        print(f"{lead}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{lead}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: error: a file is not {getattr(e, 'encoding', 'utf-8')} text "
              f"({_one_line(getattr(e, 'reason', str(e)))} at byte {getattr(e, 'start', '?')})", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (an unexpected error: one line, the traceback on request)
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: internal error: {type(e).__name__}: {_one_line(str(e)) or 'no message'} "
              f"(rerun with --debug or MINICPM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


_OS_HINTS = {
    "ENOSPC": "no space left on the device; free some and rerun (what was written before is intact)",
    "EDQUOT": "disk quota exceeded; free some space and rerun",
    "EEXIST": "already exists; choose another name or remove it",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EISDIR": "is a directory, a file was expected",
    "ENOTDIR": "is not a directory (or a file stands where a directory is needed)",
    "ENOENT": "no such file or directory",
    "EROFS": "read-only file system",
    "ENAMETOOLONG": "file name too long",
    "EMFILE": "too many open files",
}


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the file(s) and what went wrong in words a user can act on."""
    import errno as errno_names

    code = errno_names.errorcode.get(e.errno or 0, "")
    what = _OS_HINTS.get(code) or (e.strerror or _one_line(str(e)) or type(e).__name__)
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{files}: {what}" if files else what


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""
