"""charrnn serve: the real server (uvicorn on a free localhost port) against a tiny trained run.

Every endpoint, every limit (4xx + JSON error), seeds, 50 concurrent requests compared with the
library's own output, disconnects that stop generation, the command line, and the web page in
headless Chromium.
"""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import types

import httpx
import pytest

import charrnn
from charrnn.cli import main
from charrnn.errors import CharRNNError
from charrnn.serve import Limits, create_app

from .conftest import browser as open_browser
from .conftest import running, train_tiny_run

LIMITS = Limits(max_prompt_chars=100, max_length=200_000, max_samples=4, max_queue=64, max_batch=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "serve", max_steps=8)


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)



@pytest.fixture(scope="module")
def server(lm):
    app = create_app(lm, LIMITS)
    with running(app) as url:
        yield url, app.state.engine


def health(url) -> dict:
    r = httpx.get(f"{url}/healthz")
    assert r.status_code == 200
    return r.json()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----- endpoints ------------------------------------------------------------------------------------------


def test_healthz_and_model(server, lm, run_dir):
    url, _ = server
    h = health(url)
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    r = httpx.get(f"{url}/v1/model")
    assert r.status_code == 200
    info = r.json()
    assert info["model"] == lm.config["model"]
    assert info["vocabulary"] == "".join(lm.vocab.chars)
    assert info["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert info["run"] == run_dir.name and info["weights"] == "best.safetensors"
    assert info["limits"] == LIMITS.to_dict()
    assert info["int8"] is False


def test_web_page_and_static_files(server):
    url, _ = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for part in ('id="prompt"', 'id="temperature"', 'id="length"', 'id="generate"', 'id="stop"', "/static/app.js"):
        assert part in page.text
    js = httpx.get(f"{url}/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/v1/generate/stream" in js.text and "AbortController" in js.text
    assert httpx.get(f"{url}/static/style.css").status_code == 200


def test_generate_matches_the_library_and_seeds_repeat(server, lm):
    url, _ = server
    body = {"prompt": "the ", "length": 80, "temperature": 0.8, "top_k": 10, "top_p": 0.95, "num_samples": 3,
            "seed": 7}
    r = httpx.post(f"{url}/v1/generate", json=body)
    assert r.status_code == 200, r.text
    samples = r.json()["samples"]
    assert samples == lm.generate("the ", 80, num_samples=3, temperature=0.8, top_k=10, top_p=0.95, seed=7)
    assert len(samples) == 3 and all(len(s) == 84 and s.startswith("the ") for s in samples)
    assert httpx.post(f"{url}/v1/generate", json=body).json()["samples"] == samples
    # Without a seed the server picks one and says which: asking again with it gives the same text.
    first = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "length": 60}).json()
    again = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "length": 60, "seed": first["seed"]}).json()
    assert again["samples"] == first["samples"]


def test_generate_edge_cases(server, lm):
    url, _ = server
    # Defaults: an empty prompt starts after a newline, 200 characters.
    r = httpx.post(f"{url}/v1/generate", json={"seed": 3})
    assert r.status_code == 200 and r.json()["samples"] == lm.generate("", 200, seed=3)
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "xyz", "length": 0}).json()["samples"] == ["xyz"]
    greedy = httpx.post(f"{url}/v1/generate", json={"prompt": "the", "length": 40, "temperature": 0}).json()
    assert greedy["samples"] == lm.generate("the", 40, temperature=0)
    # Characters outside the vocabulary are read as [UNK], as on the command line.
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "\u00e9t\u00e9 \U0001f600", "length": 20, "seed": 1})
    assert r.status_code == 200 and r.json()["samples"] == lm.generate("\u00e9t\u00e9 \U0001f600", 20, seed=1)
    # curl -d sends a form content type; the body is JSON all the same.
    r = httpx.post(f"{url}/v1/generate", content=b'{"prompt": "a", "length": 5, "seed": 2}',
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["samples"] == lm.generate("a", 5, seed=2)


def test_stream_sends_characters_as_events_then_done(server, lm):
    url, _ = server
    body = {"prompt": "ROMEO: ", "length": 300, "num_samples": 2, "temperature": 1.0, "seed": 11}
    with httpx.stream("POST", f"{url}/v1/generate/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"message"} and len(kinds) >= 2
    streamed = ["".join(parts) for parts in zip(*(data["text"] for kind, data in events if kind == "message"))]
    expected = lm.generate("ROMEO: ", 300, num_samples=2, seed=11)
    assert ["ROMEO: " + s for s in streamed] == expected
    assert events[-1][1]["samples"] == expected


def test_stream_delivers_text_before_generation_ends(server):
    """The first characters arrive while the rest is still being generated."""
    url, _ = server
    before = health(url)["completed"]
    with httpx.stream("POST", f"{url}/v1/generate/stream", json={"length": 100_000, "seed": 1}) as r:
        lines = r.iter_lines()  # (kept: a dropped iterator closes the connection)
        first = next(lines)
        assert first.startswith("data: ") and json.loads(first[6:])["text"][0]
        h = health(url)
        assert h["running"] == 1, h
    wait_for(lambda: health(url)["running"] == 0, what="the abandoned stream to stop")
    assert health(url)["completed"] == before


def test_a_new_request_gets_its_first_character_after_one_step(lm):
    """The hop that primes a request ends after one step: its first character does not wait a whole hop."""
    import asyncio

    from charrnn.serve.engine import Engine, Job

    async def first_update():
        engine = Engine(lm.sampler, hop_seconds=10.0)     # a later hop would run for up to 10 s
        await engine.start()
        try:
            job = engine.submit(Job("ROMEO:", 500, num_samples=2, seed=3, streaming=True))
            return await asyncio.wait_for(job.updates.get(), 5)
        finally:
            await engine.stop()

    pieces, _ = asyncio.run(first_update())
    assert [len(p) for p in pieces] == [1, 1]


def test_a_request_arriving_during_a_hop_joins_at_the_next_step(lm):
    """A hop ends early when a waiting request fits in the batch: the newcomer does not wait out a long hop."""
    import asyncio

    from charrnn.serve.engine import Engine, Job

    async def second_request_first_update():
        engine = Engine(lm.sampler, hop_seconds=30.0)     # a hop that ran to its end would take 30 s
        await engine.start()
        try:
            first = engine.submit(Job("ROMEO:", 10_000_000, seed=1, streaming=True))
            await asyncio.wait_for(first.updates.get(), 5)     # its admitting hop; a 30-second one follows
            await asyncio.sleep(0.2)
            second = engine.submit(Job("the ", 100, seed=2, streaming=True))
            return await asyncio.wait_for(second.updates.get(), 3)
        finally:
            await engine.stop()

    pieces, _ = asyncio.run(second_request_first_update())
    assert [len(p) for p in pieces] == [1]


def test_hops_grow_with_the_rows_so_that_events_stay_bounded(lm):
    from charrnn.serve.engine import EVENTS_PER_S, Engine

    engine = Engine(lm.sampler, hop_seconds=0.02)
    engine.active = [types.SimpleNamespace(num_samples=n) for n in (1, 3)]
    assert engine._period() == 0.02
    engine.active = [types.SimpleNamespace(num_samples=2)] * 64
    assert engine._period() == pytest.approx(128 / EVENTS_PER_S) and 128 / EVENTS_PER_S > 0.02


def test_a_stream_gets_an_event_per_period_and_all_its_text():
    """Text made by short hops (ones that admitted a request) is held until half a period has passed since the
    stream's last event, then sent with the rest; the first text and the end are never held."""
    from charrnn.serve.engine import Job

    job = Job("a", 10, num_samples=2, seed=1, streaming=True)
    job._push(["x", "y"], [[], []], now=0.0, every=0.1)          # the first: at once
    job._push(["b", "c"], [[{"r": 1}], []], now=0.01, every=0.1)  # a short hop later: held
    assert job.updates.qsize() == 1
    job._push(["d", "e"], [[], [{"r": 2}]], now=0.06, every=0.1)
    assert job.updates.qsize() == 2
    job._push(["f", "g"], [[], []], now=0.07, every=0.1)          # held, then sent by the end
    job._finish()
    got = [job.updates.get_nowait() for _ in range(4)]
    assert got == [(["x", "y"], [[], []]), (["bd", "ce"], [[{"r": 1}], [{"r": 2}]]), (["f", "g"], [[], []]), None]
    assert job.texts == ["xbdf", "yceg"]


# ----- limits: every one answered with a 4xx and a JSON error ------------------------------------------------

BAD_REQUESTS = [
    # (body or raw bytes, status, word the message must contain)
    ({"prompt": "x" * 101}, 422, "prompt"),
    ({"length": 200_001}, 422, "length"),
    ({"num_samples": 5}, 422, "num_samples"),
    ({"num_samples": 0}, 422, "num_samples"),
    ({"length": -1}, 422, "length"),
    ({"temperature": -0.5}, 422, "temperature"),
    (b'{"temperature": NaN}', 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"top_p": 1.5}, 422, "top_p"),
    ({"top_k": 0}, 422, "top_k"),
    ({"length": "100"}, 422, "length"),
    ({"length": 10.5}, 422, "length"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"temperature": True}, 422, "temperature"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": ["a"]}, 422, "prompt"),
    ({"num_samples": None}, 422, "num_samples"),
    ({"seed": -1}, 422, "seed"),
    ({"seed": "1"}, 422, "seed"),
    ({"top_k": 2.5}, 422, "top_k"),
    ({"lenght": 10}, 422, "lenght"),
    (b'{"prompt": "unterminated', 400, "JSON"),
    (b"", 400, "JSON"),
    (b"\xff\xfe", 400, "JSON"),
    (b'["a", "list"]', 400, "object"),
    (b'"a string"', 400, "object"),
    (json.dumps({"prompt": "x" * 10_000}).encode(), 413, "body"),
]


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/generate/stream"])
def test_every_limit_is_a_4xx_with_a_json_error(server, endpoint):
    url, _ = server
    before = health(url)
    with httpx.Client(base_url=url) as client:
        for body, status, word in BAD_REQUESTS:
            r = (client.post(endpoint, content=body) if isinstance(body, bytes) else client.post(endpoint, json=body))
            assert r.status_code == status, (body, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            assert word in r.json()["error"], (body, r.json())
    after = health(url)
    assert after["completed"] == before["completed"] and after["characters"] == before["characters"]


def test_option_errors_name_the_json_field_not_the_flag(server):
    url, _ = server
    with httpx.Client(base_url=url) as client:
        for body, message in (({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
                              ({"temperature": -0.5},
                               "temperature must be >= 0 (0 means greedy) and at most 1e38, got -0.5"),
                              ({"top_k": 0}, "top_k must be a positive integer, got 0")):
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 422 and r.json()["error"] == message, r.text
    with pytest.raises(CharRNNError, match=r"^max_batch \(8\) must be at least max_samples \(16\)"):
        Limits(max_batch=8).validate()


def test_unknown_paths_and_methods_are_json_errors(server):
    url, _ = server
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]
    r = httpx.get(f"{url}/v1/generate")
    assert r.status_code == 405 and r.json()["error"]


@pytest.mark.slow
def test_full_queue_answers_503_and_disconnects_free_it(lm):
    """One request at a time, one held: a third is refused; a client that goes away stops its generation."""
    app = create_app(lm, Limits(max_queue=1, max_batch=4, max_samples=4, max_length=1_000_000))
    engine = app.state.engine
    with running(app) as url:
        with httpx.stream("POST", f"{url}/v1/generate/stream", json={"length": 1_000_000}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (kept: a dropped iterator closes the connection)
            next(lines)  # generating now
            busy = httpx.post(f"{url}/v1/generate", json={"length": 5})
            assert busy.status_code == 503 and "retry" in busy.json()["error"]
            assert busy.headers["retry-after"] == "1"
        # The client closed the stream: its generation stops and the server takes requests again.
        wait_for(lambda: engine.stats["cancelled"] == 1 and not engine.active, what="cancellation")
        produced = engine.stats["characters"]
        assert produced < 1_000_000
        time.sleep(0.3)
        assert engine.stats["characters"] == produced, "generation went on after the client left"
        ok = httpx.post(f"{url}/v1/generate", json={"length": 5})
        assert ok.status_code == 200

        # The same for a plain request whose client gives up waiting.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json={"length": 1_000_000, "num_samples": 4}, timeout=0.5)
        wait_for(lambda: engine.stats["cancelled"] == 2 and not engine.active, what="cancellation")
        produced = engine.stats["characters"]
        time.sleep(0.3)
        assert engine.stats["characters"] == produced
        assert engine.stats["completed"] == 1


def test_a_failing_request_fails_alone_and_the_server_keeps_serving(lm):
    """An internal error (here: priming the prompt "boom") is a 500 for that request only."""

    class Flaky:
        def __init__(self, sampler):
            self.sampler = sampler

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def prime(self, prompts, offset=0):
            if prompts[0] == "boom":
                raise RuntimeError("injected failure")
            return self.sampler.prime(prompts, offset)

    flaky = types.SimpleNamespace(**vars(lm))
    flaky.sampler = Flaky(lm.sampler)
    app = create_app(flaky, LIMITS)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "boom", "length": 10})
        assert r.status_code == 500 and "injected failure" in r.json()["error"]
        with httpx.stream("POST", f"{url}/v1/generate/stream", json={"prompt": "boom", "length": 10}) as r:
            events = parse_sse(r.read().decode())
        assert events == [("error", {"error": "generation failed: RuntimeError: injected failure"})]
        ok = httpx.post(f"{url}/v1/generate", json={"prompt": "the", "length": 10, "seed": 4})
        assert ok.status_code == 200 and ok.json()["samples"] == lm.generate("the", 10, seed=4)
        h = health(url)
        assert h["failed"] == 2 and h["completed"] == 1 and h["running"] == 0


# ----- many clients at once ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_50_concurrent_requests_all_answered_correctly(server, lm):
    url, engine = server
    specs = [{"prompt": ["", "the ", "ROMEO: ", "a"][i % 4], "length": 20 + 3 * i, "num_samples": 1 + i % 3,
              "temperature": [1.0, 0.7, 0.0, 1.3][i % 4], "top_k": [None, 5][i % 2], "top_p": [None, 0.9][i % 3 == 0],
              "seed": 1000 + i} for i in range(50)]
    expected = [lm.generate(s["prompt"], s["length"], num_samples=s["num_samples"], temperature=s["temperature"],
                            top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"]) for s in specs]
    peak_before = engine.stats["peak_running"]
    engine.stats["peak_running"] = 0

    async def one(client, i, spec):
        if i % 2:
            r = await client.post("/v1/generate", json=spec)
            assert r.status_code == 200, r.text
            return r.json()["samples"]
        async with client.stream("POST", "/v1/generate/stream", json=spec) as r:
            assert r.status_code == 200
            events = parse_sse((await r.aread()).decode())
        assert events[-1][0] == "done"
        streamed = ["".join(p) for p in zip(*(d["text"] for k, d in events if k == "message"))]
        assert [spec["prompt"] + s for s in streamed] == events[-1][1]["samples"]
        return events[-1][1]["samples"]

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i, s) for i, s in enumerate(specs)))

    results = asyncio.run(main())
    assert results == expected
    # They were generated together, not one after another.
    assert engine.stats["peak_running"] > 1
    engine.stats["peak_running"] = max(peak_before, engine.stats["peak_running"])
    h = health(url)
    assert h["running"] == 0 and h["waiting"] == 0 and h["failed"] == 0


def test_int8_requests_at_once_match_one_at_a_time(run_dir):
    """int8 rows are quantised each on its own, so int8 requests share a step and each gets its seed's text."""
    lm8 = charrnn.load(run_dir, int8=True)
    specs = [{"prompt": "the ", "length": 60, "num_samples": 1 + i % 2, "seed": i} for i in range(8)]
    expected = [lm8.generate(s["prompt"], s["length"], num_samples=s["num_samples"], seed=s["seed"]) for s in specs]
    app = create_app(lm8, LIMITS)

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers = await asyncio.gather(*(client.post("/v1/generate", json=s) for s in specs))
        return [a.json()["samples"] for a in answers]

    with running(app) as url:
        assert httpx.get(f"{url}/v1/model").json()["int8"] is True
        assert asyncio.run(main(url)) == expected
        assert app.state.engine.stats["peak_running"] > 1


# ----- command line -----------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "charrnn", "serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_serves_until_interrupted(run_dir):
    proc = _cli(run_dir, "--port", "0", "--log-level", "warning")
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"serving {run_dir}") and "http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0].rstrip("/")
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "the", "length": 10, "seed": 1})
        assert r.status_code == 200 and len(r.json()["samples"][0]) == 13
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "server stopped" in err and "Traceback" not in err


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        cases = [
            ((tmp_path / "missing",), "does not exist"),
            ((run_dir, "--port", port), f"port {port} on 127.0.0.1 is already in use"),
            ((run_dir, "--max-length", "0"), "--max-length must be a positive integer"),
            ((run_dir, "--max-batch", "8"), "--max-batch (8) must be at least --max-samples (16)"),
            ((run_dir, "--host", "no such host.invalid"), "cannot listen on host"),
        ]
        for args, message in cases:
            assert main(["serve", *map(str, args)]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    finally:
        holder.close()


# ----- the web page in headless Chromium ---------------------------------------------------------------------


@pytest.mark.slow
def test_web_page_streams_and_stops_in_chromium(server, lm):
    from selenium.webdriver.common.by import By

    url, engine = server
    browser = open_browser()
    try:
        browser.get(f"{url}/")
        find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
        text = lambda: find("output-text").get_attribute("textContent")  # noqa: E731
        wait_for(lambda: "parameters" in find("model-info").text, what="the model description")

        # Type a prompt, pick the length and a seed, press Generate: the streamed text is the model's.
        find("prompt").send_keys("ROMEO: ")
        for field, value in (("length", "400"), ("seed", "5")):
            find(field).clear()
            find(field).send_keys(value)
        temperature = float(find("temperature").get_attribute("value"))
        find("generate").click()
        wait_for(lambda: find("status").text.startswith("done"), what="the generation to finish")
        expected = lm.generate("ROMEO: ", 400, temperature=temperature, seed=5)[0]
        assert find("output-prompt").text == "ROMEO: "
        assert "ROMEO: " + text() == expected
        assert find("generate").is_enabled() and not find("stop").is_enabled()

        # A long generation: the text grows while it streams; Stop ends it, on the page and on the server.
        cancelled = engine.stats["cancelled"]
        find("length").clear()
        find("length").send_keys("200000")
        find("generate").click()
        wait_for(lambda: len(text()) > 0, what="streamed text")
        shown = len(text())
        wait_for(lambda: len(text()) > shown, what="more streamed text")
        assert find("stop").is_enabled() and not find("generate").is_enabled()
        find("stop").click()
        wait_for(lambda: find("status").text.startswith("stopped"), what="the page to stop")
        wait_for(lambda: engine.stats["cancelled"] == cancelled + 1 and not engine.active,
                 what="the server to stop generating")
        stopped_at = len(text())
        assert 0 < stopped_at < 200_000
        time.sleep(0.3)
        assert len(text()) == stopped_at
        assert find("generate").is_enabled()
    finally:
        browser.quit()
