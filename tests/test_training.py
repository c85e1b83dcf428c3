"""Training: it learns, it checkpoints, it resumes exactly, it stops when told."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import charrnn
from charrnn.errors import CharRNNError

from .conftest import TINY, TINY_KW, make_text, unigram_entropy


def weights(run, name="model.safetensors"):
    return load_file(str(run / name))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_a_small_model_learns_well_below_the_unigram_entropy(small_corpus, tmp_path):
    result = charrnn.train(str(small_corpus), tmp_path / "run", progress=False, max_steps=300, eval_every=100,
                           lr=3e-3, **TINY_KW)
    h1 = unigram_entropy(small_corpus.read_text())
    assert result.stop_reason == "max_steps" and result.step == 300
    assert result.best_val_loss < 0.5 * h1, (result.best_val_loss, h1)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in lines if "loss" in r)
    assert first["step"] == 1
    import math
    assert abs(first["loss"] - math.log(len(set(small_corpus.read_text())) + 1)) < 0.3
    val_steps = [r["step"] for r in lines if "val_loss" in r]
    assert {100, 200, 300, 35, 70} <= set(val_steps)  # every --eval-every steps and every epoch
    lm = charrnn.load(tmp_path / "run")
    assert lm.evaluate()["loss"] == pytest.approx(result.best_val_loss, rel=1e-4)
    # What it learned shows in the samples: mostly real words from the corpus.
    text = lm.generate("the ", 300, temperature=0.5, seed=0)[0]
    words = set(" ".join(make_text(20_000).split("\n")).split())
    produced = text.replace("\n", " ").split()
    assert sum(w in words for w in produced) / len(produced) > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_bf16_training_learns_as_well_as_fp32(arch, small_corpus, tmp_path, monkeypatch):
    """--precision bf16 on CPU: the recurrent layers take the fast path with bf16 products, and the
    model reaches the validation loss the float32 run does (to within 3%)."""
    from charrnn.ops import matmul
    lows = []
    real_init = matmul.Product.__init__
    monkeypatch.setattr(matmul.Product, "__init__",
                        lambda self, w, rows, low=None: real_init(self, w, rows, low) or lows.append(low))
    opts = dict(progress=False, max_steps=200, lr=3e-3, arch=arch, **{**TINY_KW, "hidden": 64})
    fp32 = charrnn.train(str(small_corpus), tmp_path / "fp32", **opts)
    assert torch.bfloat16 not in lows        # (the LSTM's compiled float32 loops make no _Product)
    lows.clear()
    bf16 = charrnn.train(str(small_corpus), tmp_path / "bf16", **{**opts, "precision": "bf16"})
    assert lows and set(lows) == {torch.bfloat16}
    assert bf16.best_val_loss < 0.5 * unigram_entropy(small_corpus.read_text())
    assert bf16.best_val_loss == pytest.approx(fp32.best_val_loss, rel=0.03)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_at_a_checkpoint_and_resumed_equals_uninterrupted(precision, small_corpus, tmp_path):
    opts = dict(progress=False, dropout=0.2, weight_drop=0.3, layers=2, eval_every=4,
                **{**TINY_KW, "precision": precision})
    charrnn.train(str(small_corpus), tmp_path / "straight", max_steps=14, **opts)
    charrnn.train(str(small_corpus), tmp_path / "split", max_steps=6, **opts)
    r = charrnn.train(str(small_corpus), tmp_path / "split", resume=True, max_steps=14, progress=False)
    assert r.step == 14
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    # Metrics after the resume point are not duplicated.
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in x]
    assert steps == sorted(set(steps))


def test_runs_saved_before_an_option_existed_resume(small_corpus, tmp_path):
    """A run whose config.json predates --weight-drop (no such key) resumes with the default."""
    charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=4, **TINY_KW)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"].pop("weight_drop") == 0.0 and config["training"]["model"].pop("weight_drop") == 0.0
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    assert charrnn.train(str(small_corpus), tmp_path / "r", resume=True, max_steps=6, progress=False).step == 6
    with pytest.raises(CharRNNError, match="weight_drop is 0.2 but the run in .* was trained with 0.0"):
        charrnn.train(str(small_corpus), tmp_path / "r", resume=True, max_steps=8, progress=False, weight_drop=0.2)


@pytest.mark.slow
def test_resume_across_an_epoch_boundary(small_corpus, tmp_path):
    opts = dict(progress=False, **TINY_KW)
    # 20,000 chars * 0.9 / 32 / 16 = 35 steps per epoch: stop inside the second epoch.
    charrnn.train(str(small_corpus), tmp_path / "a", max_steps=50, **opts)
    charrnn.train(str(small_corpus), tmp_path / "b", max_steps=40, **opts)
    charrnn.train(str(small_corpus), tmp_path / "b", resume=True, max_steps=50, progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_best_weights_and_latest(small_corpus, tmp_path):
    charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=20, eval_every=10, **TINY_KW)
    assert (tmp_path / "r" / "best.safetensors").exists()
    best = charrnn.load(tmp_path / "r")
    latest = charrnn.load(tmp_path / "r", weights="latest")
    assert best.run.weights == "best.safetensors" and latest.run.weights == "model.safetensors"


@pytest.mark.slow
def test_time_limit_stops_cleanly_with_a_checkpoint(small_corpus, tmp_path):
    r = charrnn.train(str(small_corpus), tmp_path / "r", progress=False, time_limit=1.5, **TINY_KW)
    assert r.stop_reason == "time_limit"
    assert 1.5 <= r.train_time < 30
    state = torch.load(tmp_path / "r" / "trainer-state.pt", weights_only=True)
    assert state["step"] == r.step > 0


def test_existing_run_is_never_overwritten_without_force(small_corpus, tmp_path):
    charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=3, **TINY_KW)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(CharRNNError, match="use resume to continue it, force to overwrite it"):
        charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=3, **TINY_KW)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    r = charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=2, force=True, **TINY_KW)
    assert r.step == 2


def test_force_refuses_a_directory_that_is_not_a_run(small_corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CharRNNError, match="not a charrnn run"):
        charrnn.train(str(small_corpus), tmp_path / "mine", progress=False, max_steps=2, force=True, **TINY_KW)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_resume_with_a_different_vocabulary_is_refused(small_corpus, tmp_path):
    charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=3, **TINY_KW)
    other = tmp_path / "other.txt"
    other.write_text(make_text(20_000).upper(), encoding="utf-8")
    with pytest.raises(CharRNNError, match="vocabulary does not match"):
        charrnn.train(str(other), tmp_path / "r", resume=True, progress=False, max_steps=6)


def test_training_on_cpu_loads_on_cpu_with_map_location(small_corpus, tmp_path):
    # Weights are stored on the CPU whatever device trained them (safetensors of .cpu() tensors),
    # and trainer-state is loaded with map_location="cpu": a GPU run loads on a CPU-only machine.
    charrnn.train(str(small_corpus), tmp_path / "r", progress=False, max_steps=2, **TINY_KW)
    for name in ("model.safetensors", "best.safetensors"):
        assert all(t.device.type == "cpu" for t in load_file(str(tmp_path / "r" / name)).values())


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_exactly(small_corpus, tmp_path):
    run = tmp_path / "r"
    args = [sys.executable, "-m", "charrnn", "train", str(small_corpus), "--out", str(run), "--max-steps",
            "100000", "--log-every", "1", *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    stopped = torch.load(run / "trainer-state.pt", weights_only=True)["step"]
    assert stopped >= 20
    target = stopped + 7
    charrnn.train(str(small_corpus), run, resume=True, max_steps=target, progress=False)
    charrnn.train(str(small_corpus), tmp_path / "straight", max_steps=target, progress=False, log_every=1,
                  **TINY_KW)
    assert_same_weights(weights(run), weights(tmp_path / "straight"))


@pytest.mark.slow
def test_a_kill_between_checkpoints_resumes_from_the_last_one(small_corpus, tmp_path):
    run = tmp_path / "r"
    args = [sys.executable, "-m", "charrnn", "train", str(small_corpus), "--out", str(run), "--max-steps",
            "100000", "--log-every", "1", "--checkpoint-every", "5", *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "trainer-state.pt").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait(timeout=60)
    saved = torch.load(run / "trainer-state.pt", weights_only=True)["step"]
    assert saved > 0 and saved % 5 == 0
    r = charrnn.train(str(small_corpus), run, resume=True, max_steps=saved + 3, progress=False)
    assert r.step == saved + 3
    charrnn.load(run).generate("the", 10, seed=0)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "sgd"])
def test_optimizers_are_torchs_own_with_the_recipes_settings(name):
    """Plain torch.optim classes (a checkpoint's optimizer state is theirs), with Keras's RMSprop
    settings and SGD with momentum."""
    from charrnn.config import TrainConfig
    from charrnn.training import make_optimizer

    opt = make_optimizer(TrainConfig(optimizer=name, lr=0.01, weight_decay=0.1), torch.nn.Linear(5, 3))
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
               "sgd": torch.optim.SGD}
    assert type(opt) is classes[name]
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.1
    if name == "rmsprop":
        assert group["alpha"] == 0.9 and group["eps"] == 1e-7
    if name == "sgd":
        assert group["momentum"] == 0.9


def test_a_users_hooks_see_what_is_logged_and_can_stop_training(small_corpus, tmp_path):
    seen = {"after_log": [], "epoch_end": [], "after_eval": [], "train_end": []}

    def keep(event):
        return lambda trainer, info: seen[event].append((trainer.state.step, dict(info)))

    def after_eval(trainer, info):
        keep("after_eval")(trainer, info)
        if info["step"] >= 40:
            trainer.request_stop("good enough")

    hooks = {"after_log": keep("after_log"), "epoch_end": keep("epoch_end"), "after_eval": after_eval,
             "train_end": keep("train_end")}
    # 35 steps per epoch: evaluations at steps 20, 35 (the epoch's end) and 40, where the hook stops the run.
    r = charrnn.train(str(small_corpus), tmp_path / "r", progress=False, epochs=10, eval_every=20, log_every=5,
                      sample_every=0, hooks=hooks, **TINY_KW)
    assert r.stop_reason == "good enough" and r.step == 40
    assert torch.load(tmp_path / "r" / "trainer-state.pt", weights_only=True)["step"] == 40
    # Every hook saw the trainer at the step of its info, and the info is the record in metrics.jsonl.
    assert all(step == info["step"] for events in seen.values() for step, info in events)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for event, key in (("after_log", "loss"), ("epoch_end", "epoch_loss"), ("after_eval", "val_loss")):
        assert [info for _, info in seen[event]] == [x for x in lines if key in x], event
    assert [info["step"] for _, info in seen["after_eval"]] == [20, 35, 40]   # no final evaluation: done at 40
    assert seen["after_eval"][-1][1]["val_loss"] == r.last_val_loss
    assert [info for _, info in seen["train_end"]] == [{"step": 40, "stop_reason": "good enough"}]
    with pytest.raises(CharRNNError, match="after_eval"):
        charrnn.train(str(small_corpus), tmp_path / "r2", progress=False, max_steps=2, hooks={"before_lunch": print},
                      **TINY_KW)


@pytest.mark.slow
def test_building_the_kernels_does_not_count_against_the_time_limit(small_corpus, tmp_path, monkeypatch):
    from charrnn import native

    real, calls = native.load, []

    def first_build_is_slow():
        if not calls:
            time.sleep(5)
        calls.append(1)
        return real()

    monkeypatch.setattr(native, "load", first_build_is_slow)
    r = charrnn.train(str(small_corpus), tmp_path / "r", progress=False, time_limit=1.5, log_every=1,
                      sample_every=0, **TINY_KW)
    assert calls and r.stop_reason == "time_limit" and r.step > 1
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["time"] < 5


@pytest.mark.slow
def test_loading_a_run_for_inference_does_not_import_the_training_code(small_corpus, tmp_path):
    run = tmp_path / "r"
    charrnn.train(str(small_corpus), run, progress=False, max_steps=2, sample_every=0, **TINY_KW)
    code = f"""
import sys
import charrnn, charrnn.checkpoint, charrnn.evaluation, charrnn.sampling
from charrnn.cli import main
run = {str(run)!r}
assert main(["generate", run, "--length", "5", "--seed", "0"]) == 0
assert main(["eval", run, "--device", "cpu"]) == 0
charrnn.load(run, int8=True).generate("the", 5, seed=0)
charrnn.checkpoint.load_run(run)
print(sorted(m for m in sys.modules if m in ("charrnn.training", "charrnn.tasks.common")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
