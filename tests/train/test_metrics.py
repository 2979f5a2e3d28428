"""What a run reports: peak FLOP/s for MFU (datasheet or measured, cached at the maximum), interval averages."""

import json

import pytest
import torch

from minicpm.train import metrics
from minicpm.train.metrics import IntervalStats, device_peak_flops


def test_peak_flops_known_gpus_from_table(monkeypatch):
    for name, flops in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)):
        monkeypatch.setattr(metrics, "_device_name", lambda device, name=name: name)
        assert device_peak_flops(torch.device("cuda")) == flops


def test_peak_flops_cpu_is_measured_once_a_process_and_the_cache_keeps_the_maximum(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings = iter([1.5e11, 4.0e11, 1.0e11])  # a busy machine, then a quiet one, then a busy one again
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops",
                        lambda device, dtype: calls.append(dtype) or next(readings))
    cache = tmp_path / "minicpm" / "peak.json"

    def new_process():
        monkeypatch.setattr(metrics, "_MEASURED", {})

    new_process()
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == 1.5e11
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == 1.5e11
    assert len(calls) == 1  # the same process does not measure again
    assert list(json.loads(cache.read_text()).values()) == [1.5e11]
    new_process()
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == 4.0e11  # a higher reading replaces it
    assert list(json.loads(cache.read_text()).values()) == [4.0e11]
    new_process()
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == 4.0e11  # a lower one does not
    assert list(json.loads(cache.read_text()).values()) == [4.0e11]
    assert len(calls) == 3


def test_measured_matmul_flops_is_two_n_cubed_over_the_fastest_repeat(monkeypatch):
    # each matmul "takes" the next duration of a fake clock; the first run is a warm-up and does not count
    durations = iter([9.0, 0.5, 0.25, 0.75])
    clock = [0.0]

    def perf_counter():
        return clock[0]

    def synchronize(device):
        clock[0] += next(durations) if synchronize.started else 0.0
        synchronize.started = not synchronize.started

    synchronize.started = False
    monkeypatch.setattr(metrics.time, "perf_counter", perf_counter)
    monkeypatch.setattr(metrics, "_synchronize", synchronize)
    flops = metrics.measure_matmul_flops(torch.device("cpu"), torch.float32, size=64, repeats=3)
    assert flops == 2 * 64 ** 3 / 0.25


def test_interval_stats_average_every_named_value_and_restore_from_a_checkpoint():
    stats = IntervalStats()
    stats.add({"loss": 2.0, "grad_norm": 1.0, "z_loss": 0.5})
    stats.add({"loss": 4.0, "grad_norm": 3.0, "z_loss": 1.5})
    stats.skipped = 1
    assert stats.summary() == {"loss": 3.0, "grad_norm": 2.0, "z_loss": 1.0, "skipped_steps": 1}
    assert IntervalStats.from_state(json.loads(json.dumps(stats.state_dict()))) == stats
    # a checkpoint written before named metrics
    old = IntervalStats.from_state({"loss_sum": 6.0, "grad_norm_sum": 4.0, "steps": 2, "skipped": 0})
    assert old.summary() == pytest.approx({"loss": 3.0, "grad_norm": 2.0})
