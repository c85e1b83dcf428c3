"""Stateful training (truncated BPTT), the Keras recipe's windows and loss, samples during training."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import charrnn
from charrnn.config import build_config
from charrnn.data import StreamBatches, WindowBatches
from charrnn.models.charlm import CharLM, ModelConfig
from charrnn.training import make_optimizer, train_step

from .conftest import TINY, TINY_KW, make_text, run_cli, unigram_entropy


def weights(run):
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- data


def test_stream_batches_continue_each_other_where_they_stopped():
    ids = np.arange(5000)
    b = StreamBatches(ids, seq_len=20, batch_size=8, seed=3)
    for epoch in (0, 1):
        n = b.steps_in_epoch(epoch)
        assert n == (5000 - b._offset(epoch) - 1) // 8 // 20
        firsts = []
        for k in range(n):
            x, y = b.batch(epoch, k)
            assert x.shape == y.shape == (8, 20)
            assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next characters
            if k:
                assert torch.equal(x[:, 0], prev_y[:, -1])  # row i continues row i of the last batch
                assert torch.equal(x[:, 0], prev_x[:, -1] + 1)
            firsts.append(x[:, 0])
            prev_x, prev_y = x, y
        # The streams are disjoint, contiguous stretches of the text.
        starts = firsts[0]
        assert torch.all(starts[1:] - starts[:-1] >= n * 20)
    # A rank's share is a subset of the streams.
    assert torch.equal(b.batch(1, 2, rows=slice(1, None, 2))[0], b.batch(1, 2)[0][1::2])


def test_overlapping_windows_every_window_step_characters():
    ids = np.arange(3000)
    b = WindowBatches(ids, seq_len=40, batch_size=16, seed=0, window_step=3)
    offset, perm = b._plan(0)
    assert offset < 3
    assert len(perm) == (3000 - offset - 41) // 3 + 1
    starts = []
    for k in range(b.steps_in_epoch(0)):
        x, y = b.batch(0, k)
        assert torch.equal(y[:, -1], x[:, -1] + 1)
        starts += x[:, 0].tolist()
    assert len(set(starts)) == len(starts)  # each window once per epoch
    assert all((s - offset) % 3 == 0 for s in starts)
    assert b.nominal_steps_per_epoch() == pytest.approx(b.steps_in_epoch(0), abs=1)


def test_loss_on_last_is_the_cross_entropy_of_the_next_character_only():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(12, "lstm", 0, 16, 1))
    x = torch.randint(1, 12, (4, 10))
    y = torch.randint(1, 12, (4, 10))
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0][:, -1], y[:, -1])
    opt = make_optimizer(build_config(optimizer="sgd"), model)
    loss, _ = train_step(model, opt, x, y, None, torch.device("cpu"), None, last_only=True)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --------------------------------------------------------------------------- stateful training


class Recorder:
    """Wraps CharLM.forward to record the state each training batch starts from and ends with."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = CharLM.forward

        def forward(model, ids, state=None, **kw):
            logits, new = original(model, ids, state, **kw)
            if torch.is_grad_enabled():  # training, not evaluation or sampling
                self.calls.append((clone(state), clone(new)))
            return logits, new

        monkeypatch.setattr(CharLM, "forward", forward)


def clone(state):
    if state is None:
        return None
    return tuple(s.detach().clone() for s in state) if isinstance(state, tuple) else state.detach().clone()


def same_state(a, b):
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_stateful_batch_starts_from_the_state_the_last_one_ended_with(small_corpus, tmp_path, monkeypatch, arch):
    rec = Recorder(monkeypatch)
    r = charrnn.train(str(small_corpus), tmp_path / "run", progress=False, stateful=True, epochs=2, arch=arch,
                      sample_every=0, **TINY_KW)
    per_epoch = r.step // 2
    assert len(rec.calls) == r.step and per_epoch > 5
    for k, (start, _) in enumerate(rec.calls):
        if k % per_epoch == 0:
            assert start is None  # reset at the start of every epoch
        else:
            assert same_state(start, rec.calls[k - 1][1]), k


def test_stateless_batches_start_from_zeros(small_corpus, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    charrnn.train(str(small_corpus), tmp_path / "run", progress=False, max_steps=5, sample_every=0, **TINY_KW)
    assert len(rec.calls) == 5 and all(start is None for start, _ in rec.calls)


@pytest.mark.slow
def test_stateful_model_learns(small_corpus, tmp_path):
    r = charrnn.train(str(small_corpus), tmp_path / "run", progress=False, stateful=True, max_steps=200, lr=3e-3,
                      sample_every=0, **TINY_KW)
    assert r.best_val_loss < 0.5 * unigram_entropy(small_corpus.read_text())


def test_stateful_resume_mid_epoch_keeps_streams_and_state(small_corpus, tmp_path):
    opts = dict(progress=False, stateful=True, sample_every=0, layers=2, dropout=0.1, **TINY_KW)
    charrnn.train(str(small_corpus), tmp_path / "straight", max_steps=12, **opts)
    charrnn.train(str(small_corpus), tmp_path / "split", max_steps=5, **opts)
    state = torch.load(tmp_path / "split" / "trainer-state.pt", weights_only=True)
    assert state["step_in_epoch"] == 5 and state["stream_state"][0].shape == (2, 16, 48)
    charrnn.train(str(small_corpus), tmp_path / "split", resume=True, max_steps=12, progress=False)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))


@pytest.mark.slow
def test_stateful_options_that_do_not_mix_are_refused(small_corpus, tmp_path):
    r = run_cli("train", small_corpus, "--out", tmp_path / "run", "--stateful", "--window-step", "3", *TINY)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--stateful" in r.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the Keras recipe


def test_keras_preset_is_the_seed_recipe_and_explicit_options_win():
    cfg = build_config("keras-lstm")
    assert (cfg.lowercase, cfg.newlines_to_spaces, cfg.model.arch, cfg.model.hidden, cfg.model.embed,
            cfg.model.layers) == (
        True, True, "lstm", 128, 0, 1)
    assert (cfg.seq_len, cfg.window_step, cfg.loss_on, cfg.batch_size, cfg.optimizer, cfg.lr) == (
        40, 3, "last", 1024, "rmsprop", 0.01)
    assert cfg.sample_temperatures == [0.2, 0.5, 1.0, 1.2]
    assert build_config("keras-lstm", hidden=64, lr=0.02).model.hidden == 64
    assert build_config("tutorial-gru") == build_config()


@pytest.mark.slow
def test_keras_recipe_runs_and_learns_on_a_small_text(tmp_path):
    text = make_text(12_000).upper()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    r = charrnn.train(str(path), tmp_path / "run", preset="keras-lstm", progress=False, batch_size=64, hidden=64,
                      epochs=2, sample_every=0)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["embed"] == 0 and cfg["training"]["window_step"] == 3
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    chars = vocab["chars"]
    assert "\n" not in chars and not any(c.isupper() for c in chars)  # lowercased, newlines as spaces
    steps_per_epoch = ((10_800 - 41) // 3 + 1) // 64
    assert abs(r.step - 2 * steps_per_epoch) <= 2
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "epoch_loss" in x]
    assert len(epochs) == 2 and epochs[1]["epoch_loss"] < epochs[0]["epoch_loss"]
    assert r.best_val_loss < 0.6 * unigram_entropy(text.lower().replace("\n", " "))


# --------------------------------------------------------------------------- samples during training


def test_samples_at_each_epoch_end_are_printed_and_saved(small_corpus, tmp_path):
    logged = []
    r = charrnn.train(str(small_corpus), tmp_path / "run", progress=False, epochs=2, sample_length=30,
                      sample_temperatures=[0.5, 1.0], log=logged.append, **TINY_KW)
    per_epoch = r.step // 2
    names = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert names == sorted(f"step{s:07d}-t{t}.txt" for s in (per_epoch, r.step) for t in ("0.5", "1"))
    text = small_corpus.read_text()
    prompt = text[int(len(text) * 0.9):][:40]  # default: the start of the validation text
    for name in names:
        sample = (tmp_path / "run" / "samples" / name).read_text()
        assert sample.startswith(prompt) and len(sample) == 40 + 30
        assert sample in "\n".join(logged)


def test_sample_every_n_steps_and_never(small_corpus, tmp_path):
    charrnn.train(str(small_corpus), tmp_path / "a", progress=False, max_steps=10, sample_every=4,
                  sample_temperatures=[0.8], sample_prompt="the ", sample_length=10, **TINY_KW)
    names = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert names == ["step0000004-t0.8.txt", "step0000008-t0.8.txt", "step0000010-t0.8.txt"]
    assert (tmp_path / "a" / "samples" / names[0]).read_text().startswith("the ")
    charrnn.train(str(small_corpus), tmp_path / "b", progress=False, max_steps=10, sample_every=0, **TINY_KW)
    assert not list((tmp_path / "b").glob("samples/*"))
    # Sampling leaves training untouched: same weights with and without samples.
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.slow
def test_bad_sample_temperatures_are_one_line_errors(small_corpus, tmp_path):
    for bad in ("hot", "0.5,-1"):
        r = run_cli("train", small_corpus, "--out", tmp_path / "run", "--sample-temperatures", bad, *TINY)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
