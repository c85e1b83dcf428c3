"""Stop texts, log-probabilities and the OpenAI penalties, in the library and the CLI."""

import json
import math

import pytest
import torch

from charrnn.decoding import Penalties
from charrnn.models import CharLM, ModelConfig
from charrnn.sampling import Sampler
from charrnn.tokens import StopText
from charrnn.vocab import Vocab

from .conftest import cli


def _sampler():
    torch.manual_seed(0)
    vocab = Vocab(list("\n abcdefgh"))
    return Sampler(CharLM(ModelConfig(vocab_size=len(vocab), embed=8, hidden=16, layers=2)), vocab)


def test_stop_text_holds_back_what_could_become_a_stop():
    s = StopText(["END", "\n\n"], rows=2)
    assert s.push(["abE", "x\n"]) == ["ab", "x"]          # "E" and "\n" could start a stop text
    assert s.push(["Nd", "y"]) == ["ENd", "\ny"]          # they did not
    assert s.push(["xEN", "\n"]) == ["x", ""]
    assert s.push(["D and more", "\nz"]) == ["", ""]       # both met one; nothing after is given
    assert s.finished == [True, True] and s.push(["q", "q"]) == ["", ""]
    t = StopText(["abc"], rows=1)
    assert t.push(["xab"]) == ["x"] and t.flush(0) == "ab" and not t.finished[0]


def test_a_stop_ends_one_sample_and_not_the_others():
    s = _sampler()
    free = s.complete(["a"] * 6, 60, seed=3)
    grams = sorted({x.text[i:i + 3] for x in free for i in range(1, 58)})
    stop = next(g for g in grams if sum(g in x.text[1:] for x in free) in (2, 3, 4))   # in some samples only
    done = s.complete(["a"] * 6, 60, seed=3, stop=[stop])
    for f, d in zip(free, done):
        cut = f.text.find(stop, 1)
        if cut < 0:
            assert d.text == f.text and d.finish_reason == "length"
        else:
            assert d.text == f.text[:cut] and d.finish_reason == "stop"
    assert {d.finish_reason for d in done} == {"stop", "length"}
    streamed = ["a"] * 6
    for pieces in s.stream(["a"] * 6, 60, seed=3, stop=[stop]):
        streamed = [t + p for t, p in zip(streamed, pieces)]
    assert streamed == [d.text for d in done]
    assert s.generate("a", 60, num_samples=6, seed=3, stop=[stop]) == streamed


def test_logprobs_are_the_models_own():
    s = _sampler()
    (c,) = s.complete(["ab"], 20, seed=1, temperature=0.7, top_k=4, logprobs=3)
    assert "".join(r["token"] for r in c.logprobs) == c.text[2:] and len(c.logprobs) == 20
    logits, state = s.prime(["ab"])
    for r in c.logprobs:
        lp = torch.log_softmax(logits[0].double(), -1)
        i = int(s.vocab.encode(r["token"])[0])
        assert r["logprob"] == pytest.approx(float(lp[i]), abs=1e-5)
        best = lp.topk(3)
        assert list(r["top"].values()) == pytest.approx(best.values.tolist(), abs=1e-5)
        logits, state = s.stepper.step(torch.tensor([i]), state)


def test_presence_and_frequency_penalties_are_the_openai_formula():
    logits = torch.zeros(2, 5)
    p = Penalties([torch.tensor([1]), torch.tensor([2])], 5, "cpu", presence=0.5, frequency=0.25)
    for ids in ([3, 4], [3, 4], [0, 4]):
        p.add(torch.tensor(ids))
    out = p(logits)
    assert out[0].tolist() == [-0.75, 0, 0, -1.0, 0]             # the prompt's ids are not counted
    assert out[1].tolist() == [0, 0, 0, 0, -1.25]
    s = _sampler()
    plain = s.generate("a", 40, temperature=0)[0]
    spread = s.generate("a", 40, temperature=0, frequency_penalty=2.0)[0]
    assert len(set(spread[1:])) > len(set(plain[1:]))


@pytest.mark.slow
def test_cli_stop_and_logprobs(capsys, tmp_path):
    import charrnn

    from .conftest import TINY_KW, make_text

    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    charrnn.train(str(corpus), tmp_path / "run", max_steps=60, lr=3e-3, progress=False, log=lambda m: None,
                  **TINY_KW)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "generate", run, "--prompt", "the", "--length", 200, "--seed", 1, "--json",
                         "--num-samples", 4)
    free = json.loads(out)["samples"]
    code, out, err = cli(capsys, "generate", run, "--prompt", "the", "--length", 200, "--seed", 1, "--json",
                         "--num-samples", 4, "--stop", "e", "--stop", "\n", "--logprobs", 2)
    r = json.loads(out)
    assert code == 0 and r["finish_reasons"] == ["stop"] * 4, err
    for f, text, lps in zip(free, r["samples"], r["logprobs"]):
        cut = min(i for i in (f.find("e", 3), f.find("\n", 3)) if i >= 0)
        assert text == f[:cut] and "".join(x["token"] for x in lps) == text[3:]
        assert all(math.isfinite(x["logprob"]) and len(x["top"]) == 2 for x in lps)
    code, out, err = cli(capsys, "generate", run, "--prompt", "the", "--length", 200, "--seed", 1, "--stop", "e")
    code, one, err = cli(capsys, "generate", run, "--prompt", "the", "--length", 200, "--seed", 1, "--stop", "e",
                         "--json")
    assert code == 0 and out == json.loads(one)["samples"][0] + "\n" and "e" not in out[3:]
    code, _, err = cli(capsys, "generate", run, "--logprobs", 2)
    assert code == 2 and "--logprobs" in err and "--json" in err
    code, _, err = cli(capsys, "generate", run, "--beam-width", 2, "--stop", "x")
    assert code == 2 and "--stop applies to sampling" in err
    code, _, err = cli(capsys, "generate", run, "--presence-penalty", 3)
    assert code == 2 and "--presence-penalty must be between -2 and 2" in err


@pytest.mark.slow
def test_generate_endpoint_takes_stop_and_logprobs(tmp_path_factory):
    import httpx

    import charrnn
    from charrnn.serve import create_app

    from .conftest import running, train_tiny_run

    lm = charrnn.load(train_tiny_run(tmp_path_factory, "stops", 40))
    want = lm.complete("the ", 80, num_samples=3, seed=2, stop=["e"], logprobs=1)
    with running(create_app(lm)) as url:
        r = httpx.post(f"{url}/v1/generate",
                       json={"prompt": "the ", "length": 80, "num_samples": 3, "seed": 2, "stop": ["e"], "logprobs": 1})
    body = r.json()
    assert r.status_code == 200 and body["samples"] == [c.text for c in want]
    assert body["finish_reasons"] == [c.finish_reason for c in want] and "stop" in body["finish_reasons"]
    assert [[x["token"] for x in recs] for recs in body["logprobs"]] == [[x["token"] for x in c.logprobs] for c in want]
