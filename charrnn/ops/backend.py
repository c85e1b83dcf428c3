"""The one switch that picks the fast kernels' branches: :class:`Backend`, read with :func:`current`
and changed for a block with :func:`use`.

The environment variables ``CHARRNN_FAST_RNN``, ``CHARRNN_NATIVE`` and ``CHARRNN_PACKED`` (``0`` /
``false`` / ``no`` / ``off`` turn one off) only set the defaults, once, at import::

    from charrnn import ops
    with ops.backend.use(native=False):      # the ATen loops, even where the extension is built
        model(ids)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which implementation the fast path runs (each False falls back to a plainer one, same results)."""

    fast_rnn: bool = True          # CPU training (and evaluation()) through charrnn.ops; False: the stock modules
    native: bool = True            # the compiled kernels (charrnn.native) where they build; False: ATen loops
    packed: bool = True            # per-step products on a weight packed once (panels / oneDNN); False: addmm
    onednn_first: bool | None = None   # oneDNN before the panels; None: where PyTorch runs AVX-512 code


DEFAULT = Backend(fast_rnn=_env_flag("CHARRNN_FAST_RNN"), native=_env_flag("CHARRNN_NATIVE"),
                  packed=_env_flag("CHARRNN_PACKED"))

_current: contextvars.ContextVar[Backend] = contextvars.ContextVar("charrnn_ops_backend", default=DEFAULT)


def current() -> Backend:
    """The backend in force in this thread / context."""
    return _current.get()


@contextlib.contextmanager
def use(backend: Backend | None = None, **changes):
    """Within this block (this thread / context only), ``backend`` (default: the current one) with
    ``changes`` applied, e.g. ``use(native=False)``."""
    token = _current.set(dataclasses.replace(backend or current(), **changes))
    try:
        yield current()
    finally:
        _current.reset(token)


def compiled():
    """charrnn.native's module when the backend allows it and it builds, else None."""
    if not current().native:
        return None
    from .. import native
    return native.load()


def kernels(t):
    """The compiled kernels for float32 tensors like ``t`` (see :func:`compiled`), else None: then the
    ATen loops run."""
    import torch
    return compiled() if t.dtype == torch.float32 else None
