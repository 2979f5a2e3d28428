"""Every failure is one line and a non-zero exit: the inputs a hostile but fair user tried (issue 17), through the
CLI where the mapping matters, through the library where the check lives."""

from __future__ import annotations

import errno
import textwrap

import numpy as np
import pytest
import torch
from train_helpers import PatternData, make_datasets, tiny_config

from minicpm import cli
from minicpm.errors import MiniCPMError

def assert_one_line(result, *fragments, code=2):
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(tmp_path_factory.mktemp("data"))


def recipe(tmp_path, datasets, extra=""):
    tokenizer, code, _ = datasets
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{preset: tiny}}
        data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}}}
        batch: {{seq_len: 32, tokens_per_step: 256, micro_batch_size: 4}}
        schedule: {{total_steps: 4, warmup_steps: 1, decay_start: 3}}
        run: {{dtype: fp32, progress: false, device: cpu, checkpoint_every: 2, log_every: 1}}
        """) + extra)
    return path


# ------------------------------------------------------------------------------------------ through the CLI

def test_a_yaml_whose_top_level_is_a_list_is_one_line(tmp_path, cli):
    (tmp_path / "c.yaml").write_text("- model\n- data\n")
    assert_one_line(cli("train", "c.yaml", "--out", "run", cwd=tmp_path), "c.yaml", "mapping")


def test_a_non_utf8_table_is_one_line(tmp_path, cli):
    (tmp_path / "runs.csv").write_bytes(b"params,tokens,loss\n1e6,2e7,3.\xff\n")
    assert_one_line(cli("scaling", "fit", "runs.csv", cwd=tmp_path), "runs.csv: not UTF-8 text (byte 29)")


def test_out_naming_an_existing_file_is_one_line(tmp_path, datasets, cli):
    (tmp_path / "taken").write_text("a file")
    assert_one_line(cli("train", recipe(tmp_path, datasets), "--out", "taken", cwd=tmp_path), "taken")


def test_an_unexpected_error_is_one_line_and_its_traceback_only_on_request(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "REGISTER", [lambda sub: sub.add_parser("boom").set_defaults(handler=broken)])
    monkeypatch.delenv("MINICPM_DEBUG", raising=False)
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: boom" in err and "--debug" in err
    assert cli.main(["--debug", "boom"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MINICPM_DEBUG", "1")
    assert cli.main(["boom"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "run/x"), "run/x: no space left"),
    (FileExistsError(errno.EEXIST, "File exists", "plots"), "plots: already exists"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "dir"), "dir: is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/g"), "f/g: is not a directory"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not utf-8 text"),
])
def test_os_and_decoding_errors_are_one_line_with_exit_2(monkeypatch, capsys, error, expected):
    def failing(args):
        raise error

    monkeypatch.setattr(cli, "REGISTER", [lambda sub: sub.add_parser("fail").set_defaults(handler=failing)])
    assert cli.main(["fail"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


# ------------------------------------------------------------------------------------------ in the library

@pytest.fixture
def no_peak(monkeypatch):
    monkeypatch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)


def test_a_run_whose_last_steps_were_skipped_ends_non_zero_naming_the_last_good_checkpoint(tmp_path, no_peak):
    from minicpm.train.loop import Trainer

    cfg = tiny_config(tmp_path / "run", "run.dtype=fp32", "schedule.total_steps=6", "schedule.decay_start=4",
                      "run.max_bad_steps=5")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    real_step = trainer.module.train_step

    def nan_at_the_end(micro_batches, *, lr):
        metrics = real_step(micro_batches, lr=lr) if trainer.step < 4 else {"loss": float("nan"), "grad_norm": 1.0,
                                                                              "applied": False}
        return metrics

    trainer.module.train_step = nan_at_the_end
    with pytest.raises(MiniCPMError, match=r"ended on 2 skipped step\(s\).*steps 5\.\.6.*step_00000003") as error:
        trainer.fit()
    assert "\n" not in str(error.value)


def test_a_vocabulary_smaller_than_the_tokenizers_is_one_line(tmp_path):
    from minicpm.train.config import model_config

    cfg = tiny_config(tmp_path / "run", "model.vocab_size=256")
    with pytest.raises(MiniCPMError, match="model.vocab_size 256 is smaller than the tokenizer's vocabulary"):
        model_config(cfg, vocab_size=512)


def test_shard_ids_beyond_the_vocabulary_are_found_before_training(tmp_path):
    import json

    from minicpm.data.shards import FORMAT, VERSION, ShardWriter, TokenDataset, shard_entry

    writer = ShardWriter(tmp_path / "train", np.dtype("<u2"))
    writer.add(np.array([5, 6, 2, 7, 900, 2, 9, 9, 9, 2], dtype=np.uint16), np.array([3, 3, 4]))
    shards = [shard_entry(s) for s in writer.close()]
    meta = {"format": FORMAT, "version": VERSION, "dtype": "uint16",
            "tokenizer": {"hash": "abc", "vocab_size": 16, "eos_id": 2, "source": "tok.json"},
            "document_format": "tokens + eos", "sources": [{"spec": "x", "documents": 3, "bytes": 30}],
            "val_fraction": 0.0, "skipped_empty_documents": 0,
            "splits": {"train": {"documents": 3, "tokens": 10, "bytes": 30, "shards": shards}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MiniCPMError, match=r"\.bin: token 4 is id 900, not below the vocabulary size 512"):
        TokenDataset(tmp_path).check_token_ids(512)
    with pytest.raises(MiniCPMError, match="tokenizer.vocab_size 16 exceeds the model's vocab_size 8"):
        TokenDataset(tmp_path).check_token_ids(8)


@pytest.mark.parametrize("settings, expected", [
    ({"temperature": -1.0}, "temperature -1.0"), ({"temperature": float("nan")}, "temperature nan"),
    ({"temperature": float("inf")}, "temperature inf"), ({"top_p": float("nan")}, "top_p nan"),
    ({"top_p": -0.5}, "top_p -0.5"), ({"max_new_tokens": -3}, "max_new_tokens -3"),
])
def test_negative_or_non_finite_generation_settings_are_one_line(settings, expected):
    from minicpm.infer.generate import generate
    from minicpm.model.config import preset
    from minicpm.model.transformer import MiniCPM

    model = MiniCPM(preset("tiny"))
    kwargs = {"max_new_tokens": 2, **settings}
    with pytest.raises(MiniCPMError, match=expected.replace("(", r"\(")):
        list(generate(model, [1, 2], **kwargs))


def test_enospc_while_saving_is_one_line_keeps_the_previous_checkpoint_and_resumes_bit_identically(
        tmp_path, no_peak, monkeypatch):
    from safetensors.torch import load_file

    from minicpm.checkpoints.verify import verify_checkpoint
    from minicpm.rundir import RunDir
    from minicpm.train import checkpoint as ckpt
    from minicpm.train.loop import train

    torch.set_num_threads(1)
    steps = ("run.dtype=fp32", "schedule.total_steps=6", "schedule.decay_start=4", "run.checkpoint_every=3")
    ref_cfg = tiny_config(tmp_path / "ref", *steps)
    reference = train(ref_cfg, data=PatternData(ref_cfg.schedule.resolve()))
    cfg = tiny_config(tmp_path / "run", *steps)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_00000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        train(cfg, data=PatternData(cfg.schedule.resolve()))
    assert error.value.errno == errno.ENOSPC
    assert "\n" not in cli.describe_os_error(error.value) and "no space left" in cli.describe_os_error(error.value)
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith(".")] == []  # no half checkpoint
    assert run.latest_checkpoint().name == "step_00000003"
    verify_checkpoint(run.latest_checkpoint())  # intact
    monkeypatch.setattr(ckpt.torch, "save", real_save)  # space freed
    resumed = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    a = load_file(reference.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
