"""The recurrent cells: one :class:`Cell` line each, what every layer of charrnn reads about an architecture.

A cell's description (its name, gate blocks, state tensors, whether its gates read the input only, its
compiled step) is torch-free, so the option parser and the ONNX runtime read it without torch.  What
needs torch lives in the cell's own module, named by ``impl`` and imported on first use
(:meth:`Cell.impl`); it defines three functions:

``build(cell, input_size, hidden, layers, dropout) -> nn.Module``
    the recurrent stack :class:`charrnn.models.CharLM` runs, with the interface of
    ``nn.GRU(batch_first=True)``: ``forward(x (batch, time, in), state) -> (output, state)``, ``state``
    ``(layers, batch, hidden)`` for one state tensor, a tuple of those (in ``cell.state``'s order, ``h``
    first) for several, ``None`` meaning zeros; its weights named as PyTorch names them
    (``weight_ih_l{i}``, ``bias_ih_l{i}`` of ``gates * hidden`` rows, and ``weight_hh_l{i}``,
    ``bias_hh_l{i}`` unless ``input_only``).
``step(cell, gi, gh, state) -> state``
    one step of one layer for :class:`charrnn.stepper.Stepper`'s PyTorch step: ``gi`` the input
    projection ``(batch, gates * hidden)``, ``gh`` the recurrent one (``None`` for input-only cells),
    ``state`` the layer's state tensors ``(batch, hidden)`` in ``cell.state``'s order (contiguous; they
    may be overwritten); returns the new ones, ``h`` first.  A cell with a compiled step (``native``)
    does exactly the operations of ``csrc/step.cpp``, in its order.
``onnx(cell, g, gi, gh, state, split) -> state``
    the same step as ONNX nodes (:mod:`charrnn.export`'s ``g.op(type, *inputs, outputs=n, **attrs)``
    and ``g.const(name, value)``, each returning output names), over the names of ``gi``, ``gh``,
    the state tensors, and ``split``, a constant of ``gates`` times ``hidden`` for ``Split``.

Adding a cell: its module and one line in :data:`CELLS` (or :func:`register` from elsewhere).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CharRNNError


@dataclass(frozen=True)
class Cell:
    name: str                       # the --arch value
    gates: int                      # gate blocks of the weights: W_ih has gates * hidden rows
    impl: str                       # the module with build(), step() and onnx()
    state: tuple[str, ...] = ("h",)  # the state tensors, the output h first; the ONNX inputs and *_out outputs
    input_only: bool = False        # gates read the input only: no recurrent weights (weight_hh)
    native: int | None = None       # the cell's id in the compiled sampling step (csrc/step.cpp), if it has one

    def impl_module(self):
        """The module with the cell's torch parts (imported on first use)."""
        return importlib.import_module(self.impl)


CELLS: dict[str, Cell] = {c.name: c for c in (
    Cell("gru", gates=3, impl="charrnn.cells.gru", native=0),
    Cell("lstm", gates=4, impl="charrnn.cells.lstm", state=("h", "c"), native=1),
    Cell("rnn", gates=1, impl="charrnn.cells.rnn", native=2),
    Cell("mingru", gates=2, impl="charrnn.cells.minrnn", input_only=True),
    Cell("minlstm", gates=3, impl="charrnn.cells.minrnn", input_only=True),
)}


def cell(name: str) -> Cell:
    """The cell ``name`` (an ``--arch`` value)."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise CharRNNError(f"unknown recurrent cell {name!r}; known: {', '.join(CELLS)}") from None


def register(new: Cell) -> Cell:
    """Add a cell (e.g. one defined outside charrnn); :func:`unregister` removes it again."""
    if new.name in CELLS:
        raise ValueError(f"a cell named {new.name!r} is registered already")
    if new.native is not None and any(c.native == new.native for c in CELLS.values()):
        raise ValueError(f"native id {new.native} belongs to another cell")
    CELLS[new.name] = new
    return new


def unregister(name: str) -> None:
    del CELLS[name]


class _Names(Sequence):
    """The registered cells' names, in order, as the registry holds them now (the ``--arch`` choices)."""

    def __getitem__(self, i):
        return tuple(CELLS)[i]

    def __len__(self) -> int:
        return len(CELLS)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in CELLS

    def __iter__(self):
        return iter(tuple(CELLS))

    def __repr__(self) -> str:
        return repr(tuple(CELLS))


ARCHS: Sequence[str] = _Names()
