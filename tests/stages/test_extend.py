"""`minicpm extend` and the sequence-length curriculum: untying, the new RoPE, bad input, stages and their resume."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from minicpm.cli import main
from minicpm.errors import MiniCPMError
from minicpm.stages.extend import (curriculum_stages, extend_checkpoint, run_curriculum, stage_config,
                                        training_memory, untie_head)
from minicpm.interop.hf import load_model, save_model
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig, preset
from minicpm.train.loop import train
from train_helpers import make_datasets


def tiny_config(**fields) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, dim_model_base=16,
                                 max_position_embeddings=32), **fields})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_datasets(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def source(data, tmp_path_factory):
    tokenizer = data[0]
    model = build_model(tiny_config(), seed=3)
    return save_model(model, tmp_path_factory.mktemp("src") / "ckpt", extra_files={"tokenizer.json": tokenizer})


def test_untied_head_leaves_the_logits_unchanged():
    tied = build_model(tiny_config(), seed=1)
    state = untie_head(tied.state_dict(), tied.config)
    untied = build_model(tiny_config(tie_word_embeddings=False), seed=2)
    untied.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tied(ids), untied(ids))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_dynamic_extension_keeps_step0_logits_up_to_the_trained_length(source, data, tmp_path):
    result = extend_checkpoint(source, tmp_path / "ext", to_length=128, method="dynamic")
    assert result.curriculum is None and result.config.max_position_embeddings == 32
    extended, original = load_model(result.model), load_model(source)
    assert extended.lm_head is not None and original.lm_head is None
    assert torch.equal(extended.lm_head.weight, original.model.embed_tokens.weight)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(extended(ids), original(ids))
        longer = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(extended(longer), original(longer))  # beyond 32 the base grows
    assert (tmp_path / "ext" / "model" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method,expected", [
    ("abf", {"rope_theta": 50000.0, "rope_scaling": None}),
    ("ntk", {"rope_scaling": {"rope_type": "ntk", "factor": 16.0}}),
    ("yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32}}),
])
def test_extend_writes_the_rope_and_a_training_plan(source, data, tmp_path, method, expected):
    _, code, prose = data
    result = extend_checkpoint(source, tmp_path / "ext", to_length=512, method=method,
                               base=50000.0 if method == "abf" else None, steps_per_stage=3, tokens_per_step=512,
                               short_data={str(code): 1.0, str(prose): 1.0}, synthetic_documents=24)
    written = json.loads((result.model / "config.json").read_text())
    assert written["max_position_embeddings"] == 512 and written["tie_word_embeddings"] is False
    for key, value in expected.items():
        assert written.get(key) == value
    train_cfg = yaml.safe_load(result.train_config.read_text())
    mix = train_cfg["data"]["stable"]
    synthetic = str(tmp_path / "ext" / "data" / "synthetic")
    assert mix[synthetic] == pytest.approx(0.44) and sum(mix.values()) == pytest.approx(1.0)
    assert train_cfg["run"]["init_weights_from"] == str(result.model) and "model" not in train_cfg
    assert train_cfg["data"]["packing"] == "document"  # packed examples never see each other's needles
    _, stages = curriculum_stages(result.curriculum)
    assert [(s.seq_len, s.steps) for s in stages] == [(256, 3), (512, 3)]
    meta = json.loads((Path(synthetic) / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] > 20 and meta["loss_mask"] is True  # trained as whole examples


def test_a_stage_too_short_for_every_synthetic_example_is_refused_before_writing(source, data, tmp_path):
    _, code, _ = data
    with pytest.raises(MiniCPMError, match="no synthetic example fits in 64 tokens") as caught:
        extend_checkpoint(source, tmp_path / "ext", to_length=512, method="yarn", stages=[64, 512],
                          tokens_per_step=512, short_data={str(code): 1.0}, synthetic_documents=12)
    assert "\n" not in str(caught.value) and not (tmp_path / "ext").exists()


@pytest.mark.parametrize("argv,message", [
    (["--to-length", "16", "--method", "yarn"], "must exceed the current length 32"),
    (["--to-length", "128", "--method", "rope2"], "--method 'rope2': expected one of abf, ntk, dynamic, yarn"),
    (["--to-length", "128", "--method", "ntk", "--factor", "1"], "--factor 1.0: must be a number > 1"),
    (["--to-length", "1024", "--method", "yarn", "--memory", "1MB", "--micro-batch-size", "4"],
     "training needs about"),
])
def test_bad_extend_input_is_one_line_and_exit_2_before_writing(source, tmp_path, capsys, argv, message):
    out = tmp_path / "ext"
    assert main(["extend", str(source), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not out.exists()


def test_memory_estimate_of_the_2_4b_at_length():
    config = preset("minicpm-2.4b")
    short = training_memory(config, seq_len=4096, micro_batch_size=1)
    long = training_memory(config, seq_len=131072, micro_batch_size=1)
    # weights, gradients and two Adam moments: 16 bytes per parameter
    assert short.weights_and_optimizer == 16 * config.total_params()
    assert long.activations == pytest.approx(32 * short.activations, rel=0.01)  # linear in tokens (no T^2 term)
    assert long.total > 80e9 > short.total


def _final_weights(run_dir: Path) -> dict:
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


@pytest.mark.slow
def test_curriculum_runs_stages_in_order_and_resumes_bitwise_across_a_boundary(source, data, tmp_path):
    _, code, prose = data
    overrides = ["evaluators=[]", "run.device=cpu", "run.dtype=fp32", "run.progress=false",
                 "parallel.activation_checkpointing=none"]
    finals = []
    for name, interrupted in (("whole", False), ("interrupted", True)):
        result = extend_checkpoint(source, tmp_path / name, to_length=512, method="yarn", steps_per_stage=3,
                                   tokens_per_step=512, short_data={str(code): 1.0, str(prose): 1.0},
                                   synthetic_documents=24)
        if interrupted:  # stage 1 alone, as if the curriculum stopped at the boundary
            data_file, stages = curriculum_stages(result.curriculum)
            train(stage_config(result.curriculum, data_file, stages[0], result.model, overrides))
        results = run_curriculum(result.curriculum, overrides)
        assert len(results) == (1 if interrupted else 2)
        runs = sorted((tmp_path / name / "runs").iterdir())
        assert [r.name for r in runs] == ["stage1-seq256", "stage2-seq512"]
        stage2 = yaml.safe_load((runs[1] / "config.yaml").read_text())
        assert stage2["batch"]["seq_len"] == 512 and stage2["run"]["init_weights_from"].startswith(str(runs[0]))
        finals.append(_final_weights(runs[1]))
        assert run_curriculum(result.curriculum, overrides) == []  # finished: nothing left to train
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_abf_ntk_writes_abf_stages_then_ntk_stages(source, data, tmp_path):
    """MiniCPM-128K's path in one call: ABF (default base 50 x theta, Xiong et al.'s 10,000 -> 500,000) to M = N/4,
    then NTK by N/M on the ABF base, each through its own curriculum stages."""
    _, code, prose = data
    result = extend_checkpoint(source, tmp_path / "ext", to_length=1024, method="abf-ntk", steps_per_stage=3,
                               tokens_per_step=1024, short_data={str(code): 1.0, str(prose): 1.0},
                               synthetic_documents=24, stages=[256, 512, 1024])
    written = json.loads((result.model / "config.json").read_text())
    assert written["rope_theta"] == 50 * tiny_config().rope_theta and written.get("rope_scaling") is None
    assert written["max_position_embeddings"] == 256  # the ABF step: 32 -> 1024 / 4
    data_file, stages = curriculum_stages(result.curriculum)
    assert [s.seq_len for s in stages] == [256, 512, 1024]
    configs = [stage_config(result.curriculum, data_file, s, result.model) for s in stages]
    for cfg in configs[:1]:  # ABF: up to M, no rope_scaling
        assert cfg.model.rope_scaling is None and cfg.model.max_position_embeddings == 256
    for cfg in configs[1:]:  # then NTK by N/M = 4 on the ABF base
        assert cfg.model.rope_scaling == {"rope_type": "ntk", "factor": 4.0}
        assert cfg.model.max_position_embeddings == 1024
    whole = yaml.safe_load(result.train_config.read_text())  # the one run at N: NTK on the ABF weights
    assert whole["model"] == {"rope_scaling": {"rope_type": "ntk", "factor": 4.0}, "max_position_embeddings": 1024}
    assert [cfg.batch.seq_len for cfg in configs] == [256, 512, 1024]


def test_abf_defaults_to_xiong_et_al_base_ratio(source, data, tmp_path):
    _, code, _ = data
    result = extend_checkpoint(source, tmp_path / "ext", to_length=256, method="abf", steps_per_stage=3,
                               tokens_per_step=512, short_data={str(code): 1.0}, synthetic_documents=12, stages=[256])
    assert result.config.rope_theta == 50 * tiny_config().rope_theta


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "abf-ntk", "abf_length": 512}, "--abf-length 512: the ABF step must end between"),
    ({"method": "yarn", "abf_length": 128}, "--abf-length is for --method abf-ntk"),
    ({"method": "abf-ntk", "factor": 4.0}, "abf-ntk's NTK factor is --to-length / --abf-length"),
])
def test_bad_abf_ntk_input_is_one_line(source, tmp_path, kwargs, message):
    with pytest.raises(MiniCPMError, match=message):
        extend_checkpoint(source, tmp_path / "ext", to_length=512, **kwargs)
