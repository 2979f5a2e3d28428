"""Spec files (`minicpm sweep`, `minicpm scaling campaign`, `minicpm scaling compare-schedules`): YAML read into
typed dataclasses by one loader, every error one line naming the file, the key and what the key accepts.

A spec's schema is a dataclass whose fields are its keys and whose types say what each takes: bool, int, float
(finite; an int is taken as float), Number (an int stays an int), str, Literal choices, list[...], dict[str, ...],
a nested schema, Optional and Union (the alternative picked by the YAML value's kind: a mapping, a list or a
scalar), Any. What a type cannot say goes in its Annotated metadata, an Accepts:

    trials: Annotated[int, Accepts("a positive integer", lambda n: n >= 1)] = 10
    ->  spec.yaml: trials: expected a positive integer, got 0

The training config is OmegaConf's (typed_config.py): it merges `a.b=c` overrides into a recipe. A spec is read
once, and its keys take the unions OmegaConf cannot type (a preset name or {name, width, depth}; a list of choices
or {low, high, log}; a recipe path or {config, overrides}).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional, TypeVar, Union

from minicpm.errors import MiniCPMError

T = TypeVar("T")


@dataclass(frozen=True)
class Accepts:
    """What a key accepts, in words for its error, and the condition beyond its type (None: the type alone)."""

    words: str
    check: Optional[Callable[[Any], bool]] = None


Number = Union[int, float]
"""A finite number; an int stays an int (a spec's fingerprint keeps what was written)."""
Scalar = Annotated[Union[None, bool, int, float, str], Accepts("a number, string, boolean or null")]
"""A value one override can carry (and Optuna can store)."""
PositiveInt = Annotated[int, Accepts("a positive integer", lambda n: n >= 1)]
PositiveFloat = Annotated[float, Accepts("a positive number", lambda x: x > 0)]
PositiveNumber = Annotated[Number, Accepts("a positive number", lambda x: x > 0)]
Fraction = Annotated[float, Accepts("a fraction in (0, 1)", lambda x: 0 < x < 1)]
NonEmptyStr = Annotated[str, Accepts("a non-empty string", bool)]


def at_least(low: int) -> Any:
    """An int type that takes `low` or more."""
    return Annotated[int, Accepts(f"an integer >= {low}", lambda n: n >= low)]


def spec_error(source: str | Path, key: str, message: str) -> MiniCPMError:
    """The one line of a bad spec: FILE: KEY: message."""
    return MiniCPMError(f"{source}: {key}: {message}")


def read_spec(path: str | Path, schema: type[T], *, what: str = "spec") -> T:
    """The spec file at `path` as a `schema` instance, every value checked against its field's type."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such {what}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        keys = ", ".join(f.name for f in dataclasses.fields(schema))
        raise MiniCPMError(f"{path}: expected a mapping with {keys}")
    return typed(schema, data, "", path)


def typed(tp: Any, value: Any, key: str, source: str | Path) -> Any:
    """`value` (found at `key` of the spec `source`) checked against the type `tp`: the value, converted where the
    type says so (a float, a dataclass); otherwise the one-line error."""
    try:
        return _load(tp, value, key)
    except _Bad as bad:
        raise spec_error(source, bad.key, bad.message) from None


# ------------------------------------------------------------------------------------------ the loader

class _Bad(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key, self.message = key, message


class _Mismatch(_Bad):
    """A value not accepted at `key`; unless an Accepts already said what is (`worded`), the Annotated type above
    it says so in its words."""

    def __init__(self, key: str, words: str, value: Any, worded: bool = False):
        super().__init__(key, f"expected {words}, got {value!r}")
        self.worded = worded


def _child(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(tp: Any) -> str:
    """Which YAML values a type can take: a mapping, a list, a scalar, or any."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "mapping"
    if tp is list or origin is list:
        return "list"
    return "scalar"


def _value_kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict) else "list" if isinstance(value, list) else "scalar"


def _strip(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def describe(tp: Any) -> str:
    """What a type accepts, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return next((a.words for a in args[1:] if isinstance(a, Accepts)), describe(args[0]))
    if origin in (Union, types.UnionType):
        alternatives = [a for a in args if a is not type(None)]
        if set(alternatives) == {int, float}:
            return "a number"
        return " or ".join(describe(a) for a in alternatives)
    if origin is typing.Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    if tp is list or origin is list:
        return "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _load(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        accepts = [a for a in args[1:] if isinstance(a, Accepts)]
        try:
            loaded = _load(args[0], value, key)
        except _Mismatch as bad:
            if bad.key == key and accepts and not bad.worded:
                raise _Mismatch(key, accepts[0].words, value, worded=True) from None
            raise
        for a in accepts:
            if a.check is not None and loaded is not None and not a.check(loaded):
                raise _Mismatch(key, a.words, value, worded=True)
        return loaded
    if origin in (Union, types.UnionType):
        return _load_union(tp, args, value, key)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(key, describe(tp), value)
    if dataclasses.is_dataclass(tp):
        return _load_dataclass(tp, value, key)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise _Mismatch(key, describe(tp), value)
        item = args[0] if args else Any
        return [_load(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(key, describe(tp), value)
        item = args[1] if args else Any
        return {k: _load(item, v, _child(key, str(k))) for k, v in value.items()}
    if _is_scalar_of(tp, value):
        return float(value) if tp is float else value
    raise _Mismatch(key, describe(tp), value)


def _is_scalar_of(tp: Any, value: Any) -> bool:
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"a spec field of type {tp!r}: the spec loader takes no such type")


def _load_union(tp: Any, args: tuple, value: Any, key: str) -> Any:
    """The alternative of the value's kind: a mapping to the mapping type, a list to the list type (their own errors
    then name the key inside), a scalar to the first scalar type that takes it."""
    kind = _value_kind(value)
    candidates = [a for a in args if _kind(a) in (kind, "any")]
    if len(candidates) == 1:
        return _load(candidates[0], value, key)
    for candidate in candidates:
        try:
            return _load(candidate, value, key)
        except _Mismatch as bad:
            if bad.key != key:
                raise
    raise _Mismatch(key, describe(tp), value)


def _load_dataclass(cls: type, value: Any, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(value, dict):
        raise _Mismatch(key, describe(cls), value)
    for name in value:
        if name not in fields:
            raise _Bad(_child(key, str(name)), f"unknown key (expected one of {', '.join(fields)})")
    hints = typing.get_type_hints(cls, include_extras=True)
    given = {}
    for name, f in fields.items():
        if name in value:
            given[name] = _load(hints[name], value[name], _child(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Bad(_child(key, name), f"missing (expected {describe(hints[name])})")
    return cls(**given)


# ------------------------------------------------------------------------------------------ the training recipe

def override_value(value: Any) -> str:
    """A value as the right-hand side of a key=value override (OmegaConf dotlist syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


Override = Annotated[str, Accepts("a key=value override", lambda s: "=" in s)]


@dataclass(kw_only=True)
class RecipeSection:
    """`base:` of a spec: the training recipe its runs start from, and overrides of its keys."""

    config: Annotated[str, Accepts("the path of a training recipe (YAML)", bool)]
    """The recipe, relative to the spec file (or absolute)."""
    overrides: Union[List[Override], Dict[str, Scalar], None] = None
    """key=value strings, or a mapping of key: value."""


Recipe = Annotated[Union[str, RecipeSection],
                   Accepts("a training recipe: RECIPE.yaml or {config: RECIPE.yaml, overrides: [key=value, ...]}")]


def resolve_recipe(base: str | RecipeSection, spec: Path) -> tuple[Path, list[str]]:
    """The recipe's absolute path (checked to exist) and its overrides as key=value strings."""
    section = RecipeSection(config=base) if isinstance(base, str) else base
    config = Path(section.config) if Path(section.config).is_absolute() else spec.parent / section.config
    if not config.is_file():
        raise spec_error(spec, "base.config", f"{config}: no such file")
    overrides = section.overrides or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={override_value(v)}" for k, v in overrides.items()]
    return config.resolve(), list(overrides)
