"""The LSTM layer's time loops as an autograd Function: the ATen loops (the reference, PyTorch's
equations exactly) and the compiled loops (charrnn.native's lstm_forward / lstm_backward, float32
only).  Inputs and buffers as in :mod:`charrnn.ops.gru`; the gates are [i, f, g, o]."""
from __future__ import annotations

import torch

from . import backend, torch_compat
from .matmul import Product, fp32, weight_grads
from .table import Inputs, input_grad


def _forward_aten(inputs, h0, c0, w_hh, b_hh, low):
    T, B, H = inputs.T, inputs.B, w_hh.shape[1]
    gates = h0.new_empty(B, T, 4 * H)    # activations [i, f, g, o]
    cs, tcs, ys = h0.new_empty(B, T, H), h0.new_empty(B, T, H), h0.new_empty(B, T, H)
    product = Product(w_hh, B, low)
    h, c = h0, c0
    for t in range(T):
        g = gates[:, t]
        product(h, b_hh, out=g)
        g.add_(inputs.at(t))
        g[:, :2 * H].sigmoid_()
        g[:, 2 * H:3 * H].tanh_()
        g[:, 3 * H:].sigmoid_()
        cn, tc, hn = cs[:, t], tcs[:, t], ys[:, t]
        torch.mul(g[:, H:2 * H], c, out=cn)
        cn.addcmul_(g[:, :H], g[:, 2 * H:3 * H])
        torch.tanh(cn, out=tc)
        torch.mul(g[:, 3 * H:], tc, out=hn)
        h, c = hn, cn
    return gates, cs, tcs, ys


def _cell_backward(dh, dc, g, tc, c_prev, d, tmp, tmp2):
    """One reverse step (ATen): the pre-activations' gradients into d; dc becomes the previous step's."""
    H = dh.shape[1]
    i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
    torch.mul(dh, o, out=tmp)                      # dc += dh * o * (1 - tanh(c)^2)
    torch_compat.tanh_backward(tmp, tc, out=tmp)
    dc.add_(tmp)
    torch.mul(dh, tc, out=tmp)                     # do
    torch_compat.sigmoid_backward(tmp, o, out=d[:, 3 * H:])
    torch.mul(dc, gg, out=tmp)                     # di
    torch.mul(dc, i, out=tmp2)                     # dg
    torch_compat.sigmoid_backward(tmp, i, out=d[:, :H])
    torch_compat.tanh_backward(tmp2, gg, out=d[:, 2 * H:3 * H])
    torch.mul(dc, c_prev, out=tmp)                 # df
    dc.mul_(f)
    torch_compat.sigmoid_backward(tmp, f, out=d[:, H:2 * H])


def _backward_aten(ctx, dys, dhT, dcT, h0, c0, w_hh, gates, cs, tcs):
    """The reverse loop; returns (dg, dh, dc)."""
    B, T, _ = gates.shape
    dg = gates if not torch_compat.keep_graph() else torch.empty_like(gates)
    dh, dc = dhT.contiguous().clone(), dcT.contiguous().clone()
    tmp, tmp2 = torch.empty_like(dh), torch.empty_like(dh)
    product = Product(w_hh.t(), B, ctx.low)
    for t in range(T - 1, -1, -1):
        dh.add_(dys[:, t])
        _cell_backward(dh, dc, gates[:, t], tcs[:, t], cs[:, t - 1] if t > 0 else c0, dg[:, t], tmp, tmp2)
        product(dg[:, t], out=dh)
    return dg, dh, dc


class LSTMFunction(torch.autograd.Function):
    """``(gi, ids, h0, c0, w_hh, b_hh, low) -> (ys (B, T, H), h_T, c_T)``."""

    @staticmethod
    @fp32
    def forward(ctx, gi, ids, h0, c0, w_hh, b_hh, low):
        ctx.table_shape, ctx.low, ctx.backend = gi.shape, low, backend.current()
        kernels = backend.kernels(h0) if low is None else None     # the compiled loops multiply in float32
        ctx.set_materialize_grads(kernels is None)   # the compiled backward takes None for unused outputs
        if kernels is not None:
            x = gi if gi.stride(-1) == 1 else gi.contiguous()    # the one-hot table is w_ih.t() + b_ih
            gates, cs, tcs, ys = kernels.lstm_forward(x, ids, h0, c0, w_hh, b_hh)
        else:
            h0, c0 = h0.contiguous(), c0.contiguous()
            gates, cs, tcs, ys = _forward_aten(Inputs(gi, ids), h0, c0, w_hh, b_hh, low)
        ctx.save_for_backward(ids, h0, c0, w_hh, gates, cs, tcs, ys)
        return ys, ys[:, -1].clone(), cs[:, -1].clone()

    @staticmethod
    @fp32
    def backward(ctx, dys, dhT, dcT):
        with backend.use(ctx.backend):
            ids, h0, c0, w_hh, gates, cs, tcs, ys = ctx.saved_tensors
            # grad of the pre-activations (= of gi and of W_hh h + b_hh), over the activations
            # (each step's slot read first) unless the graph is kept.
            kernels = backend.kernels(h0) if ctx.low is None else None
            if kernels is not None:
                dg, dh, dc = kernels.lstm_backward(dys, dhT, dcT, gates, cs, tcs, c0, w_hh,
                                                   not torch_compat.keep_graph())
            else:
                dg, dh, dc = _backward_aten(ctx, dys, dhT, dcT, h0, c0, w_hh, gates, cs, tcs)
            gw, gb = weight_grads(dg, ys, h0, ctx.low)
            return input_grad(dg, ids, ctx.table_shape), None, dh, dc, gw, gb, None
