"""The output layer ``logits = dropout(ys) @ w.t() + b`` folded into the last GRU layer.

The reference is the layer then ``nn.Linear`` (and :func:`charrnn.ops.dropout.dropout`) on its outputs.
Folded, the backward makes each step's output gradient ``dropout(dlogits[:, t] @ w)`` when the
reverse loop needs it: the (B, T, H) gradient of the outputs never exists, nor does a dropped copy
of all the outputs.
"""
from __future__ import annotations

import torch


class Head:
    """The folded output layer of one forward / backward.  The mask is the compiled kernel's (see
    :func:`charrnn.ops.dropout.dropout`) for the outputs in time-major order, so any run of steps is
    one range of its element indices and the backward recomputes the same mask a step or a chunk of
    steps at a time; ``p`` > 0 needs those kernels.  With ``low`` (bf16 autocast) the products run in
    that dtype, as autocast's own ``linear`` would, on a chunk of steps at a time; the logits and
    gradients are float32."""

    chunk = 1 << 20   # elements of the outputs dropped and multiplied at a time

    def __init__(self, w, b, p, seed, kernels, low=None):
        self.w, self.b, self.p, self.seed, self.kernels, self.low = w, b, p, seed, kernels, low
        self.w_ = w if low is None else w.to(low)            # the weight and bias the products use
        self.b_ = b if low is None else b.to(low)

    def _whole(self) -> bool:
        return self.p == 0 and self.low is None              # then one GEMM over all steps

    def _chunks(self, ys):
        """(t0, t1, dropout(ys[:, t0:t1]) time-major as ((t1 - t0) * B, H) in the products' dtype)
        over all steps, about ``chunk`` elements each, in buffers made once (fresh pages for
        every chunk would cost more than the copies)."""
        B, T, H = ys.shape
        k = max(1, min(T, self.chunk // (B * H)))
        drop = ys.new_empty(k, B, H) if self.p else None
        cast = ys.new_empty(k, B, H, dtype=self.low) if self.low is not None else None   # (p or low: see _whole)
        for t0 in range(0, T, k):
            t1 = min(T, t0 + k)
            x = ys[:, t0:t1].transpose(0, 1)
            if drop is not None:
                x = drop[:t1 - t0].copy_(x)
                self.kernels.dropout(x, self.p, self.seed, t0 * B * H, out=x)
            if cast is not None:
                x = cast[:t1 - t0].copy_(x)
            yield t0, t1, x.view(-1, H)

    def logits(self, ys):
        B, T, H = ys.shape
        if self._whole():
            return torch.addmm(self.b, ys.view(B * T, H), self.w.t()).view(B, T, -1)
        out = ys.new_empty(B, T, self.w.shape[0])
        for t0, t1, x in self._chunks(ys):
            out[:, t0:t1] = torch.addmm(self.b_, x, self.w_.t()).view(t1 - t0, B, -1).transpose(0, 1)
        return out

    def grads(self, dlogits, ys):
        """grad w and grad b."""
        B, T, H = ys.shape
        if self._whole():
            return dlogits.reshape(B * T, -1).t() @ ys.view(B * T, H), dlogits.sum((0, 1))
        gw = ys.new_zeros(self.w.shape)
        for t0, t1, x in self._chunks(ys):
            d = dlogits[:, t0:t1].transpose(0, 1).reshape(-1, gw.shape[0]).t()
            gw.add_(torch.mm(d.to(x.dtype), x))
        return gw, dlogits.sum((0, 1))

    def output_grads(self, dlogits):
        """The gradients of ys[:, t], (B, H) float32, for t = T - 1 down to 0, made a quarter of a
        chunk of steps at a time in buffers made once (each valid until the next is taken)."""
        B, T, V = dlogits.shape
        H = self.w.shape[1]
        k = max(1, min(T, self.chunk // 4 // (B * H)))
        buf = dlogits.new_empty(k, B, H)
        prod = None if self.low is None else dlogits.new_empty(k * B, H, dtype=self.low)
        for t1 in range(T, 0, -k):
            t0 = max(0, t1 - k)
            d = dlogits[:, t0:t1].transpose(0, 1).reshape(-1, V)
            y = buf[:t1 - t0]
            if prod is None:
                torch.mm(d, self.w, out=y.view(-1, H))
            else:
                y.view(-1, H).copy_(torch.mm(d.to(self.low), self.w_, out=prod[:d.shape[0]]))
            if self.p:
                self.kernels.dropout(y, self.p, self.seed, t0 * B * H, out=y)
            for t in range(t1 - 1, t0 - 1, -1):
                yield y[t - t0]
