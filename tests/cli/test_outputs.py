"""No command destroys its input (issue 26, part 1): every command that writes a directory builds it under a
temporary name and renames it into place; OUT must be new (or an empty directory) unless --overwrite, which
replaces it only once the new one is complete; OUT equal to, inside, or containing an input is refused in one
line, with or without --overwrite, and nothing is left behind."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from train_helpers import PatternData, tiny_config

from minicpm.checkpoints.verify import verify_checkpoint
from minicpm.interop.initialise import init_checkpoint
from minicpm.model.config import preset
from minicpm.rundir import RunDir
from minicpm.train.loop import train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(a run directory with checkpoints at steps 2 and 4, an official-layout model with its tokenizer)."""
    root = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
        cfg = tiny_config(root / "run", "run.dtype=fp32", "schedule.total_steps=4", "schedule.decay_start=3",
                          "run.checkpoint_every=2")
        run = train(cfg, data=PatternData(cfg.schedule.resolve())).run_dir
    return run, init_checkpoint(preset("tiny"), root / "official")


@pytest.fixture
def run(sources, tmp_path):
    return Path(shutil.copytree(sources[0], tmp_path / "run"))


@pytest.fixture
def official(sources, tmp_path):
    return Path(shutil.copytree(sources[1], tmp_path / "official"))


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_refused(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def no_leftovers(directory: Path) -> bool:
    return not [p for p in Path(directory).iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.mark.parametrize("to", ["llama", "minicpm", "gguf"])
def test_an_export_into_its_own_checkpoint_is_refused_and_the_checkpoint_still_verifies(cli, run, to):
    pytest.importorskip("gguf") if to == "gguf" else None
    checkpoint = RunDir(run).latest_checkpoint()
    before = tree_digest(run)
    # the input itself, inside it, containing it (a .gguf is a file: into the checkpoint directory, or inside it)
    outs = (checkpoint, checkpoint / "m.gguf") if to == "gguf" else (checkpoint, checkpoint / "sub", run)
    for out in outs:
        result = cli("export", checkpoint, out, "--to", to, "--overwrite")
        assert_refused(result, "OUT")
    assert tree_digest(run) == before
    assert verify_checkpoint(checkpoint, warn=pytest.fail)["step"] == 4


def test_an_upcycle_into_its_source_is_refused(cli, run):
    checkpoint = RunDir(run).latest_checkpoint()
    before = tree_digest(run)
    for out in (checkpoint, run, checkpoint / "moe"):
        assert_refused(cli("upcycle", checkpoint, "--out", out, "--experts", 2, "--top-k", 1, "--overwrite"),
                       "--out", "input")
    assert tree_digest(run) == before


@pytest.mark.parametrize("command", ["export", "upcycle", "import", "init"])
def test_a_non_empty_output_is_refused_and_overwrite_replaces_it_whole(cli, run, official, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = {"export": ("export", RunDir(run).latest_checkpoint(), out, "--to", "llama"),
            "upcycle": ("upcycle", official, "--out", out, "--experts", 2, "--top-k", 1),
            "import": ("import", official, out),
            "init": ("init", out, "--preset", "tiny")}[command]
    assert_refused(cli(*args), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and no_leftovers(tmp_path)
    result = cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file() and no_leftovers(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is as good as a new one
    result = cli(*[empty if a == out else a for a in args])
    assert result.returncode == 0 and (empty / "config.json").is_file(), result.stderr


def test_import_never_replaces_the_tokenizer_files_of_a_directory(cli, official, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text('{"mine": true}')
    assert_refused(cli("import", official, tokenizer_dir), "already exists")
    assert (tokenizer_dir / "tokenizer.json").read_text() == '{"mine": true}'
    assert [p.name for p in tokenizer_dir.iterdir()] == ["tokenizer.json"]


def test_a_gguf_export_to_a_directory_writes_model_gguf_in_it(cli, official, datasets, tmp_path):
    pytest.importorskip("gguf")
    gguf = ("--to", "gguf", "--tokenizer", datasets[0])  # a trained BPE: llama.cpp loads no merge-less one
    result = cli("export", official, f"{tmp_path / 'new'}/", *gguf)  # a trailing slash: a directory
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["model.gguf"]
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli("export", official, existing, *gguf).returncode == 0
    assert (existing / "model.gguf").is_file() and not (tmp_path / "existing.gguf").exists()
    before = (existing / "model.gguf").read_bytes()
    assert_refused(cli("export", official, existing, *gguf), "model.gguf: already exists")
    assert (existing / "model.gguf").read_bytes() == before


def test_export_and_upcycle_take_a_run_directorys_newest_checkpoint_that_verifies(cli, run, tmp_path):
    newest = RunDir(run).latest_checkpoint()
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))  # damaged: the previous checkpoint is the newest good
    result = cli("export", run, tmp_path / "llama", "--to", "llama")
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint step_00000004" in result.stderr
    result = cli("upcycle", run, "--out", tmp_path / "moe", "--experts", 2, "--top-k", 1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "moe/config.json").is_file()
