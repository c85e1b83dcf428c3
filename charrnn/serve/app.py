"""The HTTP interface: a Starlette application around one loaded model and an :class:`Engine`.

Endpoints (JSON in, JSON out; every error is ``{"error": "<what is wrong>"}`` with a 4xx/5xx status):

- ``POST /v1/generate``: ``{prompt, length, num_samples}`` and the sampling parameters (``temperature``,
  ``top_k``, ``top_p``, ``min_p``, penalties, ``stop``, ``logprobs``, ``seed``) -> ``{samples: [...], seed}``.
- ``POST /v1/generate/stream``: the same request; server-sent events, one ``data: {"text": [...]}``
  per batch of new characters (one string per sample), then ``event: done`` with the samples.
- ``GET /v1/model``: the loaded model, its vocabulary and the server's limits.
- ``GET /healthz``: ``{"status": "ok"}`` and the engine's counters.
- ``GET /metrics``: counters, gauges and histograms in the Prometheus text format (``metrics.py``).
- ``GET /``: the web page (``static/``).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CharRNNError
from ..options import GenerationOptions, SamplingParams, check_shape
from ..prompt_cache import PromptCache
from .auth import BearerAuth
from .engine import Busy, Engine, Job
from .limits import Limits
from .metrics import Metrics, MetricsMiddleware
from .openai_api import OpenAIEndpoints
from .protocol import (JobStream, RequestError, check_limits, disconnected, error_response, pieces, read_request,
                       sse)

STATIC = Path(__file__).parent / "static"
_DEFAULTS, _SAMPLING = GenerationOptions(), SamplingParams()
log = logging.getLogger("charrnn.serve")
# A request's target (path and query), and its line and headers together: past them, 414 and 431.
MAX_URL_BYTES = 8 * 1024
MAX_HEAD_BYTES = 16 * 1024
LABEL_CHARS = 1000          # a label request (a name, or a mix of names and weights) at most


class GenerateRequest(BaseModel):
    """The request body; types are strict (``"5"`` is not a length, ``true`` is not a temperature)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = _DEFAULTS.prompt
    length: int = 200  # shorter than `charrnn generate`'s, for a page that waits for it
    temperature: float = _SAMPLING.temperature
    top_k: int | None = _SAMPLING.top_k
    top_p: float | None = _SAMPLING.top_p
    min_p: float | None = _SAMPLING.min_p
    repetition_penalty: float = _SAMPLING.repetition_penalty
    presence_penalty: float = _SAMPLING.presence_penalty
    frequency_penalty: float = _SAMPLING.frequency_penalty
    stop: list[str] = Field(default_factory=list, max_length=4)
    logprobs: int | None = Field(None, ge=0, le=20)
    num_samples: int = _DEFAULTS.num_samples
    seed: int | None = Field(_SAMPLING.seed, ge=0, lt=2**63)
    label: str | None = Field(_SAMPLING.label, max_length=LABEL_CHARS)

    def to_sampling_params(self) -> SamplingParams:
        """The request's sampling parameters, checked: an :class:`OptionError` names the field at fault."""
        return SamplingParams.pick(self, stop=tuple(self.stop))


def describe_model(lm, limits: Limits) -> dict:
    return {**lm.describe(), "limits": limits.to_dict(), "defaults": GenerateRequest().model_dump()}


async def _events(job: Job):
    """A streaming job's server-sent events: the new characters, then the samples; always ends with ``done``
    or ``error``."""
    try:
        async for texts, _ in pieces(job):
            yield sse({"text": texts})
        last = (sse({"error": job.error}, event="error") if job.error else
                sse({"samples": job.samples, "finish_reasons": job.finish_reasons, "seed": job.seed}, event="done"))
    except Exception as e:  # a bug, not a user error: the client still learns that the stream has ended
        log.exception("streaming failed")
        last = sse({"error": f"streaming failed: {type(e).__name__}"}, event="error")
    yield last


class _Endpoints:
    """The HTTP endpoints of one loaded model, its limits and its engine."""

    def __init__(self, lm, limits: Limits, engine: Engine):
        self.lm, self.limits, self.engine = lm, limits, engine

    async def parse(self, request: Request, streaming: bool) -> Job:
        req = await read_request(request, self.limits, GenerateRequest)
        check_limits([req.prompt], req.length, req.num_samples, self.limits)
        try:
            check_shape(req.length, req.num_samples)
            params = req.to_sampling_params()
            self.lm.sampler.check_label(params.label)  # a label the run has
            self.lm.sampler.encode_prompt(req.prompt)  # an empty prompt needs a newline in the vocabulary
        except CharRNNError as e:
            raise RequestError(422, str(e)) from None  # an OptionError names the field: "top_p must be ..."
        return Job(req.prompt, req.length, req.num_samples, params, streaming=streaming)

    async def submit(self, request: Request, streaming: bool) -> Job | JSONResponse:
        try:
            return self.engine.submit(await self.parse(request, streaming))
        except RequestError as e:
            return error_response(e.status, e.message, headers=e.headers)
        except ClientDisconnect:  # gone while sending the body: nobody reads the answer
            return error_response(499, "the client closed the request")
        except Busy as e:
            return error_response(503, str(e), headers={"Retry-After": "1"})

    async def generate(self, request: Request):
        job = await self.submit(request, streaming=False)
        if not isinstance(job, Job):
            return job
        # Wait for the samples, or for the client to hang up (then stop generating for it).
        waiter = asyncio.ensure_future(job.done.wait())
        hangup = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([waiter, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            waiter.cancel()
            job.cancel()  # no-op when finished
        if not job.done.is_set() or job.cancelled:
            return error_response(499, "the client closed the request")
        if job.error:
            return error_response(job.error_status, job.error)
        logprobs = {"logprobs": job.records} if job.params.logprobs is not None else {}
        return JSONResponse({"samples": job.samples, "finish_reasons": job.finish_reasons, "seed": job.seed,
                             **logprobs})

    async def generate_stream(self, request: Request):
        job = await self.submit(request, streaming=True)
        return JobStream([job], _events(job)) if isinstance(job, Job) else job

    async def model(self, request: Request):
        return JSONResponse(describe_model(self.lm, self.limits))

    async def healthz(self, request: Request):
        cache = self.lm.sampler.prompt_cache
        more = {"prompt_cache": {"entries": len(cache.entries), "bytes": cache.bytes, "hits": cache.hits,
                                 "misses": cache.misses}} if cache is not None else {}
        return JSONResponse({"status": "ok", **self.engine.status(), **more})

    async def index(self, request: Request):
        return FileResponse(STATIC / "index.html")

    async def http_error(self, request: Request, exc: HTTPException):
        return error_response(exc.status_code, exc.detail)

    async def server_error(self, request: Request, exc: Exception):
        """A bug, not a user error: answered in the usual shape (uvicorn logs the traceback)."""
        return error_response(500, f"internal error: {type(exc).__name__}")


def create_app(lm, limits: Limits | None = None, *, api_key: str | None = None, cors_origins=(),
               hop_seconds: float = 0.02, threads: int | None = None) -> Starlette:
    """The server for a model loaded by :func:`charrnn.load` (a run, or a Hugging Face model); ``api_key``: the
    key ``/v1/`` requests must carry (auth.py); ``cors_origins``: the web origins allowed to call it; ``threads``:
    the engine's intra-op threads (see :func:`charrnn.threads.leave_to_worker`)."""
    limits = (limits or Limits()).validate()
    if limits.prompt_cache_mb and lm.capabilities.prompt_cache:
        lm.sampler.prompt_cache = PromptCache(limits.prompt_cache_mb << 20)
    engine = Engine(lm.sampler, batch_requests=lm.capabilities.batchable, max_queue=limits.max_queue,
                    max_batch=limits.max_batch, hop_seconds=hop_seconds, threads=threads)
    engine.metrics = metrics = Metrics(engine)
    ep = _Endpoints(lm, limits, engine)
    oa = OpenAIEndpoints(lm, limits, engine)

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = Starlette(
        routes=[
            Route("/", ep.index),
            Route("/healthz", ep.healthz),
            Route("/metrics", metrics.endpoint),
            Route("/v1/model", ep.model),
            Route("/v1/generate", ep.generate, methods=["POST"]),
            Route("/v1/generate/stream", ep.generate_stream, methods=["POST"]),
            Route("/v1/completions", oa.completions, methods=["POST"]),
            Route("/v1/models", oa.models),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[*_cors(cors_origins), Middleware(MetricsMiddleware, metrics=metrics),
                    Middleware(BearerAuth, api_key=api_key), Middleware(_HeadLimits)],
        exception_handlers={HTTPException: ep.http_error, Exception: ep.server_error},
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.limits = limits
    return app


def _cors(origins) -> list[Middleware]:
    """Outermost, so that a browser's preflight (OPTIONS, without the key) is answered."""
    return [Middleware(_CORS, allow_origins=list(origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])] if origins else []


class _CORS(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as a JSON error, as every other error is."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return error_response(response.status_code, response.body.decode(), headers=headers)


class _HeadLimits:
    """Refuses a request whose target is over ``MAX_URL_BYTES`` (414) or whose head is over ``MAX_HEAD_BYTES``
    (431) before any route sees it (uvicorn's h11 only caps a head that is still arriving)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            url = len(scope["raw_path"]) + len(scope["query_string"])
            head = url + sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if url > MAX_URL_BYTES:
                refusal = error_response(414, f"the URL is over {MAX_URL_BYTES} bytes")
                return await refusal(scope, receive, send)
            if head > MAX_HEAD_BYTES:
                refusal = error_response(431, f"the request's headers are over {MAX_HEAD_BYTES} bytes")
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class _HeadDeadline:
    """Mixed into uvicorn's h11 protocol (:func:`http_protocol`): ``timeout_keep_alive`` is also the time a client
    has to send each request's line and headers (from the connection's start or the previous response; a byte now
    and then does not extend it) and the rest of a body its endpoint did not read."""

    deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.deadline is not None and self._answering():  # the head has arrived; the app reads the body
            self.deadline.cancel()
            self.deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._answering() and not self.transport.is_closing():
            self._await_request()

    def connection_lost(self, exc) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_request(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


# What _HeadDeadline extends or calls on uvicorn's H11Protocol (uvicorn.protocols.http.h11_impl), and the
# attributes it reads that H11Protocol sets in __init__ / connection_made: uvicorn's internals, so checked.
_H11_METHODS = ("connection_made", "data_received", "on_response_complete", "connection_lost",
                "timeout_keep_alive_handler")
_H11_ATTRIBUTES = ("cycle", "loop", "timeout_keep_alive", "transport")


def http_protocol():
    """uvicorn's h11 protocol with the head deadline (:class:`_HeadDeadline`) mixed in.  A uvicorn whose
    ``H11Protocol`` cannot be imported, or lacks what the deadline builds on, serves without it (its own protocol,
    so clients that trickle a request's head are dropped only by uvicorn's own timeouts), with a one-line warning."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError as e:
        return _without_head_deadline(f"cannot import uvicorn.protocols.http.h11_impl.H11Protocol ({e})", "auto")
    assigned = {name for method in (H11Protocol.__init__, H11Protocol.connection_made)
                for name in getattr(getattr(method, "__code__", None), "co_names", ())}
    missing = ([name for name in _H11_METHODS if not callable(getattr(H11Protocol, name, None))]
               + [name for name in _H11_ATTRIBUTES if name not in assigned])
    if missing:
        return _without_head_deadline(f"uvicorn's H11Protocol has no {', '.join(missing)}", H11Protocol)
    return type("HeadDeadlineH11Protocol", (_HeadDeadline, H11Protocol), {})


def _without_head_deadline(why: str, protocol):
    log.warning("uvicorn %s: %s; serving without the deadline on request heads (the uvicorn versions "
                "charrnn[serve] asks for have it)", getattr(uvicorn, "__version__", "?"), why)
    return protocol


def server_config(app: Starlette, **options) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (from :func:`create_app`): slow or excess connections are dropped
    as its limits say; ``options`` go to ``uvicorn.Config``."""
    limits = app.state.limits
    return uvicorn.Config(app, http=http_protocol(), timeout_keep_alive=limits.max_read_seconds,
                          limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          **options)
