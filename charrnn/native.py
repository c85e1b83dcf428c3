"""charrnn's C++ kernels (``charrnn/csrc``): building them once per machine, and loading them.

The kernels: the sampling step (int8 and fp32 layers, the whole per-character step and the
sampling draw in one call each, bit-identical to the pure-PyTorch step in
:mod:`charrnn.sampling`), and the fp32 recurrent products, LSTM loops, GRU steps and dropout that
:mod:`charrnn.ops` uses for float32 on CPU.  ``charrnn/csrc/charrnn.h`` says what each
source file holds.

They are compiled with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja) into
charrnn's build folder: ``$TORCH_EXTENSIONS_DIR/<name>`` when that is set, else
``$XDG_CACHE_HOME/charrnn/<name>`` (``~/.cache/charrnn/<name>``), where ``<name>`` hashes the
sources, the flags, torch, Python and the machine, so that a changed source or another torch never
picks up a stale build.  :func:`build` does it ahead of time (``charrnn build``, ``python -m
charrnn.native``); otherwise the first :func:`load` does, printing a line while it compiles.  Later
processes import the built library directly, without ``torch.utils.cpp_extension``.

Whether they are *used* is :mod:`charrnn.ops.backend`'s choice (``CHARRNN_NATIVE=0`` or
``charrnn.ops.use(native=False)`` turns them off); without a compiler :func:`load` answers None (with
one warning) and the pure-PyTorch path runs.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
import warnings

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# No fused multiply-adds and no fast math: the sampling step must give the same bits as PyTorch's.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread.  A compiler without
# OpenMP still gets the extension, single-threaded.
_VARIANTS = (["-fopenmp"], [])

_lock = threading.Lock()
_module = None
_tried = False
_error: str | None = None


def sources() -> list[str]:
    """The files compiled (every ``csrc/*.cpp``; bindings.cpp, the slowest, sorts first and so starts
    first) and the header they share: everything the build name hashes."""
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "*.h")))


def build_name(variant: list[str] | None = None) -> str:
    """The extension's name: a hash of the sources, the flags, torch and the machine."""
    flags = _FLAGS + (_VARIANTS[0] if variant is None else variant)
    digest = hashlib.sha256()
    for path in sources():
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    key = "\n".join([" ".join(flags), torch.__version__, platform.machine(), sys.version,
                     torch.backends.cpu.get_cpu_capability()])
    digest.update(key.encode())
    return "charrnn_native_" + digest.hexdigest()[:16]


def build_dir(name: str) -> str:
    """The folder the extension ``name`` is built in."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "charrnn")
    return os.path.join(root, name)


def _built_path(name: str) -> str:
    """The library that ``cpp_extension.load`` writes for ``name``."""
    return os.path.join(build_dir(name), name + (".pyd" if sys.platform == "win32" else ".so"))


def _prebuilt(variant: list[str]):
    """The library an earlier process built, imported directly (importing torch.utils.cpp_extension
    would bring setuptools into every process), or None."""
    name = build_name(variant)
    path = _built_path(name)
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(variant: list[str]):
    from torch.utils import cpp_extension

    name = build_name(variant)
    os.makedirs(build_dir(name), exist_ok=True)
    print(f"charrnn: compiling its C++ kernels, once per machine, into {build_dir(name)} ...",
          file=sys.stderr, flush=True)
    # copies: load() may append to the lists it is given
    return cpp_extension.load(name, sources=[p for p in sources() if p.endswith(".cpp")],
                              extra_cflags=_FLAGS + list(variant), extra_ldflags=list(variant),
                              build_directory=build_dir(name), verbose=False)


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "subcommand failed" not in ln]
    diagnostics = [ln for ln in errors if ": error:" in ln]    # the compiler's "file:line:col: error: ..."
    return f"{type(e).__name__}: {(diagnostics or errors or lines or [''])[0][:300]}"


def _find_or_build():
    """(module, None, compiled) from an earlier build (either variant) or a new one, or (None, why not,
    False)."""
    for variant in _VARIANTS:
        try:
            module = _prebuilt(variant)
        except Exception:                  # a partial or foreign file: building decides
            module = None
        if module is not None:
            return module, None, False
    reason = None
    for variant in _VARIANTS:
        try:
            return _compile(variant), None, True
        except Exception as e:  # no compiler, no ninja, a failed build: the Python path does the same
            reason = _reason(e)
    return None, reason, False


def _settle() -> tuple[object, bool, bool]:
    """(the module or None, whether this call looked for it, whether it compiled it): the first call in
    a process finds or builds it, later ones get the same answer."""
    global _module, _tried, _error
    with _lock:
        if _tried:
            return _module, False, False
        _module, _error, compiled = _find_or_build()
        _tried = True
        return _module, True, compiled


def load():
    """The compiled module (built on the first call in any process, then cached on disk), or None
    when it cannot be built (see :func:`error`).  Callers ask :mod:`charrnn.ops.backend` first."""
    module, first, _ = _settle()
    if module is None and first:
        warnings.warn(f"charrnn: the compiled kernels are unavailable ({_error}); "
                      "using the pure-PyTorch path (same results, slower)", RuntimeWarning, stacklevel=2)
    return module


def build(verbose: bool = True):
    """Build the kernels now, or find the build an earlier process made (also with ``CHARRNN_NATIVE=0``,
    which only turns their use off, see :mod:`charrnn.ops.backend`); with ``verbose``, say on stderr where they are or why they are not.
    Returns the module, or None."""
    start = time.perf_counter()
    module, _, compiled = _settle()
    if verbose:
        if module is None:
            print(f"charrnn: cannot build the C++ kernels ({_error}); charrnn runs its pure-PyTorch path "
                  "instead (same results, slower)", file=sys.stderr)
        else:
            done = f"built in {time.perf_counter() - start:.0f} s" if compiled else "already built"
            print(f"charrnn: C++ kernels {done}: {module.__file__}", file=sys.stderr)
    return module


def loaded():
    """The compiled module if an earlier :func:`load` or :func:`build` found or built it, else None
    (never compiles)."""
    return _module


def error() -> str | None:
    """Why :func:`load` answered None, if it tried and failed."""
    return _error


def main() -> int:
    """``python -m charrnn.native``: build the kernels; exit status 0 when they are ready, else 1."""
    return 0 if build(verbose=True) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
