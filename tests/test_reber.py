"""The embedded Reber grammar: generator, checker, corruption, the GRU classifier and its command line."""

import json
import random

import pytest
import torch

from charrnn.cli import main
from charrnn.errors import CharRNNError
from charrnn.models.classifier import ClassifierConfig, SequenceClassifier
from charrnn.tasks import reber


def test_generated_strings_are_grammatical():
    rng = random.Random(0)
    for _ in range(500):
        s = reber.reber_string(rng)
        assert reber.is_reber(s) and s[0] == "B" and s[-1] == "E"
        e = reber.embedded_reber_string(rng)
        assert reber.is_embedded_reber(e) and e[1] == e[-2] and e[1] in "TP"
        assert not reber.is_reber(e)


def test_checker_on_known_strings():
    assert reber.is_reber("BTXSE") and reber.is_reber("BPVVE") and reber.is_reber("BTSSXXTVVE")
    assert not reber.is_reber("BTXSEE") and not reber.is_reber("BTXS") and not reber.is_reber("")
    assert reber.is_embedded_reber("BTBTXSETE") and reber.is_embedded_reber("BPBPVVEPE")
    assert not reber.is_embedded_reber("BTBTXSEPE")
    for s, good in reber.TRICKY.items():
        assert reber.is_embedded_reber(s) == good


def test_corruption_changes_exactly_one_character_to_another_letter():
    rng = random.Random(1)
    for _ in range(500):
        s = reber.embedded_reber_string(rng)
        c = reber.corrupt(s, rng)
        assert len(c) == len(s) and set(c) <= set(reber.ALPHABET)
        assert sum(a != b for a, b in zip(s, c)) == 1
        bad = reber.corrupted_string(rng)
        assert not reber.is_embedded_reber(bad) and set(bad) <= set(reber.ALPHABET)


def test_dataset_is_balanced_seeded_and_labelled_right():
    strings, labels = reber.dataset(1000, seed=5)
    assert sum(labels) == 500
    assert all(reber.is_embedded_reber(s) == bool(y) for s, y in zip(strings, labels))
    assert reber.dataset(1000, seed=5) == (strings, labels)
    assert reber.dataset(1000, seed=6)[0] != strings
    assert len({len(s) for s in strings}) > 10  # really variable lengths


def test_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    voc = reber.vocab()
    model = SequenceClassifier(ClassifierConfig(len(voc), 5, 16)).eval()
    short, long = "BTBTXSETE", "BPBTSSSSSSSXXTTVPXVPXTTTTTVVEPE"
    alone = reber.predict_proba(model, voc, [short])[0]
    together = reber.predict_proba(model, voc, [long, short])[1]
    assert alone == pytest.approx(together, abs=1e-6)


def test_out_of_alphabet_characters_are_named():
    voc = reber.vocab()
    model = SequenceClassifier(ClassifierConfig(len(voc), 5, 8))
    with pytest.raises(CharRNNError, match=r"'A'.*'Z'|'Z'.*'A'") as e:
        reber.predict_proba(model, voc, ["BTXSE", "BTZAE"])
    assert "alphabet" in str(e.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("reber") / "run"
    cfg = reber.train(out, train_size=3000, val_size=1000, epochs=12, batch_size=32, lr=0.01, hidden=32,
                      log=lambda m: None)
    return out, cfg


@pytest.mark.slow
def test_training_learns_the_grammar(trained):
    out, cfg = trained
    assert cfg["result"]["val_accuracy"] > 0.95
    r = reber.evaluate(out, size=1000, seed=7)
    assert r["accuracy"] > 0.95


@pytest.mark.slow
def test_cli_eval_and_predict(trained, capsys):
    out, _ = trained
    assert main(["task", "reber", "eval", str(out), "--size", "500", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["strings"] == 500 and 0 <= r["accuracy"] <= 1 and len(r["tricky"]) == 2
    assert main(["task", "reber", "predict", str(out), "BTBTXSETE", "BTBTXSEPE"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == ["BTBTXSETE", "BTBTXSEPE"]
    assert all(0 <= float(line.split("\t")[0]) <= 1 for line in lines)
    code = main(["task", "reber", "predict", str(out), "BTBTXSETE", "BTxSE"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "'x'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_errors(tmp_path, trained, capsys):
    out, _ = trained
    assert main(["task", "reber", "eval", str(tmp_path / "nope")]) == 2
    assert "not a trained reber run" in capsys.readouterr().err
    assert main(["task", "dates", "eval", str(out)]) == 2
    assert "is a reber run, not a dates run" in capsys.readouterr().err
    assert main(["task", "reber", "train", "--out", str(out), "--epochs", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["task", "reber", "train", "--out", str(tmp_path / "x"), "--epochs", "0"]) == 2
    assert "--epochs must be a positive integer, got 0" in capsys.readouterr().err
