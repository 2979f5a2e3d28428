"""Registries of the kinds a config names (objectives, evaluators): a class per kind, and the dataclass of the
kind's options, which the config's mapping is checked against (OmegaConf types and keys, one-line errors).

A kind registers itself when its module is imported, and that module imports the registry; so a registry names the
modules of its built-in kinds and imports them by name when first asked, as run.plugins are imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from minicpm.errors import MiniCPMError
from minicpm.typed_config import typed_options


@dataclass(frozen=True)
class Entry:
    cls: Callable[..., Any]
    options: type | None


class Registry:
    def __init__(self, what: str, key: str, builtin: tuple[str, ...] = ()):
        self.what, self.key = what, key  # e.g. "objective", "objective.kind"
        self.builtin = builtin
        """Dotted names of the modules that register the built-in kinds."""
        self.entries: dict[str, Entry] = {}
        self.loaded = False

    def load_builtin(self) -> None:
        """Import the modules of the built-in kinds (once; each registers its kinds)."""
        if not self.loaded:
            self.loaded = True
            for module in self.builtin:
                importlib.import_module(module)

    def register(self, kind: str, *, options: type | None = None):
        """Class decorator: make `kind` buildable (options: the dataclass of its settings)."""
        def decorate(cls):
            self.entries[kind] = Entry(cls, options)
            return cls
        return decorate

    def __contains__(self, kind: str) -> bool:
        self.load_builtin()
        return kind in self.entries

    def kinds(self) -> list[str]:
        self.load_builtin()
        return sorted(self.entries)

    def get(self, kind: str, where: str | None = None) -> Entry:
        self.load_builtin()
        if kind not in self.entries:
            raise MiniCPMError(f"{where or self.key}: {kind!r} is not a registered {self.what} (known: "
                               f"{', '.join(self.kinds())}; run.plugins can register more)")
        return self.entries[kind]

    def options(self, kind: str, values: dict[str, Any] | None, where: str) -> Any:
        """The kind's options dataclass filled from `values` (None for a kind without options, which takes none)."""
        entry = self.get(kind)
        if entry.options is None:
            if values:
                raise MiniCPMError(f"{where}: the {kind} {self.what} takes no options, got {', '.join(values)}")
            return None
        return typed_options(entry.options, values, where)
