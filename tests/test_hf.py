"""Pretrained Hugging Face causal LMs behind charrnn's commands, on a tiny GPT-2 built here (no hub)."""

import json
import math
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import charrnn  # noqa: E402
from charrnn.errors import CharRNNError  # noqa: E402

from .conftest import cli, make_text, running  # noqa: E402
from .hf_models import tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.slow     # transformers takes seconds to import


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", make_text(6000))


@pytest.fixture(scope="module")
def lm(model_dir):
    return charrnn.load(model_dir)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_text(3000, seed=5), encoding="utf-8")
    return path


def hf_greedy(lm, prompt: str, tokens: int) -> str:
    """transformers' own greedy decoding, special tokens suppressed (as charrnn never generates them)."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, do_sample=False, max_new_tokens=tokens, suppress_tokens=lm.tokenizer.all_special_ids,
                            pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:])


def test_greedy_text_is_what_transformers_generates(lm):
    ours = lm.generate("the quick", 40, temperature=0)[0]
    assert ours.startswith("the quick") and len(ours) == len("the quick") + 40
    assert hf_greedy(lm, "the quick", 60).startswith(ours[len("the quick"):].rstrip("\ufffd"))


def test_prompts_of_different_lengths_in_one_batch_match_each_alone(lm):
    batch = lm.generate(["a", "to be or not", "the quick brown fox"], 30, temperature=0)
    alone = [lm.generate(p, 30, temperature=0)[0] for p in ["a", "to be or not", "the quick brown fox"]]
    assert batch == alone


def test_sampling_is_seeded_batched_and_streamed(lm):
    texts = lm.generate("the ", 50, num_samples=3, seed=7, top_p=0.9)
    assert texts == lm.generate("the ", 50, num_samples=3, seed=7, top_p=0.9)
    assert len(set(texts)) == 3 and all(len(t) == 54 and t.startswith("the ") for t in texts)
    assert texts != lm.generate("the ", 50, num_samples=3, seed=8, top_p=0.9)
    streamed = ["the "] * 3
    for pieces in lm.stream("the ", 50, num_samples=3, seed=7, top_p=0.9):
        streamed = [s + p for s, p in zip(streamed, pieces)]
    assert streamed == texts
    logits, _ = lm.sampler.prime(["the "])            # the end-of-text token is never generated
    assert logits[0, lm.tokenizer.eos_token_id + 1] == float("-inf") and logits[0, 0] == float("-inf")
    assert all(lm.tokenizer.eos_token not in t for t in lm.generate("", 100, num_samples=4, seed=1))


def test_beam_search_finds_likelier_text_than_greedy(lm):
    greedy = lm.generate("to be", 30, temperature=0)[0]
    (one, one_score), = lm.sampler.beam("to be", 30, 1)
    beams = lm.sampler.beam("to be", 30, 4)
    assert greedy.startswith(one)          # a beam of one is greedy (its tokens may spell fewer characters)
    assert len(beams) == 4 and all(t.startswith("to be") and len(t) <= 35 for t, _ in beams)
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True) and scores[0] >= one_score - 1e-6


def test_eval_is_the_models_own_loss_per_character(lm, text_file):
    text = text_file.read_text(encoding="utf-8")
    r = lm.evaluate(str(text_file), window=128, stride=64)
    # Directly: every token after the first, scored with the model, in windows of at most 128 tokens
    # with a new window every 64 (the first window scores 1..127, each later one its last 64).
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    total, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 64):
            x = ids[begin:begin + 128]
            logp = torch.log_softmax(lm.model(x[None]).logits[0].double(), -1)
            first = 1 if begin == 0 else 128 - 64
            total -= float(sum(logp[i - 1, x[i]] for i in range(first, len(x))))
            scored += len(x) - first
            if begin + 128 >= len(ids):
                break
    first_chars = len(lm.tokenizer.decode(ids[:1]))
    assert r["tokens"] == scored == len(ids) - 1 and r["chars"] == len(text) - first_chars
    assert r["bpc"] == pytest.approx(total / r["chars"] / math.log(2), rel=1e-5)
    assert r["loss"] == pytest.approx(total / scored, rel=1e-5)
    whole = lm.evaluate(str(text_file), window=128, stride=127)
    assert whole["tokens"] == r["tokens"] and whole["bpc"] == pytest.approx(r["bpc"], rel=0.02)


def test_eval_reads_a_corpus_validation_split(lm, text_file):
    r = lm.evaluate(str(text_file), val_fraction=0.5)
    assert 1400 < r["chars"] <= 1500
    with pytest.raises(CharRNNError, match="no validation split of its own"):
        lm.evaluate()


def test_commands(capsys, model_dir, text_file):
    code, out, err = cli(capsys, "generate", model_dir, "--prompt", "the", "--length", 40, "--seed", 3,
                         "--num-samples", 5, "--top-p", 0.9, "--repetition-penalty", 1.0, "--json")
    assert code == 0, err
    samples = json.loads(out)["samples"]
    assert len(samples) == 5 and all(len(s) == 43 for s in samples)
    code, out2, _ = cli(capsys, "generate", model_dir, "--prompt", "the", "--length", 40, "--seed", 3,
                        "--num-samples", 5, "--top-p", 0.9, "--json")
    assert json.loads(out2)["samples"] == samples
    code, out, err = cli(capsys, "generate", model_dir, "--prompt", "the", "--length", 40, "--seed", 3)
    assert code == 0 and out == samples[0][:3] + charrnn.load(model_dir).generate("the", 40, seed=3)[0][3:] + "\n"
    code, out, err = cli(capsys, "generate", model_dir, "--prompt", "to be", "--length", 20, "--beam-width", 2)
    assert code == 0 and out.count("[log-probability") == 2, err
    code, out, err = cli(capsys, "eval", model_dir, "--corpus", text_file, "--json", "--window", 64, "--stride", 32)
    r = json.loads(out)
    assert code == 0 and r["window"] == 64 and r["stride"] == 32 and r["bpc"] > 0


@pytest.mark.parametrize("args, says", [
    (["generate", "{m}", "--int8"], "--int8 applies only to charrnn's own models"),
    (["generate", "{m}", "--weights", "latest"], "--weights applies only to charrnn's own models"),
    (["eval", "{m}"], "no validation split of its own"),
    (["eval", "{m}", "--corpus", "{t}", "--window", 1000], "--window must be between 2 and the model's context"),
    (["eval", "{m}", "--corpus", "{t}", "--stride", 128], "--stride must be at least 1 and below --window"),
    (["eval", "{m}", "--val-fraction", 0.1], "--val-fraction must be in (0, 1) and goes with --corpus"),
    (["generate", "{m}", "--beam-width", 2, "--repetition-penalty", 1.2], "not to --beam-width"),
    (["generate", "{m}", "--repetition-penalty", 0], "--repetition-penalty must be > 0"),
    (["generate", "no-such/model-here"], "the Hugging Face hub is out of reach"),
    (["generate", "{m}", "--num-samples", 10**10], "--num-samples is 10,000,000,000: that needs about"),
])
def test_bad_input_is_one_line(capsys, model_dir, text_file, monkeypatch, args, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")      # the hub-id case must not wait for the network
    code, out, err = cli(capsys, *[str(a).format(m=model_dir, t=text_file) for a in args])
    assert code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_a_model_that_is_not_a_causal_lm_or_no_model_at_all(capsys, tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    code, _, err = cli(capsys, "generate", vit)
    assert code == 2 and "is a vit model, not a causal language model" in err, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"hidden": 3}))
    code, _, err = cli(capsys, "generate", other)
    assert code == 2 and "neither a charrnn run nor a Hugging Face model" in err, err


def test_without_transformers_the_error_says_what_to_install(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)     # import transformers now raises ImportError
    with pytest.raises(CharRNNError, match=r'install the hf extra: pip install -e "\.\[hf\]"'):
        charrnn.load(model_dir)


def test_repetition_penalty_is_transformers_own(lm):
    from transformers import RepetitionPenaltyLogitsProcessor

    from charrnn.decoding import penalize

    torch.manual_seed(0)
    logits, ids = torch.randn(2, 50), torch.tensor([[3, 7, 7, 20], [0, 1, 2, 49]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.allclose(penalize(logits, seen, 1.7), expected)
    # In generation: with a strong penalty, greedy decoding stops repeating itself.
    plain = lm.generate("the", 80, temperature=0)[0]
    penalised = lm.generate("the", 80, temperature=0, repetition_penalty=5.0)[0]
    assert len(set(lm.tokenizer(penalised)["input_ids"])) > len(set(lm.tokenizer(plain)["input_ids"]))


def test_serve_answers_the_same_endpoints(model_dir, lm):
    import httpx

    from charrnn.serve import create_app

    app = create_app(lm)
    with running(app) as url:
        info = httpx.get(f"{url}/v1/model").json()
        assert info["kind"] == "huggingface" and info["model_type"] == "gpt2" and info["context"] == 128
        body = {"prompt": "the ", "length": 40, "num_samples": 2, "seed": 5, "top_p": 0.9}
        r = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["samples"] == lm.generate("the ", 40, num_samples=2, seed=5, top_p=0.9)
        pieces = []
        with httpx.stream("POST", f"{url}/v1/generate/stream", json={**body, "num_samples": 1}, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    pieces.append(json.loads(line[6:]))
        assert "".join(p["text"][0] for p in pieces if "text" in p) == lm.generate("the ", 40, seed=5, top_p=0.9)[0][4:]
        r = httpx.post(f"{url}/v1/generate", json={**body, "repetition_penalty": -1}, timeout=60)
        assert r.status_code == 422 and "repetition_penalty" in r.json()["error"]
        r = httpx.post(f"{url}/v1/generate", json={**body, "length": 2000}, timeout=60)   # past the context
        assert r.status_code == 422 and "context of 128 tokens" in r.json()["error"]
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
