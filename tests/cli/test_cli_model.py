"""The model commands, driven through the `minicpm` entry point (main, in this process)."""

import json

import pytest
import torch

from minicpm.cli import main
from minicpm.data.tokenizer import SPECIAL_TOKENS
from minicpm.interop.hf import WEIGHTS, load_model



@pytest.mark.slow
def test_init_info_generate_export_import_end_to_end(tmp_path, cli):
    init = cli("init", "--preset", "tiny", "--seed", "3", tmp_path / "fresh", "num_hidden_layers=3")
    assert init.returncode == 0, init.stderr
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["config.json", WEIGHTS, "tokenizer.json"]
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["num_hidden_layers"] == 3

    info = cli("info", tmp_path / "fresh")
    assert info.returncode == 0, info.stderr
    assert "non-embedding (N)" in info.stdout and "training FLOPs per token" in info.stdout
    assert "F32, model.safetensors" in info.stdout

    gen = cli("generate", tmp_path / "fresh", "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.endswith("\n")

    export = cli("export", tmp_path / "fresh", tmp_path / "llama", "--to", "llama", "--dtype", "bf16")
    assert export.returncode == 0, export.stderr
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert llama.config.num_hidden_layers == 3 and llama.dtype == torch.bfloat16

    imported = cli("import", tmp_path / "fresh", tmp_path / "copy", "--dtype", "bf16", "--max-shard-size", "100KB")
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "copy" / "model.safetensors.index.json").exists()
    assert load_model(tmp_path / "copy").head_weight.dtype == torch.bfloat16


def test_broken_checkpoint_exits_nonzero_with_one_line_naming_the_file(tmp_path, cli):
    assert main(["init", "--preset", "tiny", str(tmp_path / "ckpt")]) == 0
    (tmp_path / "ckpt" / WEIGHTS).write_bytes(b"not a safetensors file at all")
    result = cli("generate", tmp_path / "ckpt", "--prompt", "hi")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert f"{tmp_path / 'ckpt' / WEIGHTS}: not a safetensors file" in result.stderr


def test_user_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert main(["info", "no-such-preset"]) == 2
    assert main(["init", "--preset", "tiny", str(tmp_path / "a"), "no_such_field=1"]) == 2
    assert main(["init", "--preset", "tiny", str(tmp_path / "b"), "vocab_size=100"]) == 2  # too few for the bytes
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("minicpm ") for line in lines)
    assert "unknown model preset 'no-such-preset'" in lines[0] and "no_such_field" in lines[1]
    assert f"vocab_size={len(SPECIAL_TOKENS) + 256}" in lines[2]


def test_info_on_the_paper_presets_prints_their_counts(capsys):
    assert main(["info", "minicpm-2.4b"]) == 0
    out = capsys.readouterr().out
    assert "2,442,057,984" in out and "2,724,880,896" in out and "282,822,912" in out
    assert main(["info", "minicpm-1.2b", "--seq-len", "2048"]) == 0
    assert "1,247,442,432" in capsys.readouterr().out
