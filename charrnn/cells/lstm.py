"""The LSTM (``nn.LSTM``, PyTorch's equations; gate blocks ``[i, f, g, o]``; state ``h`` and ``c``)."""

from __future__ import annotations

import torch
from torch import nn

from .rnn import tanh_


def build(cell, input_size: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    return nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True, dropout=dropout)


def step(cell, gi: torch.Tensor, gh: torch.Tensor, state: tuple) -> tuple:
    h, c = state
    H = h.shape[1]
    g = torch.add(gi, gh)                 # [i, f, g, o]
    g[:, 2 * H:3 * H].mul_(2)
    g.sigmoid_()
    g[:, 2 * H:3 * H].mul_(2).sub_(1)
    c = torch.mul(g[:, H:2 * H], c).add_(torch.mul(g[:, :H], g[:, 2 * H:3 * H]))
    h = torch.mul(g[:, 3 * H:], tanh_(c.clone()))
    return h, c


def onnx(cell, g, gi: str, gh: str, state: tuple, split: str) -> tuple:
    _, c = state
    ig, fg, gg, og = g.op("Split", g.op("Add", gi, gh), split, axis=1, outputs=4)
    c = g.op("Add", g.op("Mul", g.op("Sigmoid", fg), c), g.op("Mul", g.op("Sigmoid", ig), g.op("Tanh", gg)))
    return g.op("Mul", g.op("Sigmoid", og), g.op("Tanh", c)), c
