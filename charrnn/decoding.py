"""From logits to text: the logits processors, the choice of ids, penalties, stop sequences and
log-probabilities, for one batch of samples (:class:`Decoding`).

:class:`charrnn.sampling.Sampler` (generation in the library and the CLI) and the server's engine both
decode through :class:`Decoding`, so an option means the same everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from . import native
from .options import GREEDY_BELOW, SamplingParams, check_shape
from .tokens import StopText
from .vocab import UNK_ID


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, *, min_p: float | None = None) -> torch.Tensor:
    """Scaled, filtered logits ``(batch, vocab)``; filtered-out entries are ``-inf``.

    ``[UNK]`` is always removed.  ``temperature`` must be > 0 here (0 is handled as greedy
    by the caller).  ``top_k`` keeps the k largest; ``top_p`` keeps the smallest set of
    most likely characters whose probability reaches p (always at least one); ``min_p`` (None
    or 0: off) keeps those at least ``min_p`` times as likely as the most likely one, which
    always stays (transformers' ``MinPLogitsWarper``, after the others as there).
    """
    logits = logits.float() / temperature
    logits[:, UNK_ID] = float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a character when the mass of the ones strictly more likely already reaches p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[:, 0] = False  # the most likely stays, also when top_p underflows the logits' dtype to 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def plain(temperature: float, top_k, top_p, min_p, vocab_size: int) -> bool:
    """Whether :func:`choose` draws with the temperature alone (no filter removes an id): the draw the compiled
    module makes in one call."""
    return (temperature >= GREEDY_BELOW and (top_k is None or top_k >= vocab_size) and (top_p is None or top_p >= 1.0)
            and not min_p)


def _compiled_for(logits: torch.Tensor):
    """The compiled module, when it is loaded and ``logits`` are what it draws from (fp32 on the CPU)."""
    fused = native.loaded()
    return fused if fused is not None and logits.dtype == torch.float32 and logits.device.type == "cpu" else None


def choose(logits: torch.Tensor, temperature: float, top_k, top_p, generator: torch.Generator | None, *,
           min_p: float | None = None, compiled: bool = True) -> torch.Tensor:
    """Next ids ``(batch,)`` from logits ``(batch, vocab)``: greedy at temperature 0, else sampled.

    Plain temperature sampling (:func:`plain`) of CPU fp32 logits runs as one call into the compiled module
    (:mod:`charrnn.native`) when a :class:`Stepper` has loaded it and ``compiled`` is true: the
    same operations, the same random draws, the same ids.
    """
    fused = _compiled_for(logits) if compiled else None
    if fused is not None and plain(temperature, top_k, top_p, min_p, logits.shape[-1]):
        return fused.sample(logits, generator, float(temperature))
    if temperature < GREEDY_BELOW:
        masked = logits.float().clone()
        masked[:, UNK_ID] = float("-inf")
        return masked.argmax(-1)
    probs = process_logits(logits, temperature, top_k, top_p, min_p=min_p).softmax(-1)
    # Inverse-CDF sampling: three small ops, a fraction of torch.multinomial's per-call cost.
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019), as transformers applies it: the logit of every id
    ``seen`` in the text so far (prompt included) is divided by ``penalty`` when positive and multiplied
    by it when negative.  Above 1 it discourages repeats; 1 changes nothing."""
    logits = logits.float()
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class Penalties:
    """The penalties on the ids each row of a batch has seen: CTRL's repetition penalty (:func:`penalize`)
    over the prompt and the text generated, and the presence and frequency penalties of the OpenAI API
    over the text generated (``logit - frequency * count - presence * (count > 0)``)."""

    def __init__(self, prompt_ids: Sequence[torch.Tensor], vocab_size: int, device, repetition: float = 1.0,
                 presence: float = 0.0, frequency: float = 0.0):
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        rows = len(prompt_ids)
        self.seen = None
        if repetition != 1:
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompt_ids):
                self.seen[row, ids.to(device)] = True
        self.counts = torch.zeros(rows, vocab_size, device=device) if presence or frequency else None

    @staticmethod
    def wanted(repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0) -> bool:
        return repetition != 1 or presence != 0 or frequency != 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.seen is not None:
            logits = penalize(logits, self.seen, self.repetition)
        if self.counts is not None:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0)
        return logits

    def add(self, ids: torch.Tensor) -> None:
        rows = torch.arange(len(ids), device=ids.device)
        if self.seen is not None:
            self.seen[rows, ids] = True
        if self.counts is not None:
            self.counts[rows, ids] += 1


def top_logprobs(logits: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The log-probabilities, under the model's own distribution (before temperature, filters and
    penalties), of the chosen ``ids`` and of the ``n`` likeliest ids of each row: ``(chosen, top_ids,
    top_logprobs)``."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(min(n, lp.shape[-1]), dim=-1) if n else None
    chosen = lp.gather(1, ids[:, None])[:, 0]
    return (chosen, top.indices, top.values) if top is not None else (chosen, None, None)


class Decoding:
    """One batch of samples on its way from logits to text.

    ``choose(logits)`` picks each row's next id as the :class:`charrnn.options.SamplingParams` ``params`` say
    (penalties, temperature, top-k / top-p / min-p, the seeded generator) and counts a step; ``read(steps)``
    turns the ids chosen since the last read into each row's new text, cut at ``length`` characters or before
    the first ``stop`` text (never shown), with ``logprobs`` records when asked.  ``finish[r]`` becomes
    ``"stop"`` or ``"length"``; ``done`` once every row has finished (or the steps ``length`` can take are
    spent).
    """

    def __init__(self, sampler, prompts: Sequence[str], length: int, params: SamplingParams = SamplingParams(), *,
                 steps: int | None = None):
        check_shape(length, len(prompts) or 1)      # the params checked themselves when they were made
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.params, self.logprobs = params, params.logprobs
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device=sampler.device)
        self.generator.manual_seed(self.seed)
        self.compiled = sampler.stepper.backend == "native"
        penalties = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
        self.penalties = (Penalties([sampler.prompt_ids(p) for p in prompts], len(sampler.vocab), sampler.device,
                                    *penalties) if Penalties.wanted(*penalties) else None)
        banned = sampler.vocab.banned
        self.banned = torch.tensor(banned, dtype=torch.long, device=sampler.device) if len(banned) else None
        self.text = sampler.text_stream(prompts, length)
        self.stops = StopText(params.stop, len(prompts)) if params.stop else None
        self.token_text = sampler.token_text
        self.length = length
        self.steps_left = sampler.vocab.steps_for(length) if steps is None else steps
        self.finish: list[str | None] = [None if length else "length"] * len(prompts)
        self.tokens = [0] * len(prompts)       # ids generated per row until it finished
        self._logprobs: list[tuple] = []        # per step chosen since the last read
        self._pending: list[list[dict]] = [[] for _ in prompts]      # records whose text is held back
        self._shown, self._given = [0] * len(prompts), [0] * len(prompts)   # characters shown / in records given
        # Whether choose() is the compiled draw alone (nothing before it, nothing recorded): BatchChoice draws
        # the ids of such decodings together.
        self.fused = (self.compiled and self.penalties is None and self.banned is None and self.logprobs is None
                      and plain(params.temperature, params.top_k, params.top_p, params.min_p, len(sampler.vocab)))

    @property
    def done(self) -> bool:
        return self.steps_left <= 0 or all(self.finish)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next id of every row ``(batch,)`` from the model's ``logits`` ``(batch, vocab)``."""
        scored = self.penalties(logits) if self.penalties is not None else logits
        if self.banned is not None:     # as [UNK]: bytes a BPE model never saw in training
            scored = scored.index_fill(1, self.banned, float("-inf"))
        p = self.params
        ids = choose(scored, p.temperature, p.top_k, p.top_p, self.generator, min_p=p.min_p, compiled=self.compiled)
        if self.penalties is not None:
            self.penalties.add(ids)
        if self.logprobs is not None:
            self._logprobs.append(top_logprobs(logits, ids, self.logprobs))
        self.steps_left -= 1
        return ids

    def read(self, steps: Sequence[Sequence[int]]) -> tuple[list[str], list[list[dict]]]:
        """Each row's new text for the ids of ``steps`` (one list per step, as chosen since the last read), and
        its new log-probability records (``{"token", "logprob", "top"}``, one per id; none unless asked).

        A record is given with its token's text: its tokens spell the row's text exactly (the token that
        reached a stop text is cut where the text ends)."""
        rows = len(self.finish)
        texts, records = [""] * rows, [[] for _ in range(rows)]
        logprobs, self._logprobs = self._logprobs, self._logprobs[len(steps):]
        for step, ids in enumerate(steps):
            pieces = self.text.push(ids)
            shown = self.stops.push(pieces) if self.stops is not None else pieces
            for r in range(rows):
                if self.finish[r]:
                    continue
                self.tokens[r] += 1
                new = shown[r]
                if self.stops is not None and self.stops.finished[r]:
                    self.finish[r] = "stop"
                elif self.text.chars[r] >= self.length or (self.steps_left <= 0 and step == len(steps) - 1):
                    new += self.stops.flush(r) if self.stops is not None else ""
                    self.finish[r] = "length"
                texts[r] += new
                if self.logprobs is not None:
                    self._pending[r].append(self._record(logprobs[step], r, pieces[r]))
                    records[r] += self._release(r, len(new))
        return texts, records

    def _release(self, row: int, shown: int) -> list[dict]:
        """The row's held records whose token text is now all shown (``shown`` more characters were); once the
        row has finished, the rest, the last cut to the text."""
        self._shown[row] += shown
        out, pending = [], self._pending[row]
        while pending and (self._given[row] + len(pending[0]["token"]) <= self._shown[row] or self.finish[row]):
            record = pending.pop(0)
            room = self._shown[row] - self._given[row]
            if room <= 0 and record["token"]:
                pending.clear()
                break
            record["token"] = record["token"][:room]
            self._given[row] += len(record["token"])
            out.append(record)
        return out

    def _record(self, logprobs: tuple, row: int, token: str) -> dict:
        chosen, top_ids, top_lps = logprobs
        top = {} if top_ids is None else {self.token_text(int(i)): float(v)
                                          for i, v in zip(top_ids[row].tolist(), top_lps[row].tolist())}
        return {"token": token, "logprob": float(chosen[row]), "top": top}


class BatchChoice:
    """The next ids of several :class:`Decoding` s whose rows lie one after another in one batch of logits (the
    server's requests stepped together): the rows of every :attr:`Decoding.fused` one in one call into the
    compiled module, each group of rows drawing from its own decoding's generator at its own temperature; the
    others through their own :meth:`Decoding.choose`.  The same ids, and the same draws from each generator, as
    each decoding's ``choose`` on its rows alone.

    A decoding whose choice raises is listed in :attr:`failed` with the error (its rows get id 0); the others'
    ids are chosen as usual."""

    def __init__(self, decodings: Sequence[Decoding]):
        self.rows = 0
        self.fused, self.others = [], []
        for d in decodings:
            (self.fused if d.fused else self.others).append((d, self.rows, len(d.finish)))
            self.rows += len(d.finish)
        self._groups = ([d.generator for d, _, _ in self.fused],
                        [float(d.params.temperature) for d, _, _ in self.fused],
                        [s for _, s, _ in self.fused], [n for _, _, n in self.fused])
        self.failed: list[tuple[Decoding, Exception]] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Every row's next id ``(rows,)`` from the batch's ``logits`` ``(rows, vocab)``."""
        ids = torch.zeros(self.rows, dtype=torch.long, device=logits.device)
        compiled = _compiled_for(logits) if self.fused else None
        if compiled is not None:
            compiled.sample_rows(logits, *self._groups, ids)
            for d, _, _ in self.fused:
                d.steps_left -= 1
        for d, start, n in (self.others if compiled is not None else self.fused + self.others):
            try:
                ids[start:start + n] = d.choose(logits[start:start + n])
            except Exception as e:  # noqa: BLE001 - one request's decoding fails alone; the caller reports it
                self.failed.append((d, e))
        return ids
