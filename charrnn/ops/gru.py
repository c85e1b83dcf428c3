"""The GRU layer's time loop as an autograd Function: the ATen loop (the reference, PyTorch's equations
exactly) and the compiled gate steps (charrnn.native), with the output layer optionally folded in
(:mod:`charrnn.ops.head`).

Inputs: either gi (T, B, 3H), any strides, or a (vocab, 3H) table with ids (B, T); h0 (B, H),
w_hh (3H, H).  Buffers are batch-major (B, T, X).  The backward writes the per-step gradients of the
recurrent pre-activations into one (B, T, 3H) buffer (over the saved gate activations, each step's slot
read first, unless the graph is kept), so ``grad W_hh`` and ``grad b_hh`` are one GEMM and one sum.
"""
from __future__ import annotations

import torch

from . import backend, torch_compat
from .head import Head
from .matmul import Product, fp32, weight_grads
from .table import Inputs, input_grad


def cell(gi, gh, h, n, h_out, rz=None, tanh_=torch.Tensor.tanh_):
    """One GRU step's gate arithmetic, PyTorch's equations: ``rz`` (B, 2H; default: ``gh``'s first 2H
    columns, overwritten) gets ``[r, z]`` from ``gh`` (B, 3H) = W_hh h + b_hh and ``gi``, ``n`` the new
    gate and ``h_out`` the new state ``(h - n) * z + n``.  ``tanh_`` applies tanh in place (the sampling
    step passes its own form).  Shared by the training loop below and
    :class:`charrnn.stepper.Stepper`'s PyTorch step, which passes a contiguous ``rz`` (ATen's sigmoid
    may round differently on another memory layout, and its compiled twin's results are fixed)."""
    H = h.shape[1]
    rz = torch.add(gh[:, :2 * H], gi[:, :2 * H], out=gh[:, :2 * H] if rz is None else rz).sigmoid_()
    torch.mul(rz[:, :H], gh[:, 2 * H:], out=n)
    tanh_(n.add_(gi[:, 2 * H:]))
    return torch.sub(h, n, out=h_out).mul_(rz[:, H:]).add_(n)


def _cell_backward(dh, g, n, h_prev, d, dan, zdh, tmp):
    """One reverse step of :func:`cell` (ATen): from dh (B, H), the gradients of the pre-activations
    into d = [dr, dz, dan * r] and dan; dh keeps dh * (1 - z), zdh gets z * dh."""
    H = dh.shape[1]
    r, z, ghn = g[:, :H], g[:, H:2 * H], g[:, 2 * H:]
    torch.mul(z, dh, out=zdh)                      # dh through z * h
    torch.sub(h_prev, n, out=tmp)                  # dz = dh * (h - n)
    tmp.mul_(dh)
    dh.sub_(zdh)                                   # dn = dh * (1 - z)
    torch_compat.tanh_backward(dh, n, out=dan)
    torch_compat.sigmoid_backward(tmp, z, out=d[:, H:2 * H])
    torch.mul(dan, ghn, out=tmp)                   # dr = dan * ghn
    torch.mul(dan, r, out=d[:, 2 * H:])
    torch_compat.sigmoid_backward(tmp, r, out=d[:, :H])


class GRUFunction(torch.autograd.Function):
    """``(gi, ids, h0, w_hh, b_hh, low[, w_out, b_out, p, seed]) -> (ys (B, T, H) or logits, h_T)``."""

    @staticmethod
    @fp32
    def forward(ctx, gi, ids, h0, w_hh, b_hh, low, w_out=None, b_out=None, p=0.0, seed=0):
        kernels = backend.kernels(h0)
        inputs = Inputs(gi, ids, lookup=kernels is None)
        T, B, H = inputs.T, inputs.B, w_hh.shape[1]
        h0 = h0.contiguous()
        gates = h0.new_empty(B, T, 3 * H)    # [r, z, W_hn h + b_hn] per step
        ns = h0.new_empty(B, T, H)
        ys = h0.new_empty(B, T, H)
        product = Product(w_hh, B, low)
        h = h0
        if kernels is not None:                  # the gate arithmetic in one compiled pass per row
            x = gi if gi.stride(-1) == 1 else gi.contiguous()
            for t in range(T):
                kernels.gru_forward_step(product(h, b_hh), x, inputs.ids, h, gates, ns, ys, t)
                h = ys[:, t]
        else:
            for t in range(T):
                h = cell(inputs.at(t), product(h, b_hh, out=gates[:, t]), h, ns[:, t], ys[:, t])
        del product                  # its packed weight, before the output layer (the forward's peak) runs
        ctx.table_shape, ctx.low, ctx.backend = gi.shape, low, backend.current()
        ctx.save_for_backward(ids, h0, w_hh, gates, ys, w_out, b_out)
        ctx.ns = ns       # on ctx (an intermediate, never seen outside): the backward frees it early
        ctx.p, ctx.seed = p, seed
        if w_out is not None:
            return Head(w_out, b_out, p, seed, kernels, low).logits(ys), ys[:, T - 1].clone()
        return ys, ys[:, T - 1].clone()

    @staticmethod
    @fp32
    def backward(ctx, dys, dhT):
        with backend.use(ctx.backend):
            return _backward(ctx, dys, dhT)


def _backward(ctx, dys, dhT):
    ids, h0, w_hh, gates, ys, w_out, b_out = ctx.saved_tensors
    ns = ctx.ns
    kernels = backend.kernels(h0)
    head = None if w_out is None else Head(w_out, b_out, ctx.p, ctx.seed, kernels, ctx.low)
    # With the head, dys is the logits' gradient: the steps' output gradients are made in the loop.
    dy = None if head is None else head.output_grads(dys)
    H = h0.shape[1]
    # Each step reads its slot of gates / ns before writing the gradients over it, so
    # unless the graph is kept, the saved buffers become the gradient buffers.
    reuse = not torch_compat.keep_graph()
    if reuse:
        del ctx.ns
    dg = gates if reuse else torch.empty_like(gates)   # grad of W_hh h + b_hh: [dr, dz, dan * r]
    dan = ns if reuse else torch.empty_like(ns)        # grad of the n pre-activation
    product = Product(w_hh.t(), gates.shape[0], ctx.low)   # dh_prev = d_gates @ w_hh (+ z dh)
    loop = _reverse_native if kernels is not None else _reverse_aten
    dh = loop(kernels, product, dys, dy, dhT, gates, ns, ys, h0, dg, dan)
    del product                                        # its packed weight, before the peak below
    if ids is not None:                                # the table's gradient first, then dan can go
        # (index_add_ is fast on contiguous rows only: all of dg, then dan's columns over its third)
        d_in = input_grad(dg, ids, ctx.table_shape)
        d_in[:, 2 * H:] = input_grad(dan, ids, (ctx.table_shape[0], H))
        del dan, ns
    gw, gb = weight_grads(dg, ys, h0, ctx.low)
    if ids is None:
        dg[:, :, 2 * H:].copy_(dan)                    # now the grad of gi: [dr, dz, dan]
        d_in = input_grad(dg, None, ctx.table_shape)
    gw_out, gb_out = (None, None) if head is None else head.grads(dys, ys)
    return d_in, None, dh, gw, gb, None, gw_out, gb_out, None, None


def _reverse_aten(kernels, product, dys, dy, dhT, gates, ns, ys, h0, dg, dan):
    """The reverse time loop in ATen ops; returns grad h0.  ``dy``: the steps' output gradients from
    the folded head (last step first), else None (they are ``dys[:, t]``)."""
    dh = dhT.contiguous().clone()
    zdh, tmp = torch.empty_like(dh), torch.empty_like(dh)
    for t in range(gates.shape[1] - 1, -1, -1):
        dh.add_(dys[:, t] if dy is None else next(dy))
        _cell_backward(dh, gates[:, t], ns[:, t], ys[:, t - 1] if t > 0 else h0, dg[:, t], dan[:, t], zdh, tmp)
        product(dg[:, t], other=zdh, out=dh)
    return dh


def _reverse_native(kernels, product, dys, dy, dhT, gates, ns, ys, h0, dg, dan):
    """The reverse time loop with the compiled gate steps; returns grad h0."""
    B, T, H = ys.shape
    dh = dhT.contiguous().clone()
    zdh = torch.empty_like(dh)
    if dy is None:
        dys = dys if dys.stride(-1) == 1 else dys.contiguous()
    for t in range(T - 1, -1, -1):
        # the kernel reads row b of step t at dys[b, t]: a step's own gradient as (B, T, H), stride 0 over T
        dys_t = dys if dy is None else next(dy).unsqueeze(1).expand(B, T, H)
        kernels.gru_backward_step(dh, dys_t, gates, dg, ns, dan, ys[:, t - 1] if t > 0 else h0, zdh, t)
        product(dg[:, t], other=zdh, out=dh)
    return dh
