"""Dynamic evaluation: the model adapts to the text it reads, on a copy, reproducibly."""

import hashlib
import json
import random

import pytest
import torch

import charrnn
from charrnn.options import DynamicOptions

from .conftest import TINY_KW, cli, make_text

pytestmark = pytest.mark.slow        # trains a model

OTHER = ["she sells sea shells by the sea shore.", "peter piper picked a peck of pickled peppers."]


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A run trained on one text, and a second text of other sentences (the shift)."""
    tmp = tmp_path_factory.mktemp("dynamic")
    (tmp / "a.txt").write_text(make_text(30_000), encoding="utf-8")
    rng = random.Random(1)
    (tmp / "b.txt").write_text("".join(rng.choice(OTHER) + rng.choice(" \n") for _ in range(120)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(tmp / "home"))
        charrnn.train(str(tmp / "a.txt"), tmp / "run", max_steps=300, lr=3e-3, progress=False, log=lambda m: None,
                      **TINY_KW)
    return tmp


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_dynamic_evaluation_learns_the_shift_on_a_copy_and_repeats(shifted, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(shifted / "home"))
    lm = charrnn.load(shifted / "run")
    before, files = {k: v.clone() for k, v in lm.model.state_dict().items()}, digest(shifted / "run")
    options = DynamicOptions(dynamic_lr=1e-3)
    r = lm.evaluate(str(shifted / "b.txt"), dynamic=options)
    assert r["dynamic"]["loss"] < r["loss"] - 0.5 and r["dynamic"]["tokens"] == r["tokens"]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert digest(shifted / "run") == files
    assert lm.evaluate(str(shifted / "b.txt"), dynamic=options)["dynamic"] == r["dynamic"]
    # On the run's own validation split (no shift) the default settings do not hurt much.
    own = lm.evaluate(dynamic=DynamicOptions())
    assert own["dynamic"]["loss"] < own["loss"] + 0.05


def test_cli_eval_dynamic_and_generate_adapt(capsys, shifted, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(shifted / "home"))
    run, other = shifted / "run", shifted / "b.txt"
    files = digest(run)
    code, out, err = cli(capsys, "eval", run, "--corpus", other, "--dynamic", "--dynamic-lr", "1e-3", "--json")
    r = json.loads(out)
    assert code == 0 and r["dynamic"]["bpc"] < r["bpc"] and r["dynamic"]["dynamic_lr"] == 1e-3, err
    plain = cli(capsys, "generate", run, "--prompt", "pe", "--length", 60, "--temperature", 0)[1]
    code, adapted, err = cli(capsys, "generate", run, "--prompt", "pe", "--length", 60, "--temperature", 0,
                             "--adapt", other, "--dynamic-lr", "1e-3")
    assert code == 0 and adapted != plain and ("peter" in adapted or "pepper" in adapted or "pick" in adapted), err
    assert digest(run) == files
    code, _, err = cli(capsys, "generate", run, "--adapt", shifted / "missing.txt")
    assert code == 2 and "--adapt" in err and "no such file" in err
    code, _, err = cli(capsys, "eval", run, "--dynamic", "--dynamic-lr", "2")
    assert code == 2 and "--dynamic-lr must be in (0, 1)" in err
