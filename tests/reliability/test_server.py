"""A hostile client against `charrnn serve` on 127.0.0.1: malformed bodies, lying lengths, slow and vanishing
connections, traversal, odd methods, huge heads, many streams, and the server's memory over 2,000 requests.

The fast tests run the real uvicorn configuration (`server_config`) in a thread; the slow ones start
`python -m charrnn serve` in a subprocess and talk to it over raw sockets where HTTP clients would tidy the abuse.
"""

import asyncio
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

import charrnn
from charrnn import sampling
from charrnn.serve import Limits, create_app
from charrnn.serve.app import _events, server_config
from charrnn.serve.engine import Job

from ..conftest import cli, make_text, serving, train_tiny_run

ROOT = Path(__file__).resolve().parents[2]
READ_SECONDS = 1                    # the fast server's --max-read-seconds
LIMITS = Limits(max_read_seconds=READ_SECONDS)
EMOJI = "\U0001f600"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "serve-abuse", max_steps=2)


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)


@pytest.fixture(scope="module")
def port(lm):
    """The port of the real server configuration (uvicorn in a thread) around the tiny model."""
    with serving(server_config(create_app(lm, LIMITS), log_level="critical")) as port:
        yield port


# ----- raw HTTP: what a well-behaved client library would refuse to send ---------------------------------------


def raw_request(method: str, target: str, body: bytes = b"", headers: tuple = ()) -> bytes:
    named = {h.split(":")[0].lower() for h in headers}
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if "connection" not in named:
        head.append("Connection: close")
    if body and not named & {"content-length", "transfer-encoding"}:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (it must, within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_close(s, timeout)


def read_to_close(s: socket.socket, timeout: float) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            raise AssertionError(f"the server held the connection past {timeout} s") from None
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def json_error(raw: bytes, status: int) -> str:
    """The ``error`` of a JSON error response with ``status`` (the server's usual shape)."""
    code, headers, body = parse_response(raw)
    assert code == status, raw[:500]
    assert headers["content-type"] == "application/json", headers
    return json.loads(body)["error"]


def healthy(port: int) -> dict:
    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert r.status_code == 200
    return r.json()


# ----- bodies ------------------------------------------------------------------------------------------------

HOSTILE_BODIES = [
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"length": ' + b"9" * 5001 + b"}", "too many digits"),
    (b'{"prompt": "\\ud800"}', "lone surrogate (\\ud800)"),
    (b'{"prompt": "a\\udfff b"}', "lone surrogate (\\udfff)"),
    (b'{"\\ud800": 1}', "lone surrogate"),
    (b'{"prompt": "\xff\xfe"}', "not valid JSON"),
    (b'{"prompt": "\xed\xa0\x80"}', "lone surrogate (\\ud800)"),  # written as UTF-8 (json reads it)
    (b'{"prompt": "\xc3"}', "not valid JSON"),           # a truncated sequence
]


@pytest.mark.probe("server-hostile-json")
@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/generate/stream"])
def test_hostile_json_bodies_are_400_json_errors(port, endpoint):
    for body, words in HOSTILE_BODIES:
        error = json_error(exchange(port, raw_request("POST", endpoint, body)), 400)
        assert words in error and error.startswith("the request body"), (body[:40], error)
    assert healthy(port)["failed"] == 0


@pytest.mark.probe("server-hostile-json")
def test_a_stream_ends_with_error_when_its_last_event_cannot_be_sent(lm):
    """Whatever goes wrong while streaming, the client's last event is ``done`` or ``error``."""

    async def events():
        job = Job("\ud800", 3, streaming=True)   # a prompt no request can carry (the server refuses it first)
        job._push(["abc"], [[]])
        job._finish()
        return [chunk.decode() async for chunk in _events(job)]

    sent = asyncio.run(events())
    assert sent[0] == 'data: {"text": ["abc"]}\n\n'
    assert sent[-1] == 'event: error\ndata: {"error": "streaming failed: UnicodeEncodeError"}\n\n', sent


@pytest.mark.probe("server-escaped-prompt")
def test_prompt_limit_counts_characters_after_decoding(port, lm):
    limit = LIMITS.max_prompt_chars
    escaped = json.dumps({"prompt": EMOJI * limit, "length": 3, "seed": 1}).encode()  # ensure_ascii: \ud83d\ude00
    assert len(escaped) > 12 * limit
    code, _, body = parse_response(exchange(port, raw_request("POST", "/v1/generate", escaped), timeout=60))
    assert code == 200, body
    assert json.loads(body)["samples"] == lm.generate(EMOJI * limit, 3, seed=1)
    over = json.dumps({"prompt": EMOJI * (limit + 1)}).encode()
    error = json_error(exchange(port, raw_request("POST", "/v1/generate", over)), 422)
    assert error == f"prompt: {limit + 1} characters; this server accepts at most {limit} (--max-prompt-chars)"
    padded = b'{"prompt": "a"' + b" " * (12 * limit + 4096) + b"}"
    error = json_error(exchange(port, raw_request("POST", "/v1/generate", padded)), 413)
    assert f"the prompt may be at most {limit} characters (--max-prompt-chars)" in error, error


@pytest.mark.probe("server-long-prompt")
def test_a_long_prompt_is_primed_in_pieces(lm, monkeypatch):
    """Priming costs the prompt's ids and one piece of activations, not activations per character."""
    prompt = make_text(5 * sampling.PRIME_CHUNK + 17, seed=3)
    ids, _ = lm.sampler.encode_prompt(prompt)
    with torch.inference_mode():
        whole, _ = lm.model(ids[None])
    lengths = []
    forward = type(lm.model).forward
    monkeypatch.setattr(type(lm.model), "forward", lambda self, x, *a, **k: lengths.append(x.shape[1])
                        or forward(self, x, *a, **k))
    logits, _ = lm.sampler.prime([prompt, prompt])
    assert max(lengths) == sampling.PRIME_CHUNK and sum(lengths) == len(prompt)
    assert torch.equal(logits, whole[:, -1].expand(2, -1))


@pytest.mark.probe("server-limits-fit")
@pytest.mark.parametrize("bad", [["--max-prompt-chars", "1000000000000"], ["--max-length", "100000000000"],
                                 ["--max-connections", "100000000", "--max-prompt-chars", "100000"]])
def test_limits_past_the_memory_here_are_refused_before_serving(capsys, run_dir, bad):
    code, out, err = cli(capsys, "serve", run_dir, "--port", 0, *bad)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: prompts of --max-prompt-chars")
    assert "GiB of memory here; lower some of them" in err, err


@pytest.mark.probe("server-tiny-top-p")
def test_a_top_p_below_float32s_smallest_keeps_the_most_likely_character(port, lm):
    for endpoint in ("/v1/generate", "/v1/generate/stream"):
        r = httpx.post(f"http://127.0.0.1:{port}{endpoint}", json={"prompt": "the", "length": 20, "top_p": 1e-300})
        assert r.status_code == 200
        samples = r.json()["samples"] if endpoint == "/v1/generate" else json.loads(r.text.split("data: ")[-1])["samples"]
        assert samples == lm.generate("the", 20, temperature=0), endpoint


# ----- lengths that lie, bodies that trickle --------------------------------------------------------------------


@pytest.mark.probe("server-lying-length")
def test_content_length_that_lies_or_chunks_past_the_limit(port):
    body = b'{"prompt": "the", "length": 5, "seed": 1}'
    # Shorter than the body: the declared bytes are the body (truncated JSON), the rest is never a request.
    short = raw_request("POST", "/v1/generate", body, (f"Content-Length: {len(body) - 10}",))
    assert "not valid JSON" in json_error(exchange(port, short), 400)
    # Longer than the body: the server waits --max-read-seconds for the rest, then answers 408 and closes.
    start = time.monotonic()
    long = raw_request("POST", "/v1/generate", body, (f"Content-Length: {len(body) + 100}",))
    error = json_error(exchange(port, long, timeout=READ_SECONDS + 5), 408)
    assert error == f"the request body did not arrive within {READ_SECONDS} seconds (--max-read-seconds)"
    assert READ_SECONDS - 0.1 < time.monotonic() - start < READ_SECONDS + 3
    # Chunked past the byte limit: refused once the limit is passed (the rest is never read).
    head = raw_request("POST", "/v1/generate/stream", headers=("Transfer-Encoding: chunked",))
    chunk = b"1000\r\n" + b" " * 0x1000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b'8\r\n{"a": 1 \r\n')
        for sent in range(1, 1000):
            if select.select([s], [], [], 0.02)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        raw = read_to_close(s, 10)
    assert "the request body is over" in json_error(raw, 413)
    assert sent * 0x1000 < 2 * 12 * LIMITS.max_prompt_chars + 0x10000
    assert parse_response(raw)[1]["connection"] == "close"


# ----- /static, methods, heads ----------------------------------------------------------------------------------

TRAVERSALS = [
    "/static/../app.py", "/static/../../serve/app.py", "/static/%2e%2e/app.py", "/static/%2e%2e%2fapp.py",
    "/static/%2E%2E%2F%2E%2E%2Fserve%2Fapp.py", "/static/%252e%252e%252fapp.py", "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/static/..%5capp.py", "/static/....//app.py", "/static/%c0%ae%c0%ae/app.py", "/static//etc/passwd",
    "/static/%2fetc%2fpasswd", "/static/app.js%00.py", "/static/../../../../../../etc/passwd",
]


@pytest.mark.probe("server-static-traversal")
def test_path_traversal_on_static_finds_nothing(port):
    secrets = (b"root:", b"STATIC = Path", b"import ")
    for target in TRAVERSALS:
        code, _, body = parse_response(exchange(port, raw_request("GET", target)))
        assert code in (400, 404), (target, code)
        assert not any(s in body for s in secrets), target
    code, _, body = parse_response(exchange(port, raw_request("GET", "/static/app.js")))
    assert code == 200 and b"/v1/generate/stream" in body


@pytest.mark.probe("server-odd-methods")
def test_odd_methods_are_405_json_errors(port):
    for method in ("TRACE", "PROPFIND", "MKCOL", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"):
        for target in ("/", "/healthz", "/v1/model", "/v1/generate", "/v1/generate/stream", "/static/app.js"):
            assert json_error(exchange(port, raw_request(method, target)), 405), (method, target)
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03"
    for junk in (b"G\x00T / HTTP/1.1\r\n\r\n", b"GET /\x7f HTTP/1.1\r\n\r\n", tls_hello):
        assert parse_response(exchange(port, junk))[0] == 400, junk


@pytest.mark.probe("server-long-head")
def test_long_urls_and_headers_are_refused_and_the_server_goes_on(port):
    huge = 64 * 1024
    refused = [
        raw_request("GET", "/v1/model?" + "a" * huge),
        raw_request("GET", "/" + "a/" * (huge // 2)),
        raw_request("GET", "/v1/model", headers=("X-Long: " + "b" * huge,)),
        raw_request("GET", "/v1/model", headers=tuple(f"X-{i}: {'c' * 100}" for i in range(1000))),
    ]
    for data, status in zip(refused, (414, 414, 431, 431)):
        raw = exchange(port, data)
        # (uvicorn answers 400 itself when the head outgrows its buffer before it is complete)
        assert parse_response(raw)[0] == 400 or json_error(raw, status), data[:60]
    # Long but under the head limit: answered as usual.
    assert json_error(exchange(port, raw_request("GET", "/v1/" + "d" * 8000)), 404)
    assert json_error(exchange(port, raw_request("GET", "/static/" + "%2e" * 2000)), 404)
    assert healthy(port)["status"] == "ok"


def head_deadline_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "charrnn.serve" and "request heads" in r.getMessage()]


def test_a_connection_that_sends_no_head_is_dropped_after_max_read_seconds(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        assert read_to_close(s, READ_SECONDS + 3) == b""
        assert time.monotonic() - start < READ_SECONDS + 1.5


def test_a_uvicorn_without_h11protocol_serves_without_the_head_deadline(lm, monkeypatch, caplog):
    """uvicorn's H11Protocol is its internals: where it cannot be imported, the server runs on uvicorn's own
    protocol with one line of warning, and answers as usual (only slow heads are no longer cut short)."""
    import types

    import uvicorn.protocols.http.auto  # noqa: F401  (uvicorn's own choice, imported while it still can be)

    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.h11_impl",
                        types.ModuleType("uvicorn.protocols.http.h11_impl"))  # no H11Protocol in it
    with caplog.at_level("WARNING", logger="charrnn.serve"):
        config = server_config(create_app(lm, LIMITS), log_level="critical")
    [warning] = head_deadline_warnings(caplog)
    assert "cannot import uvicorn.protocols.http.h11_impl.H11Protocol" in warning and "\n" not in warning
    assert config.http == "auto"
    with serving(config) as port:
        assert healthy(port)["status"] == "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a", "length": 5}, timeout=10)
        assert r.status_code == 200 and len(r.json()["samples"]) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a silent client is not cut short
            s.settimeout(READ_SECONDS + 0.5)
            with pytest.raises(socket.timeout):
                s.recv(1)


def test_a_uvicorn_whose_h11protocol_lacks_what_the_deadline_extends_serves_without_it(monkeypatch, caplog):
    from uvicorn.protocols.http import h11_impl

    from charrnn.serve.app import http_protocol

    assert issubclass(http_protocol(), h11_impl.H11Protocol) and not head_deadline_warnings(caplog)
    changed = type("H11Protocol", (h11_impl.H11Protocol,), {"timeout_keep_alive_handler": None})
    monkeypatch.setattr(h11_impl, "H11Protocol", changed)
    with caplog.at_level("WARNING", logger="charrnn.serve"):
        assert http_protocol() is changed   # uvicorn's protocol as it is, nothing mixed in
    [warning] = head_deadline_warnings(caplog)
    assert "H11Protocol has no timeout_keep_alive_handler" in warning


# ----- a real `charrnn serve` process ---------------------------------------------------------------------------

SERVE_READ_SECONDS = 2


@contextmanager
def serve_process(run_dir, *options):
    """``python -m charrnn serve RUN --port 0`` from this worktree; yields (process, port)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", str(run_dir), "--port", "0",
                             "--log-level", "critical", "--max-read-seconds", str(SERVE_READ_SECONDS), *options],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            proc.kill()
            proc.stderr.close()


def proc_status(pid: int, key: str) -> int:
    """A figure from /proc/PID/status (VmRSS in kB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def served(run_dir):
    with serve_process(run_dir, "--max-queue", "400", "--max-batch", "64") as server:
        yield server


@pytest.mark.slow
@pytest.mark.probe("server-slow-clients")
def test_slow_clients_are_dropped_and_others_served_meanwhile(served):
    """200 connections sending a header byte a second, one sending nothing, one whose body trickles, and one
    trickling a body its endpoint never reads."""
    proc, port = served
    start = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    idle, trickle, unread = (socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3))
    trickle.sendall(raw_request("POST", "/v1/generate", headers=("Content-Length: 1000",)))
    unread.sendall(raw_request("GET", "/v1/model", headers=("Content-Length: 1000000", "Connection: keep-alive")))
    everyone = slow + [idle, trickle, unread]
    head = raw_request("GET", "/healthz")
    received = {s: b"" for s in everyone}
    closed: dict[socket.socket, float] = {}  # socket -> seconds from the start until the server closed it
    answered_in = None
    try:
        for tick in range(SERVE_READ_SECONDS + 4):
            for s in slow + [trickle, unread]:
                try:
                    s.send(head[tick:tick + 1] if s in slow else b" ", socket.MSG_DONTWAIT)
                except OSError:
                    closed.setdefault(s, time.monotonic() - start)
            if tick == 1:  # all of them connected and trickling: an ordinary client is answered at once
                t = time.monotonic()
                assert httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).status_code == 200
                answered_in = time.monotonic() - t
            second = time.monotonic() + 1
            while time.monotonic() < second and len(closed) < len(everyone):
                for s in select.select([s for s in everyone if s not in closed], [], [], 0.1)[0]:
                    try:
                        data = s.recv(65536, socket.MSG_DONTWAIT)
                    except OSError:
                        data = b""
                    received[s] += data
                    if not data:
                        closed[s] = time.monotonic() - start
        print(f"\n200 slow connections: an ordinary request answered in {answered_in:.3f} s meanwhile; "
              f"all dropped {min(closed.values()):.1f}-{max(closed.values()):.1f} s after they connected")
    finally:
        for s in everyone:
            s.close()
    assert answered_in is not None and answered_in < 2
    assert len(closed) == len(everyone), f"{len(everyone) - len(closed)} slow connections still open"
    assert max(closed.values()) < SERVE_READ_SECONDS + 2.5
    assert not any(received[s] for s in slow + [idle]), "a slow connection was answered before its head arrived"
    assert "did not arrive within" in json_error(received[trickle], 408)
    assert parse_response(received[unread])[0] == 200
    assert healthy(port)["status"] == "ok"


@pytest.mark.slow
@pytest.mark.probe("server-many-streams")
def test_300_concurrent_streams_all_finish(served, lm):
    _, port = served
    specs = [{"prompt": "the ", "length": 40, "seed": i} for i in range(300)]

    async def one(client, spec):
        async with client.stream("POST", "/v1/generate/stream", json=spec) as r:
            assert r.status_code == 200
            events = [e for e in (await r.aread()).decode().split("\n\n") if e]
        assert events[-1].startswith("event: done\n"), events[-1]
        return json.loads(events[-1].split("data: ", 1)[1])["samples"]

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, s) for s in specs))

    start = time.monotonic()
    results = asyncio.run(main())
    print(f"\n300 concurrent streams finished in {time.monotonic() - start:.1f} s")
    for spec, samples in list(zip(specs, results))[::30]:
        assert samples == lm.generate(spec["prompt"], spec["length"], seed=spec["seed"])
    h = healthy(port)
    assert h["running"] == 0 and h["waiting"] == 0 and h["failed"] == 0


def _stream_then_vanish(port: int, reset: bool) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"prompt": "the ", "length": 1_000}).encode()
    s.sendall(raw_request("POST", "/v1/generate/stream", body))
    seen = b""
    while b"data: " not in seen:
        seen += s.recv(4096)
        assert seen, "the stream ended before its first event"
    if reset:  # RST instead of FIN
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.slow
@pytest.mark.probe("server-vanishing-clients")
def test_clients_that_vanish_mid_stream_cost_nothing(served):
    proc, port = served
    healthy(port)
    fds, threads, cancelled = open_fds(proc.pid), proc_status(proc.pid, "Threads"), healthy(port)["cancelled"]

    async def others():  # ordinary clients served while the others vanish
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answers = await asyncio.gather(*(client.post("/v1/generate", json={"length": 30}) for _ in range(20)))
        return [a.status_code for a in answers]

    vanish = [threading.Thread(target=_stream_then_vanish, args=(port, i % 2 == 0)) for i in range(40)]
    for t in vanish:
        t.start()
    assert asyncio.run(others()) == [200] * 20
    for t in vanish:
        t.join(60)
    deadline = time.monotonic() + 15
    while True:
        h = healthy(port)
        if (h["running"], h["waiting"], h["cancelled"]) == (0, 0, cancelled + 40) and open_fds(proc.pid) <= fds:
            break
        assert time.monotonic() < deadline, (h, open_fds(proc.pid), fds)
        time.sleep(0.1)
    assert proc_status(proc.pid, "Threads") == threads


def _mixed(i: int, port: int) -> tuple[str, str, bytes, tuple[int, ...]]:
    """The i-th of a mix of valid and abusive requests: (method, path, body, statuses it may get)."""
    kind = i % 10
    if kind in (0, 1, 2):
        return "POST", "/v1/generate", json.dumps({"prompt": "the", "length": 20, "seed": i}).encode(), (200,)
    if kind == 3:
        return "POST", "/v1/generate/stream", json.dumps({"length": 20, "num_samples": 2}).encode(), (200,)
    return [
        ("POST", "/v1/generate", HOSTILE_BODIES[i % len(HOSTILE_BODIES)][0], (400,)),
        ("POST", "/v1/generate", json.dumps({"prompt": EMOJI * 2001}).encode(), (422,)),
        ("POST", "/v1/generate", b'{"prompt": "' + b"x" * 30_000 + b'"}', (413,)),
        ("GET", TRAVERSALS[i % len(TRAVERSALS)], b"", (400, 404)),
        ("PROPFIND", "/v1/generate", b"", (405,)),
        ("GET", "/v1/model", b"", (200,)),
    ][kind - 4]


@pytest.mark.slow
@pytest.mark.probe("server-memory-flat")
def test_server_memory_is_flat_over_2000_mixed_requests(served):
    proc, port = served

    async def batch(start: int, n: int):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            sem = asyncio.Semaphore(16)

            async def one(i):
                method, path, body, statuses = _mixed(i, port)
                async with sem:
                    r = await client.request(method, path, content=body)
                assert r.status_code in statuses, (i, method, path, r.status_code, r.text[:200])

            await asyncio.gather(*(one(i) for i in range(start, start + n)))

    asyncio.run(batch(0, 300))  # warm up: allocator pools, imports, caches
    before = proc_status(proc.pid, "VmRSS")
    start = time.monotonic()
    asyncio.run(batch(300, 2000))
    after = proc_status(proc.pid, "VmRSS")
    print(f"\nserver RSS before 2,000 mixed requests {before / 1024:.1f} MB, after {after / 1024:.1f} MB "
          f"({(after - before) / 1024:+.1f} MB, {time.monotonic() - start:.1f} s)")
    assert after - before < 30 * 1024
    h = healthy(port)
    assert h["running"] == 0 and h["waiting"] == 0 and h["failed"] == 0
