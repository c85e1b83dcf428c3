"""A hostile user's command lines: refused in one line with exit status 2, and nothing of theirs lost."""

import hashlib

import pytest

import charrnn

from .conftest import TINY, TINY_KW, cli


def _fingerprint(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture
def trained(small_corpus, tmp_path):
    run = tmp_path / "run"
    charrnn.train(str(small_corpus), run, progress=False, max_steps=3, **TINY_KW)
    return run


@pytest.mark.parametrize("bad", [
    ["--batch-size", "100000000"],
    ["--seq-len", "100000000"],
    ["--val-fraction", "0.99999"],
    ["--seed", "1e23"],
    ["--weight-decay", "nan"],
    ["--hidden", "99999999"],
])
def test_force_with_an_impossible_option_keeps_the_run_it_would_replace(capsys, small_corpus, trained, bad):
    before = _fingerprint(trained)
    assert {"config.json", "vocab.json", "model.safetensors", "trainer-state.pt"} <= set(before)
    options = TINY.copy()
    flag = bad[0]
    if flag in options:                       # the bad value replaces TINY's own
        i = options.index(flag)
        del options[i:i + 2]
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--force", "--max-steps", 2, *options, *bad)
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert _fingerprint(trained) == before


def test_force_replaces_the_run_once_everything_is_checked(capsys, small_corpus, trained):
    (trained / "samples").mkdir(exist_ok=True)
    (trained / "samples" / "old.txt").write_text("old")
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--force", "--max-steps", 2, "--seed", 7,
                       *TINY)
    assert code == 0, err
    assert not (trained / "samples" / "old.txt").exists()
    assert '"seed": 7' in (trained / "config.json").read_text()
