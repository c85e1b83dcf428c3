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


def test_an_existing_run_without_resume_or_force(capsys, unsplit_run, small_corpus, tmp_path):
    message = api_error(lambda: charrnn.train(str(small_corpus), unsplit_run, progress=False, max_steps=1, **TINY_KW))
    assert message == (f"{unsplit_run} already holds a run; use resume to continue it, force to overwrite it, or "
                       "choose another out")
    assert cli_error(capsys, "train", small_corpus, "--out", unsplit_run, *TINY, "--max-steps", "1") == (
        f"error: {unsplit_run} already holds a run; use --resume to continue it, --force to overwrite it, or choose "
        "another --out")
    file = tmp_path / "file"
    file.write_text("x")
    assert api_error(lambda: charrnn.train(str(small_corpus), file, progress=False, **TINY_KW)) == (
        f"out {file} is a file, not a directory; choose another out")
    assert cli_error(capsys, "train", small_corpus, "--out", file, *TINY) == (
        f"error: --out {file} is a file, not a directory; choose another --out")


def test_resuming_with_a_changed_model_option_names_it(capsys, unsplit_run, small_corpus):
    message = api_error(lambda: charrnn.train(str(small_corpus), unsplit_run, resume=True, progress=False,
                                              max_steps=2, hidden=64))
    assert message == (f"hidden is 64 but the run in {unsplit_run} was trained with 48; resume without changing "
                       "the model's options")
    assert cli_error(capsys, "train", small_corpus, "--out", unsplit_run, "--resume", "--hidden", "64",
                     "--max-steps", "2", "--quiet") == f"error: --{message}"


def test_weights_that_are_neither_best_nor_latest(unsplit_run):
    with pytest.raises(OptionError) as e:
        charrnn.load(unsplit_run, weights="worst")
    assert str(e.value) == "weights must be 'best' or 'latest', got 'worst'"
    assert e.value.render(flag) == "--weights must be 'best' or 'latest', got 'worst'"   # argparse's choices, on the CLI


def test_damaged_best_weights_name_the_weights_option(capsys, unsplit_run):
    (unsplit_run / "best.safetensors").write_bytes(b"not weights")
    message = api_error(lambda: charrnn.load(unsplit_run))
    assert message.startswith(f"{unsplit_run / 'best.safetensors'} is damaged (not a safetensors file: "), message
    assert message.endswith("; use weights latest, or delete it"), message
    assert cli_error(capsys, "generate", unsplit_run, "--length", "5").endswith("; use --weights latest, or delete it")


def test_int8_on_another_device_than_the_cpu(unsplit_run):
    import torch

    from charrnn.api import LanguageModel
    from charrnn.checkpoint import load_run

    with pytest.raises(OptionError) as e:   # no GPU needed: the device is refused before anything runs on it
        LanguageModel(load_run(unsplit_run), torch.device("cuda"), int8=True)
    assert str(e.value) == "int8 sampling runs on the CPU only, not on cuda; drop int8 or use device cpu"
    assert e.value.render(flag) == "--int8 sampling runs on the CPU only, not on cuda; drop --int8 or use --device cpu"


def test_the_runs_recorded_corpus_missing(capsys, tmp_path, small_corpus):
    import json

    charrnn.train(str(small_corpus), tmp_path / "run", progress=False, max_steps=1, sample_every=0, **TINY_KW)
    small_corpus.rename(tmp_path / "moved.txt")
    lm = charrnn.load(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["corpus"]["name"] == str(small_corpus)
    assert api_error(lm.evaluate) == (f"the run's corpus {small_corpus} is not found; pass corpus PATH to evaluate on "
                                      "it where it is now")
    assert cli_error(capsys, "eval", tmp_path / "run") == (
        f"error: the run's corpus {small_corpus} is not found; pass --corpus PATH to evaluate on it where it is now")


def test_a_full_disk_names_the_force_option(tmp_path):
    import pickle

    from charrnn.checkpoint import CONFIG, out_of_space_advice
    from charrnn.fileio import NoSpaceError

    (tmp_path / CONFIG).write_text("{}")     # a run began there, but no checkpoint
    with pytest.raises(NoSpaceError) as e, out_of_space_advice(tmp_path, "corpus.txt"):
        raise NoSpaceError(tmp_path / "model.safetensors", 100)
    assert str(e.value).endswith("; free some space and start the run again with force"), str(e.value)
    assert e.value.render(flag).endswith("; free some space and start the run again with --force")
    copy = pickle.loads(pickle.dumps(e.value))
    assert type(copy) is NoSpaceError and copy.render(flag) == e.value.render(flag)
