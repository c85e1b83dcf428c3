"""The Elman RNN layer's (``nn.RNN``, tanh or relu) time loop as an autograd Function, in ATen ops
(there is no compiled version).  Inputs and buffers as in :mod:`charrnn.ops.gru`."""
from __future__ import annotations

import torch

from . import backend, torch_compat
from .matmul import Product, fp32, weight_grads
from .table import Inputs, input_grad


class ElmanFunction(torch.autograd.Function):
    """``(gi, ids, h0, w_hh, b_hh, relu, low) -> (ys (B, T, H), h_T)``."""

    @staticmethod
    @fp32
    def forward(ctx, gi, ids, h0, w_hh, b_hh, relu: bool, low):
        inputs = Inputs(gi, ids)
        T, B = inputs.T, inputs.B
        h0 = h0.contiguous()
        ys = h0.new_empty(B, T, w_hh.shape[1])
        product = Product(w_hh, B, low)
        h = h0
        for t in range(T):
            hn = ys[:, t]
            product(h, b_hh, out=hn)
            hn.add_(inputs.at(t))
            hn.relu_() if relu else hn.tanh_()
            h = hn
        ctx.relu, ctx.low, ctx.backend = relu, low, backend.current()
        ctx.table_shape = gi.shape
        ctx.save_for_backward(ids, h0, w_hh, ys)
        return ys, ys[:, T - 1].clone()

    @staticmethod
    @fp32
    def backward(ctx, dys, dhT):
        with backend.use(ctx.backend):
            ids, h0, w_hh, ys = ctx.saved_tensors
            dg = torch.empty_like(ys)          # ys itself is still needed for the weight gradient
            dh = dhT.contiguous().clone()
            product = Product(w_hh.t(), ys.shape[0], ctx.low)
            for t in range(ys.shape[1] - 1, -1, -1):
                dh.add_(dys[:, t])
                if ctx.relu:
                    torch.mul(dh, ys[:, t] > 0, out=dg[:, t])
                else:
                    torch_compat.tanh_backward(dh, ys[:, t], out=dg[:, t])
                product(dg[:, t], out=dh)
            del product                                        # its packed weight, before the peak below
            gw, gb = weight_grads(dg, ys, h0, ctx.low)
            return input_grad(dg, ids, ctx.table_shape), None, dh, gw, gb, None, None
