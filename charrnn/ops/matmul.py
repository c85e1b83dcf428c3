"""The per-step product with a recurrent weight, ``x @ w.t() (+ bias) (+ other)``, and the batched weight
gradients.

:class:`Product` picks one of three backends for a fixed ``w`` and many ``x``: charrnn.native's
``packed_matmul`` (AVX2 + FMA register tiles on ``w`` packed into panels), oneDNN's matmul on ``w``
packed once (:mod:`charrnn.ops.torch_compat`), or the plain reference, ``torch.addmm``.  All three give
the same numbers to rounding; ``benchmarks/kernel_speed.py`` times them.
"""
from __future__ import annotations

import functools

import torch

from . import backend, torch_compat

PACKED_ROWS = 256   # from 512 rows on, MKL's addmm is as fast as oneDNN's packed product or faster


def addmm(x, w, bias=None, other=None, out=None):
    """The reference: ``x @ w.t() (+ bias) (+ other)`` with ``torch.addmm``, into ``out`` when given."""
    if other is None:
        return torch.addmm(bias, x, w.t(), out=out) if bias is not None else torch.mm(x, w.t(), out=out)
    y = torch.addmm(other, x, w.t(), out=out)
    return y.add_(bias) if bias is not None else y


def _panel_kernels(w: torch.Tensor):
    """charrnn.native when its packed_matmul applies to ``w`` (float32 CPU, a CPU with AVX2 + FMA), else None."""
    kernels = backend.kernels(w) if w.device.type == "cpu" else None
    return kernels if kernels is not None and kernels.has_fma() else None


def onednn_ok(w: torch.Tensor) -> bool:
    """Whether oneDNN's packed product applies to ``w`` (a CPU float32 / bfloat16 tensor, torch has it)."""
    return w.device.type == "cpu" and torch_compat.onednn_linear(w.dtype)


def _onednn_first() -> bool:
    first = backend.current().onednn_first
    return torch_compat.avx512() if first is None else first


class Product:
    """``x @ w.t() (+ bias) (+ other)`` for one fixed ``w`` (out, in) and many ``x`` (rows, in).
    ``kind`` says which backend runs: "panels", "onednn" or "addmm" (see the module's docstring);
    with ``Backend.packed`` off, always "addmm".  On AVX-512 CPUs oneDNN comes before the panels (its
    AVX-512 kernel outruns the panels' AVX2 tile there); on AVX2 CPUs the panels win.

    With ``low`` (torch.bfloat16: bf16 autocast), ``x`` and ``w`` are multiplied in that dtype
    (oneDNN's packed product, else ``mm``) and the product, rounded to it, is added to ``bias`` and
    ``other`` in float32."""

    def __init__(self, w: torch.Tensor, rows: int, low: torch.dtype | None = None):
        self.w, self.low, self.kind = w, low, "addmm"
        packed = backend.current().packed
        if low is not None:
            self.w = w.new_empty(w.shape, dtype=low).copy_(w)   # contiguous (w may be w_hh.t()): one copy
            if packed and rows <= PACKED_ROWS and onednn_ok(self.w):
                self.kind, self.packed = "onednn", torch_compat.pack_linear_weight(self.w, rows)
                self.w = None                          # only the packed copy is read
        elif packed:
            kernels = _panel_kernels(w)
            panels = kernels is not None and kernels.use_panels(rows)
            onednn = rows <= PACKED_ROWS and onednn_ok(w)
            if panels and not (onednn and _onednn_first()):
                self.kind, self.kernels, self.packed = "panels", kernels, kernels.pack_panels(w)
            elif onednn:
                self.kind, self.out_features = "onednn", w.shape[0]
                # A transposed w (the backward's w_hh.t()) is packed a half at a time: packing goes through
                # a contiguous copy, and two half copies at once are less at the backward's peak.
                n = w.shape[0] if w.is_contiguous() or w.shape[0] < 2 else (w.shape[0] + 1) // 2
                self.packed = [(i, min(i + n, w.shape[0]),
                                torch_compat.pack_linear_weight(w[i:i + n].contiguous(), rows))
                               for i in range(0, w.shape[0], n)]

    def __call__(self, x, bias=None, other=None, out=None):
        """The product, written to ``out`` when given (else a new tensor); ``other`` is added.
        ``out`` may be ``other`` but must not overlap ``x``."""
        if self.low is not None:
            return self._low(x, bias, other, out)
        if self.kind == "panels":
            if out is None:
                out = x.new_empty(x.shape[0], self.w.shape[0])
            self.kernels.packed_matmul(x, self.packed, bias, other, out)
            return out
        if self.kind == "addmm":
            return addmm(x, self.w, bias, other, out)
        if len(self.packed) == 1:
            return self._onednn(x, self.packed[0][2], bias, other, out)
        if out is None:
            out = x.new_empty(x.shape[0], self.out_features)
        for i, j, packed in self.packed:
            self._onednn(x, packed, bias[i:j] if bias is not None else None,
                         other[:, i:j] if other is not None else None, out[:, i:j])
        return out

    def _low(self, x, bias, other, out):
        x = x.to(self.low)
        y = torch_compat.linear_packed(x, self.packed) if self.kind == "onednn" else torch.mm(x, self.w.t())
        if out is None:
            out = x.new_empty(y.shape, dtype=torch.float32)
        out.copy_(y) if other is None else torch.add(other, y, out=out)
        return out.add_(bias) if bias is not None else out

    @staticmethod
    def _onednn(x, packed, bias, other, out):
        y = torch_compat.linear_packed(x, packed, bias, other)
        return out.copy_(y) if out is not None else y


LOW_ROWS = 1024   # rows of dg per bf16 weight-gradient GEMM


def weight_grads(dg: torch.Tensor, ys: torch.Tensor, h0: torch.Tensor, low: torch.dtype | None = None):
    """grad W_hh = sum_{b,t} dg[b,t]^T @ h_{t-1}[b] and grad b_hh, from batch-major dg (B, T, GH)
    and ys (B, T, H): one GEMM of the flattened rows against the rows one before them, minus the
    B-1 pairs that straddle two sequences, plus the t = 0 terms against h0.  With ``low``, that
    big GEMM runs in that dtype in blocks of LOW_ROWS rows (each block's product rounded to it,
    as under autocast, and summed in float32)."""
    B, T, GH = dg.shape
    d = dg.view(B * T, GH)
    gw = torch.mm(dg[:, 0].t(), h0)
    if T > 1:
        y = ys.view(B * T, ys.shape[-1])
        if low is not None:
            _low_weight_grad(gw, d, y, low)
        else:
            gw.addmm_(d[1:].t(), y[:-1])
        if B > 1:
            gw.addmm_(dg[1:, 0].t(), ys[:-1, T - 1], alpha=-1)
    return gw, d.sum(0)


def _low_weight_grad(gw, d, y, low):
    """gw += d[1:].t() @ y[:-1] in ``low``, in row blocks through buffers made once (a low copy of
    all of d would raise the peak; fresh pages for each block's copies cost time)."""
    n_rows, GH = d.shape
    rows = min(LOW_ROWS, n_rows - 1)
    d_low = d.new_empty(rows, GH, dtype=low)
    y_low = y.new_empty(rows, y.shape[1], dtype=low)
    prod = d.new_empty(GH, y.shape[1], dtype=low)
    for i in range(1, n_rows, rows):
        n = min(rows, n_rows - i)
        d_low[:n].copy_(d[i:i + n])
        y_low[:n].copy_(y[i - 1:i - 1 + n])
        gw.add_(torch.mm(d_low[:n].t(), y_low[:n], out=prod))


def fp32(fn):
    """Run ``fn`` (a Function's forward or backward, which choose their own dtypes) with autocast off."""
    @functools.wraps(fn)
    def wrapped(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    return wrapped
