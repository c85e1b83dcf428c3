"""Dropout: the compiled hashed-mask kernel beside the reference, ``F.dropout``.

The compiled kernel (:mod:`charrnn.native`) derives each element's mask from a seed and the element's
index: the backward recomputes it instead of keeping a float mask, and generating it costs a fraction
of ``bernoulli_``.  Same distribution as ``F.dropout``, different masks for the same seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backend


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed, kernels):
        ctx.p, ctx.seed, ctx.kernels = p, seed, kernels
        return kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return ctx.kernels.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None, None


def mask_seed() -> int:
    """A seed for the compiled dropout's mask, drawn from torch's default generator (so
    ``torch.manual_seed`` and a saved random state reproduce the masks)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``; float32 CPU tensors go through the compiled kernel when the
    backend allows it (same distribution, a different mask for the same seed), everything else
    through ``F.dropout``.  The kernel's seed comes from :func:`mask_seed`."""
    if not training or p == 0:
        return x
    kernels = backend.kernels(x) if x.device.type == "cpu" else None
    if kernels is None:
        return F.dropout(x, p, training=True)
    return _DropoutFunction.apply(x.contiguous(), p, mask_seed(), kernels)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
