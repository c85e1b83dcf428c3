"""The character language model: embedding (or one-hot) -> recurrent stack -> logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cells, ops
from ..config import ARCHS, ModelConfig  # noqa: F401 (re-exported)

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CharLM(nn.Module):
    """``forward(ids (batch, time), state) -> (logits (batch, time, vocab), state)``.

    The recurrent stack is the one ``config.arch``'s cell builds (:mod:`charrnn.cells`): ``nn.GRU`` /
    ``nn.LSTM`` / ``nn.RNN`` (fused kernels, cuDNN on GPU), or a minGRU / minLSTM stack
    (:mod:`charrnn.models.minrnn`, a parallel scan over time).  ``state`` is ``(layers, batch, hidden)``,
    or a tuple of those for a cell with several state tensors (LSTM's ``(h, c)``); ``None`` means zeros.
    Dropout (if any) is applied between recurrent layers and to the output of the last one, not to the embedding (which keeps the first layer's input projection a
    table lookup on the CPU training path).  ``weight_drop`` drops entries of the recurrent
    weights (``weight_hh``), one mask per forward shared by every step and sequence
    (DropConnect, as in AWD-LSTM): it regularises the recurrence itself, which output dropout
    does not reach.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed) if c.embed else None
        in_size = c.embed or c.vocab_size
        dropout = c.dropout if c.layers > 1 else 0.0
        cell = cells.cell(c.arch)
        self.rnn = cell.impl_module().build(cell, in_size, c.hidden, c.layers, dropout)
        self.drop = ops.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)
        # A labelled model (charrnn.labels) reads ids in label space: label * vocab_size + id.
        self.label_embedding = (nn.Embedding(c.n_labels, in_size)
                                if c.n_labels and c.label_on in ("input", "both") else None)
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)     # every label starts as the plain model
        n_state = len(cell.state)
        self.initial_state = (nn.Parameter(torch.zeros(c.n_labels, n_state, c.layers, c.hidden))
                              if c.n_labels and c.label_on in ("state", "both") else None)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The first layer's inputs for ``ids`` (label-space ids of a labelled model: its label embedding added)."""
        v = self.config.vocab_size
        chars = ids % v if self.config.n_labels else ids
        x = (F.one_hot(chars, v).to(self.head.weight.dtype) if self.embedding is None else self.embedding(chars))
        if self.label_embedding is not None:
            x = x + self.label_embedding(ids // v).to(x.dtype)
        return x

    def labelled_state(self, ids: torch.Tensor, state: State | None) -> State | None:
        """The state a labelled model starts from: each row's label's learned initial state (``state`` None and
        the label read on the state), else ``state``."""
        if state is not None or self.initial_state is None:
            return state
        h0 = self.initial_state[ids[:, 0] // self.config.vocab_size]      # (batch, states, layers, hidden)
        parts = tuple(h0[:, k].transpose(0, 1).contiguous() for k in range(h0.shape[1]))
        return parts if len(parts) > 1 else parts[0]

    def forward(self, ids: torch.Tensor, state: State | None = None, last_only: bool = False,
                features: bool = False) -> tuple[torch.Tensor, State]:
        """Logits (batch, time, vocab), or (batch, 1, vocab) for the last position only with
        ``last_only`` (the output layer then runs on that position alone), and the final state.
        ``features``: the output layer's inputs (batch, time, hidden) instead of its logits (dropout
        applied), for a loss that uses the output layer its own way (sampled softmax)."""
        # CPU training goes through charrnn.ops (same parameters, same results,
        # batched weight gradients; under bf16 autocast, bf16 recurrent products), and so does
        # validation (ops.evaluation()); GPU (cuDNN) and other no_grad inference (sampling)
        # keep self.rnn.
        wd = self.config.weight_drop if self.training else 0.0
        state = self.labelled_state(ids, state)
        if self._fast_lookup(ids):
            # The output layer (and its dropout) goes inside the last layer's backward, unless only
            # the last position is wanted.
            p = self.drop.p if self.training else 0.0
            fold = not last_only and not features and ops.head_usable(self.rnn, self.head, p)
            y, state = ops.rnn_forward(self.rnn, None, state, table=self.input_projection(), ids=ids,
                                       weight_drop=wd, head=self.head if fold else None, head_dropout=p)
            if fold:
                return y, state
        else:
            x = self.embed_ids(ids)
            if ops.usable(self.rnn, x):
                y, state = ops.rnn_forward(self.rnn, x, state, weight_drop=wd)
            elif wd:
                dropped = {name: ops.dropout(w, wd) for name, w in self.rnn.named_parameters()
                           if name.startswith("weight_hh")}
                y, state = torch.func.functional_call(self.rnn, dropped, (x, state))
            else:
                y, state = self.rnn(x, state)
        if last_only:
            # The last layer's final h is the output at the last position; taking it from the state
            # leaves the output sequence unused, so its gradient is never materialised.
            h_n = state[0] if isinstance(state, tuple) else state
            y = h_n[-1].unsqueeze(1)
        y = self.drop(y)
        return (y if features else self.head(y)), state

    def _fast_lookup(self, ids: torch.Tensor) -> bool:
        """Fast path with the first projection as a vocab-table lookup."""
        return (ids.dim() == 2
                and ops.supported(self.rnn, ids.device, self.rnn.weight_ih_l0.dtype))

    def input_projection(self) -> torch.Tensor:
        """The first layer's input projection of every id, (vocab, gates * hidden); of a labelled model, of every
        label-space id (labels * vocab rows: each label's projection added to every id's)."""
        w = self.embedding.weight if self.embedding is not None else None
        table = ops.input_table(self.rnn.weight_ih_l0, self.rnn.bias_ih_l0, w)
        if not self.config.n_labels:
            return table
        if self.label_embedding is None:
            return table.repeat(self.config.n_labels, 1)
        shift = F.linear(self.label_embedding.weight.to(table.dtype), self.rnn.weight_ih_l0.to(table.dtype))
        return (shift[:, None, :] + table[None]).reshape(-1, table.shape[1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_state(self, batch: int, device=None, dtype=None) -> State:
        c = self.config
        h = torch.zeros(c.layers, batch, c.hidden, device=device or self.head.weight.device,
                        dtype=dtype or self.head.weight.dtype)
        n = len(cells.cell(c.arch).state)
        return h if n == 1 else (h, *(h.clone() for _ in range(n - 1)))

    def summary(self) -> str:
        c = self.config
        rows = []
        if self.embedding is not None:
            rows.append((f"embedding {c.vocab_size} x {c.embed}", self.embedding.weight.numel()))
        else:
            rows.append((f"one-hot inputs ({c.vocab_size})", 0))
        rows.append((f"{c.arch.upper()} {c.layers} x {c.hidden}" + (f", dropout {c.dropout}" if c.dropout else "")
                     + (f", weight drop {c.weight_drop}" if c.weight_drop else ""),
                     sum(p.numel() for p in self.rnn.parameters())))
        rows.append((f"linear {c.hidden} -> {c.vocab_size}", sum(p.numel() for p in self.head.parameters())))
        if c.n_labels:
            rows.append((f"{c.n_labels} labels, on the {c.label_on}", c.label_parameters()))
        width = max(len(r[0]) for r in rows)
        lines = [f"  {name:<{width}}  {n:>12,}" for name, n in rows]
        lines.append(f"  {'total parameters':<{width}}  {self.num_parameters():>12,}")
        return "\n".join(lines)
