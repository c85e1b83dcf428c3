"""A hostile user's labelled corpora and label requests: one line (exit 2) naming the file or the label and the
known labels, nothing written; a server request with a bad label fails alone."""

import concurrent.futures
import os

import pytest

import charrnn

from ..conftest import TINY_KW, cli, running
from ..test_labels import FAST, labelled_corpus
from .test_corpora import one_line_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels_hostile")
    corpus = labelled_corpus(tmp / "corpus", 600)
    charrnn.train(str(corpus), tmp / "run", labels=True, **{**FAST, "max_steps": 30})
    return tmp / "run"


@pytest.mark.probe("labels-hostile")
def test_hostile_labelled_corpora_are_one_line_and_write_nothing(tmp_path, capsys):
    plain = tmp_path / "plain.txt"
    plain.write_text("some text " * 100)
    os.mkfifo(tmp_path / "pipe")
    fifo_corpus = tmp_path / "fifo.tsv"           # a FIFO inside a label folder is skipped, as in any corpus folder
    fifo_corpus.write_text("soft\tpipe\n")
    latin = labelled_corpus(tmp_path / "latin", 50)
    (latin / "hard" / "old.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 100)
    cases = [(plain, "neither a folder"), (fifo_corpus, "label 'soft'"), (latin, "label 'hard'"),
             (binary, "binary.tsv")]
    for corpus, naming in cases:
        out = tmp_path / f"run-{corpus.name}"
        code, _, err = cli(capsys, "train", corpus, "--out", out, "--labels", "--max-steps", "1", "--hidden", "8")
        one_line_error(code, err, naming)
        assert not out.exists()


@pytest.mark.probe("labels-hostile")
def test_hostile_label_requests_are_one_line(run, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled"
    (tmp_path / "t.txt").write_text("some text " * 200)
    charrnn.train(str(tmp_path / "t.txt"), unlabelled, max_steps=1, progress=False, log=lambda m: None, **TINY_KW)
    cases = [(run, "=1", "'' is not one of"), (run, "soft=nan", "positive numbers"), (run, "soft=0", "positive"),
             (run, "soft=-2", "positive"), (run, "loud", "unlabelled, hard, soft"), (run, "x" * 10_000, "is not one"),
             (unlabelled, "soft", "no labels")]
    for model, label, naming in cases:
        code, _, err = cli(capsys, "generate", model, "--prompt", "e", "--length", "5", "--label", label)
        line = one_line_error(code, err, naming)
        assert "--label" in line and len(line) < 400, line
    code, _, err = cli(capsys, "eval", run, "--label", "soft=0.7,hard=0.3")
    one_line_error(code, err, "mix")


@pytest.mark.probe("labels-hostile")
def test_a_bad_label_in_a_request_fails_alone(run):
    import httpx

    from charrnn.serve import Limits, create_app

    lm = charrnn.load(run)
    with running(create_app(lm, Limits(max_batch=16))) as url:
        bodies = [{"prompt": " ", "length": 50, "label": label, "seed": 1}
                  for label in ("soft", "loud", None, "x" * 5000, "hard", 7, "soft=nan", "soft=0.6,hard=0.4")]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/generate", json=b, timeout=60), bodies))
        codes = [r.status_code for r in answers]
        assert codes == [200, 422, 200, 422, 200, 422, 422, 200], [r.text for r in answers]
        assert answers[-1].json()["samples"] == lm.generate(" ", 50, seed=1, label="soft=0.6,hard=0.4")
        assert "unlabelled, hard, soft" in answers[1].text and "label" in answers[3].text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": " ", "label": ["soft"]}, timeout=60)
        assert r.status_code == 400 and "label" in r.text
