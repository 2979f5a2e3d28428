"""`minicpm reproduce` at toy size: every part runs end to end, and a SIGKILL followed by the same command writes the
results.json an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicpm.errors import MiniCPMError
from minicpm.reproduce.findings import NOT_MEASURED, OUTCOMES
from minicpm.reproduce.plan import FULL, QUICK, TOY, plan_named
from minicpm.reproduce.runs import optimum_log2_lr

@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    """What `minicpm quickstart` leaves that reproduce reads: corpus/{library,tests,sample}.jsonl (small seeded text)."""
    from train_helpers import write_corpus

    root = tmp_path_factory.mktemp("quickstart")
    (root / "corpus").mkdir()
    for name, style, seed in (("library", "code", 1), ("tests", "prose", 2), ("sample", "code", 3)):
        folder = write_corpus(root / "text" / name, documents=160, seed=seed, style=style)
        lines = [json.dumps({"text": p.read_text(encoding="utf-8")}) for p in sorted(Path(folder).rglob("*"))
                 if p.is_file()]
        (root / "corpus" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _command(out: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "minicpm", "reproduce", "--plan", "toy", "--out", str(out), "--data", str(data)]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, quickstart_dir):
    out = tmp_path_factory.mktemp("reproduce") / "whole"
    done = subprocess.run(_command(out, quickstart_dir), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_every_part_is_judged_and_reported(uninterrupted):
    out, stdout = uninterrupted
    results = _results(out)
    parts = [f["part"] for f in results["findings"]]
    assert parts == [1, 2, 3, 4, 5, 6, 7, 8]
    assert results["failed_runs"] == {}
    for finding in results["findings"]:
        assert finding["outcome"] in OUTCOMES
        assert finding["outcome"] != NOT_MEASURED, (finding["part"], finding["notes"])
        assert finding["paper"]
        assert finding["figure"] and (out / finding["figure"]).is_file(), finding["part"]
        for verdict in finding["verdicts"]:
            low, high = verdict["interval"]
            assert low <= verdict["estimate"] <= high
            assert verdict["seeds"] >= 2
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<section>") == 8 and "Paper:" in page
    assert (out / "results.md").read_text(encoding="utf-8").count("\n### ") == 8
    assert "part finding" in stdout and "results:" in stdout
    # part 3's arms train on one mixture: the recipe has no decay-stage switch
    assert "decay: null" in (out / "recipe.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_reproduction_killed_with_sigkill_resumes_to_the_same_results(uninterrupted, quickstart_dir, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "killed"
    process = subprocess.Popen(_command(out, quickstart_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        # kill it in round 2, once a stable run of part 3 has a checkpoint and branches are training
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if list((out / "schedules").glob("s*/stable/checkpoints/step_*")):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the reproduction ended before it could be killed"
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (out / "results.json").exists()
    done = subprocess.run(_command(out, quickstart_dir), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _results(out) == _results(whole)


@pytest.mark.slow
def test_another_plan_in_the_same_directory_is_refused(uninterrupted, quickstart_dir):
    out, _ = uninterrupted
    from minicpm.reproduce.run import reproduce

    with pytest.raises(MiniCPMError, match="another plan"):
        reproduce(out, plan="toy", scale=2.0, data=quickstart_dir, workers=0)


def test_a_missing_quickstart_is_one_line_naming_what_to_run(tmp_path):
    from minicpm.reproduce.run import reproduce

    with pytest.raises(MiniCPMError, match="minicpm quickstart --out") as error:
        reproduce(tmp_path / "out", plan="toy", data=tmp_path / "nothing", workers=0)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_optimum_is_the_parabola_vertex_inside_the_grid_and_flagged_at_its_edge():
    # loss = (k + 6.4)^2: the vertex at -6.4 between the grid points -7, -6, -5
    grid = {k: (k + 6.4) ** 2 + 3 for k in (-8, -7, -6, -5)}
    optimum, at_edge = optimum_log2_lr(grid)
    assert optimum == pytest.approx(-6.4) and not at_edge
    assert optimum_log2_lr({-8: 3.0, -7: 3.1, -6: 3.2}) == (-8.0, True)
    assert optimum_log2_lr({-8: None, -7: float("nan")}) == (None, False)
    # a diverged neighbour: the grid point itself
    assert optimum_log2_lr({-8: 3.3, -7: 3.0, -6: float("nan"), -5: 3.5}) == (-7.0, False)


def test_at_the_base_width_every_arm_reads_the_same_runs(tmp_path):
    from minicpm.reproduce.plan import Plan
    from minicpm.reproduce.transfer import runs_of, width_grids

    plan = Plan("t", widths=(16, 32), embedding_widths=(32,), mup_log2_lrs=(-6, -5), sp_log2_lrs=(-8, -7, -6, -5),
                embedding_log2_lrs=(-6, -5, -4), transfer_seeds=(0, 1))
    grids = {g.arm: g for g in width_grids(plan, tmp_path, tmp_path / "recipe.yaml")}
    assert grids["sp"].runs[16][0][-6] is grids["mup"].runs[16][0][-6] is grids["mup-embedding-2d"].runs[16][0][-6]
    base = [r for r in runs_of(list(grids.values())) if "/w16/" in r.job.name]
    assert len(base) == 2 * len({-8, -7, -6, -5, -4}) and all(r.job.name.startswith("width/mup/") for r in base)
    sp_wide = grids["sp"].runs[32][1][-8].job.kwargs["overrides"]
    assert "model.dim_model_base=32" in sp_wide and "optim.lr=0.00390625" in sp_wide
    embedding = grids["mup-embedding-2d"].runs[32][0][-4].job.kwargs["overrides"]
    assert "optim.embedding_in_2d_group=true" in embedding and "model.dim_model_base=16" in embedding


def test_plans_span_what_the_issue_asks_and_scale_whole_heads():
    for plan in (FULL, QUICK):
        assert plan.widths[-1] / plan.widths[0] >= 8
        assert plan.depths[-1] / plan.depths[0] >= 4
        assert len(plan.transfer_seeds) >= 2 and len(plan.seeds) >= 2
        assert len(plan.law_sizes) >= 5 and len(plan.law_tokens) >= 4
    assert max(FULL.multiples) / min(FULL.multiples) == 8 and len(FULL.seeds) == 3
    bigger = plan_named("full", 4.0)
    assert bigger.widths == tuple(4 * w for w in FULL.widths)
    assert bigger.law_tokens == tuple(round(4 * t / 128) * 128 for t in FULL.law_tokens)  # whole sequences
    assert all(w % 16 == 0 for w in plan_named("quick", 1.3).widths)
    with pytest.raises(MiniCPMError, match="--scale"):
        plan_named("full", 0)
    assert TOY.base_width == TOY.widths[0]


def test_a_shift_judged_from_an_optimum_at_the_grid_edge_is_inconclusive():
    from minicpm.laws.verdict import FAILS, HOLDS, INCONCLUSIVE
    from minicpm.reproduce.transfer import shift_verdict

    def table(first, last, edge=False):
        row = lambda optima: {"optimum_log2_lr": {str(s): v for s, v in enumerate(optima)},  # noqa: E731
                              "at_grid_edge": {str(s): edge for s in range(len(optima))}}
        return {32: row(first), 256: row(last)}

    seeds = (0, 1, 2)
    assert shift_verdict(table([-6.0, -5.8, -6.1], [-6.2, -5.9, -6.0]), "μP", (32, 256), seeds, "width").outcome == HOLDS
    moved = shift_verdict(table([-6.0, -5.8, -6.1], [-8.9, -8.7, -9.1]), "SP", (32, 256), seeds, "width")
    assert moved.outcome == FAILS and moved.estimate == pytest.approx(-2.9, abs=0.05)
    edge = shift_verdict(table([-6.0, -5.8, -6.1], [-6.2, -5.9, -6.0], edge=True), "μP", (32, 256), seeds, "width")
    assert edge.outcome == INCONCLUSIVE and "edge" in edge.threshold
    assert shift_verdict(table([-6.0, None, -6.1], [-6.2, -5.9, -6.0]), "μP", (32, 256), seeds, "width") is None
