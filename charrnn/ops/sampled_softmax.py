"""Sampled softmax: the training loss of a large output layer from the true token and K sampled ones.

The full softmax cross-entropy costs one row of the output layer per vocabulary entry and position.
The sampled loss (Jean et al. 2015; TensorFlow's ``sampled_softmax_loss``) scores only the true token
and ``K`` negatives drawn once per step from a proposal distribution ``q``, each logit corrected by
``-log(K q(token))`` so that the softmax over the sample estimates the full one; a negative that
happens to be the position's true token is masked out ("accidental hits").  Validation, evaluation and
generation keep the full softmax: :func:`full_softmax_loss` is the reference this estimate is tested
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unigram(counts: torch.Tensor) -> torch.Tensor:
    """The proposal ``q``: the training split's token frequencies (add-one smoothed, so every id can be drawn)."""
    q = counts.double() + 1.0
    return (q / q.sum()).float()


def log_uniform(counts: torch.Tensor) -> torch.Tensor:
    """The proposal ``q``: Zipf's law over frequency rank, ``q(rank r) = log((r + 2) / (r + 1)) / log(V + 1)``."""
    v = counts.numel()
    ranks = torch.empty(v, dtype=torch.float64)
    ranks[torch.argsort(counts, descending=True, stable=True)] = torch.arange(v, dtype=torch.float64)
    q = torch.log((ranks + 2) / (ranks + 1)) / torch.log(torch.tensor(v + 1.0, dtype=torch.float64))
    return (q / q.sum()).float()


PROPOSALS = {"unigram": unigram, "log-uniform": log_uniform}


def full_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (N, H) @ weight.T (V, H) + bias`` against ``targets (N,)``."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                         proposal: torch.Tensor, num_sampled: int, generator: torch.Generator | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Sampled-softmax cross-entropy, the mean (``reduction="none"``: each position's); the negatives are drawn with
    replacement, shared by all positions."""
    sampled = torch.multinomial(proposal, num_sampled, replacement=True, generator=generator).to(hidden.device)
    log_kq = torch.log(proposal.to(hidden.device) * num_sampled)
    true_logit = (hidden * weight[targets]).sum(-1) + bias[targets] - log_kq[targets]
    sampled_logits = F.linear(hidden, weight[sampled], bias[sampled]) - log_kq[sampled]
    sampled_logits = sampled_logits.masked_fill(sampled.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([true_logit.unsqueeze(1), sampled_logits], dim=1).float()
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction=reduction)
