"""`minicpm windtunnel search`: D = 10N steps, a TPE sweep over the four μP hyper-parameters, its plots and result."""

import json

import pytest
from train_helpers import make_datasets

from minicpm.cli import main
from minicpm.errors import MiniCPMError
from minicpm.sweep.sweep import read_trials_csv
from minicpm.windtunnel.search import parse_ranges, proxy_steps


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    tokenizer, code, _ = make_datasets(root / "data")
    path = root / "tiny.yaml"
    path.write_text(f"""
model: {{preset: tiny, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 2,
         dim_model_base: 32}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: wsd, total_steps: 1000, warmup_steps: 1}}
batch: {{tokens_per_step: 128, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 2, eval_every: 0, checkpoint_every: 0, progress: false, device: cpu, dtype: fp32}}
""")
    return path


def test_the_proxy_trains_for_d_tokens_per_non_embedding_parameter(recipe):
    n, tokens, steps = proxy_steps(recipe, [], 10.0)
    # 2 layers x (4 d^2 attention + 3 d f MLP + 2 d norms) + the final norm, d = 32, f = 64
    assert n == 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert tokens == 10 * n and steps == -(-tokens // 128)


def test_ranges_are_checked_one_line():
    assert parse_ranges(["lr=0.002:0.05"]) == {"lr": (0.002, 0.05)}
    for bad in ("lr=0.05:0.002", "lr=0:1", "speed=1:2", "lr=1-2"):
        with pytest.raises(MiniCPMError, match="--range"):
            parse_ranges([bad])


@pytest.mark.slow
def test_search_writes_the_best_point_plots_and_importances(recipe, tmp_path, capsys):
    out = tmp_path / "search"
    code = main(["windtunnel", "search", str(recipe), "--out", str(out), "--trials", "3", "--workers", "2",
                 "--tokens-per-param", "0.03"])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    rows = read_trials_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["complete"] * 3
    losses = {int(r["number"]): float(r["eval_loss"]) for r in rows}
    assert result["best"]["value"] == min(losses.values())
    assert result["best"]["number"] == min(losses, key=losses.get)
    assert set(result["best"]["params"]) == {"model.scale_emb", "model.scale_depth", "model.initializer_range",
                                             "optim.lr"}
    assert set(result["importances"]) == {"scale_emb", "scale_depth", "init_std", "lr"}
    assert sum(result["importances"].values()) == pytest.approx(1.0)
    # every trial trained the D = 0.03 N tokens and took its sampled values
    for row in rows:
        config = (out / "runs" / f"trial_{int(row['number']):04d}" / "config.yaml").read_text()
        assert f"total_steps: {result['steps']}" in config
        assert f"scale_emb: {float(row['model.scale_emb'])!r}" in config
    for name in ("search.png", "importance.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "best eval_loss" in printed and "importance" in printed
