"""The argument parser of every subcommand: one-line errors, help built only when shown, and option defaults read
from the library function the subcommand calls.

A default is written once, in the library's signature; the parser names it
(`LibraryFunction("pkg.mod:fn").default("x")`) and reads it when the subcommand parses its arguments or shows
its help. The library module is imported only then, so building the parser for every command stays fast (most
library modules import torch).
"""

from __future__ import annotations

import argparse
import inspect
from importlib import import_module


class LibraryDefault:
    """The default of parameter `parameter` of the callable `target` ("package.module:function", or a class whose
    constructor takes it, e.g. a dataclass)."""

    def __init__(self, target: str, parameter: str):
        self.target, self.parameter = target, parameter

    def value(self):
        module, _, qualname = self.target.partition(":")
        function = import_module(module)
        for name in qualname.split("."):
            function = getattr(function, name)
        default = inspect.signature(function).parameters[self.parameter].default
        if default is inspect.Parameter.empty:
            raise TypeError(f"{self.target}: parameter {self.parameter!r} has no default")
        return default

    def __repr__(self) -> str:
        return f"{self.target}({self.parameter}=...)"


class LibraryFunction:
    """The function a subcommand calls, as the home of its options' defaults."""

    def __init__(self, target: str):
        self.target = target

    def default(self, parameter: str) -> LibraryDefault:
        return LibraryDefault(self.target, parameter)


class CommandParser(argparse.ArgumentParser):
    """Takes a function as epilog, called only when help is shown (`train`'s list of config keys needs omegaconf);
    resolves LibraryDefault defaults when it parses or shows help; reports bad input in one line."""

    def parse_known_args(self, args=None, namespace=None):
        self.resolve_library_defaults()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        self.resolve_library_defaults()
        return super().format_help()

    def resolve_library_defaults(self) -> None:
        for action in self._actions:
            if isinstance(action.default, LibraryDefault):
                value = action.default.value()
                # a tuple default of a repeatable option reads, and is, the list argparse would have built
                action.default = list(value) if isinstance(value, tuple) and action.nargs in ("+", "*") else value

    def error(self, message: str):
        # bad input is one line and exit 2, like the project's own errors (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
