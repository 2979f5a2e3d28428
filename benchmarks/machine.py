"""The machine a benchmark ran on, in one line for its table: CPU model, cores, whether bf16 is native, the GPU."""

from __future__ import annotations

import os

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def describe() -> str:
    from minicpm.train.distributed import has_fast_bf16

    native = "native bf16" if has_fast_bf16(torch.device("cpu")) else "no native bf16 (AVX2: emulated)"
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {native}{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
