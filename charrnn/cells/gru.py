"""The GRU (``nn.GRU``, PyTorch's equations; gate blocks ``[r, z, n]``)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import gru
from .rnn import tanh_


def build(cell, input_size: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    return nn.GRU(input_size, hidden, num_layers=layers, batch_first=True, dropout=dropout)


def step(cell, gi: torch.Tensor, gh: torch.Tensor, state: tuple) -> tuple:
    """The gate arithmetic training's reference loop shares (:func:`charrnn.ops.gru.cell`), with a contiguous
    ``rz`` and tanh as :func:`~charrnn.cells.rnn.tanh_`."""
    h, = state
    rz, n, h_out = h.new_empty(h.shape[0], 2 * h.shape[1]), torch.empty_like(h), torch.empty_like(h)
    return (gru.cell(gi, gh, h, n, h_out, rz, tanh_),)


def onnx(cell, g, gi: str, gh: str, state: tuple, split: str) -> tuple:
    h, = state
    i_r, i_z, i_n = g.op("Split", gi, split, axis=1, outputs=3)
    h_r, h_z, h_n = g.op("Split", gh, split, axis=1, outputs=3)
    r = g.op("Sigmoid", g.op("Add", i_r, h_r))
    z = g.op("Sigmoid", g.op("Add", i_z, h_z))
    n = g.op("Tanh", g.op("Add", i_n, g.op("Mul", r, h_n)))
    return (g.op("Add", n, g.op("Mul", z, g.op("Sub", h, n))),)  # (1 - z) * n + z * h, as torch.lerp
