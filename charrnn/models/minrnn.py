"""minGRU and minLSTM (Feng et al., "Were RNNs All We Needed?", 2024): recurrent cells whose gates read
the input only.

Each layer is ``h_t = a_t * h_{t-1} + b_t`` with ``a_t``, ``b_t`` functions of ``x_t`` alone, so a
whole sequence is computed at once by a parallel scan in log space (Heinsen, 2023) instead of one step
after another; sampling still costs one small step per character (:func:`step`, the plain sequential
reference the scan is tested against).

- minGRU: ``z = σ(W_z x)``, ``h̃ = g(W_h x)``, ``h_t = (1 - z) h_{t-1} + z h̃``.
- minLSTM: ``f = σ(W_f x)``, ``i = σ(W_i x)``, ``h̃ = g(W_h x)``, ``h_t = (f h_{t-1} + i h̃) / (f + i)``.

``g(x) = x + 1/2`` for ``x >= 0`` and ``σ(x)`` below keeps every state positive (the log-space scan
needs it).  Weights are named as PyTorch's recurrent modules name theirs (``weight_ih_l{i}``,
``bias_ih_l{i}``; gate blocks ``[z, h̃]`` / ``[f, i, h̃]``), so the input table and the exporter read them
the same way; there are no ``weight_hh``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

def g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def step(mode: str, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One step from the input projection ``gi`` ``(batch, gates * hidden)`` and ``h`` ``(batch, hidden)``."""
    if mode == "mingru":
        z, k = gi.chunk(2, -1)
        z = torch.sigmoid(z)
        return (1 - z) * h + z * g(k)
    f, i, k = gi.chunk(3, -1)
    f, i = torch.sigmoid(f), torch.sigmoid(i)
    return (f * h + i * g(k)) / (f + i)


def scan(mode: str, gi: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """Every step's ``h`` ``(batch, time, hidden)`` from ``gi`` ``(batch, time, gates * hidden)``, at once:
    ``log h_t = log(h_0 e^{A_t} + Σ_{k<=t} b_k e^{A_t - A_k})`` with ``A_t = Σ_{k<=t} log a_k``.

    In float32 (float64 stays float64) under autocast too: the rounding error of the cumulative sums grows
    with the position, and in bf16 it passes 100% within a few hundred steps."""
    with torch.autocast(gi.device.type, enabled=False):
        dtype = torch.promote_types(gi.dtype, torch.float32)
        return _scan(mode, gi.to(dtype), None if h0 is None else h0.to(dtype))


def _scan(mode: str, gi: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    if mode == "mingru":
        z, k = gi.chunk(2, -1)
        log_a, log_b = -F.softplus(z), -F.softplus(-z) + log_g(k)
    else:
        f, i, k = gi.chunk(3, -1)
        diff = F.softplus(-f) - F.softplus(-i)
        log_a, log_b = -F.softplus(diff), -F.softplus(-diff) + log_g(k)
    a_star = log_a.cumsum(1)
    log_h = a_star + torch.logcumsumexp(log_b - a_star, dim=1)
    if h0 is not None:
        log_h = torch.logaddexp(log_h, a_star + h0.clamp_min(torch.finfo(h0.dtype).tiny).log()[:, None])
    return log_h.exp()


class MinRNN(nn.Module):
    """A stack of minGRU or minLSTM layers with the interface of ``nn.GRU(batch_first=True)``:
    ``forward(x (batch, time, in), h0 (layers, batch, hidden) | None) -> (output, h_n)``; ``dropout``
    between layers while training."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.mode, self.hidden_size, self.num_layers, self.dropout = mode, hidden_size, num_layers, dropout
        gates = 2 if mode == "mingru" else 3
        bound = 1 / math.sqrt(hidden_size)
        for i in range(num_layers):
            width = input_size if i == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{i}",
                                    nn.Parameter(torch.empty(gates * hidden_size, width).uniform_(-bound, bound)))
            self.register_parameter(f"bias_ih_l{i}", nn.Parameter(torch.empty(gates * hidden_size).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        finals = []
        for i in range(self.num_layers):
            if i and self.training and self.dropout:
                x = F.dropout(x, self.dropout)
            gi = F.linear(x, getattr(self, f"weight_ih_l{i}"), getattr(self, f"bias_ih_l{i}"))
            x = scan(self.mode, gi, None if h0 is None else h0[i])
            finals.append(x[:, -1])
        return x, torch.stack(finals)
