"""A hostile client against the request fields of `/v1/generate` and `/v1/completions`: empty stop texts beside
other requests, prompt lists past the queue and `--max-samples`, prompts past a Hugging Face model's context,
every field of both schemas walked with wrong types, nulls, huge, negative and NaN-like values, and OpenAI's
error shape read by the official client."""

import asyncio
import json
import os
import time

import httpx
import pytest

import charrnn
from charrnn.serve import Limits, create_app
from charrnn.serve import engine as engine_module
from charrnn.decoding import Decoding

from ..conftest import cli, make_text, running, train_tiny_run
from .test_corpora import one_line_error
from .test_options import deadline

openai = pytest.importorskip("openai")

LONG = 5000                    # characters of a request generating beside the others (a few hops' worth)
LIMITS = Limits(max_length=LONG, max_samples=16, max_queue=24, max_batch=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "endpoints", max_steps=2)


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)


@pytest.fixture(scope="module")
def server(lm):
    """(base URL, engine) of a server around the tiny run."""
    app = create_app(lm, LIMITS)
    with running(app) as url:
        yield url, app.state.engine


def held(engine) -> int:
    return len(engine.active) + len(engine.waiting)


def wait_until(predicate, seconds: float = 20):
    deadline_at = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline_at, "timed out"
        time.sleep(0.01)


def beside(url: str, engine, bad: tuple[str, dict], good: tuple[str, dict]):
    """Four ``good`` requests (seeds 0-3) generating, then the ``bad`` one: (bad's response, the four's, whether
    the four were still unanswered when it was answered)."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            others = [asyncio.ensure_future(client.post(good[0], json={**good[1], "seed": i})) for i in range(4)]
            while len(engine.active) < 4:
                await asyncio.sleep(0.005)
            answer = await client.post(bad[0], json=bad[1])
            pending = not any(o.done() for o in others)
            return answer, await asyncio.gather(*others), pending

    return asyncio.run(main())


# ----- severe 1: one request's error never ends the others -------------------------------------------------------

GOOD = {"/v1/generate": {"prompt": "the ", "length": LONG}, "/v1/completions": {"prompt": "the ", "max_tokens": LONG}}
EMPTY_STOP = {"/v1/generate": {"prompt": "x", "length": 5, "stop": [""]},
              "/v1/completions": {"prompt": "x", "max_tokens": 5, "stop": [""]}}


def texts(endpoint: str, response) -> list[str]:
    body = response.json()
    return body["samples"] if endpoint == "/v1/generate" else ["the " + c["text"] for c in body["choices"]]


@pytest.mark.probe("server-empty-stop")
@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions"])
def test_an_empty_stop_text_is_refused_and_the_requests_beside_it_finish(server, lm, endpoint):
    url, engine = server
    failed = engine.stats["failed"]
    bad, others, pending = beside(url, engine, (endpoint, EMPTY_STOP[endpoint]), (endpoint, GOOD[endpoint]))
    for seed, answer in enumerate(others):
        assert answer.status_code == 200, answer.text
        assert texts(endpoint, answer) == lm.generate("the ", LONG, seed=seed)
    assert bad.status_code in (400, 422), bad.text
    error = bad.json()["error"]
    if endpoint == "/v1/completions":
        assert bad.status_code == 400 and error["param"] == "stop" and error["type"] == "invalid_request_error"
    else:
        assert error.startswith("stop is an empty text"), error
    assert pending, "the four finished before the bad request was answered: nothing was tried beside them"
    assert engine.stats["failed"] == failed and held(engine) == 0


@pytest.mark.probe("server-empty-stop")
def test_generate_refuses_an_empty_stop_text_in_one_line(capsys, run_dir):
    code, out, err = cli(capsys, "generate", run_dir, "--stop", "", "--length", 5)
    one_line_error(code, err, "--stop is an empty text")
    assert out == ""
    with pytest.raises(charrnn.errors.OptionError, match="^stop is an empty text"):
        charrnn.load(run_dir).generate("a", 5, stop=["e", ""])


@pytest.mark.probe("server-job-error-isolated")
@pytest.mark.parametrize("where", ["choose", "read"])
def test_a_decoding_error_fails_its_request_alone(server, lm, monkeypatch, where):
    """The engine's hop: one request's decoding raising (a bug) fails that request, never the batch beside it."""
    url, engine = server

    beside_it = []                     # the requests held when the fault was raised

    class Faulty(Decoding):
        def __init__(self, sampler, prompts, *args, **kw):
            super().__init__(sampler, prompts, *args, **kw)
            self.faulty = prompts[0] == "boom"
            self.fused = self.fused and not self.faulty    # its ids through choose(), the others' drawn together

        def fault(self, place: str):
            if self.faulty and where == place:
                beside_it.append(len(engine.active))
                raise RuntimeError("injected")

        def choose(self, logits):
            self.fault("choose")
            return super().choose(logits)

        def read(self, steps):
            self.fault("read")
            return super().read(steps)

    monkeypatch.setattr(engine_module, "Decoding", Faulty)
    failed = engine.stats["failed"]
    bad, others, _ = beside(url, engine, ("/v1/generate", {"prompt": "boom", "length": 50}),
                         ("/v1/generate", GOOD["/v1/generate"]))
    for seed, answer in enumerate(others):
        assert answer.status_code == 200, answer.text
        assert answer.json()["samples"] == lm.generate("the ", LONG, seed=seed)
    assert bad.status_code == 500 and bad.json()["error"] == "generation failed: RuntimeError: injected"
    assert beside_it == [5], "the fault was not raised beside the four"
    assert engine.stats["failed"] == failed + 1 and held(engine) == 0


# ----- severe 2 and moderate 2: prompt lists ------------------------------------------------------------------------


@pytest.mark.probe("server-prompt-list-queue")
def test_a_prompt_list_past_the_limits_queues_nothing(server):
    url, engine = server
    completed = engine.stats["completed"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [""] * 5000, "n": 16, "max_tokens": 2000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert held(engine) == 0 and engine.stats["completed"] == completed
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 5}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 5


@pytest.mark.probe("server-prompt-list-queue")
def test_a_prompt_list_that_does_not_fit_the_queue_room_leaves_nothing_running(server):
    """Ten requests held of the 24 the queue takes: sixteen prompts do not fit, and none of them is queued."""
    url, engine = server

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            long = [asyncio.ensure_future(client.post("/v1/generate", json={"length": LONG})) for _ in range(10)]
            while held(engine) < 10:
                await asyncio.sleep(0.005)
            busy = await client.post("/v1/completions", json={"prompt": ["a"] * 16, "max_tokens": 5})
            during = held(engine), sum(o.done() for o in long)
            await asyncio.gather(*long)
            return busy, during

    busy, (during, done) = asyncio.run(main())
    assert done == 0, "the ten ended before the prompt list was answered"
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert during == 10, f"{during - 10} jobs of the refused request were queued"
    wait_until(lambda: held(engine) == 0)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a"] * 16, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


@pytest.mark.probe("server-prompt-list-samples")
def test_prompts_times_n_count_against_max_samples(lm):
    with running(create_app(lm, Limits(max_samples=4, max_batch=4))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for prompts, n, param in (([""] * 250, 4, "prompt"), (["a", "b"], 4, "n"), (["a"] * 5, 1, "prompt")):
            with pytest.raises(openai.BadRequestError, match="this server generates at most 4 samples") as e:
                client.completions.create(model="run", prompt=prompts, n=n, max_tokens=3)
            assert e.value.body["param"] == param
        r = client.completions.create(model="run", prompt=["a", "b"], n=2, max_tokens=3)
        assert len(r.choices) == 4


# ----- moderate 3: a Hugging Face model's context ------------------------------------------------------------------


@pytest.mark.slow    # transformers takes seconds to import
@pytest.mark.probe("server-hf-context")
def test_a_prompt_past_a_hugging_face_models_context_is_refused_when_read(capsys, tmp_path_factory):
    pytest.importorskip("transformers")
    from ..hf_models import tiny_gpt2

    folder = tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", make_text(6000), context=64)
    lm = charrnn.load(folder)
    prompt = make_text(600, seed=4)
    tokens = len(lm.vocab.encode(prompt))
    assert tokens > lm.context == 64
    message = f"prompt is {tokens} tokens with this model's tokenizer, and its context holds 64"
    app = create_app(lm)
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.completions.create(model="tiny-gpt2", prompt=["the", prompt], max_tokens=5)
        assert e.value.body["param"] == "prompt"
        r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "length": 5}, timeout=30)
        assert r.status_code == 422 and r.json()["error"].startswith(message), r.text
        assert app.state.engine.stats["failed"] == 0 and held(app.state.engine) == 0
        ok = client.completions.create(model="tiny-gpt2", prompt="the", max_tokens=5)
        assert len(ok.choices[0].text) == 5
    capsys.readouterr()                      # (save_pretrained's progress bars)
    code, out, err = cli(capsys, "generate", folder, "--prompt", prompt, "--length", 5)
    one_line_error(code, err, f"--{message}")


# ----- moderate 8: OpenAI's error shape ---------------------------------------------------------------------------

INVALID = [  # (extra fields of a completion request, the param named)
    ({"temperature": -3}, "temperature"), ({"top_p": 2}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"), ({"n": 0}, "n"), ({"n": 17}, "n"),
    ({"presence_penalty": 5}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -1}, "seed"), ({"logprobs": 9}, "logprobs"),
    ({"stop": list("abcde")}, "stop"), ({"stop": ""}, "stop"), ({"prompt": []}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"), ({"temperature": "hot"}, "temperature"), ({"n": 1.5}, "n"),
    ({"colour": "red"}, "colour"), ({"logit_bias": {"1": 5}}, "logit_bias"), ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"), ({"stream_options": []}, "stream_options"),
]


@pytest.mark.probe("openai-error-shape")
def test_every_invalid_completion_is_the_clients_bad_request_naming_the_param(server):
    url, engine = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for extra, param in INVALID:
        body = {"prompt": "a", "max_tokens": 5, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="run", prompt=body.pop("prompt"), max_tokens=body.pop("max_tokens"),
                                      extra_body=body)
        error = e.value.body
        assert error["param"] == param and error["type"] == "invalid_request_error", (extra, error)
        assert "--" not in error["message"], (extra, error["message"])     # the API's names, not the flags'
        assert set(error) == {"message", "type", "param", "code"}
    assert held(engine) == 0


# ----- every field of both schemas, walked -------------------------------------------------------------------------

NASTY = ["x", "", "NaN", "x" * 3000, [], [""], [""] * 17, {}, True, None, 0, -1, -1.5, 10**30, -10**30, 2**63, 1e308,
         float("nan"), float("inf"), float("-inf")]       # the last three are sent as JSON's NaN, Infinity, -Infinity


@pytest.mark.probe("server-request-walk")
@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions"])
def test_every_field_of_the_request_walked_with_hostile_values(server, endpoint):
    """Each field of the schema with wrong types, null, huge, negative, NaN-like, empty strings and lists: a 4xx
    JSON error naming the field, or the request honoured; never a 500, never a hang; the server goes on."""
    from charrnn.serve.app import GenerateRequest
    from charrnn.serve.openai_api import CompletionRequest

    url, engine = server
    schema, small = ((GenerateRequest, {"length": 3}) if endpoint == "/v1/generate" else
                     (CompletionRequest, {"max_tokens": 3}))
    failed = engine.stats["failed"]
    with httpx.Client(base_url=url, timeout=30) as client:
        for field in schema.model_fields:
            for value in NASTY:
                body = json.dumps({"prompt": "a", **small, field: value}).encode()
                r = client.post(endpoint, content=body, headers={"Content-Type": "application/json"})
                case = (field, str(value)[:20], r.status_code, r.text[:300])
                if r.status_code == 200:
                    assert "event: error" not in r.text and "server_error" not in r.text, case   # a 500 in a stream
                    continue
                assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json", case
                error = r.json()["error"]
                if endpoint == "/v1/completions":
                    assert r.status_code == 400 and error["param"] == field, case
                else:
                    assert field in error, case
    assert engine.stats["failed"] == failed and held(engine) == 0
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


# ----- minor: null fields, echoed offsets, CORS, the key file -----------------------------------------------------

OPENAI_OPTIONAL = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
                   "seed", "logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "best_of", "suffix", "logit_bias", "user"]


@pytest.mark.probe("openai-null-fields")
def test_null_for_an_optional_field_is_its_default(server, lm):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", **dict.fromkeys(OPENAI_OPTIONAL), "seed": 3},
                   timeout=30)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert "the " + choice["text"] == lm.generate("the ", 16, seed=3)[0] and choice["logprobs"] is None


@pytest.mark.probe("openai-echo-offsets")
def test_echoed_text_offsets_are_the_same_streamed_and_plain(server):
    url, _ = server
    body = {"prompt": "the ", "max_tokens": 30, "seed": 5, "echo": True, "logprobs": 1}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    streamed = {"text": "", "tokens": [], "text_offset": []}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                streamed["text"] += choice["text"]
                for key in ("tokens", "text_offset"):
                    streamed[key] += (choice["logprobs"] or {}).get(key, [])
    assert streamed["text"] == plain["text"] and streamed["tokens"] == plain["logprobs"]["tokens"]
    assert streamed["text_offset"] == plain["logprobs"]["text_offset"] and plain["logprobs"]["text_offset"][0] == 4


@pytest.mark.probe("server-cors-json")
def test_a_refused_cors_preflight_is_a_json_error(lm):
    with running(create_app(lm, cors_origins=["https://app.example"])) as url:
        r = httpx.options(f"{url}/v1/generate", headers={"Origin": "https://elsewhere.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "origin" in r.json()["error"]


@pytest.mark.probe("server-key-file-fifo")
def test_a_fifo_api_key_file_is_refused_at_start(capsys, run_dir, tmp_path):
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    with deadline(20):
        code, _, err = cli(capsys, "serve", run_dir, "--port", 0, "--api-key-file", fifo)
    one_line_error(code, err, f"--api-key-file {fifo} is a FIFO, not a regular file")
