"""`charrnn train --init-from RUN`: a run that starts from another run's weights (charrnn/sources.py)."""

import json

import pytest
import torch

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.errors import OptionError

from .conftest import TINY_KW, cli, make_text


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny run trained on lowercase text without digits, and a corpus that adds upper case and digits."""
    tmp = tmp_path_factory.mktemp("init-from")
    base = tmp / "base.txt"
    base.write_text(make_text(20_000).lower(), encoding="utf-8")
    mine = tmp / "mine.txt"       # the base's sentences with their capitals, and a line of new characters between
    mine.write_text("\nRoom 101, 42 QUIET ZEBRAS.\n".join(make_text(8_000, seed=3).split("\n")), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(tmp / "home"))
        charrnn.train(str(base), tmp / "base", max_steps=30, progress=False, log=lambda m: None, **TINY_KW)
    return tmp


def _train(source, out, **kw):
    kw = {"max_steps": 1, "precision": "fp32", "seq_len": 32, "batch_size": 16, "progress": False,
          "log": lambda m: None, **kw}
    return charrnn.train(str(source / "mine.txt"), out, init_from=str(source / "base"), **kw)


def test_the_new_characters_are_appended_and_the_known_predictions_are_the_sources(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    base = charrnn.load(source / "base")
    out = tmp_path / "tuned"
    _train(source, out, max_steps=1, lr=1e-12, sample_every=0)       # one step that changes nothing measurable
    run = ckpt.load_run(out, weights="latest")
    old = base.vocab.chars
    assert run.vocab.chars[:len(old)] == old                          # the source's ids keep their meaning
    added = run.vocab.chars[len(old):]
    assert added == sorted(added) and {"Q", "Z", "1", "0"} <= set(added)
    # At the start (the source's weights, grown), the logits of every known character are the source's.
    fresh = charrnn.models.CharLM(run.model.config)
    charrnn.sources.load_weights(fresh, charrnn.sources.read(source / "base"))
    ids = torch.from_numpy(base.vocab.encode("the quick brown fox jumps over the lazy dog\n").astype("int64"))[None]
    with torch.inference_mode():
        theirs, _ = base.model(ids)
        ours, _ = fresh(ids)
    torch.testing.assert_close(ours[..., :len(base.vocab)], theirs, rtol=0, atol=1e-6)
    # The new characters start as unlikely as the source's rarest one, and the architecture is the source's.
    assert (fresh.head.weight[len(base.vocab):] == 0).all()
    assert run.model.config.hidden == base.model.config.hidden == TINY_KW["hidden"]
    cfg = json.loads((out / ckpt.CONFIG).read_text())
    assert cfg["init"]["from"] == str(source / "base") and len(cfg["init"]["sha256"]) == 64
    assert cfg["training"]["init_from"] == str(source / "base")


def test_fine_tuning_learns_the_new_text_and_resumes_exactly(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    still = _train(source, tmp_path / "still", max_steps=1, lr=1e-12, sample_every=0)     # the source, grown
    tuned = _train(source, tmp_path / "tuned", max_steps=40, lr=3e-3, sample_every=0)
    scratch = charrnn.train(str(source / "mine.txt"), tmp_path / "scratch", max_steps=40, lr=3e-3, sample_every=0,
                            progress=False, log=lambda m: None, **TINY_KW)
    assert tuned.last_val_loss < still.last_val_loss - 0.5             # it learned the new text
    assert tuned.last_val_loss < scratch.last_val_loss                 # better than from random weights
    # Resuming (with or without --init-from) goes on from the run's own checkpoint, its grown vocabulary included.
    whole, out = tmp_path / "whole", tmp_path / "halves"
    _train(source, whole, max_steps=12, sample_every=0)
    _train(source, out, max_steps=6, sample_every=0)
    resumed = charrnn.train(str(source / "mine.txt"), out, resume=True, max_steps=12, progress=False,
                            log=lambda m: None)
    again = charrnn.train(str(source / "mine.txt"), out, resume=True, max_steps=14, progress=False,
                          log=lambda m: None, init_from=str(source / "base"))
    assert resumed.step == 12 and again.step == 14
    _train(source, whole, max_steps=14, sample_every=0, resume=True)
    a, b = (ckpt.load_run(d, weights="latest").model.state_dict() for d in (whole, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / ckpt.CONFIG).read_text())["init"]["from"] == str(source / "base")


def test_bad_sources_and_conflicts_are_one_line_and_write_nothing(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    corpus = source / "mine.txt"
    not_a_run = tmp_path / "folder"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    cases = [
        (["--init-from", tmp_path / "missing"], "--init-from"),
        (["--init-from", not_a_run], "--init-from"),
        (["--init-from", corpus], "--init-from"),                                  # a file, not a run
        (["--init-from", source / "base", "--hidden", "64"], "--hidden"),          # a shape conflict
        (["--init-from", source / "base", "--arch", "lstm"], "--arch"),
        (["--init-from", source / "base", "--tokenizer", "word"], "--tokenizer"),
    ]
    for i, (extra, named) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, _, err = cli(capsys, "train", corpus, "--out", out, "--max-steps", "1", *extra)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), extra
    # --resume with another source: refused, the run untouched.
    out = tmp_path / "tuned"
    _train(source, out, max_steps=1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = cli(capsys, "train", corpus, "--out", out, "--resume", "--init-from", not_a_run)
    assert code == 2 and "--init-from" in err and "started from" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(OptionError, match="init_from"):
        _train(source, tmp_path / "again", embed=8)                   # the API names the field
    # --force over the source itself would delete it: refused, the source untouched.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = cli(capsys, "train", corpus, "--out", out, "--force", "--init-from", out)
    assert code == 2 and "--init-from" in err and "--out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_grown_vocabulary_generates_exports_and_evaluates_as_trained(source, tmp_path, monkeypatch):
    """The grown vocabulary (not sorted) through generate, the ONNX export and its runtime, and eval."""
    from charrnn import runtime
    from charrnn.export import export_onnx

    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    result = _train(source, tmp_path / "tuned", max_steps=20, lr=3e-3, sample_every=0)
    lm = charrnn.load(tmp_path / "tuned")
    assert lm.vocab.chars != sorted(lm.vocab.chars)
    assert lm.evaluate()["loss"] == pytest.approx(result.best_val_loss, rel=1e-6)
    exported = runtime.load(export_onnx(tmp_path / "tuned", tmp_path / "m.onnx").path)
    assert exported.generate("Room 1", 80, temperature=0) == lm.generate("Room 1", 80, temperature=0)


def test_a_word_source_keeps_its_tokenizer_and_says_how_much_is_unknown(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    q = dict(progress=False, log=lambda m: None, sample_every=0)
    charrnn.train(str(source / "base.txt"), tmp_path / "words", tokenizer="word", max_steps=2, **q, **TINY_KW)
    said = []
    charrnn.train(str(source / "mine.txt"), tmp_path / "tuned", init_from=str(tmp_path / "words"), max_steps=2,
                  progress=False, log=said.append, sample_every=0, seq_len=16, batch_size=8)
    base, tuned = (ckpt.load_run(d, weights="latest") for d in (tmp_path / "words", tmp_path / "tuned"))
    assert tuned.vocab.kind == "word" and tuned.vocab.to_json() == base.vocab.to_json()
    assert any("[UNK] under its word vocabulary" in line for line in said)     # capitals, digits: unknown words


def test_a_grown_vocabulary_records_its_blocks():
    """Each growth appends a sorted block; vocab.json lists where the blocks start, so that a vocabulary in any
    other order (a damaged or foreign file) is still refused."""
    from charrnn.errors import CharRNNError
    from charrnn.vocab import Vocab

    v = Vocab(list("abc")).grown("xbA").grown("a1")
    assert v.chars == list("abcAx1") and v.blocks == [3, 5]
    assert Vocab.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert list(v.encode("xA1a")) == [5, 4, 6, 1] and v.decode([5, 4, 6, 1]) == "xA1a"
    assert Vocab(list("abc")).grown("cab") == Vocab(list("abc"))         # nothing new: the same vocabulary
    for bad in ({"chars": "cba"}, {"chars": "abcxA", "blocks": [3]}, {"chars": "abcx", "blocks": [9]},
                {"chars": "abcx", "blocks": "3"}, {"chars": "abca", "blocks": [3]}):
        with pytest.raises(CharRNNError):
            Vocab.from_json(bad)


@pytest.fixture
def fake_shipped(source, tmp_path, monkeypatch):
    """A shipped model folder holding the tiny source run (the real base-en is tested in test_base_model.py)."""
    from charrnn import shipped

    folder = tmp_path / "base_models"
    (folder / "en").mkdir(parents=True)
    for name in (ckpt.CONFIG, ckpt.VOCAB, ckpt.LATEST):
        (folder / "en" / name).write_bytes((source / "base" / name).read_bytes())
    monkeypatch.setattr(shipped, "FOLDER", folder)
    monkeypatch.chdir(tmp_path)
    return folder / "en"


def test_a_shipped_model_is_taken_by_name(fake_shipped, source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    lm = charrnn.load("base-en")
    assert lm.generate("the ", 30, seed=1) == charrnn.load(source / "base", weights="latest").generate("the ", 30,
                                                                                                       seed=1)
    result = charrnn.train(str(source / "mine.txt"), tmp_path / "tuned", init_from="base-en", max_steps=1,
                           progress=False, log=lambda m: None, sample_every=0)
    init = json.loads((tmp_path / "tuned" / ckpt.CONFIG).read_text())["init"]
    assert result.step == 1 and init["from"] == "base-en" and init["kind"] == "shipped"
    code, out, _ = cli(capsys, "models")
    assert code == 0 and "base-en:" in out and str(fake_shipped / "CARD.md") in out
    (tmp_path / "base-en").mkdir()                                  # the user's own folder of that name wins
    with pytest.raises(charrnn.errors.CharRNNError, match="base-en"):
        charrnn.load("base-en")
