"""The generation engine behind the server: many requests, one batched step per character.

Generation is CPU-bound PyTorch work, so it never runs on the event loop.  One
scheduler coroutine owns every job's bookkeeping; the numeric work runs in a
single worker thread, one *hop* at a time, while the event loop keeps accepting requests and
streaming what is done.  Between hops the scheduler admits waiting requests, drops cancelled ones
(a client that went away) and hands each job its new characters: one event per running row per hop.
A hop lasts ``hop_seconds`` (20 ms), longer when more rows run, so that the events stay at about
:data:`EVENTS_PER_S` a second (an event costs the server and its client more than a row's share of a
step: docs/serving.md); it ends early when a waiting request fits in the batch (after
:data:`ADMIT_AFTER_S`, so that a burst of requests joins together), and after one step when it
admitted one, so a request's first character goes out at once.  A disconnected
client stops costing anything within one step.

All running requests advance together: their rows stay in one batch (:class:`_Rows`: the logits and the
recurrent state of every row, rows added when a request is admitted and removed when it ends) stepped by
:class:`charrnn.stepper.Stepper`, the expensive part, while each request keeps its own options and its own
seeded random generator for choosing characters (:class:`charrnn.decoding.BatchChoice`: the requests that
sample with a temperature alone in one compiled call), so a seed gives the same text as ``charrnn generate
--seed`` does.  (fp32 matrix products of a batch may round differently in the last bit from those of one row;
a sampled character can change only when that bit decides it.  int8 products are exact and each row's
activations are quantised on their own, so int8 rows do not depend on their neighbours.)  A model whose state
cannot be batched (a transformer's cache) steps each request as a batch of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..beam import select_state
from ..errors import CharRNNError
from ..decoding import BatchChoice, Decoding
from ..options import SamplingParams
from ..sampling import Sampler
from ..threads import ThreadPolicy

log = logging.getLogger("charrnn.serve")
# The events a second (one per running row per hop) past which hops grow longer than hop_seconds.
EVENTS_PER_S = 800
# How long a request arriving during a hop waits for it to end: requests that arrive together (a burst of
# clients) join in one admitting hop, not one each.
ADMIT_AFTER_S = 0.002


class Busy(Exception):
    """The engine holds as many requests as it accepts; the client should retry later."""


@dataclass(eq=False)
class Job:
    """One request: what to generate, how (its checked :class:`charrnn.options.SamplingParams`, made from the
    request body by the endpoint), and (filled in by the engine) what has been generated.  ``seed``: the seed used,
    the params' or, when neither gives one, drawn here (``seed`` given here replaces the params')."""

    prompt: str
    length: int
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    streaming: bool = False
    seed: int | None = None

    texts: list[str] = field(default_factory=list)  # the continuation of each sample so far
    error: str | None = None
    error_status: int = 500
    cancelled: bool = False

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.params.seed
        if self.seed is None:  # below 2**53, so that a JavaScript client can read it back exactly
            self.seed = random.SystemRandom().randrange(2**53)
        if self.params.seed != self.seed:
            self.params = dataclasses.replace(self.params, seed=self.seed)
        self.texts = [""] * self.num_samples
        self.records: list[list[dict]] = [[] for _ in range(self.num_samples)]   # log-probabilities, when asked
        self.remaining = self.length
        self.updates: asyncio.Queue = asyncio.Queue()  # (new text, new records) per sample; None when finished
        self.done = asyncio.Event()
        self.decoding: Decoding | None = None     # set by the worker thread when the job is primed
        self._held: tuple | None = None             # new text (and records) not yet sent to the stream
        self._sent: float | None = None             # when the stream was last sent some

    @property
    def finish_reasons(self) -> list[str]:
        """Why each sample ended: ``"stop"`` (a stop text) or ``"length"``."""
        finish = self.decoding.finish if self.decoding is not None else [None] * self.num_samples
        return [f or "length" for f in finish]

    @property
    def samples(self) -> list[str]:
        """Prompt + continuation of every sample (what ``LanguageModel.generate`` returns)."""
        return [self.prompt + t for t in self.texts]

    def cancel(self) -> None:
        """Stop generating (no-op once finished): the engine drops the job before its next step."""
        if not self.done.is_set():
            self.cancelled = True

    def _push(self, pieces: list[str], records: list[list[dict]], now: float = 0.0, every: float = 0.0) -> None:
        """Add new text.  A streaming job sends it on when it is the first, or when at least half of ``every``
        seconds have passed since the last it sent (hops are about ``every`` long; a short hop that admitted a
        request adds to what the next one sends)."""
        self.texts = [t + p for t, p in zip(self.texts, pieces)]
        self.records = [a + b for a, b in zip(self.records, records)]
        if not self.streaming:
            return
        if self._held is not None:
            pieces, records = _joined(self._held, (pieces, records))
        self._held = None
        if self._sent is None or now - self._sent >= every / 2:
            self.updates.put_nowait((pieces, records))
            self._sent = now
        else:
            self._held = pieces, records

    def _finish(self, error: str | None = None, status: int = 500) -> None:
        if self._held is not None:
            self.updates.put_nowait(self._held)
            self._held = None
        self.error, self.error_status = error, status
        self.done.set()
        self.updates.put_nowait(None)


def _joined(old: tuple, new: tuple) -> tuple:
    """Two updates ``(texts, records)`` (one entry per sample) as one."""
    return tuple([a + b for a, b in zip(x, y)] for x, y in zip(old, new))


def _cat_states(states: list[list]) -> list:
    """Per-job Stepper states (lists over layers of ``(n, H)`` tensors or LSTM ``(h, c)`` pairs) -> one batch."""
    return [tuple(torch.cat(part) for part in zip(*layer)) if isinstance(layer[0], tuple) else torch.cat(layer)
            for layer in zip(*states)]


class _Rows:
    """Jobs stepped as one batch: their rows (each job's samples, jobs in the order they joined), every row's
    logits and the model's state, and how each row's next id is chosen (one :class:`BatchChoice`, made again
    when the jobs change)."""

    def __init__(self, stepper):
        self.stepper = stepper
        self.jobs: list[Job] = []
        self.logits: torch.Tensor | None = None
        self.state = None
        self.offsets: torch.Tensor | None = None      # each row's label offset (charrnn.labels; 0: unlabelled)
        self._choice: BatchChoice | None = None

    def add(self, job: Job, logits: torch.Tensor, state, offset: int = 0) -> None:
        """Append ``job``'s rows, primed: its logits ``(num_samples, vocab)``, its state and its label's offset."""
        offsets = torch.full((job.num_samples,), offset, dtype=torch.long, device=logits.device)
        if self.jobs:
            self.logits, self.state = torch.cat([self.logits, logits]), _cat_states([self.state, state])
            self.offsets = torch.cat([self.offsets, offsets])
        else:
            self.logits, self.state, self.offsets = logits, state, offsets
        self.jobs.append(job)
        self._choice = None

    def keep(self, jobs: set[Job]) -> None:
        """Drop the rows of every job not in ``jobs``."""
        kept = [job for job in self.jobs if job in jobs]
        if len(kept) == len(self.jobs):
            return
        rows, at = [], 0
        for job in self.jobs:
            if job in kept:
                rows.extend(range(at, at + job.num_samples))
            at += job.num_samples
        if rows:
            index = torch.tensor(rows, device=self.logits.device)
            self.logits, self.state = self.logits.index_select(0, index), select_state(self.state, index)
            self.offsets = self.offsets.index_select(0, index)
        else:
            self.logits = self.state = self.offsets = None
        self.jobs = kept
        self._choice = None

    def choose(self) -> tuple[torch.Tensor, list[tuple[Job, Exception]]]:
        """Every row's next id, and the jobs whose choice failed (with the error)."""
        if self._choice is None:
            self._choice = BatchChoice([job.decoding for job in self.jobs])
        ids = self._choice(self.logits)
        failed, self._choice.failed = self._choice.failed, []
        return ids, [(next(j for j in self.jobs if j.decoding is d), e) for d, e in failed]

    def step(self, ids: torch.Tensor) -> None:
        self.logits, self.state = self.stepper.step(ids + self.offsets if self.offsets.any() else ids, self.state)

    def read(self, steps: list[torch.Tensor]) -> dict[Job, tuple[list[str], list[list[dict]]]]:
        """Each job's new text and records for the ids chosen this hop (``steps``: one ``(rows,)`` per step)."""
        table = torch.stack(steps).tolist()
        out, at = {}, 0
        for job in self.jobs:
            n = job.num_samples
            try:
                out[job] = job.decoding.read([row[at:at + n] for row in table])
            except Exception as e:  # a bug, not a user error: this request fails alone
                _fail(job, e)
            at += n
        return out


def _fail(job: Job, e: Exception) -> None:
    """End ``job`` with a 500 for an error of its own (a bug, not a user error); the other jobs go on."""
    log.exception("generating a request failed")
    job.error, job.error_status, job.remaining = f"generation failed: {type(e).__name__}: {e}", 500, 0


class Engine:
    """Queues :class:`Job` s and generates them in batches on one worker thread.

    ``max_queue`` bounds the requests held at once (running and waiting): one more
    raises :class:`Busy`.  ``max_batch`` bounds the sample rows stepped together;
    requests beyond it wait, first come first served.  ``threads``: the intra-op threads of the worker thread
    (by default PyTorch's; see :func:`charrnn.threads.leave_to_worker`).
    """

    def __init__(self, sampler: Sampler, *, batch_requests: bool = True, max_queue: int = 256, max_batch: int = 64,
                 hop_seconds: float = 0.02, threads: int | None = None):
        self.sampler = sampler
        self.batch_requests = batch_requests
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.hop_seconds = hop_seconds
        self.threads = threads
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        # Counters for /healthz; peak_running is the most requests ever generated together in one batch.
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "characters": 0, "peak_running": 0}
        self.metrics = None  # told of each job's new text: pushed(job, pieces) (see metrics.py)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._threads: ThreadPolicy | None = None     # the worker thread's (see _set_threads)
        self._rows: list[_Rows] = []                  # the worker thread's: the batches being stepped

    # ----- event-loop side -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charrnn-generate")
        # The worker's threads, decided now: before any client has connected, the threads runnable on the
        # machine are other work's (once requests run, a client is runnable the moment it has sent one).
        await asyncio.get_running_loop().run_in_executor(self._executor, self._set_threads)
        self._task = asyncio.create_task(self._run(), name="charrnn-scheduler")

    def _set_threads(self) -> None:
        """(Worker thread) the intra-op threads it steps with, under a :class:`ThreadPolicy` that re-decides
        them from CPU time between steps."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._threads = ThreadPolicy(on=self.sampler.device.type == "cpu")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self.active + self.waiting:
            job._finish("the server is shutting down", status=503)
        self.active, self.waiting = [], []
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises :class:`Busy` when ``max_queue`` requests are already held."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue all of ``jobs`` (one request's), or none: raises :class:`Busy` when they do not all fit in
        ``max_queue``."""
        if len(self.active) + len(self.waiting) + len(jobs) > self.max_queue:
            raise Busy(f"the server is generating for {len(self.active) + len(self.waiting)} of the {self.max_queue} "
                       "requests it holds at once; retry shortly")
        for job in jobs:
            job.submitted = time.monotonic()
        self.waiting.extend(jobs)
        self._wake.set()
        return jobs

    def status(self) -> dict:
        return {"running": len(self.active), "waiting": len(self.waiting), **self.stats}

    def _drop_cancelled(self) -> None:
        for jobs in (self.active, self.waiting):
            for job in [j for j in jobs if j.cancelled]:
                jobs.remove(job)
                self.stats["cancelled"] += 1
                job._finish("cancelled")

    def _admit(self) -> list[Job]:
        """Move waiting jobs into the batch while their rows fit (always at least one into an empty batch)."""
        rows = sum(j.num_samples for j in self.active)
        new = []
        while self.waiting and (rows + self.waiting[0].num_samples <= self.max_batch or not self.active and not new):
            job = self.waiting.pop(0)
            rows += job.num_samples
            new.append(job)
        self.active.extend(new)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.active))
        return new

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.active and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            new = self._admit()
            try:
                out = await loop.run_in_executor(self._executor, self._hop, new, list(self.active))
            except Exception as e:  # a bug, not a user error: fail these requests, keep serving the others
                log.exception("generation failed")
                for job in self.active:
                    self.stats["failed"] += 1
                    job._finish(f"generation failed: {type(e).__name__}: {e}")
                self.active = []
                continue
            now, every = time.monotonic(), self._period()
            for job, (pieces, records) in out.items():
                if self.metrics is not None:
                    self.metrics.pushed(job, pieces)
                job._push(pieces, records, now, every)
                self.stats["characters"] += sum(map(len, pieces))
            for job in [j for j in self.active if j.remaining == 0 and not j.cancelled]:
                self.active.remove(job)
                self.stats["failed" if job.error else "completed"] += 1
                job._finish(job.error, job.error_status)
            if new:     # first characters: let their streams send them before the next hop takes the cores
                await asyncio.sleep(0)

    # ----- worker-thread side ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _hop(self, new: list[Job], jobs: list[Job]) -> dict[Job, tuple[list[str], list[list[dict]]]]:
        """Prime ``new`` jobs, then step every job for about ``hop_seconds``; the new text (and log-probability
        records) of each job."""
        going = [job for job in jobs if job.remaining > 0 and not job.cancelled]
        for rows in self._rows:
            rows.keep(set(going))
        self._rows = [rows for rows in self._rows if rows.jobs]
        for job in new:
            self._prime(job)
        # A hop that primed new requests ends after one step, so that their first characters go out at once.
        deadline = time.perf_counter() + (0.0 if new else self._period())
        chosen = {rows: [] for rows in self._rows}
        budget = {rows: min(job.decoding.steps_left for job in rows.jobs) for rows in self._rows}
        while True:
            for rows in self._rows:
                if budget[rows] > 0:
                    budget[rows] = self._advance(rows, chosen[rows], budget[rows])
            if time.perf_counter() > deadline or not any(budget.values()) or self._admissible():
                break
        out = {}
        for rows, steps in chosen.items():
            if steps:
                out.update(rows.read(steps))
        for job in going:
            if job.remaining > 0:
                job.remaining = 0 if job.decoding.done else job.decoding.steps_left
        return out

    def _period(self) -> float:
        """How long a hop lasts, and how often a stream gets an event: ``hop_seconds``, or the time that keeps
        the events at :data:`EVENTS_PER_S` when more rows run.  (Read from the worker thread too: ``active``
        does not change while a hop runs.)"""
        return max(self.hop_seconds, sum(job.num_samples for job in self.active) / EVENTS_PER_S)

    def _admissible(self) -> bool:
        """Whether the first waiting request has waited :data:`ADMIT_AFTER_S` and would be admitted now (read
        from the worker thread: the event loop only appends to ``waiting`` while a hop runs)."""
        waiting = self.waiting
        if not waiting or time.monotonic() - waiting[0].submitted < ADMIT_AFTER_S:
            return False
        return sum(job.num_samples for job in self.active) + waiting[0].num_samples <= self.max_batch

    def _prime(self, job: Job) -> None:
        """Read ``job``'s prompt and give its rows to a batch (the running one, when requests can share one)."""
        try:
            prompts = [job.prompt] * job.num_samples
            job.decoding = Decoding(self.sampler, prompts, job.length, job.params)
            job.remaining = job.decoding.steps_left
            if job.remaining > 0:
                offset = self.sampler.label_offset(job.params.label)
                logits, state = self.sampler.prime(prompts, offset)
                if not (self.batch_requests and self._rows):
                    self._rows.append(_Rows(self.sampler.stepper))
                self._rows[-1].add(job, logits, state, offset)
        except Exception as e:  # a bug, not a user error: fail this request only
            _fail(job, e)

    def _advance(self, rows: _Rows, steps: list[torch.Tensor], budget: int) -> int:
        """Choose every row's next id and step ``rows`` with them; the steps its jobs may still take in this hop
        (0: the hop is over for them: one of them has no steps left, failed, or was cancelled)."""
        ids, failed = rows.choose()
        steps.append(ids)
        for job, e in failed:
            _fail(job, e)
        # Every job had at least `budget` steps left: after this one, all have some left while budget > 1.
        more = budget > 1 or any(job.decoding.steps_left > 0 for job in rows.jobs)
        budget = 0 if failed or any(job.cancelled for job in rows.jobs) else budget - 1
        if more:      # the last ids need no step
            self._threads.update()
            try:
                rows.step(ids)
            except CharRNNError as e:     # e.g. a transformer's context is full: these requests end here
                for job in rows.jobs:
                    job.error, job.error_status, job.remaining = str(e), 422, 0
                return 0
        return budget
