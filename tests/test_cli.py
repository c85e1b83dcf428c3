"""The command line, end to end, and every bad input: one line on stderr, exit status 2, nothing lost."""

import json

import pytest

from charrnn.cli import RULE

from .conftest import TINY, cli, make_text, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run shared by the generate / eval tests (trained through the real entry point)."""
    import os

    tmp = tmp_path_factory.mktemp("cli")
    home = tmp / "home"
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    r = run_cli("train", corpus, "--out", tmp / "run", "--max-steps", "150", "--lr", "3e-3", *TINY,
                env={"CHARRNN_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert "total parameters" in r.stderr and "stopped (max_steps) at step 150" in r.stderr
    os.environ.setdefault("CHARRNN_TEST_DUMMY", "1")
    return tmp / "run", corpus


def test_generate_streams_one_sample_with_the_prompt(trained_run):
    run, _ = trained_run
    r = run_cli("generate", run, "--prompt", "the ", "--length", "80", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the ") and len(r.stdout) == len("the ") + 80 + 1
    again = run_cli("generate", run, "--prompt", "the ", "--length", "80", "--seed", "3")
    assert again.stdout == r.stdout


def test_generate_many_samples_json_and_rules(capsys, trained_run):
    run, _ = trained_run
    code, out, err = cli(capsys, "generate", run, "--prompt", "a ", "--length", "40", "--num-samples", "3",
                         "--seed", "1", "--json", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7")
    assert code == 0
    samples = json.loads(out)["samples"]
    assert len(samples) == 3 and all(s.startswith("a ") and len(s) == 42 for s in samples)
    code, out, err = cli(capsys, "generate", run, "--prompt", "a ", "--length", "40", "--num-samples", "3",
                         "--seed", "1", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7")
    assert out.split(f"\n\n{RULE}\n\n") == [s for s in samples[:2]] + [samples[2] + "\n"]


def test_generate_greedy_and_unknown_prompt_characters_warn_once(capsys, trained_run):
    run, _ = trained_run
    code, out, err = cli(capsys, "generate", run, "--prompt", "ZZ the Q", "--length", "30", "--temperature", "0")
    assert code == 0
    assert err.count("warning:") == 1 and "'Q'" in err and "'Z'" in err
    assert "[UNK]" not in out
    code, out2, _ = cli(capsys, "generate", run, "--prompt", "ZZ the Q", "--length", "30", "--temperature", "0")
    assert out2 == out


def test_eval_json_and_on_another_corpus(capsys, trained_run, tmp_path):
    run, corpus = trained_run
    code, out, _ = cli(capsys, "eval", run, "--json")
    assert code == 0
    r = json.loads(out)
    assert set(r) == {"loss", "bpc", "nats_per_char", "perplexity", "tokens", "chars", "unk_tokens", "unk_chars",
                      "unk_share"}
    assert r["unk_tokens"] == r["unk_chars"] == r["unk_share"] == 0         # its own text has no [UNK]
    assert r["chars"] == r["tokens"] == 2_000 - 1 and r["loss"] < 1.5      # a character model: one and the same
    assert r["nats_per_char"] == r["loss"] and r["bpc"] == pytest.approx(r["loss"] / 0.693147, rel=1e-5)
    other = tmp_path / "other.txt"
    other.write_text("the early bird catches the worm. " * 30, encoding="utf-8")
    code, out, _ = cli(capsys, "eval", run, "--corpus", other, "--json")
    assert code == 0 and json.loads(out)["chars"] == len("the early bird catches the worm. " * 30) - 1


def test_corpora_lists_names_and_where_they_are(capsys, monkeypatch):
    code, out, _ = cli(capsys, "corpora")
    assert code == 0 and "shakespeare" in out and "nietzsche" in out and "not available" in out
    code, out, _ = cli(capsys, "corpora", "--json")
    assert {r["name"] for r in json.loads(out)} == {"shakespeare", "nietzsche"}


def _bad(tmp_path):
    return tmp_path


@pytest.mark.parametrize("case", [
    "missing-path", "empty", "too-short", "not-utf8", "unknown-name", "zero-hidden", "negative-layers",
    "zero-seq-len", "negative-lr", "zero-batch", "bad-dropout", "bad-weight-drop", "bad-val-fraction",
    "no-such-preset",
])
def test_bad_training_input(capsys, tmp_path, small_corpus, case):
    out = tmp_path / "out"
    args = {
        "missing-path": [tmp_path / "nope.txt"],
        "empty": [tmp_path / "empty.txt"],
        "too-short": [tmp_path / "short.txt"],
        "not-utf8": [tmp_path / "latin1.txt"],
        "unknown-name": ["tolstoy"],
        "zero-hidden": [small_corpus, "--hidden", "0"],
        "negative-layers": [small_corpus, "--layers", "-1"],
        "zero-seq-len": [small_corpus, "--seq-len", "0"],
        "negative-lr": [small_corpus, "--lr", "-0.1"],
        "zero-batch": [small_corpus, "--batch-size", "0"],
        "bad-dropout": [small_corpus, "--dropout", "1.5"],
        "bad-weight-drop": [small_corpus, "--weight-drop", "-0.1"],
        "bad-val-fraction": [small_corpus, "--val-fraction", "1"],
        "no-such-preset": [small_corpus, "--preset", "gpt5"],
    }[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("to be or not to be")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, stdout, err = cli(capsys, "train", args[0], "--out", out, "--max-steps", "2", *TINY, *args[1:])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    expected = {"missing-path": "does not exist", "empty": "empty", "too-short": "shorter than",
                "not-utf8": "byte offset 3", "unknown-name": "nietzsche, shakespeare", "zero-hidden": "--hidden",
                "negative-layers": "--layers", "zero-seq-len": "--seq-len", "negative-lr": "--lr",
                "zero-batch": "--batch-size", "bad-dropout": "--dropout", "bad-weight-drop": "--weight-drop",
                "bad-val-fraction": "--val-fraction",
                "no-such-preset": "--preset"}[case]
    assert expected in lines[0]
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("args,expected", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.01"], "--top-p"),
    (["--length", "-5"], "--length"),
    (["--num-samples", "0"], "--num-samples"),
    (["--top-k", "0"], "--top-k"),
])
def test_bad_generation_options(capsys, trained_run, args, expected):
    run, _ = trained_run
    code, _, err = cli(capsys, "generate", run, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_bad_run_directories(capsys, tmp_path, trained_run):
    code, _, err = cli(capsys, "generate", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    (tmp_path / "incomplete").mkdir()
    code, _, err = cli(capsys, "generate", tmp_path / "incomplete")
    assert code == 2 and "incomplete" in err
    # A run from an incompatible format version.
    import shutil

    run, _ = trained_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["format_version"] = 99
    (old / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "eval", old)
    assert code == 2 and "format version 99" in err and len(err.strip().splitlines()) == 1
    # A run whose weights file is missing.
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    (partial / "model.safetensors").unlink()
    (partial / "best.safetensors").unlink()
    code, _, err = cli(capsys, "generate", partial)
    assert code == 2 and "incomplete" in err


def test_existing_run_and_vocab_mismatch_on_resume(capsys, tmp_path, trained_run):
    run, corpus = trained_run
    before = (run / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "train", corpus, "--out", run, "--max-steps", "2", *TINY)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.txt"
    other.write_text(make_text(20_000).upper(), encoding="utf-8")
    code, _, err = cli(capsys, "train", other, "--out", run, "--resume", "--max-steps", "200")
    assert code == 2 and "vocabulary does not match" in err and len(err.strip().splitlines()) == 1
    assert (run / "model.safetensors").read_bytes() == before


def test_argparse_errors_are_one_line_too(capsys):
    code, _, err = cli(capsys, "train")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    code, _, err = cli(capsys, "generate", "x", "--temperature", "hot")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_generate_int8(capsys, trained_run):
    run, _ = trained_run
    code, out, _ = cli(capsys, "generate", run, "--prompt", "the ", "--length", "60", "--int8", "--seed", "2",
                       "--temperature", "0.5")
    assert code == 0 and out.startswith("the ") and len(out) == 4 + 60 + 1
