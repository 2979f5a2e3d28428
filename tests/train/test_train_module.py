"""The training core's open places: objectives and evaluators added through their registries (and run.plugins, from
the command line), the model's auxiliary-loss channel, weights-only starts, and the run directory's one writer."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_helpers import PatternData, metrics_without_timing, tiny_config

from minicpm.checkpoints.integrity import sealed_state
from minicpm.errors import MiniCPMError
from minicpm.interop.hf import load_model, save_model
from minicpm.model import transformer
from minicpm.rundir import RunDir
from minicpm.train.loop import Trainer, train
from minicpm.train.losses import lm_loss


# A plugin as a user would write one: a second objective (next-token + z-loss, logged as its own metrics) and a
# second evaluator (top-1 accuracy of the next token on held-out rows), registered by importing the file.
PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F

    from minicpm.eval.evaluators import register_evaluator
    from minicpm.eval.loss import split_rows
    from minicpm.data import IGNORE_INDEX
    from minicpm.train.objectives import count_labels, register_objective


    @dataclass
    class ZOptions:
        z_weight: float = 1e-4


    @register_objective("next_token_z", options=ZOptions)
    class NextTokenZ:
        """Cross-entropy + z_weight * logsumexp(logits)^2 (PaLM's z-loss), each logged as a metric."""

        needs_reference = False

        def __init__(self, options, aux_loss_weights):
            self.z_weight = options.z_weight

        def count(self, batch):
            return count_labels(batch)

        def loss(self, model, batch, *, chunk_size=None, reference=None):
            logits = model(batch["input_ids"]).flatten(0, 1)
            labels = batch["labels"].flatten()
            keep = labels != IGNORE_INDEX
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            z = (torch.logsumexp(logits, dim=-1)[keep] ** 2).sum()
            n = keep.sum().float()
            return ce + self.z_weight * z, {"ce": (ce.detach(), n), "z_loss": (z.detach(), n)}


    @dataclass
    class AccuracyOptions:
        sequences: int = 4


    @register_evaluator("token_accuracy", options=AccuracyOptions)
    class TokenAccuracy:
        aliases = {}

        def __init__(self, name, every, options, setup):
            from minicpm.data.mixture import validation_batches

            self.name, self.every = name, every
            cfg = setup.config
            self.rows = validation_batches(list(cfg.data.stable), seq_len=cfg.batch.seq_len,
                                           max_sequences=options.sequences, tokenizer_hash=setup.tokenizer_hash)

        @torch.no_grad()
        def __call__(self, target):
            rows = split_rows(self.rows, target.rank, target.world_size).to(target.device)
            right = (target.model(rows[:, :-1]).argmax(-1) == rows[:, 1:]).sum().double()
            total = target.all_reduce(torch.stack([right, torch.tensor(rows[:, 1:].numel(), dtype=torch.float64)]))
            return {"accuracy": float(total[0] / total[1])}
''')


def recipe(tmp_path, datasets, extra=""):
    tokenizer, code, prose = datasets
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{preset: tiny}}
        data:
          stable: {{{code}: 1.0}}
          decay: {{{code}: 0.5, {prose}: 0.5}}
          tokenizer: {tokenizer}
          eval_sequences: 4
        schedule: {{kind: wsd, total_steps: 6, warmup_steps: 2, decay_steps: 2}}
        batch: {{tokens_per_step: 256, seq_len: 32, micro_batch_size: 4}}
        run: {{log_every: 2, eval_every: 3, checkpoint_every: 3, progress: false, device: cpu, dtype: fp32}}
    """) + textwrap.dedent(extra))
    return path


@pytest.mark.slow
def test_a_second_objective_and_evaluator_plug_in_through_the_registries_from_the_command_line(tmp_path, datasets, minicpm):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    config = recipe(tmp_path, datasets, """
        objective: {kind: next_token_z, options: {z_weight: 0.001}}
        evaluators:
          - {kind: heldout}
          - {kind: token_accuracy, name: acc, every: 2, sequences: 4}
    """)
    result = minicpm("train", config, f"run.plugins=[{tmp_path / 'my_plugin.py'}]", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "objective: next_token_z; evaluators: heldout, acc" in result.stdout
    records = RunDir(tmp_path / "run").read_metrics()
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [2, 4, 6]
    for r in trained:  # the named metrics are the parts of the loss, averaged alike over micro-batches and steps
        assert r["loss"] == pytest.approx(r["ce"] + 0.001 * r["z_loss"], rel=1e-6)
        assert r["z_loss"] > 1.0  # logsumexp of a 512-token vocabulary: about ln 512 ≈ 6.2, squared
    evals = {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [2, 3, 4, 6]  # acc every 2, heldout every 3 (run.eval_every), both at the end
    assert set(k for k in evals[2] if k.startswith("eval/")) == {"eval/acc/accuracy"}
    assert 0.0 <= evals[6]["eval/acc/accuracy"] <= 1.0 and "eval_loss" in evals[6] and "eval_loss" in evals[3]
    assert "plugins" in (tmp_path / "run/config.yaml").read_text()

    resumed = minicpm("train", "--resume", "--out", "run", cwd=tmp_path)  # the recorded config brings its plugin
    assert resumed.returncode == 0 and "at step 6" in resumed.stdout, resumed.stderr


@pytest.mark.parametrize("bad, message", [
    ("objective: {kind: nope}", "objective.kind: 'nope' is not a registered objective"),
    ("objective: {kind: next_token, options: {z: 1}}", "objective.options: the next_token objective takes no options"),
    ("evaluators: [{kind: heldout, sequencez: 3}]", "evaluators[0]: sequencez"),
    ("evaluators: [{kind: heldout}, {kind: heldout}]", "evaluators[1].name: 'heldout' is used twice"),
    ("evaluators: [{name: x}]", "evaluators[0]: expected a mapping with a 'kind'"),
])
def test_bad_objective_and_evaluator_settings_are_one_line_errors(tmp_path, bad, message):
    from minicpm.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\n" + bad + "\n")
    with pytest.raises(MiniCPMError) as error:
        load_config(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def reporting(name):
    """A dense MLP forward that also reports a per-token auxiliary loss `name` through the model's channel (as an
    MoE layer will): the mean square of its input, a per-token mean whatever the batch split."""
    def forward(self, x, aux_losses=None):
        if aux_losses is not None:
            aux_losses[name] = aux_losses.get(name, 0) + x.float().pow(2).mean()
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
    return forward


def test_auxiliary_losses_reach_the_objective_weighted_and_do_not_depend_on_accumulation(tmp_path, monkeypatch):
    monkeypatch.setattr(transformer.MLP, "forward", reporting("load_balance"))
    common = ("run.dtype=fp32", "schedule.total_steps=4", "schedule.decay_start=3", "run.log_every=1")
    runs = {}
    for name, micro in (("one", 8), ("four", 2)):
        train(tiny_config(tmp_path / name, f"batch.micro_batch_size={micro}", *common),
              data=PatternData(tiny_config(tmp_path).schedule.resolve()))
        runs[name] = metrics_without_timing(tmp_path / name)
    one, four = ([r for r in runs[k] if "loss" in r] for k in ("one", "four"))
    assert [r["aux/load_balance"] for r in one] == pytest.approx([r["aux/load_balance"] for r in four], rel=1e-5)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in four], rel=1e-5)

    # the same first batch through the plain next-token loss: the difference is 0.01 x the aux loss (the default
    # objective.aux_loss_weights.load_balance, the paper's MoE coefficient)
    weighted = train(tiny_config(tmp_path / "heavy", "objective.aux_loss_weights={load_balance: 1.0}", *common),
                     data=PatternData(tiny_config(tmp_path).schedule.resolve()))
    heavy = [r for r in metrics_without_timing(weighted.run_dir) if "loss" in r]
    step1 = (one[0]["loss"] - 0.01 * one[0]["aux/load_balance"], heavy[0]["loss"] - heavy[0]["aux/load_balance"])
    assert step1[0] == pytest.approx(step1[1], rel=1e-5)
    assert heavy[0]["loss"] - one[0]["loss"] == pytest.approx(0.99 * one[0]["aux/load_balance"], rel=1e-4)


def test_an_aux_loss_without_a_weight_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(transformer.MLP, "forward", reporting("unweighted"))
    cfg = tiny_config(tmp_path / "run")
    with pytest.raises(MiniCPMError, match="auxiliary loss 'unweighted'.*no weight"):
        train(cfg, data=PatternData(cfg.schedule.resolve()))


class RecordingData(PatternData):
    """PatternData that keeps the batches it hands out."""

    def __init__(self, schedule, seed=0):
        super().__init__(schedule, seed=seed)
        self.batches = []

    def next_batch(self, step, sequences):
        batch = super().next_batch(step, sequences)
        self.batches.append(batch)
        return batch


def test_a_weights_only_start_begins_at_step_0_with_a_fresh_optimizer_and_its_own_data(tmp_path):
    source = train(tiny_config(tmp_path / "source", "run.dtype=fp32"),
                   data=PatternData(tiny_config(tmp_path).schedule.resolve()))
    # the source's data state is never used: make it one no data source accepts (still of the checked shape)
    state = json.loads((source.checkpoint / "trainer_state.json").read_text())
    state["data"] = {"not a data state": -1}
    (source.checkpoint / "trainer_state.json").write_text(json.dumps(sealed_state(state)))  # digest of the edit

    cfg = tiny_config(tmp_path / "sft", "run.dtype=fp32", "run.log_every=1", "schedule.total_steps=3",
                      "schedule.decay_start=2", f"run.init_weights_from={source.run_dir}", "run.seed=5")
    data = RecordingData(cfg.schedule.resolve(), seed=7)
    trainer = Trainer(cfg, data=data)
    assert not trainer.module.optimizer.state  # fresh
    result = trainer.fit()
    records = metrics_without_timing(tmp_path / "sft")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and result.tokens == 3 * 256
    assert all(int(s["step"]) == 3 for s in trainer.module.optimizer.state.values())

    model = load_model(source.checkpoint)  # the source model's loss on the new run's first batch
    first = data.batches[0]
    with torch.no_grad():
        expected = lm_loss(model.hidden_states(first["input_ids"]), model.head_weight, first["labels"]) / first[
            "labels"].numel()
    assert records[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert f"init_weights_from: {source.run_dir.resolve()}" in (tmp_path / "sft/config.yaml").read_text()


def test_a_weights_only_start_reads_the_official_layout_and_takes_its_architecture(tmp_path):
    source = train(tiny_config(tmp_path / "source", "run.dtype=fp32"),
                   data=PatternData(tiny_config(tmp_path).schedule.resolve()))
    official = save_model(load_model(source.checkpoint), tmp_path / "hf")  # config.json + model.safetensors only
    assert sorted(p.name for p in official.iterdir()) == ["config.json", "model.safetensors"]
    cfg = tiny_config(tmp_path / "next", "run.dtype=fp32", f"run.init_weights_from={official}", "model.preset=null",
                      "schedule.total_steps=4", "schedule.decay_start=3")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    assert trainer.model_config.to_hf_dict() == load_model(official).config.to_hf_dict()
    trainer.fit()
    assert (tmp_path / "next/checkpoints/step_00000004/model.safetensors").is_file()


def test_a_weights_only_start_from_another_architecture_is_a_one_line_error(tmp_path):
    source = train(tiny_config(tmp_path / "source"), data=PatternData(tiny_config(tmp_path).schedule.resolve()))
    cfg = tiny_config(tmp_path / "wide", f"run.init_weights_from={source.run_dir}", "model.hidden_size=128")
    with pytest.raises(MiniCPMError, match="has shape"):
        Trainer(cfg, data=PatternData(cfg.schedule.resolve())).fit()
    with pytest.raises(MiniCPMError, match="two ways to start; give one"):
        tiny_config(tmp_path / "x", f"run.init_weights_from={source.run_dir}", f"run.init_from={source.run_dir}")


HELD_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from train_helpers import PatternData, tiny_config
    from minicpm.train.loop import train

    class HeldData(PatternData):
        # at step 4 the run waits (holding its run directory) until the test lets it go on
        def next_batch(self, step, sequences):
            while step == 4 and not Path(sys.argv[2]).exists():
                time.sleep(0.05)
            return super().next_batch(step, sequences)

    cfg = tiny_config(sys.argv[1], "schedule.total_steps=16", "schedule.decay_start=12")
    train(cfg, data=HeldData(cfg.schedule.resolve()))
""")


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_directory_is_refused_and_the_first_is_unharmed(tmp_path, datasets, cli):
    tests = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    release = tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, str(tmp_path / "run"), str(release)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        owner = tmp_path / "run/.lock.owner"
        deadline = time.monotonic() + 300
        while not owner.exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first trainer never took the lock"
            time.sleep(0.05)
        second = cli("train", recipe(tmp_path, datasets), "--out", "run", "--resume", cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr, second.stderr
        assert "is writing this run directory" in second.stderr
        release.write_text("go on")
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
    records = metrics_without_timing(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(2, 17, 2))  # all the first trainer's lines, nothing else
    assert not (tmp_path / "run/.lock.owner").exists()


def test_a_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / ".lock.owner").write_text("pid 999999 on elsewhere\n")  # its process is gone, and with it the OS lock
    cfg = tiny_config(run, "schedule.total_steps=4", "schedule.decay_start=3")
    assert train(cfg, data=PatternData(cfg.schedule.resolve())).step == 4
