"""The one-step cell generation runs: a hand-written step of the model's cell (:mod:`charrnn.cells`) over a
:class:`CharLM`'s own weights, in fp32 or int8, as one call into the compiled module (:mod:`charrnn.native`)
for the cells that have one (GRU / LSTM / RNN) or as the PyTorch operations it is tested against.

Its first layer's input projection is folded into a ``(vocab, gates * hidden)`` table (embedding @ W_ih +
b_ih), so a step is a row lookup, one matrix-vector product per layer and the output layer, for all
samples of the batch at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cells, native, ops
from .errors import CharRNNError
from .models.charlm import CharLM, State

WEIGHT_FORMATS = ("fp32", "int8")
BACKENDS = ("auto", "native", "python")

# int8 weights and activations use 63 levels either side of zero (7 bits): the range in which the
# AVX2 kernels of charrnn/native.py can neither saturate nor overflow.  Their products are summed
# exactly in fp32 while every partial sum stays below 2**24.
_LEVELS = 63
_EXACT_FP32_COLUMNS = (1 << 24) // (_LEVELS * _LEVELS)


class _Linear:
    """``x -> x @ W.T + b``, in fp32 or with int8 weights.

    int8: weights in [-63, 63] with one scale per output row (``max |W_row| / 63``); each input
    row (sample) is quantised on the fly to [-63, 63] with its own scale (``max |x_row| / 63``,
    round half to even); the products are summed exactly, then ``acc * (scale_x * scale_w) + b``
    in fp32.  The pure-PyTorch version here sums the integer-valued products in fp32 (exact up
    to 4227 columns, fp64 beyond); the compiled one (:mod:`charrnn.native`) in integers: the
    same numbers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, int8: bool):
        self.int8 = int8
        self.b = bias.detach().float().contiguous()
        w = weight.detach().float()
        if not int8:
            self.w = w.contiguous()
            return
        self.sw = w.abs().amax(1) / _LEVELS
        self.q = torch.round(w / self.sw.clamp_min(1e-30)[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
        self._acc_dtype = torch.float32 if w.shape[1] <= _EXACT_FP32_COLUMNS else torch.float64
        self._qf = None

    def native_parts(self) -> list:
        """The weights as charrnn/native.py takes them: fp32 ``[w, b]``, or int8 ``[packed (blocks of 8
        rows, a multiple of 4; column quads, an even number; 8 x 4 bytes), 63 * row sums (int32),
        scales, bias]``."""
        if not self.int8:
            return [self.w, self.b]
        n, k = self.q.shape
        nb, quads = -(-n // 32) * 4, -(-k // 8) * 2
        w = torch.zeros(nb * 8, quads * 4, dtype=torch.int8)
        w[:n, :k] = self.q.cpu()
        packed = w.view(nb, 8, quads, 4).permute(0, 2, 1, 3).contiguous().view(nb, quads, 32)
        comp = _LEVELS * w.sum(1, dtype=torch.int32)
        return [packed, comp, self.sw.cpu().contiguous(), self.b.cpu()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return torch.addmm(self.b, x, self.w.t())
        if self._qf is None:
            self._qf = self.q.to(self._acc_dtype)
        m = x.abs().amax(1, keepdim=True)
        levels = torch.tensor(float(_LEVELS), device=x.device)
        inv = torch.where(m > 0, levels / m, torch.zeros((), device=x.device))
        xq = torch.round(x * inv)
        acc = torch.mm(xq.to(self._acc_dtype), self._qf.t()).float()
        return acc.mul_((m / levels) * self.sw).add_(self.b)


class Stepper:
    """One character at a time from a :class:`CharLM`'s weights.

    ``step(ids (batch,), state) -> (logits (batch, vocab), state)`` with ``state`` a list of
    per-layer ``(batch, hidden)`` tensors (tuples for a cell with several state tensors: ``(h, c)`` for
    LSTM); every call returns new tensors (callers may keep old states).

    The first layer's input projection is folded into a ``(vocab, gates * hidden)`` table, so
    a step is a row lookup, one matrix product per layer and the output layer.  On the CPU
    the whole step runs as one call into a small compiled extension (:mod:`charrnn.native`)
    when it can be built; otherwise the same arithmetic runs as PyTorch operations, with
    bit-identical results.  ``backend`` forces one (``"native"`` raises when it is unavailable).
    """

    def __init__(self, model: CharLM, weights: str = "fp32", backend: str = "auto"):
        """``weights="int8"`` runs the matrix products with int8 weights (per-row scales,
        activations quantised per sample): 4x less memory to stream per character."""
        if weights not in WEIGHT_FORMATS:
            raise CharRNNError(f"sampling weights must be one of {', '.join(WEIGHT_FORMATS)}, got '{weights}'")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        c = model.config
        self.arch, self.layers, self.hidden, self.weights = c.arch, c.layers, c.hidden, weights
        self.vocab_size = c.vocab_size
        self.cell = cells.cell(c.arch)
        self._states = len(self.cell.state)      # state tensors per layer: 1 a tensor, more a tuple
        self._cell_step = self.cell.impl_module().step
        rnn = model.rnn
        int8 = weights == "int8"
        with torch.no_grad():
            self.table = model.input_projection().float().contiguous()
            self.lin_ih = [None] + [_Linear(getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"), int8)
                                    for i in range(1, c.layers)]
            self.lin_hh = [] if self.cell.input_only else [
                _Linear(getattr(rnn, f"weight_hh_l{i}"), getattr(rnn, f"bias_hh_l{i}"), int8) for i in range(c.layers)]
            self.head = _Linear(model.head.weight, model.head.bias, int8)
        self._native = None
        if backend != "python":
            self._native = self._build_native()
            if self._native is None and backend == "native":
                off = not ops.backend.current().native
                raise CharRNNError("the compiled sampling step is unavailable: "
                                   + ("it is turned off (CHARRNN_NATIVE=0 or charrnn.ops.use(native=False))" if off
                                      else native.error() or "it needs a CPU model"))
        self.backend = "native" if self._native is not None else "python"

    def _build_native(self):
        if self.table.device.type != "cpu" or self.cell.native is None:     # no compiled step: the PyTorch one
            return None
        module = ops.backend.compiled()
        if module is None:
            return None
        ih = [[]] + [lin.native_parts() for lin in self.lin_ih[1:]]
        hh = [lin.native_parts() for lin in self.lin_hh]
        return module.Step(self.cell.native, self.hidden, self.table, ih, hh, self.head.native_parts(),
                           self.table.shape[0])

    def add_block(self, block: torch.Tensor) -> int:
        """Append ``vocab_size`` rows to the input table (a mix of a labelled model's labels, :mod:`charrnn.labels`)
        and rebuild the compiled step over it; the block's index (its ids are ``index * vocab_size + id``)."""
        self.table = torch.cat([self.table, block.to(self.table)]).contiguous()
        if self._native is not None:
            self._native = self._build_native()
        return self.table.shape[0] // self.vocab_size - 1

    def from_module_state(self, state: State) -> list:
        if self._states > 1:
            return [tuple(t[i] for t in state) for i in range(self.layers)]
        return [state[i] for i in range(self.layers)]

    def to_module_state(self, state: list) -> State:
        if self._states > 1:
            return tuple(torch.stack(parts) for parts in zip(*state))
        return torch.stack(state)

    def step(self, ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        if self._native is not None:
            n = self._states
            if n > 1:
                logits, flat = self._native.step(ids, [t for layer in state for t in layer])
                return logits, list(zip(*(flat[k::n] for k in range(n))))
            logits, new_state = self._native.step(ids, list(state))
            return logits, new_state
        return self._python_step(ids, state)

    def _python_step(self, ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """The step in PyTorch operations: per layer the input and recurrent products here and the cell's
        ``step()``; charrnn/native.py does exactly these, in this order."""
        new_state = []
        x = None
        for i in range(self.layers):
            gi = F.embedding(ids, self.table) if i == 0 else self.lin_ih[i](x)
            layer = tuple(t.contiguous() for t in (state[i] if self._states > 1 else (state[i],)))
            gh = self.lin_hh[i](layer[0]) if self.lin_hh else None
            layer = self._cell_step(self.cell, gi, gh, layer)
            new_state.append(layer if self._states > 1 else layer[0])
            x = layer[0]
        return self.head(x), new_state
