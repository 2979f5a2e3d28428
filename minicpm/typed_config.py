"""Typed configs: dataclasses filled from YAML files and `a.b=c` overrides, with one-line errors and field help.

OmegaConf gives YAML loading, dotted overrides and type/unknown-key checking against the dataclasses; every
OmegaConf error is turned into a one-line MiniCPMError naming the file or override and the key. Each field's
docstring (litgpt-style, written under the field) is its help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minicpm.errors import MiniCPMError

T = TypeVar("T")


def omegaconf_error(source: str, e: OmegaConfBaseException) -> MiniCPMError:
    """One line: `source` (a file, an override, a config entry), the key OmegaConf names, its message's first line."""
    key = getattr(e, "full_key", None)
    message = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    return MiniCPMError(f"{source}: {key + ': ' if key else ''}{message}")


def load_typed(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), *,
               sections: str = "config sections") -> T:
    """A `cls` from an optional YAML file plus `key=value` overrides (OmegaConf dotlist syntax), type-checked;
    `sections` says what the file's top-level mapping holds (for the error when it is a list)."""
    merged = OmegaConf.structured(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MiniCPMError(f"{path}: no such config file")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError: its first line names the line and column
            raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, DictConfig):
            raise MiniCPMError(f"{path}: expected a mapping of {sections}, got a list")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            if (key := _section_not_a_mapping(merged, loaded, e)) is not None:  # e.g. `model: [1, 2]`
                value = OmegaConf.select(loaded, key, throw_on_missing=False)
                value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                raise MiniCPMError(f"{path}: {key} must be a mapping of its keys, got {value!r}") from None
            raise omegaconf_error(str(path), e) from None
        except (TypeError, ValueError) as e:  # OmegaConf: a list where a mapping belongs, e.g. data.stable
            where = _list_for_mapping(merged, loaded)
            what = (f"{where} is a list where the config expects a mapping" if where else
                    "a list stands where the config expects a mapping, or a mapping where it expects a list")
            raise MiniCPMError(f"{path}: {what} ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise MiniCPMError(f"override {item!r}: expected key=value, e.g. optim.lr=0.02")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise omegaconf_error(f"override {item!r}", e) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise omegaconf_error(str(path or "config"), e) from None


def _section_not_a_mapping(default, loaded, error: OmegaConfBaseException) -> str | None:
    """The dotted key of a section that `loaded` gives as a list or a value, when that is what `error` (OmegaConf's
    "Merge error: list is not a subclass of ...") is about; None otherwise."""
    if "is not a subclass of" not in str(error):
        return None
    try:
        return _list_for_mapping(default, loaded)
    except OmegaConfBaseException:
        return None


def _list_for_mapping(default, loaded, prefix: str = "") -> str | None:
    """The dotted key at which `loaded` holds a list where `default` holds a mapping (OmegaConf's TypeError names
    none)."""
    for key, value in loaded.items_ex(resolve=False) if isinstance(loaded, DictConfig) else ():
        name = f"{prefix}{key}"
        in_default = isinstance(default, DictConfig) and key in default  # an unknown key: OmegaConf names it itself
        known = default.get(key) if in_default else None
        if isinstance(known, DictConfig) or (in_default and known is None
                                             and OmegaConf.get_type(default, str(key)) is dict):
            if not isinstance(value, DictConfig):
                return name
            if (inner := _list_for_mapping(known, value, name + ".")) is not None:
                return inner
    return None


def typed_options(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """A dataclass of a registered kind's options from a config mapping, type-checked by OmegaConf; an unknown key
    or a wrong type is a one-line error naming `where` (e.g. "evaluators[1]") and the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise omegaconf_error(where, e) from None


def to_yaml(config: Any) -> str:
    """A config dataclass as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (litgpt-style attribute docstrings, read by
    docstring_parser), whitespace folded to one line."""
    import docstring_parser

    try:
        parsed = docstring_parser.parse_from_object(cls)
    except (OSError, TypeError):  # no source (e.g. a dataclass made at run time)
        return {}
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}
