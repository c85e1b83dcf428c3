"""The OpenAI-compatible endpoints, driven by the official openai client against a live server."""

import pytest

openai = pytest.importorskip("openai")


import charrnn  # noqa: E402
from charrnn.serve import create_app  # noqa: E402

from .conftest import running, train_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return charrnn.load(train_tiny_run(tmp_path_factory, "openai", 60))


@pytest.fixture(scope="module")
def client(lm):
    with running(create_app(lm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == "run" and model.owned_by == "charrnn" and model.max_tokens_counts == "characters"


def test_completion_is_the_librarys_text(client, lm):
    r = client.completions.create(model="run", prompt="the ", max_tokens=50, n=3, seed=4, temperature=0.8)
    assert r.object == "text_completion" and r.model == "run" and r.id.startswith("cmpl-")
    want = lm.generate("the ", 50, num_samples=3, seed=4, temperature=0.8)
    assert [c.text for c in r.choices] == [w[4:] for w in want] and [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 150 and r.usage.total_tokens == 154
    again = client.completions.create(model="run", prompt="the ", max_tokens=50, n=3, seed=4, temperature=0.8)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_stop_logprobs_and_echo(client, lm):
    r = client.completions.create(model="run", prompt="the ", max_tokens=80, n=4, seed=1, stop=["e", "\n"],
                                  logprobs=2, echo=True)
    free = lm.generate("the ", 80, num_samples=4, seed=1)
    for c, f in zip(r.choices, free):
        cut = min([i for i in (f.find("e", 4), f.find("\n", 4)) if i >= 0] or [len(f)])
        assert c.text == f[:cut] and c.finish_reason == ("stop" if cut < len(f) else "length")
        assert "".join(c.logprobs.tokens) == c.text[4:] and c.logprobs.text_offset[:1] in ([], [4])
        assert all(len(top) == 2 and lp <= 0 for top, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))


def test_streaming_gives_the_same_text_then_done(client):
    whole = client.completions.create(model="run", prompt=["the ", "a"], max_tokens=40, n=2, seed=9)
    texts, finish, usage = {}, {}, None
    for chunk in client.completions.create(model="run", prompt=["the ", "a"], max_tokens=40, n=2, seed=9,
                                           stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert finish == {i: "length" for i in range(4)} and usage.completion_tokens == 160


def test_bad_parameters_raise_the_clients_own_errors_with_charrnns_message(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model="run", prompt="a", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="logit_bias is not supported"):
        client.completions.create(model="run", prompt="a", logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="max_tokens: 1000000; this server generates at most 2000"):
        client.completions.create(model="run", prompt="a", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="at most 4 stop texts"):
        client.completions.create(model="run", prompt="a", stop=["a", "b", "c", "d", "e"])


def test_a_cached_prompt_gives_the_uncached_text(client, lm, tmp_path_factory):
    import httpx

    fresh = charrnn.load(lm.run.path)                       # no cache: the library's own sampler
    prompt = "the quick brown fox " * 20
    want = fresh.generate(prompt, 60, num_samples=2, seed=11)
    health = f"{str(client.base_url).rstrip('/').removesuffix('/v1')}/healthz"
    before = httpx.get(health).json()["prompt_cache"]
    for _ in range(2):                                      # a miss, then a hit
        r = client.completions.create(model="run", prompt=prompt, max_tokens=60, n=2, seed=11)
        assert [prompt + c.text for c in r.choices] == want
    after = httpx.get(health).json()["prompt_cache"]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"] + 1


def test_the_prompt_cache_drops_the_least_recently_used_past_its_size():
    import torch

    from charrnn.prompt_cache import PromptCache

    entry = (torch.zeros(1, 10), torch.zeros(1, 1, 10))
    size = PromptCache.size(entry) + 4
    cache = PromptCache(3 * size)
    for p in "abc":
        cache.put(p, entry)
    cache.get("a")
    cache.put("d", entry)
    assert list(cache.entries) == ["c", "a", "d"] and cache.bytes == 3 * size
    assert cache.get("b") is None and cache.misses == 1 and cache.hits == 1


def test_a_wrong_key_is_the_clients_authentication_error(lm):
    with running(create_app(lm, api_key="s3cret")) as url:
        url = f"{url}/v1"
        wrong = openai.OpenAI(base_url=url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="run", prompt="a", max_tokens=5)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert len(right.completions.create(model="run", prompt="a", max_tokens=5).choices[0].text) == 5
