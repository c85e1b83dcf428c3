"""Greedy and beam search over any step function, with batched beams.

A decoder is described by one function::

    step(ids (n,), state) -> (log_probs (n, vocab), state)

where ``state`` is a tensor, or a list / tuple / dict of them (nested), every tensor
with the batch on dimension 0.  Beam search runs all ``batch x width`` beams of a batch
through ``step`` together and re-orders the state with ``index_select`` along dimension 0.

Used by the date converter (:mod:`charrnn.tasks.dates`) and by the language model
(:meth:`charrnn.sampling.Sampler.beam`).

Scores are total log-probabilities (the sum over the output tokens, the end-of-sequence
token included when it is produced).  Beam search keeps the ``width`` best partial
outputs at every step; a beam that has produced ``eos_id`` is finished and keeps its
score.  Plain beam search can, rarely, lose the greedy output on the way and end worse
than greedy; so the greedy output (one more beam-of-one pass, cheap) is merged into the
result: the best beam result is never worse than greedy, by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import OptionError

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One output: its token ids (without the end-of-sequence token) and total log-probability."""

    ids: list[int]
    log_prob: float
    finished: bool = True


StepFn = Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]


def map_state(state, fn):
    """Apply ``fn`` to every tensor of a nested state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(map_state(v, fn) for v in state)
    if isinstance(state, list):
        return [map_state(v, fn) for v in state]
    return state


def select_state(state, index: torch.Tensor):
    """Rows ``index`` (dimension 0) of every tensor of ``state``, or of a state object that selects its own
    rows (``state.select_rows(index)``, e.g. a transformer's key/value cache)."""
    if hasattr(state, "select_rows"):
        return state.select_rows(index)
    return map_state(state, lambda t: t.index_select(0, index))


def _mask(log_probs: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    if banned:
        log_probs = log_probs.clone()
        log_probs[:, list(banned)] = NEG_INF
    return log_probs


@torch.inference_mode()
def greedy_search(step: StepFn, start_ids: torch.Tensor, state, max_len: int, *, eos_id: int | None = None,
                  banned: Sequence[int] = (), first_log_probs: torch.Tensor | None = None) -> list[Hypothesis]:
    """The most likely token at every step, for a batch; one :class:`Hypothesis` per batch row.

    ``first_log_probs`` (batch, vocab), if given, are the first step's log-probabilities
    (``start_ids`` is then not used): a language model primed with its prompt has them already.
    """
    n = start_ids.shape[0] if first_log_probs is None else first_log_probs.shape[0]
    ids = start_ids
    scores = torch.zeros(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    out: list[torch.Tensor] = []
    for t in range(max_len):
        if t == 0 and first_log_probs is not None:
            lp = first_log_probs
        else:
            lp, state = step(ids, state)
        lp = _mask(lp.double(), banned)
        best, ids = lp.max(-1)
        scores += torch.where(done, torch.zeros_like(scores), best.double().cpu())
        out.append(torch.where(done.to(ids.device), torch.full_like(ids, -1), ids).cpu())
        if eos_id is not None:
            done |= ids.cpu() == eos_id
            if bool(done.all()):
                break
    seqs = torch.stack(out, 1).tolist() if out else [[] for _ in range(n)]
    result = []
    for row, score in zip(seqs, scores.tolist()):
        toks = [i for i in row if i >= 0]
        finished = eos_id is None or (bool(toks) and toks[-1] == eos_id)
        if finished and eos_id is not None:
            toks = toks[:-1]
        result.append(Hypothesis(toks, score, finished))
    return result


@torch.inference_mode()
def beam_search(step: StepFn, start_ids: torch.Tensor, state, max_len: int, beam_width: int, *,
                eos_id: int | None = None, banned: Sequence[int] = (),
                first_log_probs: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """The ``beam_width`` best outputs of every batch row, best first (by total log-probability).

    ``step``, ``start_ids``, ``state``, ``eos_id``, ``banned`` and ``first_log_probs`` are as
    in :func:`greedy_search`.  All beams of all rows advance together: ``step`` sees
    ``batch x live beams`` rows.  Outputs stop at ``eos_id`` or after ``max_len`` tokens.
    :func:`search` also merges the greedy output in (see the module docstring).
    """
    if beam_width is None or int(beam_width) < 1:
        raise OptionError("beam_width", "must be a positive integer, got {value}", value=beam_width)
    K = int(beam_width)
    B = start_ids.shape[0] if first_log_probs is None else first_log_probs.shape[0]
    device = start_ids.device if first_log_probs is None else first_log_probs.device
    scores = torch.zeros(B, 1, dtype=torch.float64, device=device)    # (B, k)
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)
    seqs = torch.zeros(B, 1, 0, dtype=torch.long, device=device)       # (B, k, t)
    ids = start_ids
    for t in range(max_len):
        k = scores.shape[1]
        if t == 0 and first_log_probs is not None:
            lp = first_log_probs
        else:
            lp, state = step(ids, state)
        lp = _mask(lp.double(), banned)
        V = lp.shape[-1]
        lp = lp.reshape(B, k, V)
        if eos_id is not None and bool(done.any()):
            # A finished beam continues only with eos_id, at no cost (its tokens after eos are dropped).
            frozen = torch.full((V,), NEG_INF, dtype=lp.dtype, device=device)
            frozen[eos_id] = 0.0
            lp = torch.where(done[..., None], frozen, lp)
        total = (scores[..., None] + lp).view(B, k * V)
        new_k = min(K, k * V)
        top, flat = total.topk(new_k, dim=-1)                            # sorted, best first
        beam, token = flat // V, flat % V
        rows = (torch.arange(B, device=device)[:, None] * k + beam).view(-1)
        state = select_state(state, rows)
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(B, new_k, seqs.shape[2])), token[..., None]], 2)
        done = done.gather(1, beam)
        if eos_id is not None:
            done = done | (token == eos_id)
        scores = top
        ids = token.view(-1)
        if eos_id is not None and bool(done.all()):
            break
    results: list[list[Hypothesis]] = []
    seq_list, score_list, done_list = seqs.tolist(), scores.tolist(), done.tolist()
    for b in range(B):
        hyps = []
        for toks, score, fin in zip(seq_list[b], score_list[b], done_list[b]):
            if score == NEG_INF:
                continue
            if eos_id is not None and fin:
                toks = toks[: toks.index(eos_id)]
            hyps.append(Hypothesis(toks, float(score), bool(fin) or eos_id is None))
        results.append(hyps)
    return results


def merge_greedy(results: list[list[Hypothesis]], greedy: list[Hypothesis],
                 beam_width: int) -> list[list[Hypothesis]]:
    """Put each row's greedy output among its beam results when it beats one of them."""
    merged = []
    for hyps, g in zip(results, greedy):
        if g.log_prob == NEG_INF or any(h.ids == g.ids for h in hyps):
            merged.append(hyps)
            continue
        merged.append(sorted(hyps + [g], key=lambda h: -h.log_prob)[:beam_width])
    return merged


def search(step: StepFn, start_ids: torch.Tensor, state, max_len: int, beam_width: int, *,
           eos_id: int | None = None, banned: Sequence[int] = (),
           first_log_probs: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Beam search that is never worse than greedy: beam results with the greedy output merged in."""
    results = beam_search(step, start_ids, state, max_len, beam_width, eos_id=eos_id, banned=banned,
                          first_log_probs=first_log_probs)
    if beam_width == 1:
        return results
    greedy = greedy_search(step, start_ids, state, max_len, eos_id=eos_id, banned=banned,
                           first_log_probs=first_log_probs)
    return merge_greedy(results, greedy, beam_width)
