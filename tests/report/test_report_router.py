"""`minicpm report` on an MoE run: router.png and a per-layer table of the router's last logged values; nothing of
the kind for a dense run."""

import json

from minicpm.report.run import write_report


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def moe_record(step, skew):
    record = {"step": step, "tokens": 256 * step, "lr": 0.01, "loss": 5.0 - 0.1 * step,
              "aux/load_balance": 2.0 + skew, "aux/router_z": 1.5, "moe/load_max": 0.25 + skew,
              "moe/load_min": 0.25 - skew, "moe/router_entropy": 1.3 - skew}
    for layer in (0, 1):
        record |= {f"moe/layer{layer}/load_expert{e}": 0.25 for e in range(4)}
        record |= {f"moe/layer{layer}/load_max": 0.25 + skew + layer / 100,
                   f"moe/layer{layer}/load_min": 0.25 - skew - layer / 100,
                   f"moe/layer{layer}/router_entropy": 1.3 - skew}
    return record


def test_an_moe_run_gets_the_router_plot_and_its_per_layer_table(tmp_path):
    moe = write_metrics(tmp_path / "moe", [moe_record(step, 0.01 * step) for step in (1, 2, 3)])
    dense = write_metrics(tmp_path / "dense", [{"step": 1, "tokens": 256, "lr": 0.01, "loss": 5.0}])
    written = write_report([moe, dense], tmp_path / "out")
    assert tmp_path / "out" / "router.png" in written
    assert (tmp_path / "out" / "router.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'alt="router.png"' in page
    # the last step's values of each layer: load max 0.25 + 0.03 + layer/100, min 0.25 - 0.03 - layer/100
    assert "<td>moe</td><td>3</td><td>1</td><td>0.2900</td><td>0.2100</td><td>1.2700</td><td>2.0300</td>" \
           "<td>1.5000</td>" in page
    assert "<td>dense</td>" not in page.split("MoE router")[1].split("</table>")[0]


def test_a_dense_run_has_no_router_section(tmp_path, cli):
    dense = write_metrics(tmp_path / "dense", [{"step": 1, "tokens": 256, "lr": 0.01, "loss": 5.0}])
    result = cli("report", dense)
    assert result.returncode == 0, result.stderr
    assert not (dense / "router.png").exists()
    assert "MoE router" not in (dense / "report.html").read_text()
