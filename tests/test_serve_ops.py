"""charrnn serve in operation: /metrics, the API key, CORS, and stopping on SIGTERM (tests/test_serve.py has the API).

The fast tests run create_app under uvicorn in a thread against a tiny trained run; the slow ones start
`python -m charrnn serve` and signal it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import charrnn
from charrnn.cli import main
from charrnn.errors import CharRNNError
from charrnn.serve import Limits, create_app
from charrnn.serve.auth import resolve_api_key

from .conftest import running, train_tiny_run

KEY = "s3cret-key"
ORIGIN = "https://example.com"
LIMITS = Limits(max_prompt_chars=100, max_length=200_000, max_samples=4, max_queue=2, max_batch=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "serve-ops", max_steps=2)


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)



@pytest.fixture(scope="module")
def url(lm):
    with running(create_app(lm, LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(lm):
    """A server that needs KEY and lets pages from ORIGIN call it."""
    with running(create_app(lm, LIMITS, api_key=KEY, cors_origins=[ORIGIN])) as url:
        yield url


def scrape(url, headers=None) -> dict:
    """Every sample of /metrics: {(name, sorted label items): value}."""
    r = httpx.get(f"{url}/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_of(samples, endpoint, status) -> float:
    return value(samples, "charrnn_http_requests_total", endpoint=endpoint, status=str(status))


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def long_stream(url, headers=None, **body):
    """A stream of 200,000 characters, open until the block ends; yields its first event's line."""
    with httpx.stream("POST", f"{url}/v1/generate/stream", json={"length": 200_000, **body}, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()   # dropping it would close the response
        yield next(lines)


# ----- /metrics ---------------------------------------------------------------------------------------------


def test_metrics_count_requests_characters_and_first_characters(url):
    before = scrape(url)
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "the", "length": 20, "num_samples": 2, "seed": 1})
    assert r.status_code == 200
    r = httpx.post(f"{url}/v1/generate/stream", json={"length": 10, "seed": 2})
    assert r.status_code == 200 and "event: done" in r.text
    assert httpx.post(f"{url}/v1/generate", json={"length": 10**6}).status_code == 422
    assert httpx.get(f"{url}/v1/generate").status_code == 405
    assert httpx.get(f"{url}/no/such/page").status_code == 404
    after = scrape(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("charrnn_http_requests_total", endpoint="/v1/generate", status="200") == 1
    assert moved("charrnn_http_requests_total", endpoint="/v1/generate", status="422") == 1
    assert moved("charrnn_http_requests_total", endpoint="/v1/generate", status="405") == 1
    assert moved("charrnn_http_requests_total", endpoint="/v1/generate/stream", status="200") == 1
    assert moved("charrnn_http_requests_total", endpoint="other", status="404") == 1
    assert moved("charrnn_http_request_duration_seconds_count", endpoint="/v1/generate") == 3
    assert moved("charrnn_http_request_duration_seconds_sum", endpoint="/v1/generate") > 0
    assert moved("charrnn_generated_characters_total") == 2 * 20 + 10
    assert moved("charrnn_time_to_first_character_seconds_count") == 2
    assert 0 < moved("charrnn_time_to_first_character_seconds_sum") < 10
    assert moved("charrnn_rejected_requests_total", endpoint="/v1/generate", status="503") == 0
    # The scrape before this one was counted too.
    assert moved("charrnn_http_requests_total", endpoint="/metrics", status="200") == 1


def test_metrics_show_running_rows_a_full_queue_and_a_stream_until_it_ends(url):
    before = scrape(url)
    with long_stream(url, num_samples=3), long_stream(url):
        during = scrape(url)
        r = httpx.post(f"{url}/v1/generate", json={"length": 5})   # max_queue=2 requests held: refused
        assert r.status_code == 503
        assert requests_of(scrape(url), "/v1/generate/stream", 200) == requests_of(before, "/v1/generate/stream", 200)
    assert value(during, "charrnn_running_requests") + value(during, "charrnn_waiting_requests") == 2
    assert value(during, "charrnn_running_rows") == 4
    wait_for(lambda: requests_of(scrape(url), "/v1/generate/stream", 200)
             == requests_of(before, "/v1/generate/stream", 200) + 2, what="the streams to be counted once ended")
    after = scrape(url)
    assert requests_of(after, "/v1/generate", 503) == requests_of(before, "/v1/generate", 503) + 1
    assert value(after, "charrnn_rejected_requests_total", endpoint="/v1/generate", status="503") == \
        value(before, "charrnn_rejected_requests_total", endpoint="/v1/generate", status="503") + 1
    wait_for(lambda: value(scrape(url), "charrnn_running_rows") == 0, what="the rows to be released")


def test_each_app_has_its_own_metrics(lm, url):
    with running(create_app(lm, LIMITS)) as other:
        assert httpx.post(f"{other}/v1/generate", json={"length": 7}).status_code == 200
        assert value(scrape(other), "charrnn_generated_characters_total") == 7


# ----- the API key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
def test_v1_needs_the_key(keyed, headers):
    for method, path in (("GET", "/v1/model"), ("POST", "/v1/generate"), ("POST", "/v1/generate/stream"),
                         ("GET", "/v1/no-such-endpoint")):
        r = httpx.request(method, f"{keyed}{path}", json={"length": 5}, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"] == "Bearer"
        assert isinstance(r.json()["error"], str) and "API key" in r.json()["error"]


def test_the_key_lets_requests_through(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed}/v1/model", headers=auth).status_code == 200
    r = httpx.post(f"{keyed}/v1/generate", json={"prompt": "the", "length": 5}, headers=auth)
    assert r.status_code == 200 and len(r.json()["samples"][0]) == 8
    assert httpx.get(f"{keyed}/v1/model", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_the_page_health_and_metrics_stay_open(keyed):
    for path in ("/", "/static/app.js", "/healthz", "/metrics"):
        assert httpx.get(f"{keyed}{path}").status_code == 200, path
    assert value(scrape(keyed), "charrnn_http_requests_total", endpoint="/v1/model", status="401") > 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/models"])
def test_openai_endpoints_refuse_in_openai_shape(keyed, path):
    r = httpx.request("POST" if path.endswith("completions") else "GET", f"{keyed}{path}", json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["param"] is None and "API key" in error["message"]


def test_the_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CHARRNN_API_KEY", raising=False)
    assert resolve_api_key() is None
    monkeypatch.setenv("CHARRNN_API_KEY", " from-env\n")
    assert resolve_api_key() == "from-env"
    assert resolve_api_key("from-flag") == "from-flag"
    key_file = tmp_path / "key"
    key_file.write_text("from-file  \nsecond line\n")
    assert resolve_api_key(api_key_file=str(key_file)) == "from-file"


def test_key_errors_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CHARRNN_API_KEY", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--api-key-file", empty], f"the API key from --api-key-file {empty} is empty"),
        (["--api-key-file", tmp_path / "missing"], "no such file"),
        (["--api-key", ""], "the API key from --api-key is empty"),
        (["--api-key", "a b"], "printable ASCII without spaces"),
        (["--api-key", "k", "--api-key-file", empty], "not both"),
        (["--shutdown-seconds", "-1"], "--shutdown-seconds must be"),
    ]
    for args, message in cases:
        assert main(["serve", str(run_dir), *map(str, args)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    monkeypatch.setenv("CHARRNN_API_KEY", "")
    with pytest.raises(CharRNNError, match="the environment variable CHARRNN_API_KEY is empty"):
        resolve_api_key()


# ----- CORS -------------------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors_answers_the_configured_origin_and_its_preflight(keyed):
    r = httpx.options(f"{keyed}/v1/generate", headers=PREFLIGHT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert {"GET", "POST"} <= set(r.headers["access-control-allow-methods"].replace(" ", "").split(","))
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(f"{keyed}/v1/model", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{keyed}/v1/model", headers={"Origin": ORIGIN})  # a page can read that it needs the key
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_headers_are_absent_for_other_origins_and_by_default(keyed, url):
    other = "https://elsewhere.example"
    r = httpx.get(f"{keyed}/v1/model", headers={"Origin": other, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert httpx.options(f"{keyed}/v1/generate", headers={**PREFLIGHT, "Origin": other}).status_code == 400
    r = httpx.get(f"{url}/v1/model", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{url}/v1/generate", headers=PREFLIGHT)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


# ----- the command line: the key, CORS and stopping ---------------------------------------------------------


@contextmanager
def serve_process(run_dir, *args, env=None):
    """`python -m charrnn serve RUN --port 0 ...`; yields (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", str(run_dir), "--port", "0",
                             "--log-level", "warning", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        yield proc, line.split(" on ")[1].split()[0].rstrip("/")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_cli_key_file_and_cors_origin(run_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    with serve_process(run_dir, "--api-key-file", key_file, "--cors-origin", ORIGIN,
                       env={"CHARRNN_API_KEY": "not-this-one"}) as (proc, url):
        assert httpx.get(f"{url}/v1/model").status_code == 401
        assert httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer not-this-one"}).status_code == 401
        r = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {KEY}", "Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert httpx.options(f"{url}/v1/generate", headers=PREFLIGHT).status_code == 200
        assert KEY not in " ".join(proc.args)


def _stream_events(url, body, headers, out: list, first: threading.Event):
    """Read a stream's events into ``out`` (name, data, arrival time); ``first`` is set on the first one."""
    try:
        with httpx.stream("POST", f"{url}/v1/generate/stream", json=body, headers=headers, timeout=60) as r:
            event = "message"
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    out.append((event, json.loads(line[6:]), time.monotonic()))
                    event = "message"
                    first.set()
    except httpx.HTTPError as e:
        out.append(("cut", repr(e), time.monotonic()))
    first.set()


@pytest.mark.slow
def test_sigterm_finishes_short_requests_ends_long_ones_and_exits_0(run_dir):
    grace = 2
    with serve_process(run_dir, "--max-length", "200000", "--max-queue", "8", "--shutdown-seconds", grace,
                       env={"CHARRNN_API_KEY": KEY}) as (proc, url):
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/model").status_code == 401
        long, short = [], []
        long_started, short_started = threading.Event(), threading.Event()
        readers = [threading.Thread(target=_stream_events, args=(url, {"length": 200_000}, auth, long, long_started)),
                   threading.Thread(target=_stream_events, args=(url, {"length": 3000}, auth, short, short_started))]
        readers[0].start()
        assert long_started.wait(30)
        readers[1].start()
        assert short_started.wait(30)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):   # no longer accepting connections
            httpx.get(f"{url}/healthz", timeout=2)
        for reader in readers:
            reader.join(30)
        _, err = proc.communicate(timeout=30)
        exited = time.monotonic()
    assert proc.returncode == 0, err
    assert "server stopped" in err and "Traceback" not in err
    assert short[-1][0] == "done" and len(short[-1][1]["samples"][0]) == 3000
    assert long[-1][0] == "error" and "shutting down" in long[-1][1]["error"], long[-1]
    assert any(t > signalled + 1 for name, _, t in long if name == "message"), "the stream was not let run"
    assert long[-1][2] >= signalled + grace - 0.5
    assert exited - signalled < grace + 8


@pytest.mark.slow
def test_web_page_asks_for_the_key_and_sends_it(keyed):
    from selenium.webdriver.common.by import By

    from .conftest import browser as open_browser

    browser = open_browser()
    try:
        browser.get(f"{keyed}/")
        find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
        wait_for(lambda: find("key-form").is_displayed(), what="the page to ask for the key")
        find("api-key").send_keys("wrong")
        find("key-form").submit()
        wait_for(lambda: find("key-form").is_displayed() and "not valid" in find("status").text,
                 what="the page to refuse a wrong key")
        find("api-key").send_keys(KEY)
        find("key-form").submit()
        wait_for(lambda: "parameters" in find("model-info").text, what="the model description")
        assert not find("key-form").is_displayed()
        find("length").clear()
        find("length").send_keys("50")
        find("generate").click()
        wait_for(lambda: find("status").text.startswith("done"), what="the generation to finish")
        assert len(find("output-text").get_attribute("textContent")) == 50
        assert browser.execute_script("return sessionStorage.getItem('charrnn-api-key')") == KEY
    finally:
        browser.quit()
