"""min-p sampling, added through the one sampling-parameters object (:class:`charrnn.options.SamplingParams`):
the filter is transformers' `MinPLogitsWarper` in PyTorch and in NumPy, and the option reaches the library, the
command line, `/v1/generate`, `/v1/completions` and the torch-free runtime."""

import dataclasses
import json

import httpx
import numpy as np
import onnx
import pytest
import torch

import charrnn
from charrnn import runtime
from charrnn.decoding import choose, process_logits
from charrnn.errors import OptionError
from charrnn.export import export_onnx
from charrnn.options import SamplingParams
from charrnn.serve import create_app
from charrnn.vocab import UNK_ID

from .conftest import TINY_KW, cli, make_text, running

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper)

CASES = [(min_p, t) for min_p in (0.0, 1e-4, 0.05, 0.1, 0.3, 0.7, 1.0) for t in (0.3, 0.7, 1.0, 1.5)]


def _logits(seed: int, batch: int = 16, vocab: int = 67) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * (1 + 3 * torch.rand(batch, 1, generator=g))


def _transformers_kept(logits: torch.Tensor, min_p: float, temperature: float, top_k: int | None = None):
    """The ids transformers' warpers keep, in its order (temperature, top-k, min-p), [UNK] removed first as
    charrnn always does."""
    scores = logits.clone()
    scores[:, UNK_ID] = float("-inf")
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return torch.isfinite(MinPLogitsWarper(min_p)(None, scores))


@pytest.mark.parametrize("min_p,temperature", CASES)
def test_the_filters_keep_exactly_the_ids_min_p_logits_warper_keeps(min_p, temperature):
    for seed in range(5):
        logits = _logits(seed)
        want = _transformers_kept(logits, min_p, temperature)
        got = torch.isfinite(process_logits(logits.clone(), temperature, min_p=min_p))
        assert torch.equal(got, want), (seed, (got != want).sum())
        # The NumPy twin computes in float64: compared with the warper run in float64.
        want64 = _transformers_kept(logits.double(), min_p, temperature)
        got_np = np.isfinite(runtime.process_logits(logits.numpy(), temperature, min_p=min_p))
        assert np.array_equal(got_np, want64.numpy()), (seed, (got_np != want64.numpy()).sum())
        assert got.any(-1).all() and got_np.any(-1).all()        # at least one id always kept


@pytest.mark.parametrize("top_k", [1, 5, 30])
def test_min_p_comes_after_top_k_as_in_transformers(top_k):
    for seed in range(5):
        logits = _logits(100 + seed)
        for min_p, temperature in ((0.1, 0.7), (0.5, 1.3)):
            want = _transformers_kept(logits, min_p, temperature, top_k)
            assert torch.equal(torch.isfinite(process_logits(logits.clone(), temperature, top_k, min_p=min_p)), want)
            want64 = _transformers_kept(logits.double(), min_p, temperature, top_k)
            got_np = runtime.process_logits(logits.numpy(), temperature, top_k, min_p=min_p)
            assert np.array_equal(np.isfinite(got_np), want64.numpy())


def test_min_p_off_changes_nothing_and_sampling_stays_inside_the_kept_ids():
    logits = _logits(7)
    plain = process_logits(logits.clone(), 0.8)
    assert torch.equal(process_logits(logits.clone(), 0.8, min_p=None), plain)
    assert torch.equal(process_logits(logits.clone(), 0.8, min_p=0.0), plain)
    kept = torch.isfinite(process_logits(logits.clone(), 0.8, min_p=0.2))
    many = logits.repeat(50, 1)
    ids = choose(many, 0.8, None, None, torch.Generator().manual_seed(0), min_p=0.2)
    assert kept.repeat(50, 1).gather(1, ids[:, None]).all()
    ids_np = runtime.choose(many.numpy(), 0.8, None, None, np.random.default_rng(0), min_p=0.2)
    assert kept.repeat(50, 1).numpy()[np.arange(len(ids_np)), ids_np].all()


def test_the_compiled_sampler_steps_aside_for_min_p(compiled):
    """The fused sampler knows temperature alone: with min_p the PyTorch path runs (the same draws, filtered)."""
    logits = _logits(3)
    for min_p in (0.05, 0.5):
        fast = choose(logits, 0.9, None, None, torch.Generator().manual_seed(1), min_p=min_p, compiled=True)
        slow = choose(logits, 0.9, None, None, torch.Generator().manual_seed(1), min_p=min_p, compiled=False)
        assert torch.equal(fast, slow)
        assert torch.isfinite(process_logits(logits.clone(), 0.9, min_p=min_p)).gather(1, fast[:, None]).all()


def test_the_parameters_object_checks_min_p_when_made():
    assert SamplingParams(min_p=0).min_p == 0 and SamplingParams(min_p=1).min_p == 1
    for bad in (-0.1, 1.5, float("nan"), float("inf"), "0.1", True, 1e308):
        with pytest.raises(OptionError, match=r"^min_p must be in \[0, 1\]"):
            SamplingParams(min_p=bad)
    params = SamplingParams(min_p=0.1, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.min_p = 5                                  # made valid, stays valid
    with pytest.raises(OptionError, match="^min_p"):
        dataclasses.replace(params, min_p=2)
    assert SamplingParams.of(params, temperature=0.5) == SamplingParams(min_p=0.1, seed=3, temperature=0.5)


# ----- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained enough to write words (not only spaces) greedily."""
    tmp = tmp_path_factory.mktemp("min_p")
    (tmp / "corpus.txt").write_text(make_text(20_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(tmp / "home"))
        charrnn.train(str(tmp / "corpus.txt"), tmp / "run", max_steps=60, lr=3e-3, progress=False,
                      log=lambda m: None, **TINY_KW)
    return tmp / "run"


@pytest.fixture(scope="module")
def lm(run_dir):
    return charrnn.load(run_dir)


@pytest.fixture(scope="module")
def onnx_file(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("min_p_onnx") / "m.onnx"
    export_onnx(run_dir, path)
    return path


def test_library_min_p_one_is_greedy_and_zero_is_off(lm):
    greedy = lm.generate("the ", 60, temperature=0)
    assert len(set(greedy[0][4:])) > 3                  # words, not a run of one character
    assert lm.generate("the ", 60, min_p=1.0, seed=1) == lm.generate("the ", 60, min_p=1.0, seed=2) == greedy
    assert lm.generate("the ", 60, min_p=0.0, seed=5) == lm.generate("the ", 60, seed=5)
    a = lm.generate("the ", 80, num_samples=3, min_p=0.1, temperature=1.3, seed=4)
    assert a == lm.generate("the ", 80, num_samples=3, params=SamplingParams(min_p=0.1, temperature=1.3, seed=4))
    assert [c.text for c in lm.complete("the ", 80, num_samples=3, min_p=0.1, temperature=1.3, seed=4)] == a
    assert "".join(t for (t,) in lm.stream("the ", 60, min_p=1.0)) == greedy[0][4:]
    with pytest.raises(OptionError, match="^min_p"):
        lm.generate("the ", 5, min_p=-1)


def test_command_line_min_p(capsys, run_dir, onnx_file, lm):
    code, greedy, _ = cli(capsys, "generate", run_dir, "--prompt", "the ", "--length", 40, "--temperature", 0)
    assert code == 0
    for model in (run_dir, onnx_file):
        code, out, err = cli(capsys, "generate", model, "--prompt", "the ", "--length", 40, "--min-p", 1, "--seed", 9)
        assert code == 0 and out == greedy, err
    code, out, _ = cli(capsys, "generate", run_dir, "--prompt", "the ", "--length", 40, "--min-p", 0.2, "--seed", 9,
                       "--json")
    assert code == 0 and json.loads(out)["samples"] == lm.generate("the ", 40, min_p=0.2, seed=9)
    for bad in ("1.5", "-0.1", "nan", "inf"):
        for model in (run_dir, onnx_file):
            code, out, err = cli(capsys, "generate", model, "--length", 5, "--min-p", bad)
            lines = err.strip().splitlines()
            assert code == 2 and lines == [lines[-1]] and lines[0].startswith("error: --min-p must be in [0, 1]"), err
            assert out == ""


def test_runtime_min_p(onnx_file, lm, tmp_path):
    exported = runtime.load(onnx_file)
    greedy = exported.generate("the ", 60, temperature=0)
    assert greedy == lm.generate("the ", 60, temperature=0)
    assert exported.generate("the ", 60, min_p=1.0, seed=3) == greedy
    a = exported.generate("the ", 60, num_samples=2, min_p=0.1, seed=3)
    assert a == exported.generate("the ", 60, num_samples=2, params=SamplingParams(min_p=0.1, seed=3))
    with pytest.raises(OptionError, match="^min_p"):
        exported.generate("the ", 5, min_p=1.01)
    with pytest.raises(OptionError, match="^presence_penalty applies to run directories"):
        exported.generate("the ", 5, presence_penalty=0.5)
    # A default stored in the file applies when the call leaves min_p out, as the temperature's does.
    proto = onnx.load(onnx_file)
    for p in proto.metadata_props:
        if p.key == "charrnn.sampling":
            p.value = json.dumps({"temperature": 1.0, "top_k": None, "top_p": None, "min_p": 1.0})
    onnx.save(proto, tmp_path / "greedy.onnx")
    stored = runtime.load(tmp_path / "greedy.onnx")
    assert stored.generate("the ", 60, seed=1) == greedy
    assert stored.generate("the ", 60, seed=1, min_p=0.0) == exported.generate("the ", 60, seed=1)


def test_both_endpoints_take_min_p(lm):
    greedy = lm.generate("the ", 40, temperature=0)
    sampled = lm.generate("the ", 40, num_samples=2, min_p=0.2, seed=6)
    with running(create_app(lm)) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/generate", json={"prompt": "the ", "length": 40, "min_p": 1.0, "seed": 2})
        assert r.status_code == 200 and r.json()["samples"] == greedy, r.text
        r = client.post("/v1/generate", json={"prompt": "the ", "length": 40, "num_samples": 2, "min_p": 0.2,
                                              "seed": 6})
        assert r.json()["samples"] == sampled
        r = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 40, "n": 2, "min_p": 0.2,
                                                 "seed": 6})
        assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [s[4:] for s in sampled], r.text
        r = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 40, "min_p": None, "seed": 6})
        assert r.json()["choices"][0]["text"] == lm.generate("the ", 40, seed=6)[0][4:]    # null: its default
