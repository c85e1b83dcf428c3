"""A CPU training path for ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with a batched weight gradient.

PyTorch's CPU recurrent backward computes the recurrent weight gradient as one small
GEMM per time step (``(G*H) x B @ B x H``) accumulated with ``add_``; on CPU that is
most of the cost of a training step.  Here each layer is split into

* the input projection for all time steps at once, ``gi = F.linear(x, W_ih, b_ih)``
  (ordinary autograd, so ``grad W_ih`` is one big GEMM), and
* an :class:`torch.autograd.Function` that runs the time loop (one ``addmm`` per step
  plus the gate arithmetic, PyTorch's equations exactly) and whose backward writes the
  per-step gradients of the recurrent pre-activations into one ``(T, B, G*H)`` buffer,
  keeping only ``dh_prev = d_gates @ W_hh`` inside the reverse loop; ``grad W_hh`` and
  ``grad b_hh`` are then one GEMM and one sum over all ``T*B`` rows.

The parameters stay in the ``nn.RNNBase`` module (state_dict names, checkpoints and
cuDNN on GPU are unchanged); :func:`rnn_forward` is a drop-in for ``rnn(x, state)``.
Dropout between layers is ``F.dropout`` on the outputs of every layer but the last, in
training mode only, like ``nn.GRU(dropout=p)`` (same places, different random masks).

Set ``ENABLED = False`` (or the environment variable ``CHARRNN_FAST_RNN=0``) to make
:func:`usable` always answer False, e.g. to benchmark against the stock modules.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

ENABLED: bool = os.environ.get("CHARRNN_FAST_RNN", "1").strip().lower() not in ("0", "false", "no", "off")

_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input   # (grad, output, *, grad_input)
_tanh_backward = torch.ops.aten.tanh_backward.grad_input         # (grad, output, *, grad_input)

_MODES = {nn.GRU: "gru", nn.LSTM: "lstm"}


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _mode(rnn: nn.Module) -> str | None:
    if type(rnn) in _MODES:
        return _MODES[type(rnn)]
    if type(rnn) is nn.RNN:
        return "rnn_tanh" if rnn.nonlinearity == "tanh" else "rnn_relu"
    return None


def supported(rnn: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path applies to this module now: enabled, CPU, grad mode on (training;
    inference keeps the stock module), fp32/fp64, no autocast, unidirectional, with biases."""
    return (ENABLED and torch.is_grad_enabled() and device.type == "cpu"
            and dtype in (torch.float32, torch.float64) and not _autocast_on("cpu")
            and _mode(rnn) is not None and rnn.bias and not rnn.bidirectional
            and getattr(rnn, "proj_size", 0) == 0
            and all(p.dtype == dtype and p.device.type == device.type for p in rnn.parameters()))


def usable(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`rnn_forward` handles ``rnn(x, ...)`` (see :func:`supported`; batched 3-D x)."""
    return x.dim() == 3 and supported(rnn, x.device, x.dtype)


def embedded_projection(ids: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor,
                        embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The first layer's input projection of token ids (B, T), time-major (T, B, G*H).

    ``F.linear(embedding[ids], w_ih, b_ih)`` (or of ``one_hot(ids)`` when ``embedding`` is
    None) computed as a lookup in the (vocab, G*H) table ``embedding @ w_ih.T + b_ih``: the
    forward GEMM shrinks from T*B rows to vocab rows and the backward to an index-add over
    the table plus two vocab-row GEMMs.  Only valid when nothing (dropout) sits between the
    embedding and the recurrent layer."""
    table = F.linear(embedding, w_ih, b_ih) if embedding is not None else w_ih.t() + b_ih
    return F.embedding(ids.t(), table)


# --------------------------------------------------------------------------------------
# The time loops.  Shapes: gi (T, B, G*H) time-major, h0/c0 (B, H), w_hh (G*H, H).
# Each forward returns (ys (T, B, H), h_T[, c_T]); ys is a fresh buffer.
# --------------------------------------------------------------------------------------

def _weight_grads(dg: torch.Tensor, ys: torch.Tensor, h0: torch.Tensor):
    """grad W_hh = sum_t dg[t]^T @ h_{t-1} as one GEMM over (T-1)*B rows plus the t=0 term."""
    T, B, GH = dg.shape
    H = ys.shape[-1]
    gw = torch.mm(dg[1:].reshape((T - 1) * B, GH).t(), ys[:-1].reshape((T - 1) * B, H))
    gw.addmm_(dg[0].t(), h0)
    return gw, dg.reshape(T * B, GH).sum(0)


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh):
        T, B, _ = gi.shape
        H = w_hh.shape[1]
        h0 = h0.contiguous()
        gates = gi.new_empty(T, B, 3 * H)    # [r, z, W_hn h + b_hn] per step
        ns = gi.new_empty(T, B, H)
        ys = gi.new_empty(T, B, H)
        w_t = w_hh.t()
        h = h0
        for t in range(T):
            g, gi_t, n, hn = gates[t], gi[t], ns[t], ys[t]
            torch.addmm(b_hh, h, w_t, out=g)
            g[:, :2 * H].add_(gi_t[:, :2 * H]).sigmoid_()
            torch.mul(g[:, :H], g[:, 2 * H:], out=n)
            n.add_(gi_t[:, 2 * H:]).tanh_()
            torch.sub(h, n, out=hn)                       # h' = (h - n) * z + n
            hn.mul_(g[:, H:2 * H]).add_(n)
            h = hn
        ctx.save_for_backward(h0, w_hh, gates, ns, ys)
        return ys, ys[T - 1].clone()

    @staticmethod
    def backward(ctx, dys, dhT):
        h0, w_hh, gates, ns, ys = ctx.saved_tensors
        T, B, _ = gates.shape
        H = h0.shape[1]
        dgh = gates.new_empty(T, B, 3 * H)   # grad of W_hh h + b_hh
        dgi = gates.new_empty(T, B, 3 * H)   # grad of gi
        dh = dhT.contiguous().clone()
        zdh = torch.empty_like(dh)
        tmp = torch.empty_like(dh)
        for t in range(T - 1, -1, -1):
            dh.add_(dys[t])
            g, n, dgh_t, dgi_t = gates[t], ns[t], dgh[t], dgi[t]
            r, z, ghn = g[:, :H], g[:, H:2 * H], g[:, 2 * H:]
            h_prev = ys[t - 1] if t > 0 else h0
            dan = dgi_t[:, 2 * H:]
            torch.mul(z, dh, out=zdh)                      # dh through z * h
            torch.sub(dh, zdh, out=tmp)                    # dn = dh * (1 - z)
            _tanh_backward(tmp, n, grad_input=dan)
            torch.sub(h_prev, n, out=tmp)                  # dz = dh * (h - n)
            tmp.mul_(dh)
            _sigmoid_backward(tmp, z, grad_input=dgh_t[:, H:2 * H])
            torch.mul(dan, ghn, out=tmp)                   # dr = dan * ghn
            _sigmoid_backward(tmp, r, grad_input=dgh_t[:, :H])
            torch.mul(dan, r, out=dgh_t[:, 2 * H:])
            dgi_t[:, :2 * H].copy_(dgh_t[:, :2 * H])
            torch.addmm(zdh, dgh_t, w_hh, out=dh)
        gw, gb = _weight_grads(dgh, ys, h0)
        return dgi, dh, gw, gb


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, h0, c0, w_hh, b_hh):
        T, B, _ = gi.shape
        H = w_hh.shape[1]
        h0, c0 = h0.contiguous(), c0.contiguous()
        gates = gi.new_empty(T, B, 4 * H)    # activations [i, f, g, o]
        cs = gi.new_empty(T, B, H)
        tcs = gi.new_empty(T, B, H)
        ys = gi.new_empty(T, B, H)
        w_t = w_hh.t()
        h, c = h0, c0
        for t in range(T):
            g = gates[t]
            torch.addmm(b_hh, h, w_t, out=g)
            g.add_(gi[t])
            g[:, :2 * H].sigmoid_()
            g[:, 2 * H:3 * H].tanh_()
            g[:, 3 * H:].sigmoid_()
            cn, tc, hn = cs[t], tcs[t], ys[t]
            torch.mul(g[:, H:2 * H], c, out=cn)
            cn.addcmul_(g[:, :H], g[:, 2 * H:3 * H])
            torch.tanh(cn, out=tc)
            torch.mul(g[:, 3 * H:], tc, out=hn)
            h, c = hn, cn
        ctx.save_for_backward(h0, c0, w_hh, gates, cs, tcs, ys)
        return ys, ys[T - 1].clone(), cs[T - 1].clone()

    @staticmethod
    def backward(ctx, dys, dhT, dcT):
        h0, c0, w_hh, gates, cs, tcs, ys = ctx.saved_tensors
        T, B, _ = gates.shape
        H = h0.shape[1]
        dg = gates.new_empty(T, B, 4 * H)    # grad of the pre-activations (= of gi and of W_hh h + b_hh)
        dh = dhT.contiguous().clone()
        dc = dcT.contiguous().clone()
        tmp = torch.empty_like(dh)
        for t in range(T - 1, -1, -1):
            dh.add_(dys[t])
            g, tc, dg_t = gates[t], tcs[t], dg[t]
            i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
            c_prev = cs[t - 1] if t > 0 else c0
            torch.mul(dh, tc, out=tmp)                     # do
            _sigmoid_backward(tmp, o, grad_input=dg_t[:, 3 * H:])
            torch.mul(dh, o, out=tmp)                      # dc += dh * o * (1 - tanh(c)^2)
            _tanh_backward(tmp, tc, grad_input=tmp)
            dc.add_(tmp)
            torch.mul(dc, gg, out=tmp)                     # di
            _sigmoid_backward(tmp, i, grad_input=dg_t[:, :H])
            torch.mul(dc, c_prev, out=tmp)                 # df
            _sigmoid_backward(tmp, f, grad_input=dg_t[:, H:2 * H])
            torch.mul(dc, i, out=tmp)                      # dg
            _tanh_backward(tmp, gg, grad_input=dg_t[:, 2 * H:3 * H])
            dc.mul_(f)
            torch.mm(dg_t, w_hh, out=dh)
        gw, gb = _weight_grads(dg, ys, h0)
        return dg, dh, dc, gw, gb


class _ElmanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, relu: bool):
        T, B, _ = gi.shape
        h0 = h0.contiguous()
        ys = gi.new_empty(gi.shape)
        w_t = w_hh.t()
        h = h0
        for t in range(T):
            hn = ys[t]
            torch.addmm(b_hh, h, w_t, out=hn)
            hn.add_(gi[t])
            hn.relu_() if relu else hn.tanh_()
            h = hn
        ctx.relu = relu
        ctx.save_for_backward(h0, w_hh, ys)
        return ys, ys[T - 1].clone()

    @staticmethod
    def backward(ctx, dys, dhT):
        h0, w_hh, ys = ctx.saved_tensors
        T = ys.shape[0]
        dg = torch.empty_like(ys)
        dh = dhT.contiguous().clone()
        for t in range(T - 1, -1, -1):
            dh.add_(dys[t])
            if ctx.relu:
                torch.mul(dh, ys[t] > 0, out=dg[t])
            else:
                _tanh_backward(dh, ys[t], grad_input=dg[t])
            torch.mm(dg[t], w_hh, out=dh)
        gw, gb = _weight_grads(dg, ys, h0)
        return dg, dh, gw, gb, None


def layer_forward(mode: str, gi: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None,
                  w_hh: torch.Tensor, b_hh: torch.Tensor):
    """One layer's time loop on the precomputed input projection ``gi`` (T, B, G*H).

    Returns ``(ys (T, B, H), h_T)`` or, for LSTM, ``(ys, h_T, c_T)``."""
    if mode == "gru":
        return _GRUFunction.apply(gi, h0, w_hh, b_hh)
    if mode == "lstm":
        return _LSTMFunction.apply(gi, h0, c0, w_hh, b_hh)
    return _ElmanFunction.apply(gi, h0, w_hh, b_hh, mode == "rnn_relu")


def rnn_forward(rnn: nn.RNNBase, x: torch.Tensor | None, state=None, *, gi0: torch.Tensor | None = None):
    """``rnn(x, state)`` for a unidirectional ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with biases,
    3-D input, computed with the functions above.  Same return value as the module.

    ``gi0``, if given, is the first layer's input projection, time-major (T, B, G*H) (see
    :func:`embedded_projection`), and ``x`` is ignored."""
    mode = _mode(rnn)
    if mode is None:
        raise TypeError(f"fast_rnn does not handle {type(rnn).__name__}")
    L, H = rnn.num_layers, rnn.hidden_size
    if gi0 is not None:
        inp = None
        T, B = gi0.shape[:2]
    else:
        inp = x.transpose(0, 1) if rnn.batch_first else x     # time-major (T, B, I)
        T, B = inp.shape[:2]
    if T == 0:
        raise ValueError("fast_rnn: empty sequence")
    ref = gi0 if gi0 is not None else inp
    if mode == "lstm":
        h0, c0 = state if state is not None else (None, None)
    else:
        h0, c0 = state, None
    if h0 is None:
        h0 = ref.new_zeros(L, B, H)
    if mode == "lstm" and c0 is None:
        c0 = ref.new_zeros(L, B, H)
    hs, cs = [], []
    for layer in range(L):
        w_hh = getattr(rnn, f"weight_hh_l{layer}")
        b_hh = getattr(rnn, f"bias_hh_l{layer}")
        if layer == 0 and gi0 is not None:
            gi = gi0
        else:
            gi = F.linear(inp, getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"bias_ih_l{layer}"))
        out = layer_forward(mode, gi, h0[layer], c0[layer] if c0 is not None else None, w_hh, b_hh)
        inp = out[0]
        hs.append(out[1])
        if mode == "lstm":
            cs.append(out[2])
        if layer < L - 1 and rnn.dropout > 0 and rnn.training:
            inp = F.dropout(inp, rnn.dropout, training=True)
    y = inp.transpose(0, 1) if rnn.batch_first else inp
    h_n = torch.stack(hs)
    return (y, (h_n, torch.stack(cs))) if mode == "lstm" else (y, h_n)
