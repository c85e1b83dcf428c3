"""The shipped base model, base-en (charrnn/base_models/en/, made by tools/make_base_model.py): it loads by name
with nothing downloaded, it is the model its card describes, and its card's figure is what `charrnn eval`
prints."""

import re

import pytest

import charrnn
from charrnn import shipped

from .conftest import SHARED_DATA, cli

CARD = shipped.FOLDER / "en" / "CARD.md"


def test_it_is_in_the_package_and_generates_english(capsys):
    assert shipped.path("base-en") is not None and CARD.is_file()
    lm = charrnn.load("base-en")
    assert lm.model.config.hidden == 512 and lm.model.num_parameters() < 2_000_000
    text = lm.generate("The ", 400, temperature=0.5, seed=0)[0]
    words = re.findall(r"[a-z]+", text.lower())
    # Words it learned: most of a sample's words are among the commonest of its English.
    common = {"the", "and", "of", "to", "a", "in", "that", "he", "was", "it", "his", "is", "with", "as", "her",
              "not", "had", "for", "at", "she", "you", "be", "but", "on", "i", "all", "him", "said", "have", "so"}
    assert sum(w in common for w in words) > 0.25 * len(words), text
    code, out, _ = cli(capsys, "models")
    assert code == 0 and "base-en:" in out and "card:" in out


@pytest.mark.slow
def test_its_card_claims_what_eval_prints(capsys, monkeypatch):
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        pytest.skip("Tiny Shakespeare is not in ../shared/data")
    monkeypatch.setenv("CHARRNN_DATA", str(SHARED_DATA))
    stored = re.search(r"The stored weights are the \w+ ones: shakespeare ([0-9.]+)", CARD.read_text()).group(1)
    code, out, err = cli(capsys, "eval", "base-en", "--corpus", "shakespeare", "--val-fraction", "0.1")
    assert code == 0, err
    assert f"{float(stored):.4f} bits/char" in out, (stored, out)
    code, _, err = cli(capsys, "eval", "base-en")        # it has no validation split of its own: it says so
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--corpus" in err and "not found" not in err, err
