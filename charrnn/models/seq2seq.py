"""Character encoder-decoders: ``basic``, ``teacher-forcing`` and ``attention``.

All three encode the padded input (id 0 is padding) with an embedding and a GRU over
*packed* sequences, so every input's final encoder state is the state after its own last
character: inputs of any length work without padding them to the training length.

- ``basic``: the encoder's final state is repeated as the decoder's input at every output
  step (the decoder starts from zeros and never sees its own outputs).
- ``teacher-forcing``: the decoder starts from the encoder's final state and is fed the
  previous output character (the target shifted right behind a start id in training, its
  own prediction at inference).
- ``attention``: teacher forcing plus Luong attention ("general" score,
  ``score(h_t, e_s) = h_t . W e_s``): at every output step the decoder's state scores every
  encoder output, the softmax weights (padding masked out) give a context vector, and
  ``tanh(W_c [context; h_t])`` feeds the output layer.  Without input feeding, training
  runs the decoder GRU over the whole target in one fused call.

Decoding goes through :meth:`Seq2Seq.start` and :meth:`Seq2Seq.step`, the
``step(ids, state) -> (log_probs, state)`` interface of :mod:`charrnn.beam`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import CharRNNError

KINDS = ("basic", "teacher-forcing", "attention")


@dataclass
class Seq2SeqConfig:
    kind: str
    in_vocab: int       # input ids, 0 = padding
    out_vocab: int      # output ids: 0 = padding, characters, then eos and sos
    eos_id: int
    sos_id: int
    embed: int = 32
    hidden: int = 128

    def validate(self) -> "Seq2SeqConfig":
        if self.kind not in KINDS:
            raise CharRNNError(f"--model must be one of {', '.join(KINDS)}, got '{self.kind}'")
        for name in ("in_vocab", "out_vocab", "embed", "hidden"):
            if int(getattr(self, name)) <= 0:
                raise CharRNNError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config.validate()
        self.src_embed = nn.Embedding(c.in_vocab, c.embed, padding_idx=0)
        self.encoder = nn.GRU(c.embed, c.hidden, batch_first=True)
        if c.kind == "basic":
            self.decoder = nn.GRU(c.hidden, c.hidden, batch_first=True)
        else:
            self.tgt_embed = nn.Embedding(c.out_vocab, c.embed)
            self.decoder = nn.GRU(c.embed, c.hidden, batch_first=True)
        if c.kind == "attention":
            self.attn_score = nn.Linear(c.hidden, c.hidden, bias=False)
            self.attn_combine = nn.Linear(2 * c.hidden, c.hidden)
        self.head = nn.Linear(c.hidden, c.out_vocab)

    # -- encoder -------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, lengths: torch.Tensor):
        """``(outputs (B, T, H), final state (1, B, H), mask (B, T) True on real characters)``."""
        x = self.src_embed(src)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < lengths.to(src.device)[:, None]
        return out, h, mask

    def attend(self, q: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor):
        """Luong attention for queries ``q (B, L, H)``: ``(attentional states (B, L, H), weights (B, L, T))``."""
        scores = torch.bmm(self.attn_score(q), enc.transpose(1, 2))
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = scores.softmax(-1)
        context = torch.bmm(weights, enc)
        return torch.tanh(self.attn_combine(torch.cat([context, q], -1))), weights

    # -- training ------------------------------------------------------------------------
    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, out_vocab)`` for the targets, given ``tgt_in`` (the targets shifted right
        behind ``sos_id``; the ``basic`` model only uses its length)."""
        enc, h, mask = self.encode(src, lengths)
        B, L = tgt_in.shape
        if self.config.kind == "basic":
            y, _ = self.decoder(h.transpose(0, 1).expand(B, L, h.shape[-1]).contiguous())
        else:
            y, _ = self.decoder(self.tgt_embed(tgt_in), h)
            if self.config.kind == "attention":
                y, _ = self.attend(y, enc, mask)
        return self.head(y)

    # -- decoding ------------------------------------------------------------------------
    def start(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """First decoder input ids ``(B,)`` (all ``sos_id``) and the decoding state (batch first)."""
        enc, h, mask = self.encode(src, lengths)
        h = h[0]
        B = src.shape[0]
        ids = torch.full((B,), self.config.sos_id, dtype=torch.long, device=src.device)
        if self.config.kind == "basic":
            return ids, {"h": torch.zeros_like(h), "ctx": h}
        if self.config.kind == "teacher-forcing":
            return ids, {"h": h}
        return ids, {"h": h, "enc": enc, "mask": mask}

    def step(self, ids: torch.Tensor, state: dict, with_attention: bool = False):
        """``(log_probs (B, out_vocab), state)`` for one output step (plus attention weights (B, T)
        when ``with_attention``)."""
        kind = self.config.kind
        x = state["ctx"] if kind == "basic" else self.tgt_embed(ids)
        y, h = self.decoder(x[:, None, :], state["h"][None])
        y = y[:, 0]
        new = dict(state)
        new["h"] = h[0]
        weights = None
        if kind == "attention":
            y, weights = self.attend(y[:, None], state["enc"], state["mask"])
            y, weights = y[:, 0], weights[:, 0]
        log_probs = F.log_softmax(self.head(y).float(), -1)
        if with_attention:
            return log_probs, new, weights
        return log_probs, new

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
