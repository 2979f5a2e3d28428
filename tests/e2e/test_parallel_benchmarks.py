"""The throughput and memory benchmarks run end to end (on CPU, at toy sizes): the GPU run must not be the first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # the CPU peak measurement is cached here
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_gpu_throughput_tiny_runs_on_cpu_and_reports_mfu(tmp_path):
    out = tmp_path / "result.json"
    proc = _run("gpu_throughput.py", "--tiny", "--compile", "off", "--steps", "2", "--json", str(out),
                tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
    [row] = json.loads(out.read_text())
    assert row["case"]["preset"] == "tiny" and row["case"]["device"] == "cpu"
    result = row["result"]
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and result["peak_memory_gib"] > 0


@pytest.mark.slow
def test_gpu_throughput_tiny_with_compile(tmp_path):
    proc = _run("gpu_throughput.py", "--tiny", "--compile", "on", "--steps", "2", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny" in proc.stdout and "error" not in proc.stdout


@pytest.mark.slow
def test_memory_benchmark_runs_at_toy_shapes(tmp_path):
    pytest.importorskip("transformers")
    proc = _run("memory.py", "--vocab", "3000", "--seq", "128", "--width", "128", "--chunk", "32", "--device", "cpu",
                tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for case in ("ours-chunked", "ours-plain", "transformers-llama"):
        row = next(line for line in lines if line.startswith(case))
        assert row.split()[1] == lines[-1].split()[1]  # same parameter count as transformers' Llama
    assert lines[-1].rstrip().endswith("1.00x")
