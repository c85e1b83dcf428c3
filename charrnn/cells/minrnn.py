"""minGRU and minLSTM: gates on the input only (:mod:`charrnn.models.minrnn` holds the equations, the
parallel scan and the step)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models import minrnn


def build(cell, input_size: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    return minrnn.MinRNN(cell.name, input_size, hidden, num_layers=layers, dropout=dropout)


def step(cell, gi: torch.Tensor, gh: None, state: tuple) -> tuple:
    return (minrnn.step(cell.name, gi, state[0]),)


def onnx(cell, g, gi: str, gh: None, state: tuple, split: str) -> tuple:
    h, = state
    parts = g.op("Split", gi, split, axis=1, outputs=cell.gates)
    k = parts[-1]
    zero, half = g.const(f"zero_{len(g.nodes)}", np.float32(0)), g.const(f"half_{len(g.nodes)}", np.float32(0.5))
    cand = g.op("Where", g.op("GreaterOrEqual", k, zero), g.op("Add", k, half), g.op("Sigmoid", k))
    if cell.name == "mingru":
        z = g.op("Sigmoid", parts[0])
        return (g.op("Add", h, g.op("Mul", z, g.op("Sub", cand, h))),)          # (1 - z) h + z h~
    f, i = g.op("Sigmoid", parts[0]), g.op("Sigmoid", parts[1])
    return (g.op("Div", g.op("Add", g.op("Mul", f, h), g.op("Mul", i, cand)), g.op("Add", f, i)),)
