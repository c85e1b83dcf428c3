"""The Elman RNN (``nn.RNN``, tanh): ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``."""

from __future__ import annotations

import torch
from torch import nn


def tanh_(a: torch.Tensor) -> torch.Tensor:
    """``tanh(a)`` in place, as ``2 * sigmoid(2a) - 1`` (doubling is exact): the form the compiled sampling
    step uses because ATen's sigmoid costs a quarter of its tanh."""
    return a.mul_(2).sigmoid_().mul_(2).sub_(1)


def build(cell, input_size: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    return nn.RNN(input_size, hidden, num_layers=layers, batch_first=True, dropout=dropout)


def step(cell, gi: torch.Tensor, gh: torch.Tensor, state: tuple) -> tuple:
    return (tanh_(torch.add(gi, gh)),)


def onnx(cell, g, gi: str, gh: str, state: tuple, split: str) -> tuple:
    return (g.op("Tanh", g.op("Add", gi, gh)),)
