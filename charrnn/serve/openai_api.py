"""The OpenAI Completions API over charrnn's engine: ``POST /v1/completions`` and ``GET /v1/models``, as the
official ``openai`` client speaks them.

``max_tokens`` counts *characters* whatever the model (a character model makes one per step; a word,
BPE or transformer model generates tokens until the text has that many characters, then cuts it),
as ``--length`` does; ``/v1/models`` says so.  ``logprobs`` gives, per generated token, its
log-probability under the model's own distribution and the likeliest alternatives.  ``echo`` puts the
prompt in front of the text.  ``best_of``, ``suffix``, ``logit_bias`` and token-id prompts are refused
(400); ``null`` for a field is its default.  Errors have the OpenAI body ``{"error": {"message", "type",
"param", "code"}}``; an invalid request is 400 with ``param`` the field at fault, named as the API names it
(``max_tokens``, ``n``), the other statuses those of charrnn's own endpoints.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..errors import CharRNNError, OptionError
from ..options import SamplingParams, check_shape
from .engine import Busy, Job
from .protocol import JobStream, RequestError, check_limits, disconnected, pieces, read_request


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; ``top_k``, ``min_p`` and ``repetition_penalty`` are charrnn's additions
    (as vLLM accepts them)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict | None = None
    user: str | None = None      # accepted, ignored
    label: str | None = Field(None, max_length=1000)   # charrnn's extra field: a labelled run's label (docs/serving.md)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError(422, "stop: at most 4 stop texts", param="stop")
        return tuple(stops)

    def to_sampling_params(self) -> SamplingParams:
        """The request's sampling parameters, checked: an :class:`OptionError` names the field at fault (a
        :class:`RequestError` past 4 stop texts)."""
        return SamplingParams.pick(self, stop=self.stops())


# The request's names for the options charrnn names otherwise.
API_NAMES = {"length": "max_tokens", "num_samples": "n"}


def openai_error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error body; an invalid request (charrnn's 422) is 400, as OpenAI answers it."""
    status = 400 if status == 422 else status
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class OpenAIEndpoints:
    """``/v1/completions`` and ``/v1/models`` for one served model."""

    def __init__(self, lm, limits, engine):
        self.lm, self.limits, self.engine = lm, limits, engine
        self.created = int(time.time())

    @functools.cached_property
    def model(self) -> str:
        """The served model's id: the run directory's name, or the Hugging Face model's."""
        described = self.lm.describe()
        return described.get("run") or described["model"]

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created, "owned_by": "charrnn",
            "max_tokens_counts": "characters", "tokenizer": self.lm.vocab.kind}]})

    async def completions(self, request: Request):
        try:
            req, params = await self._parse(request)
            jobs = self.engine.submit_all(self._jobs(req, params))
        except RequestError as e:
            return openai_error(e.status, e.message, e.param, headers=e.headers)
        except ClientDisconnect:
            return openai_error(499, "the client closed the request")
        except Busy as e:
            return openai_error(503, str(e), headers={"Retry-After": "1"})
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            return JobStream(jobs, self._events(req, jobs, meta))
        return await self._answer(request, req, jobs, meta)

    async def _parse(self, request: Request) -> tuple[CompletionRequest, SamplingParams]:
        req = await read_request(request, self.limits, CompletionRequest)
        unsupported = [name for name, given in (("best_of", req.best_of not in (None, req.n)), ("suffix", req.suffix),
                                                ("logit_bias", req.logit_bias)) if given]
        if unsupported:
            raise RequestError(400, f"{unsupported[0]} is not supported by charrnn; leave it out", param=unsupported[0])
        prompts = self._prompts(req)
        check_limits(prompts, req.max_tokens, req.n, self.limits, _api_name)
        try:
            check_shape(req.max_tokens, req.n)
            params = req.to_sampling_params()
            self.lm.sampler.check_label(params.label)       # a label the run has
            for prompt in prompts:
                self.lm.sampler.encode_prompt(prompt)
        except OptionError as e:
            raise RequestError(422, e.render(_api_name), param=_api_name(e.option)) from None
        except CharRNNError as e:      # what the tokenizer makes of a prompt
            raise RequestError(422, str(e), param="prompt") from None
        return req, params

    def _prompts(self, req: CompletionRequest) -> list[str]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise RequestError(422, "prompt: give a string or a list of strings", param="prompt")
        return prompts

    def _jobs(self, req: CompletionRequest, params: SamplingParams) -> list[Job]:
        return [Job(prompt, req.max_tokens, req.n, params, streaming=req.stream) for prompt in self._prompts(req)]

    async def _answer(self, request: Request, req: CompletionRequest, jobs: list[Job], meta: dict):
        waiter = asyncio.ensure_future(asyncio.gather(*(job.done.wait() for job in jobs)))
        hangup = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([waiter, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            waiter.cancel()
            for job in jobs:
                job.cancel()
        failed = next((job for job in jobs if job.error or job.cancelled or not job.done.is_set()), None)
        if failed is not None:
            return openai_error(failed.error_status if failed.error else 499,
                                failed.error or "the client closed the request")
        choices = []
        for p, job in enumerate(jobs):
            for s, (text, finish) in enumerate(zip(job.texts, job.finish_reasons)):
                head = job.prompt if req.echo else ""
                choices.append({"text": head + text, "index": p * req.n + s, "finish_reason": finish,
                                "logprobs": _logprobs(job.records[s], len(head)) if req.logprobs is not None
                                else None})
        return JSONResponse({**meta, "choices": choices, "usage": self._usage(jobs)})

    def _usage(self, jobs: list[Job]) -> dict:
        prompt = sum(len(self.lm.sampler.prompt_ids(job.prompt)) for job in jobs)
        done = sum(sum(job.decoding.tokens) for job in jobs if job.decoding is not None)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def _events(self, req: CompletionRequest, jobs: list[Job], meta: dict):
        """The stream: a chunk per sample per batch of new text, a last chunk per sample with its finish reason,
        the usage when ``stream_options.include_usage``, then ``data: [DONE]``."""
        def chunk(index: int, text: str, finish: str | None = None, records=None, offset: int = 0) -> bytes:
            choice = {"text": text, "index": index, "finish_reason": finish,
                      "logprobs": _logprobs(records, offset) if records is not None else None}
            return f"data: {json.dumps({**meta, 'choices': [choice]}, ensure_ascii=False)}\n\n".encode()

        shown = {}
        if req.echo:
            for p, job in enumerate(jobs):
                for s in range(job.num_samples):
                    yield chunk(p * req.n + s, job.prompt)
                    shown[p * req.n + s] = len(job.prompt)     # the text's offsets count the prompt, as unstreamed
        async for p, (texts, records) in _merged(jobs):
            for s, text in enumerate(texts):
                index = p * req.n + s
                if text or records[s]:
                    yield chunk(index, text, records=records[s] if req.logprobs is not None else None,
                                offset=shown.get(index, 0))
                    shown[index] = shown.get(index, 0) + len(text)
        failed = next((job for job in jobs if job.error), None)
        if failed is not None:
            body = {"error": {"message": failed.error, "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(body)}\n\n".encode()
        else:
            for p, job in enumerate(jobs):
                for s, finish in enumerate(job.finish_reasons):
                    yield chunk(p * req.n + s, "", finish)
            if (req.stream_options or {}).get("include_usage"):
                yield f"data: {json.dumps({**meta, 'choices': [], 'usage': self._usage(jobs)})}\n\n".encode()
        yield b"data: [DONE]\n\n"


def _api_name(option: str) -> str:
    return API_NAMES.get(option, option)


def _logprobs(records: list[dict], offset: int) -> dict:
    """Log-probability records in the Completions API's shape, text offsets counted from ``offset``."""
    offsets, at = [], offset
    for r in records:
        offsets.append(at)
        at += len(r["token"])
    return {"tokens": [r["token"] for r in records], "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [r["top"] for r in records], "text_offset": offsets}


async def _merged(jobs: list[Job]):
    """``(job index, (texts, records))`` from every job's stream as they come."""
    if len(jobs) == 1:
        async for update in pieces(jobs[0]):
            yield 0, update
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, job: Job):
        async for update in pieces(job):
            await queue.put((p, update))
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(p, job)) for p, job in enumerate(jobs)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
