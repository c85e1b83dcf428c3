"""Device and precision choices: which device a run uses, and whether it computes in bf16.

Used by training, evaluation and loading a run alike; imports nothing of charrnn but its errors.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import nullcontext

import torch

from .cells import cell
from .errors import OptionError


def resolve_device(name: str) -> torch.device:
    """``auto`` (a CUDA GPU when there is one, else the CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", "{device} cuda was asked for but no CUDA GPU is available; use {device} cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto`` uses bf16 where the hardware has it (CUDA with bf16 support, CPUs with
    AVX-512 BF16 / AMX); elsewhere bf16 is emulated and many times slower than fp32.
    """
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def tune_cpu_allocator() -> None:
    """Process-wide allocation settings for CPU training, for the program that owns the process
    (``charrnn train`` calls it; the library never does): huge pages for PyTorch's large tensors
    (``THP_MEM_ALLOC_ENABLE``, unless set) and glibc's ``mallopt(M_MMAP_THRESHOLD, 1 MB)``, so a
    step's large buffers are mapped and returned to the system each time instead of piling up in
    the heap.  The same as starting the process with ``THP_MEM_ALLOC_ENABLE=1
    MALLOC_MMAP_THRESHOLD_=1048576``; a no-op off glibc.  docs/design.md has what it is worth."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: the GPU's, or this machine's physical memory (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_model_fits(need: int, parameters: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose training needs ``need`` bytes (its
    :meth:`charrnn.config.ModelConfig.training_bytes`), more than ``device``'s memory."""
    have = memory_bytes(device)
    if have is not None and need > have:
        raise OptionError("hidden", f"the model would have {parameters:,} parameters: a training step needs at least "
                          f"{_gib(need)}, more than the {_gib(have)} of {device.type} memory here; choose a smaller "
                          "{hidden}, {layers}, {embed}, {batch_size} or {seq_len}")


# What one generated character costs until its sample is returned: its id (int64), its entries in the
# two Python lists it passes through while decoded, and its text.
CHAR_BYTES = 32


def check_sampling_fits(config, device: torch.device, option: str, value: int, rows: int, length: int = 0) -> None:
    """Refuse, before any work, ``rows`` samples (or beam candidates) of ``length`` characters from a model
    of ``config`` (a :class:`charrnn.config.ModelConfig`) that ``device``'s memory cannot hold: each row's
    recurrent state and logits (float32, a few copies) and its characters.  The error names ``option``."""
    state = config.layers * config.hidden * len(cell(config.arch).state)
    check_rows_fit(device, option, value, rows, 4 * 4 * (state + config.vocab_size) + CHAR_BYTES * length)


def check_rows_fit(device: torch.device, option: str, value: int, rows: int, per_row: int) -> None:
    """Refuse ``rows`` of ``per_row`` bytes each that ``device``'s memory cannot hold; the error names
    ``option``."""
    have = memory_bytes(device)
    if have is not None and rows * per_row > have:
        raise OptionError(option, "is {value:,}: that needs about {need}, more than the {have} of memory here; "
                                  "ask for less", value=value, need=_gib(rows * per_row), have=_gib(have))
