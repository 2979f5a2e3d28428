"""`minicpm windtunnel batch-size`: tokens to reach a loss, the parabola's optimum, and the law through them."""

import json
import math

import numpy as np
import pytest

from minicpm.cli import main
from minicpm.windtunnel.batch_size import Curve, optimal_batch, tokens_to_reach

A, B = 2.0e4, 3.0  # the optimal batch of the synthetic runs: bs*(L) = A / L^B
BATCHES = [64, 128, 256, 512, 1024, 2048]


def tokens_needed(loss, batch):
    """Tokens to reach `loss` at `batch`: quadratic in log batch around bs*(loss), more for lower losses."""
    return 1e5 * loss ** -4 * math.exp(0.3 * math.log(batch / (A / loss ** B)) ** 2)


def write_run(directory, batch):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(f"batch:\n  tokens_per_step: {batch}\n")
    losses = np.linspace(6.0, 2.5, 701)
    tokens = np.maximum.accumulate([tokens_needed(loss, batch) for loss in losses])
    lines = [json.dumps({"step": i + 1, "tokens": float(t), "eval_loss": float(loss)})
             for i, (t, loss) in enumerate(zip(tokens, losses))]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = Curve("r", 64, tokens=[100, 200, 300], loss=[5.0, 4.0, 3.0])
    assert tokens_to_reach(curve, 4.5) == 150 and tokens_to_reach(curve, 5.5) == 100
    assert tokens_to_reach(curve, 3.0) == 300 and tokens_to_reach(curve, 2.9) is None


def test_optimal_batch_is_the_parabola_vertex_or_the_best_tried():
    batches = [64, 128, 256, 512]
    tokens = [math.exp((math.log(b) - math.log(200)) ** 2) for b in batches]
    assert optimal_batch(batches, tokens) == pytest.approx(200)
    assert optimal_batch(batches, [4, 3, 2, 1]) == 512  # no minimum inside: the best tried
    assert optimal_batch([64, 128], [2, 1]) == 128


def test_batch_size_law_recovers_the_synthetic_constants(tmp_path, capsys):
    for batch in BATCHES:
        write_run(tmp_path / "sweep" / "runs" / f"bs{batch}", batch)
    targets = ["3.0", "3.4", "3.8", "4.2", "4.6"]
    assert main(["windtunnel", "batch-size", str(tmp_path / "sweep"), "--targets", *targets,
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out/result.json").read_text())
    assert len(result["points"]) == 5
    for p in result["points"]:
        assert p["optimal_batch"] == pytest.approx(A / p["target"] ** B, rel=0.05)
    assert result["b"] == pytest.approx(B, rel=0.02) and result["a"] == pytest.approx(A, rel=0.05)
    assert "bs = a / L^b: a = " in capsys.readouterr().out
    assert (tmp_path / "out/batch_size.png").read_bytes()[:4] == b"\x89PNG"


def test_batch_size_needs_runs(tmp_path, capsys):
    assert main(["windtunnel", "batch-size", str(tmp_path)]) == 2
    assert "not a run directory nor a sweep directory" in capsys.readouterr().err
