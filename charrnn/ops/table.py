"""The first layer's input projection as a table: one row per token id.

:func:`input_table` is the one place that folds the embedding (or the one-hot inputs) into the first
recurrent layer's input weights; training (:mod:`charrnn.ops.rnn`), the sampling step
(:class:`charrnn.stepper.Stepper`) and the ONNX export all use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    as rows of :func:`input_table`.  (:func:`charrnn.ops.rnn_forward` with ``table=`` and ``ids=``
    looks the rows up one step at a time instead, without this (T, B, G*H) tensor.)"""
    return F.embedding(ids.t(), input_table(w_ih, b_ih, embedding))


class Inputs:
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


def input_grad(dg: torch.Tensor, ids: torch.Tensor | None, table_shape):
    """The gradient of gi, a (T, B, G*H) view of the batch-major ``dg``, or of the table."""
    if ids is None:
        return dg.transpose(0, 1)
    return dg.new_zeros(table_shape).index_add_(0, ids.reshape(-1), dg.reshape(-1, dg.shape[-1]))
