"""The command line itself: `python -m minicpm` and the console script reach main; building the parser imports no
torch; every subcommand's help builds, its defaults read from the library function it calls."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from importlib.metadata import entry_points

from minicpm.cli import build_parser, main
from minicpm.cli.parser import LibraryDefault


def subcommand_parsers(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name), child
                yield from subcommand_parsers(child, (*prefix, name))


def test_python_dash_m_minicpm_runs_the_command_line(minicpm):
    done = minicpm("info", "tiny")
    assert done.returncode == 0 and "non-embedding (N)" in done.stdout, done.stderr
    bad = minicpm("info", "no-such-preset")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no-such-preset" in bad.stderr


def test_the_console_script_is_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "minicpm"]
    assert script.value == "minicpm.cli:main" and script.load() is main


def test_building_the_parser_imports_no_torch():
    # a fresh interpreter: this one imported torch long ago
    probe = "import sys; from minicpm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_every_subcommand_builds_its_help_with_the_library_defaults():
    parsers = list(subcommand_parsers(build_parser()))
    assert len(parsers) >= 40
    for names, parser in parsers:
        text = parser.format_help()
        assert text.startswith(f"usage: minicpm {' '.join(names)}"), names
        left = [a.dest for a in parser._actions if isinstance(a.default, LibraryDefault)]
        assert left == [], (names, left)


def test_an_option_left_out_takes_the_default_of_the_library_function():
    from minicpm.laws.commands import fit_scaling
    from minicpm.scaling.planner import make_plan
    from minicpm.windtunnel.search import search

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    parser = build_parser()
    args = parser.parse_args(["scaling", "fit", "runs.csv"])
    assert (args.bootstrap, args.confidence, args.delta) == (default(fit_scaling, "bootstrap"),
                                                             default(fit_scaling, "confidence"),
                                                             default(fit_scaling, "delta"))
    args = parser.parse_args(["plan", "--budget", "1e21", "--campaign", "c", "--out", "p.yaml"])
    assert args.bootstrap == default(make_plan, "bootstrap") == default(fit_scaling, "bootstrap")
    args = parser.parse_args(["windtunnel", "search", "proxy.yaml", "--out", "s"])
    assert args.params == list(default(search, "params")) and args.trials == default(search, "trials")
    args = parser.parse_args(["windtunnel", "search", "proxy.yaml", "--out", "s", "--trials", "3"])
    assert args.trials == 3
