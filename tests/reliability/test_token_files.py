"""Word and BPE runs against hostile files and inputs: a damaged token-id cache, a resume on another corpus,
a prompt that is not UTF-8, one long word to learn BPE from, bytes never seen in training, vocab.json edited.

Three tiny runs (char, word, BPE) are trained once per module on an ASCII corpus, in a CHARRNN_HOME of their
own; every test reads them in a fresh one (the autouse fixture), so the token-id cache is encoded per test.
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import charrnn
from charrnn import tokenized
from charrnn.corpus import charrnn_home, load_corpus
from charrnn.errors import CharRNNError
from charrnn.tokens import TokenVocab, load_vocab

from ..conftest import TINY_KW, cli, make_text
from .test_files import fingerprint, one_line_error

KINDS = ("word", "bpe")
MAX_STEPS = 4
SHORT = {"char": 1_000, "word": 2_500, "bpe": 2_500}     # characters of a corpus too short for the runs' position


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("token_files")
    (base / "corpus.txt").write_text(make_text(20_000), encoding="utf-8")
    (base / "other.txt").write_text(make_text(20_000, seed=7), encoding="utf-8")
    for kind, chars in SHORT.items():      # one or two steps an epoch: the runs stopped at the fourth
        (base / f"short-{kind}.txt").write_text(make_text(chars, seed=9), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_HOME", str(base / "home"))
        for kind in ("char", *KINDS):
            charrnn.train(str(base / "corpus.txt"), base / kind, tokenizer=kind, max_vocab=300 if kind == "bpe" else None,
                          max_steps=MAX_STEPS, sample_every=0, progress=False, log=lambda msg: None, **TINY_KW)
    return base


@pytest.fixture
def copy(runs, tmp_path, request):
    """A fresh copy of the run of the test's ``kind``."""
    kind = request.node.callspec.params["kind"]
    shutil.copytree(runs / kind, tmp_path / kind)
    return tmp_path / kind


# -- the token-id cache (severe 4) ---------------------------------------------------------------------------


def _save_like(path, ids):
    np.save(path, np.asarray(ids, dtype=np.load(path).dtype))


def _each_part(damage):
    return lambda folder, other: [damage(folder / f"{part}.npy") for part in ("train", "val")]


def _copy_all(folder, other):
    for path in other.iterdir():
        shutil.copyfile(path, folder / path.name)


TOKEN_CACHE_DAMAGES = {
    "ids-garbled": _each_part(lambda f: f.write_bytes(random.Random(0).randbytes(500))),
    "ids-emptied": _each_part(lambda f: f.write_bytes(b"")),
    "ids-truncated": _each_part(lambda f: f.write_bytes(f.read_bytes()[:-10])),
    "ids-rewritten-in-range": _each_part(lambda f: _save_like(f, np.load(f).astype(np.int64) % 5 + 1)),
    "ids-out-of-range": _each_part(lambda f: _save_like(f, np.full(len(np.load(f)), 65_000))),
    "meta-garbled": lambda folder, other: [p.write_bytes(b"\x00{not json") for p in folder.glob("*.json")],
    "of-another-corpus": _copy_all,
}


def _split(runs, kind, corpus="corpus.txt"):
    """The training and validation ids of ``corpus`` under the run's own vocabulary."""
    vocab = load_vocab(runs / kind / "vocab.json")
    splits = tokenized.split(load_corpus(str(runs / corpus), progress=False), 0.1, kind, vocab=vocab)
    return np.array(splits.train), np.array(splits.val)


def _folders() -> set:
    return {p.parent for p in (charrnn_home() / "encoded" / "tokens").rglob("train.npy")}


@pytest.mark.probe("token-cache")
@pytest.mark.parametrize("damage", list(TOKEN_CACHE_DAMAGES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_token_cache_is_encoded_again(runs, kind, damage):
    train, val = _split(runs, kind)
    (folder,) = _folders()
    _split(runs, kind, "other.txt")
    (other,) = _folders() - {folder}
    TOKEN_CACHE_DAMAGES[damage](folder, other)
    again = _split(runs, kind)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]     # no temporary file left


@pytest.mark.probe("token-cache")
@pytest.mark.parametrize("kind", KINDS)
def test_eval_rebuilds_a_rewritten_token_cache_and_reports_the_same_loss(capsys, runs, kind):
    code, first, err = cli(capsys, "eval", runs / kind, "--json")
    assert code == 0, err
    for path in (charrnn_home() / "encoded" / "tokens").rglob("*.npy"):
        _save_like(path, np.load(path).astype(np.int64) % 7 + 1)       # in range, same length: only the checksum
    code, second, err = cli(capsys, "eval", runs / kind, "--json")
    assert code == 0 and "Traceback" not in err, err
    assert json.loads(second) == json.loads(first)


# -- resume on another corpus (severe 5) ---------------------------------------------------------------------


@pytest.mark.probe("resume-other-corpus")
@pytest.mark.parametrize("kind", ("char", *KINDS))
def test_resume_past_the_end_of_an_epoch_of_another_corpus_is_refused_unchanged(capsys, runs, copy, kind):
    before = fingerprint(copy)
    code, _, err = cli(capsys, "train", runs / f"short-{kind}.txt", "--out", copy, "--resume", "--max-steps",
                       MAX_STEPS + 2, "--quiet")
    one_line_error(code, err, f"after step {MAX_STEPS}", f"short-{kind}.txt", "resume with the corpus")
    assert fingerprint(copy) == before


@pytest.mark.slow
@pytest.mark.probe("resume-other-corpus")
@pytest.mark.parametrize("kind", KINDS)
def test_resume_on_another_corpus_that_holds_the_position_says_how_it_is_read(capsys, runs, copy, kind):
    code, _, err = cli(capsys, "train", runs / "other.txt", "--out", copy, "--resume", "--max-steps", MAX_STEPS + 1,
                       "--quiet")
    assert code == 0, err
    assert f"read with the run's own {kind} vocabulary" in err and "same characters" not in err, err


# -- a prompt that is not UTF-8 (severe 6, and --json) -----------------------------------------------------------

NOT_UTF8 = b"ROMEO \xf0\x9f".decode("utf-8", "surrogateescape")     # as Python reads it from the command line


@pytest.mark.probe("undecodable-prompt")
@pytest.mark.parametrize("prompt", [NOT_UTF8, NOT_UTF8 + " the qu"], ids=["ending-in-the-bytes", "bytes-inside"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_that_is_not_utf8_reads_its_bytes_as_unk(capsys, runs, kind, prompt):
    code, out, err = cli(capsys, "generate", runs / kind, "--prompt", prompt, "--length", 12, "--seed", 1, "--json")
    assert code == 0 and "Traceback" not in err, err
    assert "read as [UNK]" in err and "\\udcf0" in err, err
    (sample,) = json.loads(out.encode("utf-8"))["samples"]       # the JSON is UTF-8: no lone surrogate in it
    assert sample.startswith("ROMEO \ufffd\ufffd")
    lm = charrnn.load(runs / kind)
    assert lm.unknown_chars(prompt) == ["\udc9f", "\udcf0"]
    assert lm.sampler.prompt_ids(prompt).tolist().count(0) == 2      # one [UNK] a byte, as a character run reads them


@pytest.mark.probe("undecodable-prompt")
def test_a_character_run_answers_json_in_utf8_too(capsys, runs):
    code, out, err = cli(capsys, "generate", runs / "char", "--prompt", NOT_UTF8, "--length", 5, "--json")
    assert code == 0, err
    assert json.loads(out.encode("utf-8"))["samples"][0].startswith("ROMEO \ufffd\ufffd")


@pytest.fixture(scope="module")
def onnx_files(runs):
    pytest.importorskip("onnxruntime")
    from charrnn.export import export_onnx

    for kind in KINDS:
        export_onnx(runs / kind, runs / f"{kind}.onnx")
    return runs


@pytest.mark.slow
@pytest.mark.probe("undecodable-prompt")
@pytest.mark.parametrize("kind", KINDS)
def test_an_exported_model_reads_undecodable_prompt_bytes_as_unk(capsys, onnx_files, kind):
    code, out, err = cli(capsys, "generate", onnx_files / f"{kind}.onnx", "--prompt", NOT_UTF8, "--length", 12,
                         "--seed", 1, "--json")
    assert code == 0 and "Traceback" not in err and "read as [UNK]" in err, err
    assert json.loads(out.encode("utf-8"))["samples"][0].startswith("ROMEO \ufffd")


# -- learning BPE from one long word (moderate 7) ----------------------------------------------------------


@pytest.mark.probe("bpe-long-word")
def test_learning_bpe_from_one_long_word_is_not_quadratic():
    """400,000 letters without a space took 27 s (a megabyte, 195 s): now well under a second a megabyte."""
    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(400_000))
    start = time.perf_counter()
    vocab = TokenVocab.train("bpe", word, 500)
    assert time.perf_counter() - start < 10
    ids = vocab.encode(word)
    assert vocab.decode(ids) == word and len(ids) < len(word)
    from charrnn.tokens import LONGEST_PIECE

    assert max(map(len, vocab.token_bytes)) <= LONGEST_PIECE


@pytest.mark.slow
@pytest.mark.probe("bpe-long-word")
@pytest.mark.parametrize("quiet", [False, True])
def test_learning_a_bpe_vocabulary_shows_progress_on_a_terminal(runs, tmp_path, quiet):
    """The library's own progress bars, on a terminal (as the training bar), unless --quiet."""
    master, slave = os.openpty()
    args = ["train", runs / "corpus.txt", "--out", tmp_path / "run", "--tokenizer", "bpe", "--max-vocab", 300,
            "--max-steps", 1, "--sample-every", 0, "--hidden", 16, "--embed", 8, "--seq-len", 16, "--batch-size", 4,
            *(["--quiet"] if quiet else [])]
    proc = subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave,
                          stderr=slave, env={**os.environ, "CHARRNN_HOME": str(tmp_path / "home")}, timeout=120)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:          # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.returncode == 0, shown
    assert (b"merges" in shown) != quiet, shown


# -- bytes never seen in training (minor) ---------------------------------------------------------------------


def _favour_escape(run):
    """The run with its output layer pushed hard toward ESC, a byte its (ASCII) training text never holds."""
    from charrnn.checkpoint import load_run, save_weights

    loaded = load_run(run)
    esc = loaded.vocab.token_bytes.index(b"\x1b")
    loaded.model.head.bias.data[esc] += 50
    save_weights(run / "best.safetensors", loaded.model, MAX_STEPS)
    return esc


def _generated(lm, beams: bool = True) -> list[str]:
    texts = lm.generate("the ", 40, num_samples=6, seed=0, temperature=1.5)
    texts += lm.generate("the ", 40, seed=0, temperature=0)
    if beams:
        texts += [t for t, _ in lm.sampler.beam("the ", 20, 3)]
    return [t.removeprefix("the ") for t in texts]


@pytest.mark.probe("unseen-bytes")
@pytest.mark.parametrize("kind", ["bpe"])
def test_bpe_never_generates_a_byte_its_training_text_never_held(runs, copy, kind):
    _favour_escape(copy)
    allowed = set((runs / "corpus.txt").read_text(encoding="utf-8"))
    for text in _generated(charrnn.load(copy)):
        assert set(text) <= allowed, repr(text)


@pytest.mark.slow
@pytest.mark.probe("unseen-bytes")
@pytest.mark.parametrize("kind", ["bpe"])
def test_an_exported_bpe_model_never_generates_a_byte_never_seen(runs, copy, kind, tmp_path):
    pytest.importorskip("onnxruntime")
    from charrnn import runtime
    from charrnn.export import export_onnx

    _favour_escape(copy)
    export_onnx(copy, tmp_path / "bpe.onnx")
    allowed = set((runs / "corpus.txt").read_text(encoding="utf-8"))
    for text in _generated(runtime.load(tmp_path / "bpe.onnx"), beams=False):
        assert set(text) <= allowed, repr(text)


# -- vocab.json's kind (minor) ------------------------------------------------------------------------------------


def _as_version_1(meta: dict, tokenizer_json: str) -> dict:
    """vocab.json as the first charrnn with word and BPE runs wrote it: a checksum of the tokenizer alone."""
    meta = {k: v for k, v in meta.items() if k != "unseen_bytes"}
    return {**meta, "version": 1, "sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()}


@pytest.mark.probe("vocab-kind")
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_a_vocab_json_of_another_kind_is_refused_in_one_line(capsys, copy, kind, version):
    path = copy / "vocab.json"
    meta = json.loads(path.read_text())
    if version == 1:
        meta = _as_version_1(meta, (copy / "tokenizer.json").read_text(encoding="utf-8"))
        path.write_text(json.dumps(meta))
        code, _, err = cli(capsys, "generate", copy, "--length", 5, "--seed", 1)
        assert code == 0, err                                 # an older run's file still reads
    path.write_text(json.dumps({**meta, "kind": "bpe" if kind == "word" else "word"}))
    before = fingerprint(copy)
    code, _, err = cli(capsys, "generate", copy, "--length", 5, "--seed", 1)
    one_line_error(code, err, "tokenizer.json")
    assert fingerprint(copy) == before


def test_unseen_bytes_are_part_of_the_checksum(runs, tmp_path):
    meta = json.loads((runs / "bpe" / "vocab.json").read_text())
    text = (runs / "bpe" / "tokenizer.json").read_text(encoding="utf-8")
    assert meta["version"] == 2 and 0x1B in meta["unseen_bytes"] and ord("a") not in meta["unseen_bytes"]
    assert TokenVocab.from_json(meta, text).banned
    with pytest.raises(CharRNNError, match="checksum"):
        TokenVocab.from_json({**meta, "unseen_bytes": []}, text)
