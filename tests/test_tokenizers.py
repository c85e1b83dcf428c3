"""Word and BPE models end to end: train, resume, generate, eval in bits per character, sampled softmax."""

import json
import math

import pytest

import charrnn
from charrnn.cli import main

from .conftest import TINY, cli, make_text

pytestmark = pytest.mark.slow
STEPS = ["--max-steps", "150", "--lr", "3e-3", "--eval-every", "150", "--sample-every", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text(make_text(40_000) + "\nCafé\tüber\r\n  the end\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["word", "bpe"])
def run(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    size = ["--max-vocab", "300"] if request.param == "bpe" else []
    assert main(["train", str(corpus), "--out", str(out), "--tokenizer", request.param, *size, *STEPS, *TINY]) == 0
    return request.param, out


def test_the_run_learned_and_reports_bits_per_character(capsys, run):
    kind, out = run
    code, text, err = cli(capsys, "eval", out, "--json")
    assert code == 0, err
    r = json.loads(text)
    assert r["tokens"] < r["chars"]
    assert r["bpc"] == pytest.approx(r["loss"] * r["tokens"] / r["chars"] / math.log(2), rel=1e-3)
    assert r["bpc"] < 2.6                       # a uniform guess over the text's 40-odd characters is 5.4
    assert json.loads((out / "vocab.json").read_text())["kind"] == kind and (out / "tokenizer.json").is_file()


def test_training_logs_and_the_report_speak_in_characters(run, tmp_path):
    """The per-token training loss and token rate are turned into bits/char and chars/s with the training
    text's characters per token (near the validation text's), and the report shows bits/char."""
    from charrnn.report import read_metrics, write_report

    m = read_metrics(run[1])
    per_token = [r["loss"] / r["bpc"] / math.log(2) for r in m["train"]]
    val = m["val"][-1]
    assert min(per_token) == pytest.approx(max(per_token)) and per_token[0] > 1.5
    assert per_token[0] == pytest.approx(val["val_loss"] / val["val_bpc"] / math.log(2), rel=0.2)
    page = write_report(run[1], tmp_path / "r.html").read_text()
    assert f"{val['val_bpc']:.4f} bits/char" in page and f"{val['val_loss']:.4f} nats/token" in page


def test_generation_counts_characters_and_repeats_with_a_seed(capsys, run):
    lm = charrnn.load(run[1])
    texts = lm.generate("the qui", length=60, num_samples=3, seed=3)
    assert [len(t) for t in texts] == [67] * 3 and all(t.startswith("the qui") for t in texts)
    assert texts == lm.generate("the qui", length=60, num_samples=3, seed=3)
    assert [len(t) for t, _ in lm.sampler.beam("the ", 30, 3)][0] == 34
    code, out, err = cli(capsys, "generate", run[1], "--prompt", "the qui", "--length", 60, "--seed", 3)
    assert code == 0 and out.startswith("the qui") and "warning" not in err, err


def test_resume_keeps_the_runs_own_vocabulary(capsys, corpus, run):
    kind, out = run
    before = (out / "tokenizer.json").read_bytes()
    code, _, err = cli(capsys, "train", corpus, "--out", out, "--resume", "--max-steps", 160, "--quiet")
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == before
    other = "bpe" if kind == "word" else "word"
    code, _, err = cli(capsys, "train", corpus, "--out", out, "--resume", "--max-steps", 170, "--tokenizer", other,
                       "--quiet")
    assert code == 2 and err.startswith(f"error: --tokenizer is {other}, but the run in") and kind in err, err


def test_a_word_model_learns_with_a_sampled_softmax(capsys, corpus, tmp_path):
    out = tmp_path / "sampled"
    code, _, err = cli(capsys, "train", corpus, "--out", out, "--tokenizer", "word", "--sampled-softmax", 20,
                       *STEPS, *TINY)
    assert code == 0, err
    code, text, err = cli(capsys, "eval", out, "--json")
    assert json.loads(text)["bpc"] < 2.6, text


@pytest.mark.parametrize("bad,says", [
    (["--tokenizer", "word", "--max-vocab", "1"], "--max-vocab must be an integer >= 2"),
    (["--tokenizer", "word", "--max-vocab", "100000"], "--max-vocab is 100,000, but the training split gives only"),
    (["--tokenizer", "bpe", "--max-vocab", "100"], "--max-vocab is 100: a byte-level BPE vocabulary"),
    (["--max-vocab", "50"], "--max-vocab applies to --tokenizer word or bpe"),
    (["--tokenizer", "word", "--sampled-softmax", "100000"], "--sampled-softmax is 100000: it must be smaller"),
])
def test_impossible_vocabularies_are_refused_and_nothing_is_written(capsys, corpus, tmp_path, bad, says):
    code, _, err = cli(capsys, "train", corpus, "--out", tmp_path / "new", *bad, *STEPS, *TINY)
    assert code == 2 and err.startswith(f"error: {says}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


def test_an_exported_model_generates_the_same_way_without_torch(capsys, run, tmp_path):
    pytest.importorskip("onnxruntime")
    from charrnn import runtime

    onnx = tmp_path / "model.onnx"
    code, _, err = cli(capsys, "export", run[1], "--out", onnx)
    assert code == 0, err
    exported = runtime.load(onnx)
    texts = exported.generate("the qui", length=50, num_samples=2, seed=5, temperature=0)
    assert texts == charrnn.load(run[1]).generate("the qui", length=50, num_samples=2, temperature=0)
    assert [len(t) for t in exported.generate("the qui", length=50, num_samples=2, seed=5)] == [57, 57]


def test_the_server_streams_characters_of_a_token_model(run):
    from starlette.testclient import TestClient

    from charrnn.serve import Limits, create_app

    with TestClient(create_app(charrnn.load(run[1]), Limits())) as client:
        model = client.get("/v1/model").json()
        assert model["tokenizer"] == run[0]
        body = {"prompt": "the qui", "length": 40, "num_samples": 2, "seed": 4, "temperature": 0}
        got = client.post("/v1/generate", json=body).json()["samples"]
        assert got == charrnn.load(run[1]).generate("the qui", length=40, num_samples=2, temperature=0)


def test_evaluation_scores_only_the_targets_it_is_told_to():
    """evaluate(scored=...) (a character model over the characters a word model predicts) sums the loss of the
    scored targets alone, over their characters, with the context of every character."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from charrnn.evaluation import evaluate
    from charrnn.models import CharLM, ModelConfig

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, embed=8, hidden=16))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 11, 300)
    scored = rng.random(300) < 0.6
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(ids[:-1])[None])
        losses = F.cross_entropy(logits[0], torch.from_numpy(ids[1:]), reduction="none").numpy()
    r = evaluate(model, ids, seq_len=50, n_streams=1, scored=scored)
    assert r["chars"] == scored[1:].sum() and r["unk_chars"] == (~scored[1:]).sum()
    assert r["nats_per_char"] == pytest.approx(losses[scored[1:]].mean(), rel=1e-5)
    assert evaluate(model, ids, seq_len=50, n_streams=1, scored=np.ones(300, bool))["loss"] == pytest.approx(
        losses.mean(), rel=1e-5)
