from pathlib import Path

import pytest

from minicpm.train.config import (TrainConfig, batch_plan, describe_fields, load_config, model_config, save_config,
                            with_model)
from minicpm.errors import MiniCPMError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_merge_with_types_checked(tmp_path):
    path = write(tmp_path, "model: {preset: tiny}\noptim: {lr: 0.02}\nbatch: {seq_len: 64, tokens_per_step: 1024}\n")
    cfg = load_config(path, ["optim.lr=0.03", "model.hidden_size=128", "data.stable={/data/a: 2, /data/b: 1}"])
    assert cfg.optim.lr == 0.03
    assert cfg.batch.seq_len == 64
    assert cfg.data.stable == {"/data/a": 2.0, "/data/b": 1.0}
    m = model_config(cfg)
    assert (m.hidden_size, m.num_hidden_layers, m.vocab_size) == (128, 2, 512)
    assert model_config(cfg, vocab_size=4096).vocab_size == 4096


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("nosection.x=1", "nosection"),
    ("schedule.kind=step", "schedule.kind"),
    ("run.dtype=fp8", "run.dtype"),
    ("batch.seq_len=100", "batch.seq_len"),
    ("model.preset=huge", "huge"),
    ("model.hidden_size=70", "model.hidden_size"),
    ("parallel.activation_checkpointing=all", "parallel.activation_checkpointing"),
    ("data.stable={/d: -1}", "data.stable"),
    ("optim.lr", "key=value"),
])
def test_config_errors_are_one_line_and_name_the_key(override, key):
    with pytest.raises(MiniCPMError) as err:
        load_config(None, ["model.preset=tiny", "batch.seq_len=64", "batch.tokens_per_step=1024", override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(MiniCPMError, match="c.yaml.*optim.betas"):
        load_config(write(tmp_path, "optim: {betas: [0.9, 0.95]}\n"))
    with pytest.raises(MiniCPMError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: {lr: [\n"))
    with pytest.raises(MiniCPMError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "batch.seq_len=64", "batch.tokens_per_step=1024",
                             "data.stable={/x: 1}", "data.decay={/y: 1}", "schedule.decay=linear"])
    cfg = with_model(cfg, model_config(cfg))
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_batch_plan_derives_accumulation_and_checks_divisibility():
    cfg = TrainConfig()
    cfg.batch.tokens_per_step, cfg.batch.seq_len, cfg.batch.micro_batch_size = 8192, 128, 8
    assert batch_plan(cfg.batch, 1).accumulation == 8
    plan = batch_plan(cfg.batch, 4)
    assert (plan.sequences, plan.per_rank, plan.accumulation) == (64, 16, 2)
    with pytest.raises(MiniCPMError, match="batch.micro_batch_size"):
        batch_plan(cfg.batch, 16)
    with pytest.raises(MiniCPMError, match="not divisible over 3 processes"):
        batch_plan(cfg.batch, 3)


def test_every_field_has_help_text():
    text = describe_fields()
    for line in text.splitlines():
        if line.startswith("      "):
            assert line.strip(), "a config field has no docstring"
    assert "optim.lr = 0.01" in text and "model.hidden_size" in text and "parallel.loss_chunk_size" in text


def test_shipped_recipes_load():
    """Every file in configs/ loads: training configs as TrainConfigs, sweep, campaign and schedule-comparison
    specs (a `base:` training config plus their own keys) through their own loaders."""
    import yaml

    from minicpm.scaling.spec import load_campaign_spec
    from minicpm.sweep.spec import load_spec

    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert recipes
    kinds = {}
    for path in recipes:
        top = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "base" not in top:
            cfg = load_config(path)
            model_config(cfg)
            batch_plan(cfg.batch, 1)
            kinds[path.name] = "train"
        elif "space" in top:
            load_spec(path)
            kinds[path.name] = "sweep"
        else:
            kind = "schedules" if path.name.startswith("schedules") else "campaign"
            load_campaign_spec(path, kind)
            kinds[path.name] = kind
    assert kinds["quickstart.yaml"] == "train" and kinds["campaign-demo.yaml"] == "campaign"
    assert kinds["windtunnel-batch-size-sweep.yaml"] == "sweep" and kinds["schedules-demo.yaml"] == "schedules"


def test_the_quickstart_runs_its_recipe_file_with_the_paths_moved_under_its_out(tmp_path):
    from minicpm.demos.quickstart import quickstart_config

    assert quickstart_config(Path("quickstart")) == load_config(CONFIGS / "quickstart.yaml")
    moved = quickstart_config(tmp_path / "qs", device="cpu")
    assert moved.run.out_dir == str(tmp_path / "qs/runs/stable") and moved.run.device == "cpu"
    assert moved.data.tokenizer == str(tmp_path / "qs/tokenizer/tokenizer.json")
    assert moved.data.decay == {str(tmp_path / "qs/data/library"): 0.8, str(tmp_path / "qs/data/tests"): 0.2}
    assert moved.schedule == load_config(CONFIGS / "quickstart.yaml").schedule
