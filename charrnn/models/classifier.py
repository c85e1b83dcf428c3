"""A sequence classifier: embedding -> GRU over the real (unpadded) characters -> one logit.

Variable-length batches are padded with id 0 and packed
(:func:`torch.nn.utils.rnn.pack_padded_sequence`), so the GRU's final state is the state
after each sequence's own last character; padding never reaches the recurrent layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..errors import CharRNNError


@dataclass
class ClassifierConfig:
    vocab_size: int
    embed: int = 5
    hidden: int = 64

    def validate(self) -> "ClassifierConfig":
        for name in ("vocab_size", "embed", "hidden"):
            if int(getattr(self, name)) <= 0:
                raise CharRNNError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class SequenceClassifier(nn.Module):
    """``forward(ids (batch, time), lengths (batch,)) -> logits (batch,)`` (sigmoid gives P(class 1))."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config.validate()
        self.embedding = nn.Embedding(config.vocab_size, config.embed, padding_idx=0)
        self.rnn = nn.GRU(config.embed, config.hidden, batch_first=True)
        self.head = nn.Linear(config.hidden, 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1]).squeeze(-1)
