"""`minicpm windtunnel lr-transfer`: the optimum per width and its shift, and a tiny end-to-end run."""

import json

import pytest
from train_helpers import make_datasets

from minicpm.cli import main
from minicpm.sweep.sweep import read_trials_csv
from minicpm.windtunnel.lr_transfer import mean_over_seeds, optima_of, width_overrides


def test_optimum_per_width_and_its_shift_in_doublings():
    losses = {64: {2.0 ** -8: 3.0, 2.0 ** -7: 2.5, 2.0 ** -6: 2.7},
              128: {2.0 ** -8: 2.9, 2.0 ** -7: 2.6, 2.0 ** -6: 2.4},
              256: {2.0 ** -8: 2.2, 2.0 ** -7: 2.3, 2.0 ** -6: None}}  # a failed trial is no optimum
    optima = optima_of(losses)
    assert [(o.width, o.lr, o.loss, o.shift, o.at_edge) for o in optima] == [
        (64, 2.0 ** -7, 2.5, 0, False), (128, 2.0 ** -6, 2.4, 1, True), (256, 2.0 ** -8, 2.2, -1, True)]


def test_several_seeds_are_averaged_and_a_failed_seed_fails_its_learning_rate():
    rows = [{"params": {"optim.lr": 0.01, "run.seed": 0}, "value": 3.0},
            {"params": {"optim.lr": 0.01, "run.seed": 1}, "value": 3.5},
            {"params": {"optim.lr": 0.02, "run.seed": 0}, "value": 2.0},
            {"params": {"optim.lr": 0.02, "run.seed": 1}, "value": None}]
    assert mean_over_seeds(rows) == {0.01: 3.25, 0.02: None}


def test_width_overrides_set_the_parametrisation():
    assert width_overrides(128, head_dim=16, base_width=64, parametrisation="mup") == [
        "model.hidden_size=128", "model.intermediate_size=320", "model.num_attention_heads=8",
        "model.num_key_value_heads=8", "model.dim_model_base=64"]
    assert width_overrides(128, head_dim=16, base_width=64, parametrisation="sp")[-1] == "model.dim_model_base=128"


@pytest.mark.slow
def test_lr_transfer_end_to_end(tmp_path, capsys):
    tokenizer, code, _ = make_datasets(tmp_path / "data")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{preset: tiny}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: constant, total_steps: 3, warmup_steps: 1}}
batch: {{tokens_per_step: 128, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 3, eval_every: 3, checkpoint_every: 3, progress: false, device: cpu, dtype: fp32}}
""")
    out = tmp_path / "lr"
    assert main(["windtunnel", "lr-transfer", str(recipe), "--widths", "32", "64", "--log2-lr", "-8", "-7",
                 "--only", "mup", "--workers", "2", "--seeds", "0", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert set(result["losses"]["mup"]) == {"32", "64"}
    for width, per_lr in result["losses"]["mup"].items():
        assert len(per_lr) == 2 and all(v is not None for v in per_lr.values())
        best = min(per_lr, key=per_lr.get)
        optimum = next(o for o in result["optima"]["mup"] if o["width"] == int(width))
        assert optimum["lr"] == float(best)
        # each learning rate's loss is the mean of its two seeds' trials
        trials = read_trials_csv(out / f"mup/w{width}/trials.csv")
        assert sorted(r["run.seed"] for r in trials) == ["0", "0", "1", "1"]
        for lr, loss in per_lr.items():
            mine = [float(r["eval_loss"]) for r in trials if float(r["optim.lr"]) == float(lr)]
            assert loss == pytest.approx(sum(mine) / 2) and mine[0] != mine[1]
        config = (out / f"mup/w{width}/runs/trial_0000/config.yaml").read_text()
        assert f"hidden_size: {width}" in config and "dim_model_base: 32" in config
    assert (out / "lr_transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert "μP: the optimum moves by" in printed
