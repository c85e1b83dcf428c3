"""The request and response plumbing every endpoint shares: reading a JSON body within the limits, the
errors as JSON, server-sent events, and streams that cancel their jobs when the client goes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from .engine import Job
from .limits import Limits


class RequestError(Exception):
    """A request refused with ``status``; ``param``: the request's field at fault, if one is; ``close``: the body
    may be unread, so the connection is closed."""

    def __init__(self, status: int, message: str, close: bool = False, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = {"Connection": "close"} if close else None


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def sse(data: dict, event: str | None = None) -> bytes:
    """One server-sent event, encoded; the payload is JSON so that newlines in the text survive."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused unread past the bytes a prompt of ``max_prompt_chars`` can take."""
    max_body = limits.max_body()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise RequestError(413, f"the request body is over {max_body} bytes; the prompt may be at most "
                                    f"{limits.max_prompt_chars} characters (--max-prompt-chars)", close=True)
    return bytes(body)


def parse_json(body: bytes):
    """``body`` as JSON, refused (400) when a JSON parser would refuse it or it could not be sent back."""
    try:
        data = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") has no UTF-8
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from None
    except UnicodeEncodeError as e:
        raise RequestError(400, f"the request body holds a lone surrogate (\\u{ord(e.object[e.start]):04x}), which is "
                                "not a character; escape one past U+FFFF as a surrogate pair") from None
    except RecursionError:
        raise RequestError(400, "the request body is JSON nested too deeply; a request is one flat object, "
                                "e.g. {\"prompt\": \"ROMEO:\"}") from None
    except ValueError:  # an integer past Python's digits limit
        raise RequestError(400, "the request body holds a number with too many digits") from None
    return data


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object; it must arrive within ``max_read_seconds``."""
    try:
        body = await asyncio.wait_for(read_body(request, limits), limits.max_read_seconds)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {limits.max_read_seconds} seconds "
                                "(--max-read-seconds)", close=True) from None
    data = parse_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object, e.g. {\"prompt\": \"ROMEO:\"}")
    return data


async def read_request(request: Request, limits: Limits, schema: type[BaseModel]):
    """The request body read by :func:`read_json` and validated as ``schema``; refused (422) with every field
    that does not fit it."""
    data = await read_json(request, limits)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        raise RequestError(422, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                                          for err in errors),
                           param=next((str(err["loc"][0]) for err in errors if err["loc"]), None)) from None


def check_limits(prompts: list[str], length: int, num_samples: int, limits: Limits,
                 name: Callable[[str], str] | None = None) -> None:
    """Refuse (422) a request over ``limits``: its prompts' characters, the characters asked per sample, the
    samples of all its prompts together, and more prompts than the queue holds.  ``name``: the request's name
    for each field (``length``, ``num_samples``) where its API names them otherwise; its messages then leave
    out the server's options (``--max-length``), which charrnn's own API names."""
    def refuse(field: str, message: str, option: str):
        shown = name(field) if name else field
        raise RequestError(422, f"{shown}: {message}" + ("" if name else f" ({option})"), param=shown)

    longest = max(map(len, prompts), default=0)
    if longest > limits.max_prompt_chars:
        refuse("prompt", f"{longest} characters; this server accepts at most {limits.max_prompt_chars}",
               "--max-prompt-chars")
    if length > limits.max_length:
        refuse("length", f"{length}; this server generates at most {limits.max_length} characters per sample",
               "--max-length")
    total = len(prompts) * num_samples
    if total > limits.max_samples:
        asked = f"{num_samples}" if len(prompts) == 1 else f"{len(prompts)} prompts x {num_samples} = {total} samples"
        refuse("prompt" if len(prompts) > limits.max_samples else "num_samples",
               f"{asked}; this server generates at most {limits.max_samples} samples per request", "--max-samples")
    if len(prompts) > limits.max_queue:
        refuse("prompt", f"{len(prompts)} prompts; this server holds at most {limits.max_queue} requests at once",
               "--max-queue")


async def pieces(job: Job):
    """A streaming job's new text (one string per sample) and log-probability records, what has piled up
    sent as one."""
    while True:
        update = await job.updates.get()
        finished = update is None
        while not finished and not job.updates.empty():
            more = job.updates.get_nowait()
            if more is None:
                finished = True
            else:
                update = tuple([a + b for a, b in zip(old, new)] for old, new in zip(update, more))
        if update is not None and any(update[0]):
            yield update
        if finished:
            return


async def disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only ``http.disconnect`` is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class JobStream(StreamingResponse):
    """An event stream that cancels its jobs however the response ends (finished, client gone, error)."""

    def __init__(self, jobs: list[Job], content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.jobs = jobs

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass
        finally:
            for job in self.jobs:
                job.cancel()
