"""When the fast path applies, and its entry point :func:`rnn_forward`, a drop-in for ``rnn(x, state)``.

Each layer is split into the input projection for all steps at once (ordinary autograd: ``grad W_ih``
is one big GEMM), or for the first layer of a CharLM a row lookup per step in
:func:`charrnn.ops.table.input_table`, and the layer's time loop (:mod:`charrnn.ops.gru`,
:mod:`~charrnn.ops.lstm`, :mod:`~charrnn.ops.elman`) whose backward batches the recurrent weight
gradient.  The parameters stay in the ``nn.RNNBase`` module (state_dict names, checkpoints and cuDNN
on GPU are unchanged).  Under bf16 autocast the per-step recurrent products, their backward and the
recurrent weight gradient run in bf16, everything else in float32.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from . import backend, torch_compat
from .dropout import dropout, mask_seed
from .elman import ElmanFunction
from .gru import GRUFunction
from .lstm import LSTMFunction

_MODES = {nn.GRU: "gru", nn.LSTM: "lstm"}
_evaluating: contextvars.ContextVar[bool] = contextvars.ContextVar("charrnn_ops_evaluating", default=False)


@contextlib.contextmanager
def evaluation():
    """Within this block (this thread / context) the fast path also serves forwards without gradients,
    e.g. a validation pass.  Elsewhere inference keeps the stock module, whose results sampling and
    export reproduce."""
    token = _evaluating.set(True)
    try:
        yield
    finally:
        _evaluating.reset(token)


def mode(rnn: nn.Module) -> str | None:
    """The loop ``rnn`` runs here: "gru", "lstm", "rnn_tanh" or "rnn_relu"; None for other modules."""
    if type(rnn) in _MODES:
        return _MODES[type(rnn)]
    if type(rnn) is nn.RNN:
        return "rnn_tanh" if rnn.nonlinearity == "tanh" else "rnn_relu"
    return None


def _autocast_ok(dtype: torch.dtype) -> bool:
    """No autocast, or bf16 autocast over float32 parameters (the recurrent products then run in bf16)."""
    if not torch_compat.autocast_on("cpu"):
        return True
    return dtype == torch.float32 and torch_compat.autocast_dtype("cpu") == torch.bfloat16


def supported(rnn: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path applies to this module now: ``Backend.fast_rnn``, CPU, grad mode on
    (training; inference keeps the stock module, but inside :func:`evaluation`), fp32/fp64, no autocast
    or bf16 autocast over fp32, unidirectional, with biases."""
    return (backend.current().fast_rnn and (torch.is_grad_enabled() or _evaluating.get())
            and device.type == "cpu" and dtype in (torch.float32, torch.float64) and _autocast_ok(dtype)
            and mode(rnn) is not None and rnn.bias and not rnn.bidirectional
            and getattr(rnn, "proj_size", 0) == 0
            and all(p.dtype == dtype and p.device.type == device.type for p in rnn.parameters()))


def usable(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`rnn_forward` handles ``rnn(x, ...)`` (see :func:`supported`; batched 3-D x)."""
    return x.dim() == 3 and supported(rnn, x.device, x.dtype)


def head_usable(rnn: nn.RNNBase, head: nn.Linear, p: float) -> bool:
    """Whether :func:`rnn_forward` can fold ``head(dropout(output, p))`` into ``rnn``'s last layer
    (``head=``): a GRU, the same dtype, and for ``p`` > 0 the compiled dropout."""
    w = rnn.weight_hh_l0
    return (mode(rnn) == "gru" and head.bias is not None and head.weight.dtype == w.dtype
            and (p == 0 or backend.kernels(w) is not None))


def layer_forward(mode: str, gi: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None,
                  w_hh: torch.Tensor, b_hh: torch.Tensor, ids: torch.Tensor | None = None):
    """One layer's time loop on the precomputed input projection ``gi`` (T, B, G*H), or, with
    ``ids`` (B, T), on the rows of the (vocab, G*H) table ``gi`` for those ids.

    Returns ``(ys (T, B, H), h_T)`` or, for LSTM, ``(ys, h_T, c_T)``; ``ys`` is a time-major
    view of a batch-major buffer."""
    out = _layer(mode, gi, ids, h0, c0, w_hh, b_hh)
    return (out[0].transpose(0, 1), *out[1:])


def _layer(mode, gi, ids, h0, c0, w_hh, b_hh, low=None, head=()):
    gi = gi.to(w_hh.dtype)                 # an input projection made under autocast
    if mode == "gru":
        return GRUFunction.apply(gi, ids, h0, w_hh, b_hh, low, *head)
    if mode == "lstm":
        return LSTMFunction.apply(gi, ids, h0, c0, w_hh, b_hh, low)
    return ElmanFunction.apply(gi, ids, h0, w_hh, b_hh, mode == "rnn_relu", low)


def _steps(rnn, x, gi0, table, ids):
    """(T, B, the tensor new states are made like)."""
    if table is not None:
        return ids.shape[1], ids.shape[0], table
    if gi0 is not None:
        return gi0.shape[0], gi0.shape[1], gi0
    return (x.shape[1], x.shape[0], x) if rnn.batch_first else (x.shape[0], x.shape[1], x)


def _initial_state(rnn, m, state, ref, B):
    L, H, dtype = rnn.num_layers, rnn.hidden_size, rnn.weight_hh_l0.dtype
    h0, c0 = (state if state is not None else (None, None)) if m == "lstm" else (state, None)
    h0 = ref.new_zeros(L, B, H, dtype=dtype) if h0 is None else h0.to(dtype)
    if m == "lstm":
        c0 = ref.new_zeros(L, B, H, dtype=dtype) if c0 is None else c0.to(dtype)
    return h0, c0


def _first_projection(rnn, x, gi0, table, ids):
    """The first layer's input projection (gi, ids for a table lookup or None)."""
    if table is not None:
        return table, ids
    if gi0 is not None:
        return gi0, None
    w_ih, b_ih = rnn.weight_ih_l0, rnn.bias_ih_l0
    if rnn.batch_first:
        return F.linear(x, w_ih, b_ih).transpose(0, 1), None   # projecting before transposing: no copy of x
    return F.linear(x, w_ih, b_ih), None


def rnn_forward(rnn: nn.RNNBase, x: torch.Tensor | None, state=None, *, gi0: torch.Tensor | None = None,
                table: torch.Tensor | None = None, ids: torch.Tensor | None = None, weight_drop: float = 0.0,
                head: nn.Linear | None = None, head_dropout: float = 0.0):
    """``rnn(x, state)`` for a unidirectional ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with biases,
    3-D input.  Same return value as the module, except that with ``head`` (see :func:`head_usable`)
    the output is ``head(dropout(y, head_dropout))``, batch-major (B, T, out), computed inside the last
    layer (its backward never makes the outputs' gradient for all steps at once; the dropout masks
    differ from :func:`dropout`'s).

    The first layer's input projection may be given instead of ``x`` (which is then ignored):
    ``gi0``, time-major (T, B, G*H) (see :func:`charrnn.ops.table.embedded_projection`), or ``table``
    (vocab, G*H) and ``ids`` (B, T), looked up one step at a time (never materialised for all steps).
    ``weight_drop`` > 0 runs each layer with :func:`dropout` applied to its ``weight_hh``
    (DropConnect: one mask for the whole forward)."""
    m = mode(rnn)
    if m is None:
        raise TypeError(f"charrnn.ops does not handle {type(rnn).__name__}")
    if head is not None and not head_usable(rnn, head, head_dropout):
        raise ValueError("charrnn.ops: this output layer cannot be folded in (see head_usable)")
    T, B, ref = _steps(rnn, x, gi0, table, ids)
    if T == 0:
        raise ValueError("charrnn.ops: empty sequence")
    # Under bf16 autocast (see supported), the recurrent products run in bf16 and the rest in float32.
    low = torch.bfloat16 if torch_compat.autocast_on("cpu") else None
    h0, c0 = _initial_state(rnn, m, state, ref, B)
    L = rnn.num_layers
    hs, cs = [], []
    inp = None                                              # the previous layer's output, (B, T, H)
    for layer in range(L):
        w_hh = dropout(getattr(rnn, f"weight_hh_l{layer}"), weight_drop)
        b_hh = getattr(rnn, f"bias_hh_l{layer}")
        if layer == 0:
            gi, lookup = _first_projection(rnn, x, gi0, table, ids)
        else:
            w_ih, b_ih = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"bias_ih_l{layer}")
            gi, lookup = F.linear(inp, w_ih, b_ih).transpose(0, 1), None
        fold = ()
        if head is not None and layer == L - 1:
            fold = (head.weight, head.bias, float(head_dropout), mask_seed() if head_dropout > 0 else 0)
        out = _layer(m, gi, lookup, h0[layer], c0[layer] if c0 is not None else None, w_hh, b_hh, low, fold)
        inp = out[0]
        hs.append(out[1])
        if m == "lstm":
            cs.append(out[2])
        if layer < L - 1 and rnn.dropout > 0 and rnn.training:
            inp = dropout(inp, rnn.dropout)
    y = inp if rnn.batch_first or head is not None else inp.transpose(0, 1)
    h_n = torch.stack(hs)
    return (y, (h_n, torch.stack(cs))) if m == "lstm" else (y, h_n)
