"""Bad MoE configurations through the command line: one line on stderr naming the field, exit status 2."""

import json

import pytest

from minicpm.interop.hf import save_model
from minicpm.stages.upcycle import upcycle
from minicpm.model.build import build_model
from minicpm.model.config import preset


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    save_model(build_model(preset("tiny"), seed=0), root / "dense")
    return upcycle(root / "dense", root / "moe", experts=2, top_k=1)


def edit_config(checkpoint, tmp_path, **fields):
    """A copy of the checkpoint whose config.json has these fields changed."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for path in checkpoint.iterdir():
        (copy / path.name).symlink_to(path)
    (copy / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | fields))
    return copy


def test_top_k_above_the_experts_in_a_checkpoint_config(moe_checkpoint, tmp_path, cli):
    bad = edit_config(moe_checkpoint, tmp_path, num_experts_per_tok=3)
    assert_one_line_error(cli("info", bad), "num_experts_per_tok must be an integer in 1..num_experts, got 3")
    assert_one_line_error(cli("export", bad, tmp_path / "out", "--to", "mixtral"), "num_experts_per_tok")


def test_an_moe_checkpoint_whose_config_says_zero_experts(moe_checkpoint, tmp_path, cli):
    bad = edit_config(moe_checkpoint, tmp_path, num_experts=0)  # the expert tensors have no place in a dense model
    assert_one_line_error(cli("export", bad, tmp_path / "out", "--to", "minicpm"), "model.layers.0.mlp")


def test_top_k_above_the_experts_and_zero_experts_in_a_training_config(moe_checkpoint, tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  preset: tiny\n")
    result = cli("train", recipe, "model.num_experts=2", "model.num_experts_per_tok=3", "--out", tmp_path / "run")
    assert_one_line_error(result, "num_experts_per_tok must be an integer in 1..num_experts, got 3")
    assert_one_line_error(cli("train", recipe, "model.num_experts=-1", "--out", tmp_path / "run"), "num_experts")
    assert_one_line_error(cli("upcycle", moe_checkpoint.parent / "dense", "--experts", "0", "--out",
                              tmp_path / "zero"), "--experts must be an integer >= 1")
    assert not (tmp_path / "run").exists() and not (tmp_path / "zero").exists()
