"""A hostile user's `--init-from`: an empty path, a FIFO, a damaged run, another model's files, a huge or wrongly
typed value.  Each is refused in one line naming `--init-from` (exit 2, or an OptionError in the library), and the
new run's folder is never created."""

import json
import os

import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.errors import OptionError
from charrnn.export import export_onnx

from ..conftest import cli, make_text, train_tiny_run
from .test_corpora import one_line_error


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "hostile_init_from", max_steps=2)


def _damaged(source, tmp_path, what: str):
    """A copy of ``source`` with one file damaged."""
    bad = tmp_path / f"damaged-{what}"
    bad.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    if what == "config":
        (bad / ckpt.CONFIG).write_text("{not json")
    elif what == "weights":
        for name in (ckpt.BEST, ckpt.LATEST):
            if (bad / name).exists():
                (bad / name).write_bytes(b"\0" * 100)
    elif what == "vocab":
        (bad / ckpt.VOCAB).write_text(json.dumps({"chars": "ab"}))      # another run's: the ids disagree
    return bad


@pytest.mark.probe("init-from-hostile")
def test_a_hostile_source_is_one_line_and_writes_nothing(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(5_000, seed=5), encoding="utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    onnx_file = export_onnx(source, tmp_path / "m.onnx").path
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "vit"}))
    sources = ["", fifo, onnx_file, hf_like, corpus, "x" * 5000, tmp_path / "nowhere" / "run",
               *(_damaged(source, tmp_path, what) for what in ("config", "weights", "vocab"))]
    for i, path in enumerate(sources):
        out = tmp_path / f"run{i}"
        code, _, err = cli(capsys, "train", corpus, "--out", out, "--max-steps", "1", "--init-from", path)
        one_line_error(code, err, "--init-from")
        assert not out.exists(), path


@pytest.mark.probe("init-from-hostile")
def test_the_library_refuses_a_wrong_type(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(5_000, seed=5), encoding="utf-8")
    for value in (3, ["a"], True):
        with pytest.raises(OptionError, match="init_from"):
            charrnn.train(str(corpus), tmp_path / "out", init_from=value, max_steps=1, progress=False)
        assert not (tmp_path / "out").exists()
