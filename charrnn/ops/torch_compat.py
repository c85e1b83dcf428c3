"""Every private (or version-dependent) torch API charrnn.ops uses, each behind one small probe with a
fallback to the public path: a torch release that removes one makes the fast path slower, never wrong.

=====================================================  ==============================================
private API                                            fallback when absent
=====================================================  ==============================================
``torch.ops.mkldnn._reorder_linear_weight`` and         ``torch.addmm`` (:mod:`charrnn.ops.matmul`)
``torch.ops.mkldnn._linear_pointwise`` (+ ``.binary``)
``torch._C._autograd._get_current_graph_task_keep_     assume the graph is kept: the backward never
graph``                                                 writes over its saved buffers
``torch.ops.aten.sigmoid_backward.grad_input``,         the same formulas in public ops
``torch.ops.aten.tanh_backward.grad_input``
=====================================================  ==============================================

:func:`without` makes probes answer "absent" for a block, so tests run every fallback.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

ONEDNN_LINEAR = "onednn_linear"
KEEP_GRAPH = "keep_graph"
ACTIVATION_BACKWARD = "activation_backward"
NAMES = (ONEDNN_LINEAR, KEEP_GRAPH, ACTIVATION_BACKWARD)

_absent: contextvars.ContextVar[frozenset] = contextvars.ContextVar("charrnn_torch_compat_absent",
                                                                     default=frozenset())


@contextlib.contextmanager
def without(*names: str):
    """Within this block, the probes of ``names`` (see NAMES) answer "absent": the public fallbacks run."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown private APIs {sorted(unknown)}; known: {', '.join(NAMES)}")
    token = _absent.set(_absent.get() | frozenset(names))
    try:
        yield
    finally:
        _absent.reset(token)


def _forced_absent(name: str) -> bool:
    return name in _absent.get()


# ---- oneDNN's packed linear (the op behind torch.compile's CPU linear) ----------------------------

_HAS_ONEDNN: dict = {}   # dtype -> whether this torch has the oneDNN ops for it; probed on first use


def onednn_linear(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed linear works here for CPU tensors of ``dtype`` (float32 / bfloat16)."""
    if dtype not in (torch.float32, torch.bfloat16) or _forced_absent(ONEDNN_LINEAR):
        return False
    if dtype not in _HAS_ONEDNN:
        try:
            probe = torch.ones(2, 3, dtype=dtype)
            y = linear_packed(probe, pack_linear_weight(probe, 2))
            _HAS_ONEDNN[dtype] = bool(torch.backends.mkldnn.is_available() and torch.equal(y, probe @ probe.t()))
        except (AttributeError, RuntimeError, NotImplementedError):
            _HAS_ONEDNN[dtype] = False
    return _HAS_ONEDNN[dtype]


def pack_linear_weight(w: torch.Tensor, rows: int):
    """``w`` (out, in), contiguous, packed for products with ``rows`` rows (only after :func:`onednn_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def linear_packed(x: torch.Tensor, packed, bias: torch.Tensor | None = None,
                  other: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.t() (+ bias) (+ other)`` on a weight from :func:`pack_linear_weight`."""
    if other is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")


def avx512() -> bool:
    """Whether PyTorch's kernels (oneDNN's among them) run AVX-512 code on this CPU."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)   # public, torch >= 2.1
    return capability is not None and capability() in ("AVX512", "AMX")


# ---- autograd: does the running backward keep its graph? ------------------------------------------

def keep_graph() -> bool:
    """Whether the running backward keeps the graph for another one (``retain_graph``, ``create_graph``,
    gradcheck): then the saved buffers must survive it.  Unknown (no probe): True."""
    probe = getattr(getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None)
    if probe is None or _forced_absent(KEEP_GRAPH):
        return True
    return probe()


# ---- the activations' backward into a given buffer ------------------------------------------------

def _aten_out(name: str):
    try:
        return getattr(torch.ops.aten, name).grad_input
    except (AttributeError, RuntimeError):
        return None


_SIGMOID_BACKWARD = _aten_out("sigmoid_backward")   # (grad, output, *, grad_input)
_TANH_BACKWARD = _aten_out("tanh_backward")


def sigmoid_backward(grad: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = grad * (1 - y) * y``, the gradient through ``y = sigmoid(a)``; ``out`` may be ``grad``."""
    if _SIGMOID_BACKWARD is not None and not _forced_absent(ACTIVATION_BACKWARD):
        return _SIGMOID_BACKWARD(grad, y, grad_input=out)
    d = torch.rsub(y, 1).mul_(grad).mul_(y)      # out may be y itself: a temporary first
    return out.copy_(d)


def tanh_backward(grad: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = grad * (1 - y * y)``, the gradient through ``y = tanh(a)``; ``out`` may be ``grad``."""
    if _TANH_BACKWARD is not None and not _forced_absent(ACTIVATION_BACKWARD):
        return _TANH_BACKWARD(grad, y, grad_input=out)
    d = torch.rsub(torch.mul(y, y), 1).mul_(grad)
    return out.copy_(d)


# ---- autocast queries (public since torch 2.4, the oldest release pyproject.toml accepts) -----------

def autocast_on(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


def autocast_dtype(device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)
