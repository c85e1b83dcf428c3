"""The generation engine behind the server: many requests, one batched step per character.

Generation is CPU-bound PyTorch work, so it never runs on the event loop.  One
scheduler coroutine owns every job's bookkeeping; the numeric work runs in a
single worker thread, one *hop* at a time (about 20 ms of characters; a hop that
admits a request ends after one step, so its first character goes out at once), while the
event loop keeps accepting requests and streaming what is done.  Between hops
the scheduler admits waiting requests, drops cancelled ones (a client that went
away) and hands each job its new characters, so a request joins a running batch
within one hop and a disconnected client stops costing anything within one step.

All running requests advance together: their recurrent states are concatenated
into one batch for :class:`charrnn.stepper.Stepper`, the expensive part, while each
request keeps its own options and its own seeded random generator for choosing
characters, so a seed gives the same text as ``charrnn generate --seed`` does.
(Batched matrix products may round differently in the last bit from unbatched
ones; a sampled character can change only when that bit decides it.)  With int8
weights, whose activations are quantised per batch, requests are stepped one after
another instead, so that one request's text never depends on its neighbours.
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

from ..errors import CharRNNError
from ..decoding import Decoding
from ..options import SamplingParams
from ..sampling import Sampler
from ..threads import ThreadPolicy

log = logging.getLogger("charrnn.serve")


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
        # Worker-thread state, set when the job is primed.
        self.decoding: Decoding | None = None
        self.logits: torch.Tensor | None = None
        self.state: list | None = None

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

    def _push(self, pieces: list[str], records: list[list[dict]]) -> None:
        self.texts = [t + p for t, p in zip(self.texts, pieces)]
        self.records = [a + b for a, b in zip(self.records, records)]
        if self.streaming:
            self.updates.put_nowait((pieces, records))

    def _finish(self, error: str | None = None, status: int = 500) -> None:
        self.error, self.error_status = error, status
        self.done.set()
        self.updates.put_nowait(None)


def _cat_states(states: list[list]) -> list:
    """Per-job Stepper states (lists over layers of ``(n, H)`` tensors or LSTM ``(h, c)`` pairs) -> one batch."""
    return [tuple(torch.cat(part) for part in zip(*layer)) if isinstance(layer[0], tuple) else torch.cat(layer)
            for layer in zip(*states)]


def _split_state(state: list, sizes: list[int]) -> list[list]:
    """The inverse of :func:`_cat_states`."""
    layers = [list(zip(*(t.split(sizes) for t in layer))) if isinstance(layer, tuple) else layer.split(sizes)
              for layer in state]
    return [list(per_job) for per_job in zip(*layers)]


def _fail(job: Job, e: Exception) -> None:
    """End ``job`` with a 500 for an error of its own (a bug, not a user error); the other jobs go on."""
    log.exception("generating a request failed")
    job.error, job.error_status, job.remaining = f"generation failed: {type(e).__name__}: {e}", 500, 0


class Engine:
    """Queues :class:`Job` s and generates them in batches on one worker thread.

    ``max_queue`` bounds the requests held at once (running and waiting): one more
    raises :class:`Busy`.  ``max_batch`` bounds the sample rows stepped together;
    requests beyond it wait, first come first served.
    """

    def __init__(self, sampler: Sampler, *, batch_requests: bool = True, max_queue: int = 256, max_batch: int = 64,
                 hop_seconds: float = 0.02):
        self.sampler = sampler
        self.batch_requests = batch_requests
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.hop_seconds = hop_seconds
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        # Counters for /healthz; peak_running is the most requests ever generated together in one batch.
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "characters": 0, "peak_running": 0}
        self.metrics = None  # told of each job's new text: pushed(job, pieces) (see metrics.py)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._threads: ThreadPolicy | None = None     # the worker thread's (see _hop)

    # ----- event-loop side -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charrnn-generate")
        self._task = asyncio.create_task(self._run(), name="charrnn-scheduler")

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
            for job, (pieces, records) in out.items():
                if self.metrics is not None:
                    self.metrics.pushed(job, pieces)
                job._push(pieces, records)
                self.stats["characters"] += sum(map(len, pieces))
            for job in [j for j in self.active if j.remaining == 0 and not j.cancelled]:
                self.active.remove(job)
                self.stats["failed" if job.error else "completed"] += 1
                job._finish(job.error, job.error_status)

    # ----- worker-thread side ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _hop(self, new: list[Job], jobs: list[Job]) -> dict[Job, tuple[list[str], list[list[dict]]]]:
        """Prime ``new`` jobs, then step every job for about ``hop_seconds``; the new text (and log-probability
        records) of each job."""
        if self._threads is None:      # made here: it sets the threads of the thread that steps
            self._threads = ThreadPolicy(on=self.sampler.device.type == "cpu")
        for job in new:
            try:
                prompts = [job.prompt] * job.num_samples
                job.decoding = Decoding(self.sampler, prompts, job.length, job.params)
                job.remaining = job.decoding.steps_left
                if job.remaining > 0:
                    job.logits, job.state = self.sampler.prime(prompts)
            except Exception as e:  # a bug, not a user error: fail this request only
                _fail(job, e)
        chosen: dict[Job, list[torch.Tensor]] = {job: [] for job in jobs}   # ids, read once the hop is over
        # A hop that primed new requests ends after one step, so that their first characters go out at once.
        deadline = time.perf_counter() + (0.0 if new else self.hop_seconds)
        while True:
            live = [j for j in jobs if j.remaining > 0 and not j.cancelled]
            if not live:
                break
            for job in live:
                try:
                    chosen[job].append(job.decoding.choose(job.logits))
                    job.remaining = job.decoding.steps_left
                except Exception as e:  # one request's decoding: it fails alone, the batch goes on
                    _fail(job, e)
            stepping = [j for j in live if j.remaining > 0]
            self._threads.update()
            groups = [stepping] if self.batch_requests else [[j] for j in stepping]
            for group in filter(None, groups):
                try:
                    self._step(group, [chosen[j][-1] for j in group])
                except CharRNNError as e:     # e.g. a transformer's context is full: these requests end here
                    for job in group:
                        job.error, job.error_status, job.remaining = str(e), 422, 0
            if time.perf_counter() > deadline:
                break
        out = {}
        for job, steps in chosen.items():
            if steps:
                try:
                    out[job] = job.decoding.read(torch.stack(steps).tolist())    # (steps, samples)
                except Exception as e:
                    _fail(job, e)
                    continue
                if job.decoding.done:
                    job.remaining = 0
        return out

    def _step(self, group: list[Job], ids: list[torch.Tensor]) -> None:
        stepper = self.sampler.stepper
        if len(group) == 1:
            group[0].logits, group[0].state = stepper.step(ids[0], group[0].state)
            return
        logits, state = stepper.step(torch.cat(ids), _cat_states([j.state for j in group]))
        sizes = [j.num_samples for j in group]
        for job, lg, st in zip(group, logits.split(sizes), _split_state(state, sizes)):
            job.logits, job.state = lg, st
