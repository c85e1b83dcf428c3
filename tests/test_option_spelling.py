"""Errors raised below the command line name options in the caller's spelling: the Python API by their
argument names (``val_fraction``), the command line by its flags (``--val-fraction``).

Such errors are :class:`charrnn.errors.OptionError`: ``str(e)`` names fields, the CLI prints ``e.render(flag)``.
"""

import re

import pytest

import charrnn
from charrnn.distributed import Dist
from charrnn.errors import CharRNNError, OptionError, flag

from .conftest import TINY, TINY_KW, cli, make_text

FLAG = re.compile(r"--[a-z]")


def api_error(call) -> str:
    with pytest.raises(OptionError) as e:
        call()
    message = str(e.value)
    assert not FLAG.search(message), message
    return message


def cli_error(capsys, *args) -> str:
    capsys.readouterr()   # what came before
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def unsplit_run(tmp_path, small_corpus):
    """A run trained without a validation split."""
    charrnn.train(str(small_corpus), tmp_path / "run", progress=False, max_steps=1, sample_every=0, val_fraction=0,
                  **TINY_KW)
    return tmp_path / "run"


def test_evaluating_a_run_without_a_validation_split(capsys, unsplit_run):
    lm = charrnn.load(unsplit_run)
    assert api_error(lm.evaluate) == "the run has no validation split (val_fraction 0); pass corpus"
    assert cli_error(capsys, "eval", unsplit_run) == (
        "error: the run has no validation split (--val-fraction 0); pass --corpus")


def test_a_held_out_fraction_out_of_range(capsys, unsplit_run, small_corpus):
    lm = charrnn.load(unsplit_run)
    assert api_error(lambda: lm.evaluate(str(small_corpus), val_fraction=1.5)) == (
        "val_fraction must be in [0, 1), got 1.5")


def test_a_corpus_shorter_than_one_batch(capsys, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(make_text(3_000), encoding="utf-8")
    kw = dict(TINY_KW, batch_size=256)
    message = api_error(lambda: charrnn.train(str(corpus), tmp_path / "a", progress=False, max_steps=1, **kw))
    assert message.endswith("; use a longer corpus or lower batch_size / seq_len"), message
    line = cli_error(capsys, "train", corpus, "--out", tmp_path / "b", *TINY, "--batch-size", "256",
                     "--max-steps", "1")
    assert line.endswith("; use a longer corpus or lower --batch-size / --seq-len"), line


def test_a_global_batch_that_does_not_split():
    with pytest.raises(OptionError) as e:
        Dist(0, 2).check_batch(15)
    assert str(e.value).startswith("batch_size 15 is the global batch and must split evenly over the 2 processes")
    assert e.value.render(flag).startswith("--batch-size 15 is the global batch")


def test_a_training_loss_that_is_not_finite_names_the_learning_rate():
    from charrnn.training import not_finite

    error = not_finite(float("nan"), 7)
    assert str(error) == "the training loss became nan at step 7; lower lr or set clip (the last good checkpoint is kept)"
    assert error.render(flag).endswith("lower --lr or set --clip (the last good checkpoint is kept)")
    assert type(not_finite(float("inf"), 1)) is CharRNNError   # the first step: a defect, no option to change


def test_no_cuda_names_the_device_option():
    import torch

    from charrnn.hardware import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    message = api_error(lambda: resolve_device("cuda"))
    assert message == "device cuda was asked for but no CUDA GPU is available; use device cpu or auto"


def test_a_vocabulary_size_for_characters():
    from charrnn.config import build_config

    assert api_error(lambda: build_config(max_vocab=50)).startswith("max_vocab applies to tokenizer word or bpe;")
