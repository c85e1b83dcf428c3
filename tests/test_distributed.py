"""Data-parallel training under torchrun (gloo on the CPU): two processes train the model one does.

Each torchrun start costs a few seconds, so the runs are tiny and shared between tests.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import charrnn
from charrnn.distributed import Dist
from charrnn.errors import CharRNNError

from .conftest import TINY, TINY_KW

pytestmark = pytest.mark.slow   # every test here trains models or starts processes

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charrnn"]
NO_SAMPLES = ["--sample-every", "0"]


def torchrun(*args, timeout=300):
    r = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return r


def check(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def weights(run):
    return load_file(str(run / "model.safetensors"))


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_comparison_here_runs_in_fp32():
    """One and two processes agree within 1e-5 in fp32 only: under bf16 autocast (what --precision auto
    picks on CPUs with native bf16) they are about 2e-3 apart after 30 steps of a 64-unit GRU (README,
    docs/design.md). So every run here pins fp32, whatever the machine."""
    assert TINY[TINY.index("--precision") + 1] == "fp32" and TINY_KW["precision"] == "fp32"


def test_each_rank_takes_a_contiguous_share_of_the_rows():
    assert [Dist(r, 2).share(16) for r in range(2)] == [slice(0, 8), slice(8, 16)]
    assert [Dist(r, 3).share(16) for r in range(3)] == [slice(0, 6), slice(6, 11), slice(11, 16)]
    assert Dist(3, 4).share(2) == slice(2, 2)  # more ranks than evaluation streams: an empty share


def test_a_global_batch_that_does_not_split_evenly_is_refused(small_corpus, tmp_path):
    from charrnn.config import build_config
    from charrnn.corpus import load_corpus
    from charrnn.training import Trainer

    cfg = build_config(max_steps=1, **{**TINY_KW, "batch_size": 15})
    with pytest.raises(CharRNNError, match="multiple of 2"):
        Trainer(load_corpus(str(small_corpus)), cfg, tmp_path / "r", dist=Dist(0, 2))


def test_two_processes_train_the_same_model_as_one(small_corpus, tmp_path):
    opts = ["--max-steps", "5", "--eval-every", "5", "--log-every", "1", "--sample-length", "20"]
    one = tmp_path / "one"
    charrnn.train(str(small_corpus), one, progress=False, max_steps=5, eval_every=5, log_every=1,
                  sample_length=20, **TINY_KW)
    r = check(torchrun("train", small_corpus, "--out", tmp_path / "two", *TINY, *opts))
    two = tmp_path / "two"
    # Global batch 16 = 2 x 8 rows: the same weights as one process with batch 16 (no dropout).
    assert_close(weights(one), weights(two))
    # The losses logged are the global batch's, the validation loss is over the whole split
    # (the streams shared between the ranks), each written once, by rank 0.
    m1, m2 = metrics(one), metrics(two)
    assert [sorted(x) for x in m1] == [sorted(x) for x in m2]
    for a, b in zip(m1, m2):
        for key in ("loss", "val_loss", "epoch_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert sorted(p.name for p in (two / "samples").iterdir()) == sorted(p.name for p in (one / "samples").iterdir())
    assert r.stderr.count("stopped (max_steps) at step 5") == 1
    assert r.stderr.count("(with [UNK])") == 1  # the summary, printed by rank 0 only


@pytest.fixture(scope="module")
def stateful_runs(tmp_path_factory):
    """Stateful LSTM runs of 12 steps: 1 and 2 processes straight, and 6 + 6 steps across a resume
    (2 -> 2, 2 -> 1, 1 -> 2 processes)."""
    base = tmp_path_factory.mktemp("stateful")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(base / "home"))  # module scope: conftest's per-test home comes later
        return _stateful_runs(base)


def _stateful_runs(base):
    corpus = base / "small.txt"
    from .conftest import make_text

    corpus.write_text(make_text(20_000), encoding="utf-8")
    kw = dict(TINY_KW, stateful=True, arch="lstm", layers=2, eval_every=6, log_every=1)
    args = [*TINY, "--stateful", "--arch", "lstm", "--layers", "2", "--eval-every", "6", "--log-every", "1",
            *NO_SAMPLES]
    runs = {name: base / name for name in ("one", "two", "two_two", "two_one", "one_two")}
    charrnn.train(str(corpus), runs["one"], progress=False, max_steps=12, sample_every=0, **kw)
    check(torchrun("train", corpus, "--out", runs["two"], "--max-steps", 12, *args))
    check(torchrun("train", corpus, "--out", runs["two_two"], "--max-steps", 6, *args))
    shutil.copytree(runs["two_two"], runs["two_one"])
    check(torchrun("train", corpus, "--out", runs["two_two"], "--resume", "--max-steps", 12, "--quiet"))
    charrnn.train(str(corpus), runs["two_one"], resume=True, max_steps=12, progress=False)
    charrnn.train(str(corpus), runs["one_two"], progress=False, max_steps=6, sample_every=0, **kw)
    check(torchrun("train", corpus, "--out", runs["one_two"], "--resume", "--max-steps", 12, "--quiet"))
    return runs


def test_stateful_two_processes_equal_one(stateful_runs):
    assert_close(weights(stateful_runs["one"]), weights(stateful_runs["two"]))
    # The checkpoint holds the carried state of the whole global batch, gathered from both ranks.
    s1 = torch.load(stateful_runs["one"] / "trainer-state.pt", weights_only=True)
    s2 = torch.load(stateful_runs["two"] / "trainer-state.pt", weights_only=True)
    assert len(s2["stream_state"]) == 2 and s2["stream_state"][0].shape == (2, 16, 48)
    for a, b in zip(s1["stream_state"], s2["stream_state"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    assert len(s2["rng_cpu_ranks"]) == 2


def test_two_processes_interrupted_and_resumed_equal_a_straight_run(stateful_runs):
    straight, split = weights(stateful_runs["two"]), weights(stateful_runs["two_two"])
    assert_close(straight, split, atol=0)
    steps = [m["step"] for m in metrics(stateful_runs["two_two"]) if "val_loss" in m]
    assert steps == [6, 12]


@pytest.mark.parametrize("name", ["two_one", "one_two"])
def test_resume_with_another_number_of_processes(stateful_runs, name):
    state = torch.load(stateful_runs[name] / "trainer-state.pt", weights_only=True)
    assert state["step"] == 12
    assert_close(weights(stateful_runs["one"]), weights(stateful_runs[name]))


def test_ctrl_c_stops_every_rank_together_and_the_run_resumes(small_corpus, tmp_path):
    run = tmp_path / "r"
    # Like Ctrl-C in a terminal: SIGINT to torchrun and its workers (one process group).
    proc = subprocess.Popen([*TORCHRUN, "train", str(small_corpus), "--out", str(run), "--max-steps", "100000",
                             "--log-every", "1", *TINY, *NO_SAMPLES], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics_file = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 10):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "--resume" in err and "stopped (interrupted)" in err, err
    stopped = torch.load(run / "trainer-state.pt", weights_only=True)["step"]
    assert stopped >= 10
    # Both ranks stopped after the same step (the checkpoint holds both random states) and the
    # run goes on in one process where it stopped.
    assert len(torch.load(run / "trainer-state.pt", weights_only=True)["rng_cpu_ranks"]) == 2
    target = stopped + 3
    charrnn.train(str(small_corpus), run, resume=True, max_steps=target, progress=False)
    charrnn.train(str(small_corpus), tmp_path / "straight", max_steps=target, progress=False, sample_every=0,
                  **TINY_KW)
    assert_close(weights(run), weights(tmp_path / "straight"))


def test_time_limit_stops_both_ranks_and_errors_print_once(small_corpus, tmp_path):
    r = check(torchrun("train", small_corpus, "--out", tmp_path / "r", "--time-limit", "2", *TINY, *NO_SAMPLES))
    assert r.stderr.count("stopped (time_limit)") == 1
    r = torchrun("train", small_corpus, "--out", tmp_path / "r", "--max-steps", "2", *TINY)
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1 and "--resume" in r.stderr, r.stderr


@pytest.mark.parametrize("tokenizer, size", [("word", 30), ("bpe", 300)])
def test_two_processes_train_a_word_or_bpe_model_as_one(small_corpus, tmp_path, tokenizer, size):
    """Both ranks build (or find) the same tokenizer and encoded split; the global batch is split as
    for characters, so two processes end on one process's weights and bits per character."""
    kw = dict(TINY_KW, tokenizer=tokenizer, max_vocab=size)
    one, two = tmp_path / "one", tmp_path / "two"
    charrnn.train(str(small_corpus), one, progress=False, max_steps=4, eval_every=4, sample_every=0, **kw)
    check(torchrun("train", small_corpus, "--out", two, *TINY, "--tokenizer", tokenizer, "--max-vocab", size,
                   "--max-steps", 4, "--eval-every", 4, *NO_SAMPLES))
    assert (two / "tokenizer.json").read_bytes() == (one / "tokenizer.json").read_bytes()
    assert_close(weights(one), weights(two))
    last1, last2 = metrics(one)[-1], metrics(two)[-1]
    assert last2["val_bpc"] == pytest.approx(last1["val_bpc"], abs=1e-5)


@pytest.mark.parametrize("lora", [None, 2])
def test_two_processes_fine_tune_a_hugging_face_model_as_one(small_corpus, tmp_path, lora):
    """Every rank loads the model it starts from and tokenizes the corpus itself; the global batch is split as
    for characters, so two processes end on one process's weights (the adapters, with LoRA) and validation."""
    pytest.importorskip("peft")
    from .hf_models import tiny_gpt2

    gpt = tiny_gpt2(tmp_path / "gpt", small_corpus.read_text(encoding="utf-8"), dropout=0.0)
    extra = ["--lora", str(lora)] if lora else []
    one, two = tmp_path / "one", tmp_path / "two"
    charrnn.train(str(small_corpus), one, init_from=str(gpt), lora=lora, progress=False, max_steps=4, eval_every=4,
                  sample_every=0, seq_len=32, batch_size=8, precision="fp32", lr=3e-3)
    check(torchrun("train", small_corpus, "--out", two, "--init-from", gpt, *extra, "--max-steps", 4, "--eval-every",
                   4, "--seq-len", 32, "--batch-size", 8, "--precision", "fp32", "--lr", 3e-3, "--quiet", *NO_SAMPLES))
    assert_close(*(torch.load(run / "trainer-state.pt", weights_only=True)["model"] for run in (one, two)))
    assert metrics(two)[-1]["val_loss"] == pytest.approx(metrics(one)[-1]["val_loss"], abs=1e-5)
