"""A CPU training path for ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with a batched weight gradient.

PyTorch's CPU recurrent backward computes the recurrent weight gradient as one small
GEMM per time step (``(G*H) x B @ B x H``) accumulated with ``add_``; on CPU that is
most of the cost of a training step.  Here each layer is split into

* the input projection for all time steps at once, ``gi = F.linear(x, W_ih, b_ih)``
  (ordinary autograd, so ``grad W_ih`` is one big GEMM), or, for the first layer of a
  :class:`CharLM`, a row lookup per step in a ``(vocab, G*H)`` table (see
  :func:`embedded_projection`), and
* an :class:`torch.autograd.Function` that runs the time loop (one ``addmm`` per step
  plus the gate arithmetic, PyTorch's equations exactly) and whose backward writes the
  per-step gradients of the recurrent pre-activations into one ``(B, T, G*H)`` buffer,
  keeping only ``dh_prev = d_gates @ W_hh`` inside the reverse loop; ``grad W_hh`` and
  ``grad b_hh`` are then one GEMM and one sum over all ``T*B`` rows.

Memory: the buffers are batch-major ``(B, T, X)``, so the output a ``batch_first`` caller
feeds to its output layer is already contiguous (no copy saved for that layer's
backward).  A backward that will not run again (no ``retain_graph``) writes the gate
gradients over the saved gate activations, each step's slot read before it is
overwritten, and hands the same buffer on as the input projection's gradient; the
table lookup never materialises ``gi`` for all steps.  For the default model (batch 64 x
100, GRU 1024) that is 237 MB less at the peak than saving ``gi``, ``d_gates`` and
``d_gi`` separately.  A :class:`CharLM`'s output layer (and the dropout before it) can run
inside its last GRU layer (``rnn_forward(head=...)``), whose backward then makes each step's
output gradient from the logits' gradient when it needs it: another 26 MB (52 with dropout)
that never exists.

Under bf16 autocast (``--precision bf16``, and ``auto`` on CPUs with native bf16) the same
path runs with the per-step recurrent products, their backward and the recurrent weight
gradient in bf16 (oneDNN; each product rounded to bf16, as autocast's own ``linear``), and
everything else (gates, state, saved buffers, the gradients' sums) in float32.

The parameters stay in the ``nn.RNNBase`` module (state_dict names, checkpoints and
cuDNN on GPU are unchanged); :func:`rnn_forward` is a drop-in for ``rnn(x, state)``.
Dropout between layers is :func:`dropout` on the outputs of every layer but the last, in
training mode only, like ``nn.GRU(dropout=p)`` (same places, different random masks).

Set ``ENABLED = False`` (or the environment variable ``CHARRNN_FAST_RNN=0``) to make
:func:`usable` always answer False, e.g. to benchmark against the stock modules.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

ENABLED: bool = os.environ.get("CHARRNN_FAST_RNN", "1").strip().lower() not in ("0", "false", "no", "off")
# The LSTM's loops and the GRU's gate steps in C++ (charrnn.native) when it is built; False: the ATen loops.
NATIVE: bool = True
# The per-step recurrent products through oneDNN's packed matmul when torch has it (see _Product).
PACKED: bool = os.environ.get("CHARRNN_PACKED", "1").strip().lower() not in ("0", "false", "no", "off")

_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input   # (grad, output, *, grad_input)
_tanh_backward = torch.ops.aten.tanh_backward.grad_input         # (grad, output, *, grad_input)

_MODES = {nn.GRU: "gru", nn.LSTM: "lstm"}

_local = threading.local()   # .evaluating: inside evaluation()


@contextlib.contextmanager
def evaluation():
    """Within this block (on this thread) the fast path also serves forwards without gradients,
    e.g. a validation pass (about twice as fast as the stock CPU modules for the default GRU).
    Elsewhere inference keeps the stock module, whose results sampling and export reproduce."""
    before = getattr(_local, "evaluating", False)
    _local.evaluating = True
    try:
        yield
    finally:
        _local.evaluating = before


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


def _autocast_ok(dtype: torch.dtype) -> bool:
    """No autocast, or bf16 autocast over float32 parameters (the recurrent products then run in bf16)."""
    if not _autocast_on("cpu"):
        return True
    try:
        low = torch.get_autocast_dtype("cpu")
    except AttributeError:  # torch < 2.4
        low = torch.get_autocast_cpu_dtype()
    return dtype == torch.float32 and low == torch.bfloat16


def supported(rnn: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path applies to this module now: enabled, CPU, grad mode on (training;
    inference keeps the stock module, but inside :func:`evaluation`), fp32/fp64, no autocast or
    bf16 autocast over fp32, unidirectional, with biases."""
    return (ENABLED and (torch.is_grad_enabled() or getattr(_local, "evaluating", False)) and device.type == "cpu"
            and dtype in (torch.float32, torch.float64) and _autocast_ok(dtype)
            and _mode(rnn) is not None and rnn.bias and not rnn.bidirectional
            and getattr(rnn, "proj_size", 0) == 0
            and all(p.dtype == dtype and p.device.type == device.type for p in rnn.parameters()))


def usable(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`rnn_forward` handles ``rnn(x, ...)`` (see :func:`supported`; batched 3-D x)."""
    return x.dim() == 3 and supported(rnn, x.device, x.dtype)


def input_table(w_ih: torch.Tensor, b_ih: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The first layer's input projection of every token id, (vocab, G*H): ``embedding @ w_ih.T +
    b_ih``, or ``w_ih.T + b_ih`` for one-hot inputs (``embedding`` None).

    Looking rows up in it replaces ``F.linear(embedding[ids], w_ih, b_ih)``: the forward GEMM
    shrinks from T*B rows to vocab rows and the backward to an index-add over the table plus
    two vocab-row GEMMs.  Only valid when nothing (dropout) sits between the embedding and the
    recurrent layer."""
    return F.linear(embedding, w_ih, b_ih) if embedding is not None else w_ih.t() + b_ih


def embedded_projection(ids: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor,
                        embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The first layer's input projection of token ids (B, T) for all steps, time-major (T, B, G*H),
    as rows of :func:`input_table`.  (:func:`rnn_forward` with ``table=`` and ``ids=`` looks the
    rows up one step at a time instead, without this (T, B, G*H) tensor.)"""
    return F.embedding(ids.t(), input_table(w_ih, b_ih, embedding))


# --------------------------------------------------------------------------------------
# The time loops.  Inputs: either gi (T, B, G*H), any strides, or a (vocab, G*H) table
# with ids (B, T); h0/c0 (B, H), w_hh (G*H, H).  Buffers are batch-major (B, T, X); each
# forward returns (ys (B, T, H), h_T[, c_T]).
# --------------------------------------------------------------------------------------

def _keep_graph() -> bool:
    """Whether the running backward keeps the graph for another one (``retain_graph``,
    ``create_graph``, gradcheck): then the saved buffers must survive it."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else probe()


# --------------------------------------------------------------------------------------
# The per-step product with the recurrent weight.  At the preset's shapes (32 rows x 1024 x 3072)
# MKL's addmm reaches ~70 GFLOP/s on a 2-core AVX2 machine, oneDNN's matmul on a weight packed
# once per forward / backward (the op behind torch.compile's CPU linear) ~90, and charrnn.native's
# packed_matmul (AVX2 + FMA register tiles on a weight packed into panels) 120-163 of the 166 peak
# (benchmarks/kernels.py times all three).
# --------------------------------------------------------------------------------------

_HAS_ONEDNN: dict = {}   # dtype -> whether this torch has the oneDNN ops for it; probed on first use


def _packed_ok(w: torch.Tensor) -> bool:
    if w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu":
        return False
    if w.dtype not in _HAS_ONEDNN:
        try:
            probe = torch.ones(2, 3, dtype=w.dtype)
            y = torch.ops.mkldnn._linear_pointwise(probe, torch.ops.mkldnn._reorder_linear_weight(probe, 2),
                                                   None, "none", [], "")
            _HAS_ONEDNN[w.dtype] = bool(torch.backends.mkldnn.is_available() and torch.equal(y, probe @ probe.t()))
        except (AttributeError, RuntimeError):
            _HAS_ONEDNN[w.dtype] = False
    return _HAS_ONEDNN[w.dtype]


def _panel_kernels(w: torch.Tensor):
    """charrnn.native when its packed_matmul applies to ``w`` (float32 CPU, a CPU with AVX2 + FMA), else None."""
    kernels = _compiled(w) if w.device.type == "cpu" else None
    return kernels if kernels is not None and kernels.has_fma() else None


def _avx512() -> bool:
    """Whether PyTorch's kernels (oneDNN's among them) run AVX-512 code on this CPU."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


class _Product:
    """``x @ w.t() (+ bias) (+ other)`` for one fixed ``w`` (out, in) and many ``x`` (rows, in):
    charrnn.native's packed_matmul on ``w`` packed once when built, else oneDNN on ``w`` packed once
    when PyTorch has it, else ``addmm``.  ``kind`` says which: "panels", "onednn" or "addmm".
    On AVX-512 CPUs oneDNN comes first: its AVX-512 kernel outruns the panels' AVX2 tile there
    (Zen 4, 1024 x 3072, 32-64 rows: 255-277 GFLOP/s against 155), while on AVX2 CPUs the panels
    win (Zen 3: about 160 against 100-130).

    With ``low`` (torch.bfloat16: bf16 autocast), ``x`` and ``w`` are multiplied in that dtype
    (oneDNN's packed product, else ``mm``) and the product, rounded to it, is added to ``bias`` and
    ``other`` in float32."""

    def __init__(self, w: torch.Tensor, rows: int, low: torch.dtype | None = None):
        self.w = w
        self.low = low
        self.kind = "addmm"
        if low is not None:
            self.w = w.new_empty(w.shape, dtype=low).copy_(w)   # contiguous (w may be w_hh.t()): one copy
            if PACKED and rows <= 256 and _packed_ok(self.w):
                self.kind, self.packed = "onednn", torch.ops.mkldnn._reorder_linear_weight(self.w, rows)
                self.w = None                          # only the packed copy is read
        elif PACKED:
            kernels = _panel_kernels(w)
            panels = kernels is not None and kernels.use_panels(rows)
            onednn = rows <= 256 and _packed_ok(w)     # from 512 rows on, MKL is as fast or faster
            if panels and not (onednn and _avx512()):
                self.kind, self.kernels, self.packed = "panels", kernels, kernels.pack_panels(w)
            elif onednn:
                self.kind, self.out_features = "onednn", w.shape[0]
                # A transposed w (the backward's w_hh.t()) is packed a half at a time: packing goes through
                # a contiguous copy, and two half copies at once are 12 MB less at the backward's peak.
                n = w.shape[0] if w.is_contiguous() or w.shape[0] < 2 else (w.shape[0] + 1) // 2
                self.packed = [(i, min(i + n, w.shape[0]),
                                torch.ops.mkldnn._reorder_linear_weight(w[i:i + n].contiguous(), rows))
                               for i in range(0, w.shape[0], n)]

    def __call__(self, x, bias=None, other=None, out=None):
        """The product, written to ``out`` when given (else a new tensor); ``other`` is added.
        ``out`` may be ``other`` but must not overlap ``x``."""
        if self.low is not None:
            x = x.to(self.low)
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "") if self.kind == "onednn" \
                else torch.mm(x, self.w.t())
            if out is None:
                out = x.new_empty(y.shape, dtype=torch.float32)
            out.copy_(y) if other is None else torch.add(other, y, out=out)
            return out.add_(bias) if bias is not None else out
        if self.kind == "panels":
            if out is None:
                out = x.new_empty(x.shape[0], self.w.shape[0])
            self.kernels.packed_matmul(x, self.packed, bias, other, out)
            return out
        if self.kind == "addmm":
            if other is None:
                return torch.addmm(bias, x, self.w.t(), out=out) if bias is not None else \
                    torch.mm(x, self.w.t(), out=out)
            y = torch.addmm(other, x, self.w.t(), out=out)
            return y.add_(bias) if bias is not None else y
        if len(self.packed) == 1:
            return self._onednn(x, self.packed[0][2], bias, other, out)
        if out is None:
            out = x.new_empty(x.shape[0], self.out_features)
        for i, j, packed in self.packed:
            self._onednn(x, packed, bias[i:j] if bias is not None else None,
                         other[:, i:j] if other is not None else None, out[:, i:j])
        return out

    @staticmethod
    def _onednn(x, packed, bias, other, out):
        if other is None:
            y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        else:
            y = torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")
        return out.copy_(y) if out is not None else y


class _Inputs:
    """The input projection of step t: a slice of gi (T, B, G*H), or the rows of a (vocab, G*H)
    table for ids (B, T), gathered into one reused (B, G*H) buffer."""

    def __init__(self, gi, ids, lookup=True):
        self.gi = gi
        self.ids = None if ids is None else ids.to(torch.int64).contiguous()
        if ids is None:
            self.T, self.B = gi.shape[:2]
        else:
            self.B, self.T = ids.shape
            if lookup:                               # for at(t)
                self.ids_tm = ids.t().contiguous()   # one contiguous index row per step
                self.buf = gi.new_empty(self.B, gi.shape[1])

    def at(self, t):
        if self.ids is None:
            return self.gi[t]
        return torch.index_select(self.gi, 0, self.ids_tm[t], out=self.buf)


def _input_grad(dg: torch.Tensor, ids: torch.Tensor | None, table_shape):
    """The gradient of gi, a (T, B, G*H) view of the batch-major ``dg``, or of the table."""
    if ids is None:
        return dg.transpose(0, 1)
    return dg.new_zeros(table_shape).index_add_(0, ids.reshape(-1), dg.reshape(-1, dg.shape[-1]))


_LOW_ROWS = 1024   # rows of dg per bf16 weight-gradient GEMM


def _weight_grads(dg: torch.Tensor, ys: torch.Tensor, h0: torch.Tensor, low: torch.dtype | None = None):
    """grad W_hh = sum_{b,t} dg[b,t]^T @ h_{t-1}[b] and grad b_hh, from batch-major dg (B, T, GH)
    and ys (B, T, H): one GEMM of the flattened rows against the rows one before them, minus the
    B-1 pairs that straddle two sequences, plus the t = 0 terms against h0.  With ``low``, that
    big GEMM runs in that dtype in blocks of _LOW_ROWS rows (each block's product rounded to it,
    as under autocast, and summed in float32)."""
    B, T, GH = dg.shape
    d = dg.view(B * T, GH)
    gw = torch.mm(dg[:, 0].t(), h0)
    if T > 1:
        y = ys.view(B * T, ys.shape[-1])
        if low is not None:                # in row blocks: a low copy of all of dg would add 39 MB to the peak
            rows = min(_LOW_ROWS, B * T - 1)   # through buffers made once: fresh pages for each block's
            d_low = d.new_empty(rows, GH, dtype=low)     # copies took a fifth of the time
            y_low = y.new_empty(rows, y.shape[1], dtype=low)
            prod = d.new_empty(GH, y.shape[1], dtype=low)
            for i in range(1, B * T, rows):
                n = min(rows, B * T - i)
                d_low[:n].copy_(d[i:i + n])
                y_low[:n].copy_(y[i - 1:i - 1 + n])
                gw.add_(torch.mm(d_low[:n].t(), y_low[:n], out=prod))
        else:
            gw.addmm_(d[1:].t(), y[:-1])
        if B > 1:
            gw.addmm_(dg[1:, 0].t(), ys[:-1, T - 1], alpha=-1)
    return gw, d.sum(0)


def _fp32(fn):
    """Run ``fn`` (a Function's forward or backward, which choose their own dtypes) with autocast off."""
    @functools.wraps(fn)
    def wrapped(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    return wrapped


_HEAD_CHUNK = 1 << 20   # elements of the outputs the folded head drops and multiplies at a time


class _Head:
    """The output layer ``logits = dropout(ys) @ w.t() + b`` folded into the last GRU layer, so the
    backward makes each step's output gradient ``dropout(dlogits[:, t] @ w)`` when the reverse loop
    needs it: the (B, T, H) gradient of the outputs (26 MB for the default model) never exists, nor
    does a dropped copy of all the outputs.  The mask is the compiled kernel's (:func:`dropout`) for
    the outputs in time-major order, so any run of steps is one range of its element indices and
    the backward recomputes the same mask a step or a chunk of steps at a time; ``p`` > 0 needs
    those kernels.  With ``low`` (bf16 autocast) the products run in that dtype, as autocast's own
    ``linear`` would, on a chunk of steps at a time; the logits and gradients are float32."""

    def __init__(self, w, b, p, seed, kernels, low=None):
        self.w, self.b, self.p, self.seed, self.kernels, self.low = w, b, p, seed, kernels, low
        self.w_ = w if low is None else w.to(low)            # the weight and bias the products use
        self.b_ = b if low is None else b.to(low)

    def _whole(self) -> bool:
        return self.p == 0 and self.low is None              # then one GEMM over all steps

    def _chunks(self, ys):
        """(t0, t1, dropout(ys[:, t0:t1]) time-major as ((t1 - t0) * B, H) in the products' dtype)
        over all steps, about _HEAD_CHUNK elements each, in buffers made once (fresh pages for
        every chunk would cost more than the copies)."""
        B, T, H = ys.shape
        k = max(1, min(T, _HEAD_CHUNK // (B * H)))
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
        k = max(1, min(T, _HEAD_CHUNK // 4 // (B * H)))
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


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    @_fp32
    def forward(ctx, gi, ids, h0, w_hh, b_hh, low, w_out=None, b_out=None, p=0.0, seed=0):
        kernels = _compiled(h0)
        inputs = _Inputs(gi, ids, lookup=kernels is None)
        T, B = inputs.T, inputs.B
        H = w_hh.shape[1]
        h0 = h0.contiguous()
        gates = h0.new_empty(B, T, 3 * H)    # [r, z, W_hn h + b_hn] per step
        ns = h0.new_empty(B, T, H)
        ys = h0.new_empty(B, T, H)
        product = _Product(w_hh, B, low)
        h = h0
        if kernels is not None:                  # the gate arithmetic in one compiled pass per row
            x = gi if gi.stride(-1) == 1 else gi.contiguous()
            for t in range(T):
                kernels.gru_forward_step(product(h, b_hh), x, inputs.ids, h, gates, ns, ys, t)
                h = ys[:, t]
        else:
            for t in range(T):
                g, gi_t, n, hn = gates[:, t], inputs.at(t), ns[:, t], ys[:, t]
                product(h, b_hh, out=g)
                g[:, :2 * H].add_(gi_t[:, :2 * H]).sigmoid_()
                torch.mul(g[:, :H], g[:, 2 * H:], out=n)
                n.add_(gi_t[:, 2 * H:]).tanh_()
                torch.sub(h, n, out=hn)                       # h' = (h - n) * z + n
                hn.mul_(g[:, H:2 * H]).add_(n)
                h = hn
        del product                  # its packed weight, before the output layer (the forward's peak) runs
        ctx.table_shape, ctx.low = gi.shape, low
        ctx.save_for_backward(ids, h0, w_hh, gates, ys, w_out, b_out)
        ctx.ns = ns       # on ctx (an intermediate, never seen outside): the backward frees it early
        ctx.p, ctx.seed = p, seed
        if w_out is not None:
            return _Head(w_out, b_out, p, seed, _compiled(h0), low).logits(ys), ys[:, T - 1].clone()
        return ys, ys[:, T - 1].clone()

    @staticmethod
    @_fp32
    def backward(ctx, dys, dhT):
        ids, h0, w_hh, gates, ys, w_out, b_out = ctx.saved_tensors
        ns = ctx.ns
        head = None if w_out is None else _Head(w_out, b_out, ctx.p, ctx.seed, _compiled(h0), ctx.low)
        # With the head, dys is the logits' gradient: the steps' output gradients are made in the loop.
        dy = None if head is None else head.output_grads(dys)
        B, T, _ = gates.shape
        H = h0.shape[1]
        # Each step reads its slot of gates / ns before writing the gradients over it, so
        # unless the graph is kept, the saved buffers become the gradient buffers.
        reuse = not _keep_graph()
        if reuse:
            del ctx.ns
        dg = gates if reuse else torch.empty_like(gates)   # grad of W_hh h + b_hh: [dr, dz, dan * r]
        dan = ns if reuse else torch.empty_like(ns)        # grad of the n pre-activation
        dh = dhT.contiguous().clone()
        zdh = torch.empty_like(dh)
        product = _Product(w_hh.t(), B, ctx.low)           # dh_prev = d_gates @ w_hh (+ z dh)
        kernels = _compiled(h0)
        if kernels is not None:
            if dy is None:
                dys = dys if dys.stride(-1) == 1 else dys.contiguous()
            for t in range(T - 1, -1, -1):
                # the kernel reads row b of step t at dys[b, t]: a step's own gradient as (B, T, H), stride 0 over T
                dys_t = dys if dy is None else next(dy).unsqueeze(1).expand(B, T, H)
                kernels.gru_backward_step(dh, dys_t, gates, dg, ns, dan, ys[:, t - 1] if t > 0 else h0, zdh, t)
                product(dg[:, t], other=zdh, out=dh)
        else:
            tmp = torch.empty_like(dh)
            for t in range(T - 1, -1, -1):
                dh.add_(dys[:, t] if dy is None else next(dy))
                g, d, n, dan_t = gates[:, t], dg[:, t], ns[:, t], dan[:, t]
                r, z, ghn = g[:, :H], g[:, H:2 * H], g[:, 2 * H:]
                h_prev = ys[:, t - 1] if t > 0 else h0
                torch.mul(z, dh, out=zdh)                      # dh through z * h
                torch.sub(h_prev, n, out=tmp)                  # dz = dh * (h - n)
                tmp.mul_(dh)
                dh.sub_(zdh)                                   # dn = dh * (1 - z)
                _tanh_backward(dh, n, grad_input=dan_t)
                _sigmoid_backward(tmp, z, grad_input=d[:, H:2 * H])
                torch.mul(dan_t, ghn, out=tmp)                 # dr = dan * ghn
                torch.mul(dan_t, r, out=d[:, 2 * H:])
                _sigmoid_backward(tmp, r, grad_input=d[:, :H])
                product(d, other=zdh, out=dh)
        del product                                        # its packed weight, before the peak below
        if ids is not None:                                # the table's gradient first, then dan can go
            # (index_add_ is fast on contiguous rows only: all of dg, then dan's columns over its third)
            d_in = _input_grad(dg, ids, ctx.table_shape)
            d_in[:, 2 * H:] = _input_grad(dan, ids, (ctx.table_shape[0], H))
            del dan, ns
        gw, gb = _weight_grads(dg, ys, h0, ctx.low)
        if ids is None:
            dg[:, :, 2 * H:].copy_(dan)                    # now the grad of gi: [dr, dz, dan]
            d_in = _input_grad(dg, None, ctx.table_shape)
        gw_out, gb_out = (None, None) if head is None else head.grads(dys, ys)
        return d_in, None, dh, gw, gb, None, gw_out, gb_out, None, None


def _compiled(t: torch.Tensor):
    """The compiled LSTM loops and GRU steps (:mod:`charrnn.native`) for float32 CPU tensors, or None (not built,
    turned off with ``CHARRNN_NATIVE=0``, or another dtype): then the ATen loops below run."""
    if not NATIVE or t.dtype != torch.float32:
        return None
    from charrnn import native
    return native.load()


class _DropoutFunction(torch.autograd.Function):
    """Dropout whose mask the compiled kernel derives from a seed and each element's index: the
    backward pass recomputes it instead of keeping a float mask, and generating it costs a
    fraction of ``bernoulli_`` (for the default model's output, 64 x 100 x 1024, about 7 ms a
    step instead of F.dropout's 85)."""

    @staticmethod
    def forward(ctx, x, p, seed, kernels):
        ctx.p, ctx.seed, ctx.kernels = p, seed, kernels
        return kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return ctx.kernels.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None, None


def _mask_seed() -> int:
    """A seed for the compiled dropout's mask, drawn from torch's default generator (so
    ``torch.manual_seed`` and a saved random state reproduce the masks)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``; float32 CPU tensors go through the compiled kernel (same
    distribution, a different mask for the same seed), everything else through ``F.dropout``.
    The kernel's seed is drawn from torch's default generator, so ``torch.manual_seed`` and a
    saved random state reproduce the masks."""
    if not training or p == 0:
        return x
    kernels = _compiled(x) if x.device.type == "cpu" else None
    if kernels is None:
        return F.dropout(x, p, training=True)
    return _DropoutFunction.apply(x.contiguous(), p, _mask_seed(), kernels)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    @_fp32
    def forward(ctx, gi, ids, h0, c0, w_hh, b_hh, low):
        ctx.table_shape, ctx.low = gi.shape, low
        kernels = _compiled(h0) if low is None else None     # the compiled loops multiply in float32
        ctx.set_materialize_grads(kernels is None)   # the compiled backward takes None for unused outputs
        if kernels is not None:
            x = gi if gi.stride(-1) == 1 else gi.contiguous()    # the one-hot table is w_ih.t() + b_ih
            gates, cs, tcs, ys = kernels.lstm_forward(x, ids, h0, c0, w_hh, b_hh)
            ctx.save_for_backward(ids, h0, c0, w_hh, gates, cs, tcs, ys)
            return ys, ys[:, -1].clone(), cs[:, -1].clone()
        inputs = _Inputs(gi, ids)
        T, B = inputs.T, inputs.B
        H = w_hh.shape[1]
        h0, c0 = h0.contiguous(), c0.contiguous()
        gates = h0.new_empty(B, T, 4 * H)    # activations [i, f, g, o]
        cs = h0.new_empty(B, T, H)
        tcs = h0.new_empty(B, T, H)
        ys = h0.new_empty(B, T, H)
        product = _Product(w_hh, B, low)
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
        ctx.save_for_backward(ids, h0, c0, w_hh, gates, cs, tcs, ys)
        return ys, ys[:, T - 1].clone(), cs[:, T - 1].clone()

    @staticmethod
    @_fp32
    def backward(ctx, dys, dhT, dcT):
        ids, h0, c0, w_hh, gates, cs, tcs, ys = ctx.saved_tensors
        # grad of the pre-activations (= of gi and of W_hh h + b_hh), over the activations
        # (each step's slot read first) unless the graph is kept.
        kernels = _compiled(h0) if ctx.low is None else None
        if kernels is not None:
            dg, dh, dc = kernels.lstm_backward(dys, dhT, dcT, gates, cs, tcs, c0, w_hh, not _keep_graph())
            gw, gb = _weight_grads(dg, ys, h0)
            return _input_grad(dg, ids, ctx.table_shape), None, dh, dc, gw, gb, None
        B, T, _ = gates.shape
        H = h0.shape[1]
        dg = gates if not _keep_graph() else torch.empty_like(gates)
        dh = dhT.contiguous().clone()
        dc = dcT.contiguous().clone()
        tmp = torch.empty_like(dh)
        tmp2 = torch.empty_like(dh)
        product = _Product(w_hh.t(), B, ctx.low)
        for t in range(T - 1, -1, -1):
            dh.add_(dys[:, t])
            g, tc, d = gates[:, t], tcs[:, t], dg[:, t]
            i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
            c_prev = cs[:, t - 1] if t > 0 else c0
            torch.mul(dh, o, out=tmp)                      # dc += dh * o * (1 - tanh(c)^2)
            _tanh_backward(tmp, tc, grad_input=tmp)
            dc.add_(tmp)
            torch.mul(dh, tc, out=tmp)                     # do
            _sigmoid_backward(tmp, o, grad_input=d[:, 3 * H:])
            torch.mul(dc, gg, out=tmp)                     # di
            torch.mul(dc, i, out=tmp2)                     # dg
            _sigmoid_backward(tmp, i, grad_input=d[:, :H])
            _tanh_backward(tmp2, gg, grad_input=d[:, 2 * H:3 * H])
            torch.mul(dc, c_prev, out=tmp)                 # df
            dc.mul_(f)
            _sigmoid_backward(tmp, f, grad_input=d[:, H:2 * H])
            product(d, out=dh)
        del product                                        # its packed weight, before the peak below
        gw, gb = _weight_grads(dg, ys, h0, ctx.low)
        d_in = _input_grad(dg, ids, ctx.table_shape)
        return d_in, None, dh, dc, gw, gb, None


class _ElmanFunction(torch.autograd.Function):
    @staticmethod
    @_fp32
    def forward(ctx, gi, ids, h0, w_hh, b_hh, relu: bool, low):
        inputs = _Inputs(gi, ids)
        T, B = inputs.T, inputs.B
        h0 = h0.contiguous()
        ys = h0.new_empty(B, T, w_hh.shape[1])
        product = _Product(w_hh, B, low)
        h = h0
        for t in range(T):
            hn = ys[:, t]
            product(h, b_hh, out=hn)
            hn.add_(inputs.at(t))
            hn.relu_() if relu else hn.tanh_()
            h = hn
        ctx.relu, ctx.low = relu, low
        ctx.table_shape = gi.shape
        ctx.save_for_backward(ids, h0, w_hh, ys)
        return ys, ys[:, T - 1].clone()

    @staticmethod
    @_fp32
    def backward(ctx, dys, dhT):
        ids, h0, w_hh, ys = ctx.saved_tensors
        T = ys.shape[1]
        dg = torch.empty_like(ys)          # ys itself is still needed for the weight gradient
        dh = dhT.contiguous().clone()
        product = _Product(w_hh.t(), ys.shape[0], ctx.low)
        for t in range(T - 1, -1, -1):
            dh.add_(dys[:, t])
            if ctx.relu:
                torch.mul(dh, ys[:, t] > 0, out=dg[:, t])
            else:
                _tanh_backward(dh, ys[:, t], grad_input=dg[:, t])
            product(dg[:, t], out=dh)
        del product                                        # its packed weight, before the peak below
        gw, gb = _weight_grads(dg, ys, h0, ctx.low)
        d_in = _input_grad(dg, ids, ctx.table_shape)
        return d_in, None, dh, gw, gb, None, None


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
        return _GRUFunction.apply(gi, ids, h0, w_hh, b_hh, low, *head)
    if mode == "lstm":
        return _LSTMFunction.apply(gi, ids, h0, c0, w_hh, b_hh, low)
    return _ElmanFunction.apply(gi, ids, h0, w_hh, b_hh, mode == "rnn_relu", low)


def head_usable(rnn: nn.RNNBase, head: nn.Linear, p: float) -> bool:
    """Whether :func:`rnn_forward` can fold ``head(dropout(output, p))`` into ``rnn``'s last layer
    (``head=``): a GRU, the same dtype, and for ``p`` > 0 the compiled dropout."""
    w = rnn.weight_hh_l0
    return (_mode(rnn) == "gru" and head.bias is not None and head.weight.dtype == w.dtype
            and (p == 0 or _compiled(w) is not None))


def rnn_forward(rnn: nn.RNNBase, x: torch.Tensor | None, state=None, *, gi0: torch.Tensor | None = None,
                table: torch.Tensor | None = None, ids: torch.Tensor | None = None, weight_drop: float = 0.0,
                head: nn.Linear | None = None, head_dropout: float = 0.0):
    """``rnn(x, state)`` for a unidirectional ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with biases,
    3-D input, computed with the functions above.  Same return value as the module, except that
    with ``head`` (see :func:`head_usable`) the output is ``head(dropout(y, head_dropout))``,
    batch-major (B, T, out), computed inside the last layer (its backward never makes the
    outputs' gradient for all steps at once; the dropout masks differ from :func:`dropout`'s).

    The first layer's input projection may be given instead of ``x`` (which is then ignored):
    ``gi0``, time-major (T, B, G*H) (see :func:`embedded_projection`), or ``table`` (vocab, G*H)
    and ``ids`` (B, T), looked up one step at a time (never materialised for all steps).
    ``weight_drop`` > 0 runs each layer with :func:`dropout` applied to its ``weight_hh``
    (DropConnect: one mask for the whole forward)."""
    mode = _mode(rnn)
    if mode is None:
        raise TypeError(f"fast_rnn does not handle {type(rnn).__name__}")
    if head is not None and not head_usable(rnn, head, head_dropout):
        raise ValueError("fast_rnn: this output layer cannot be folded in (see head_usable)")
    L, H = rnn.num_layers, rnn.hidden_size
    if table is not None:
        B, T = ids.shape
        ref = table
    elif gi0 is not None:
        T, B = gi0.shape[:2]
        ref = gi0
    else:
        T, B = (x.shape[1], x.shape[0]) if rnn.batch_first else x.shape[:2]
        ref = x
    if T == 0:
        raise ValueError("fast_rnn: empty sequence")
    # Under bf16 autocast (see supported), the recurrent products run in bf16 and the rest in float32.
    low = torch.bfloat16 if _autocast_on("cpu") else None
    dtype = rnn.weight_hh_l0.dtype
    if mode == "lstm":
        h0, c0 = state if state is not None else (None, None)
    else:
        h0, c0 = state, None
    h0 = ref.new_zeros(L, B, H, dtype=dtype) if h0 is None else h0.to(dtype)
    if mode == "lstm":
        c0 = ref.new_zeros(L, B, H, dtype=dtype) if c0 is None else c0.to(dtype)
    hs, cs = [], []
    inp = None                                              # the previous layer's output, (B, T, H)
    for layer in range(L):
        w_hh = dropout(getattr(rnn, f"weight_hh_l{layer}"), weight_drop)
        b_hh = getattr(rnn, f"bias_hh_l{layer}")
        lookup = None
        if layer == 0 and table is not None:
            gi, lookup = table, ids
        elif layer == 0 and gi0 is not None:
            gi = gi0
        else:
            w_ih, b_ih = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"bias_ih_l{layer}")
            if layer > 0:
                gi = F.linear(inp, w_ih, b_ih).transpose(0, 1)
            elif rnn.batch_first:
                gi = F.linear(x, w_ih, b_ih).transpose(0, 1)   # projecting before transposing: no copy of x
            else:
                gi = F.linear(x, w_ih, b_ih)
        fold = ()
        if head is not None and layer == L - 1:
            fold = (head.weight, head.bias, float(head_dropout), _mask_seed() if head_dropout > 0 else 0)
        out = _layer(mode, gi, lookup, h0[layer], c0[layer] if c0 is not None else None, w_hh, b_hh, low, fold)
        inp = out[0]
        hs.append(out[1])
        if mode == "lstm":
            cs.append(out[2])
        if layer < L - 1 and rnn.dropout > 0 and rnn.training:
            inp = dropout(inp, rnn.dropout)
    y = inp if rnn.batch_first or head is not None else inp.transpose(0, 1)
    h_n = torch.stack(hs)
    return (y, (h_n, torch.stack(cs))) if mode == "lstm" else (y, h_n)
