"""The spec loader (minicpm/specs.py): a YAML spec into its typed schema, every bad value one line naming the file,
the key (nested, indexed) and what the key accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Dict, List, Literal, Optional, Union

import pytest

from minicpm.errors import MiniCPMError
from minicpm.specs import (Accepts, Number, PositiveInt, Recipe, RecipeSection, read_spec, resolve_recipe,
                           spec_error)


@dataclass(kw_only=True)
class Item:
    width: PositiveInt
    name: Optional[str] = None


@dataclass(kw_only=True)
class Schema:
    base: Recipe
    sizes: Annotated[List[Union[Literal["small", "large"], Item]], Accepts("a non-empty list of sizes", bool)]
    rate: float = 0.5
    bound: Number = 1
    flag: Union[Literal[False], Literal["a", "b"]] = "a"
    weights: Dict[str, Annotated[Number, Accepts("a positive weight", lambda x: x > 0)]] = field(default_factory=dict)


def read(tmp_path, text: str) -> Schema:
    (tmp_path / "recipe.yaml").write_text("model: {preset: tiny}\n")
    (tmp_path / "spec.yaml").write_text("base: recipe.yaml\n" + text)
    return read_spec(tmp_path / "spec.yaml", Schema)


def test_a_spec_is_read_into_its_schema_each_union_by_the_values_kind(tmp_path):
    spec = read(tmp_path, "sizes: [small, {width: 64}]\nrate: 1\nbound: 3\nflag: false\nweights: {a: 2, b: 0.5}\n")
    assert spec.base == "recipe.yaml" and spec.sizes == ["small", Item(width=64)]
    assert spec.rate == 1.0 and isinstance(spec.rate, float)  # a float field takes an int as float
    assert spec.bound == 3 and isinstance(spec.bound, int)  # a Number keeps what was written
    assert spec.flag is False and spec.weights == {"a": 2, "b": 0.5}
    assert resolve_recipe(spec.base, tmp_path / "spec.yaml") == ((tmp_path / "recipe.yaml").resolve(), [])
    section = RecipeSection(config="recipe.yaml", overrides={"optim.lr": 0.02, "run.wandb": True, "data.decay": None})
    assert resolve_recipe(section, tmp_path / "spec.yaml")[1] == ["optim.lr=0.02", "run.wandb=true", "data.decay=null"]


@pytest.mark.parametrize("text, message", [
    ("sizes: [small]\nrate: x\n", "rate: expected a number, got 'x'"),
    ("sizes: [small]\nrate: .nan\n", "rate: expected a number, got nan"),
    ("sizes: [small]\nbound: true\n", "bound: expected a number, got True"),
    ("sizes: [small]\nflag: 0\n", "flag: expected false or a | b, got 0"),  # 0 is not false
    ("sizes: [small]\nflag: true\n", "flag: expected false or a | b, got True"),
    ("sizes: []\n", "sizes: expected a non-empty list of sizes, got []"),
    ("sizes: [medium]\n", "sizes[0]: expected small | large, got 'medium'"),
    ("sizes: [{width: 0}]\n", r"sizes[0].width: expected a positive integer, got 0"),
    ("sizes: [{name: x}]\n", r"sizes[0].width: missing (expected a positive integer)"),
    ("sizes: [{width: 8, depth: 2}]\n", r"sizes[0].depth: unknown key (expected one of width, name)"),
    ("sizes: [[8]]\n", "sizes[0]: expected small | large or {width, name}, got [8]"),
    ("sizes: [small]\nweights: {a: -1}\n", "weights.a: expected a positive weight, got -1"),
    ("sizes: [small]\nweights: [1]\n", "weights: expected a mapping, got [1]"),
    ("sizes: [small]\nrates: 1\n", "rates: unknown key (expected one of base, sizes, rate, bound, flag, weights)"),
    ("rate: 1\n", "sizes: missing (expected a non-empty list of sizes)"),
])
def test_a_bad_value_is_one_line_naming_the_file_the_key_and_what_it_accepts(tmp_path, text, message):
    with pytest.raises(MiniCPMError) as e:
        read(tmp_path, text)
    assert str(e.value) == f"{tmp_path / 'spec.yaml'}: {message}"


def test_a_file_that_is_not_a_spec_is_one_line(tmp_path):
    with pytest.raises(MiniCPMError, match="no such sweep spec"):
        read_spec(tmp_path / "missing.yaml", Schema, what="sweep spec")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(MiniCPMError, match=r"list.yaml: expected a mapping with base, sizes, rate, bound, flag"):
        read_spec(tmp_path / "list.yaml", Schema)
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(MiniCPMError, match=r"bad.yaml: not valid YAML \("):
        read_spec(tmp_path / "bad.yaml", Schema)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    with pytest.raises(MiniCPMError, match=r"spec.yaml: base.config: .*nope.yaml: no such file"):
        resolve_recipe(RecipeSection(config="nope.yaml"), tmp_path / "spec.yaml")
    assert str(spec_error("s.yaml", "a.b", "why")) == "s.yaml: a.b: why"
