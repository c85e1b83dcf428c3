"""Shared bits of the benchmark scripts: timing, memory, machine facts."""

import json
import os
import platform
import resource
import statistics
import sys
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def median_ms(times) -> float:
    return statistics.median(times) * 1000


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def add_model_options(p) -> None:
    """--arch --hidden --embed --layers, defaulting to the default model (GRU 1024, embedding 256)."""
    p.add_argument("--arch", default="gru")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)


def emit(obj: dict) -> None:
    print(json.dumps(obj))
