"""A hostile user's command lines: refused in one line with exit status 2, and nothing of theirs lost."""

import hashlib
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

import charrnn

from ..conftest import TINY, TINY_KW, cli, make_text


def _fingerprint(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def trained(small_corpus, tmp_path):
    run = tmp_path / "run"
    charrnn.train(str(small_corpus), run, progress=False, max_steps=3, **TINY_KW)
    return run


@pytest.mark.probe("force-bad-option")
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


@pytest.mark.probe("force-replaces")
def test_force_replaces_the_run_once_everything_is_checked(capsys, small_corpus, trained):
    (trained / "samples").mkdir(exist_ok=True)
    (trained / "samples" / "old.txt").write_text("old")
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--force", "--max-steps", 2, "--seed", 7,
                       *TINY)
    assert code == 0, err
    assert not (trained / "samples" / "old.txt").exists()
    assert '"seed": 7' in (trained / "config.json").read_text()


@pytest.mark.probe("nan-propagates")
@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_a_nan_weight_reaches_the_same_outputs_on_every_backend(arch):
    """The fast paths propagate NaN exactly as the stock modules do (a NaN must never be hidden)."""
    import torch

    from charrnn import ops
    from charrnn.models import CharLM, ModelConfig

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=20, hidden=16, embed=8, arch=arch)).train()
    with torch.no_grad():
        model.embedding.weight[3, 0] = float("nan")
    ids = torch.randint(4, 20, (4, 6))         # id 3 (the NaN row) only at sample 0, step 2
    ids[0, 2] = 3
    masks = []
    for backend in (dict(), dict(native=False), dict(packed=False), dict(fast_rnn=False)):
        with ops.use(**backend):
            out = model(ids)
            masks.append(torch.isnan(out[0] if isinstance(out, tuple) else out))
    assert masks[-1][0, 2:].all() and not masks[-1][1:].any()
    for mask in masks[:-1]:
        assert torch.equal(mask, masks[-1])


@pytest.mark.probe("diverging-run")
def test_a_diverging_run_stops_in_one_line_and_keeps_no_nan_weights(capsys, small_corpus, tmp_path):
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", small_corpus, "--out", run, "--max-steps", 30, "--log-every", 1,
                       "--optimizer", "sgd", "--lr", "1e30", "--clip", 0, *TINY)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: the training loss became"), err
    for name in ("best.safetensors", "model.safetensors"):
        if (run / name).exists():
            assert all(torch.isfinite(t).all() for t in load_file(run / name).values()), name


@pytest.mark.probe("one-writer")
def test_one_trainer_per_run_directory_and_a_dead_holder_releases_it(capsys, small_corpus, trained):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from charrnn import checkpoint\n"
        f"with checkpoint.writer_lock({str(trained)!r}):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _fingerprint(trained)
        for args in (["--resume"], ["--force"]):
            code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--max-steps", 5, *args, *TINY)
            assert code == 2 and f"another charrnn process (pid {holder.pid})" in err.strip().splitlines()[-1], err
        assert _fingerprint(trained) == before
        code, out, err = cli(capsys, "generate", trained, "--length", 20, "--seed", 1)   # readers still read
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(capsys, "train", small_corpus, "--out", trained, "--max-steps", 5, "--resume", *TINY)
    assert code == 0, err


@pytest.mark.probe("refused-new-run")
def test_a_refused_new_run_leaves_no_directory_behind(capsys, small_corpus, tmp_path):
    out = tmp_path / "new"
    code, _, err = cli(capsys, "train", small_corpus, "--out", out, "--batch-size", 100000000, "--quiet")
    assert code == 2, err
    assert not out.exists()


@pytest.mark.probe("generate-sizes")
@pytest.mark.parametrize("bad,option", [
    (["--num-samples", "99999999999"], "--num-samples"),
    (["--length", "99999999999999", "--num-samples", "2"], "--length"),
    (["--beam-width", "99999999999999999999"], "--beam-width"),
])
def test_sizes_past_the_machines_memory_are_refused_before_any_work(capsys, trained, bad, option):
    capsys.readouterr()                        # the fixture's training output
    code, _, err = cli(capsys, "generate", trained, "--seed", 1, *bad)
    assert code == 2 and err.startswith(f"error: {option} is ") and "GiB of memory here" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.probe("tiny-temperature")
def test_temperatures_too_small_to_divide_by_sample_greedily(capsys, trained):
    texts = []
    for t in ("0", "1e-7", "1e-45"):
        code, out, err = cli(capsys, "generate", trained, "--seed", 1, "--length", 40, "--temperature", t)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]


# --------------------------------------------------------------------------- every numeric option of every command

HOSTILE = ("nan", "inf", "-inf", "-1", "0", "99999999999999999999999", "1e30")


def _numeric(action) -> bool:
    """Whether the option's value is a number (or a list of numbers): its parser turns "1" into one."""
    if not action.option_strings or action.nargs == 0 or action.type is None or action.choices:
        return False
    try:
        value = action.type("1")
    except Exception:
        return False
    return all(isinstance(v, (int, float)) for v in (value if isinstance(value, list) else [value]))


def numeric_options() -> list[tuple[str, str]]:
    """``(command, flag)`` of every option of every subcommand that takes a number, read from the parser:
    an option added to any command is walked without a word here."""
    from charrnn.cli import _commands, build_parser

    return [(path, a.option_strings[0]) for path, _, parser in _commands(build_parser())
            for a in parser._actions if _numeric(a)]


# A command line per command that does the least work when every option is valid: the option walked
# replaces its value here, or is added.  {corpus}, {run}, {reber}, {dates}, {out}: see _places.
BASE = {
    "train": "train {corpus} --out {out} --force --max-steps 1 --time-limit 5 --sample-length 20 "
             "--hidden 48 --embed 16 --seq-len 32 --batch-size 16 --precision fp32 --quiet",
    "generate": "generate {run} --length 5 --json",
    "eval": "eval {run} --corpus {corpus} --json",
    "serve": "serve {run} --port 0 --log-level error",
    "task reber train": "task reber train --out {out} --force --train-size 20 --val-size 10 --epochs 1 --hidden 8 "
                        "--time-limit 5",
    "task reber eval": "task reber eval {reber} --size 10",
    "task dates train": "task dates train --out {out} --force --train-size 20 --val-size 10 --epochs 1 --hidden 8 "
                        "--embed 4 --time-limit 5",
    "task dates eval": "task dates eval {dates} --size 10",
    "task dates convert": "task dates convert {dates} 'March 3, 2001'",
}


# Options that act only beside another one: walked once more on a command line that turns them on.
TURNED_ON = {"eval": ("--dynamic-", "eval {run} --corpus {corpus} --dynamic --json"),
             "generate": ("--dynamic-", "generate {run} --adapt {style} --length 5 --json")}


def walk_cases(values) -> list[tuple[str, list[str]]]:
    """``(flag, argv)`` for each numeric option and value, from :data:`BASE` and :data:`TURNED_ON` (with
    {placeholders})."""
    import shlex

    cases = []
    for path, flag in numeric_options():
        assert path in BASE, f"`charrnn {path}` has numeric options: give it a command line in BASE"
        prefix, turned_on = TURNED_ON.get(path, (None, None))
        for base in [BASE[path]] + ([turned_on] if prefix and flag.startswith(prefix) else []):
            argv = shlex.split(base)
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
            cases += [(flag, argv + [flag, NEGATIVE_VALID.get(flag, value) if value == "-1" else value])
                      for value in values]
    return cases


# Options that name a file to read, each on the command line it is walked on, with hostile files: no regular
# file, or one that is not UTF-8 text, or empty ({fifo}, {folder}, ...: made by hostile_files).
FILE_OPTIONS = {"--corpus": "eval {run} --json", "--adapt": "generate {run} --length 5 --json"}
HOSTILE_FILES = ("{fifo}", "/dev/null", "{folder}", "{missing}", "{latin1}", "{empty}")
ENDLESS = "/dev/zero"    # walked in the child process alone, under its address-space limit


def file_cases(paths) -> list[tuple[str, list[str]]]:
    """``(flag, argv)`` for each option of :data:`FILE_OPTIONS` and path."""
    import shlex

    return [(flag, shlex.split(base) + [flag, path]) for flag, base in FILE_OPTIONS.items() for path in paths]


def hostile_files(folder) -> dict:
    """The places of :data:`HOSTILE_FILES`, made in ``folder``, and {style}: a text to adapt to."""
    import os

    os.mkfifo(folder / "fifo")
    (folder / "folder").mkdir()
    (folder / "latin1.txt").write_bytes("déjà vu\n".encode("latin-1") * 20)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "style.txt").write_text(make_text(500), encoding="utf-8")
    files = {"fifo": "fifo", "folder": "folder", "latin1": "latin1.txt", "empty": "empty.txt",
             "missing": "missing.txt", "style": "style.txt"}
    return {name: str(folder / file) for name, file in files.items()}


# Options for which -1 is a valid value (the OpenAI API's penalties, -2 to 2): the walk gives -3 instead.
NEGATIVE_VALID = {"--presence-penalty": "-3", "--frequency-penalty": "-3"}


def walk(cases: list[tuple[str, list[str]]], places: dict, seconds: float, backstop: bool = False) -> list[dict]:
    """Run each case through the command line in this process; what it printed, its exit status, and any
    exception that escaped (a case still running after ``seconds`` is stopped by a TimeoutError).  With
    ``backstop``, one stuck where no signal reaches ends the process with its stacks (faulthandler), after
    twice that.  ``charrnn serve`` returns once it is listening."""
    import uvicorn

    results = []
    listening, uvicorn.Server.run = uvicorn.Server.run, lambda self, sockets=None: None
    try:
        _walk(cases, places, seconds, backstop, results)
    finally:
        uvicorn.Server.run = listening       # later tests start real servers
    return results


def _walk(cases, places: dict, seconds: float, backstop: bool, results: list) -> None:
    import contextlib
    import faulthandler
    import io
    import traceback

    from charrnn.cli import main

    for flag, argv in cases:
        argv = [a.format(**places) for a in argv]
        out, err, raised = io.StringIO(), io.StringIO(), None
        print(f"case: charrnn {' '.join(argv)}", file=sys.__stderr__, flush=True)
        if backstop:
            faulthandler.dump_traceback_later(2 * seconds, exit=True)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(seconds):
                code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, raised = None, traceback.format_exc()
        finally:
            faulthandler.cancel_dump_traceback_later()
        results.append(dict(flag=flag, argv=argv, code=code, err=err.getvalue(), raised=raised))


def refusal_problem(r: dict) -> str | None:
    """What is wrong with a case's outcome: a success (0) or one `error:` line naming the option (2)."""
    lines = r["err"].strip().splitlines()
    if r["raised"] or "Traceback" in r["err"]:
        return f"raised\n{r['raised'] or r['err']}"
    if r["code"] == 0:
        return None
    if r["code"] != 2:
        return f"exit {r['code']}: {r['err'][-300:]}"
    errors = [line for line in lines if line.startswith("error: ")]
    names = [r["flag"]] + ([r["argv"][-1]] if r["flag"] in FILE_OPTIONS else [])    # a file option: or its file
    if errors != lines[-1:] or not any(name in errors[0] for name in names):
        return f"not one error line naming {' or '.join(names)}: {lines[-3:]}"
    return None


def _places(tmp_path, small_corpus, trained) -> dict:
    return dict(corpus=str(small_corpus), run=str(trained), out=str(tmp_path / "out"),
                reber=str(tmp_path / "reber"), dates=str(tmp_path / "dates"), style=str(tmp_path / "style.txt"))


def _problems(results) -> list[str]:
    return [f"charrnn {' '.join(r['argv'])}: {p}" for r in results if (p := refusal_problem(r))]


@pytest.mark.probe("option-walk")
def test_nan_and_negative_values_of_every_numeric_option_are_refused_up_front(small_corpus, tmp_path):
    """The cheap half of the walk, in this process: NaN and -1 are never a valid size, rate or seed, and are
    refused before any work: the runs named here do not even exist."""
    results = walk(walk_cases(("nan", "-1")), _places(tmp_path, small_corpus, tmp_path / "run"), seconds=30)
    assert not _problems(results), "\n".join(_problems(results))
    assert all(r["code"] == 2 for r in results), [r["argv"] for r in results if r["code"] != 2]


@pytest.mark.probe("option-walk")
def test_hostile_files_given_to_eval_and_generate_are_refused_in_one_line(small_corpus, trained, tmp_path):
    """`eval --corpus` and `generate --adapt` given a FIFO (it blocked `--adapt`), a device, a folder, a missing,
    a Latin-1 or an empty file: one line naming the option or the file, exit 2, never a hang."""
    places = {**_places(tmp_path, small_corpus, trained), **hostile_files(tmp_path)}
    results = walk(file_cases(HOSTILE_FILES), places, seconds=30)
    assert not _problems(results), "\n".join(_problems(results))
    assert all(r["code"] == 2 for r in results), [r["argv"] for r in results if r["code"] != 2]


ADDRESS_SPACE = 8 << 30   # the walk's limit: a size that slips past its bound fails rather than swaps


def walk_in_child(folder: str) -> None:
    """The whole walk, run by the test below in a process of its own under an address-space limit: trains the
    runs the commands need, walks every hostile value, writes results.json into ``folder``."""
    import json
    import resource
    from pathlib import Path

    from charrnn.cli import main

    here = Path(folder)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    places = {**_places(here, here / "small.txt", here / "run"), **hostile_files(here)}
    for argv in (f"train {places['corpus']} --out {places['run']} --max-steps 3 {' '.join(TINY)}",
                 f"task reber train --out {places['reber']} --train-size 20 --val-size 10 --epochs 1 --hidden 8",
                 f"task dates train --out {places['dates']} --train-size 20 --val-size 10 --epochs 1 --hidden 8 "
                 "--embed 4"):
        assert main(argv.split()) == 0, argv
    results = walk(walk_cases(HOSTILE) + file_cases(HOSTILE_FILES + (ENDLESS,)), places, seconds=120, backstop=True)
    (here / "results.json").write_text(json.dumps(results))


@pytest.mark.slow
@pytest.mark.probe("option-walk")
def test_every_numeric_option_of_every_command_with_hostile_values(small_corpus, tmp_path):
    import json
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "small.txt").write_bytes(small_corpus.read_bytes())
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.reliability.test_options import "
                           "walk_in_child; walk_in_child(sys.argv[1])", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(walk_cases(HOSTILE)) + len(FILE_OPTIONS) * (len(HOSTILE_FILES) + 1)
    assert not _problems(results), "\n".join(_problems(results))
    refused = [r for r in results if r["argv"][-1] in ("nan", "-1") or r["flag"] in FILE_OPTIONS]
    assert all(r["code"] == 2 for r in refused), [r["argv"] for r in refused if r["code"] != 2]


# --------------------------------------------------------------------------- sizes, seeds and samples


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in this (main) thread when the block runs past ``seconds``: a hang in Python code
    fails the test instead of stalling the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.probe("model-size")
@pytest.mark.parametrize("bad", [["--hidden", "10000000"], ["--layers", "100000"],
                                 ["--layers", "99999999999999999999999"]])
def test_a_model_past_the_memory_here_is_refused_before_anything_is_allocated(capsys, small_corpus, tmp_path,
                                                                              monkeypatch, bad):
    monkeypatch.setattr("charrnn.hardware.memory_bytes", lambda device: 16 << 30)   # the same verdict anywhere
    options = TINY.copy()
    if bad[0] in options:
        i = options.index(bad[0])
        del options[i:i + 2]
    with deadline(30):
        code, _, err = cli(capsys, "train", small_corpus, "--out", tmp_path / "run", "--max-steps", 1, *options,
                           *bad)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the model would have ") and "more than the 16.0 GiB of cpu memory here" in err, err
    assert not (tmp_path / "run").exists()


def test_a_training_step_counts_its_activations_as_well_as_its_weights():
    from charrnn.config import ModelConfig

    deep = ModelConfig(vocab_size=40, hidden=48, embed=16, layers=100)
    assert deep.training_bytes(1, 1) < deep.training_bytes(64, 100) - 64 * 100 * 100 * 4 * 48 * 4


@pytest.mark.probe("seed-range")
@pytest.mark.parametrize("command", ["train", "generate"])
@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", str(2**63)])
def test_a_seed_out_of_range_is_refused_in_one_line(capsys, small_corpus, tmp_path, command, seed):
    run = tmp_path / "run"
    args = ["train", small_corpus, "--out", run, *TINY] if command == "train" else ["generate", run]
    code, _, err = cli(capsys, *args, "--seed", seed)
    assert code == 2 and err == f"error: --seed must be an integer from 0 to 2**63 - 1, got {seed}\n", err


@pytest.mark.probe("seed-range")
def test_the_whole_range_of_seeds_is_honoured():
    from charrnn.models import CharLM, ModelConfig
    from charrnn.sampling import Sampler
    from charrnn.vocab import Vocab

    vocab = Vocab.from_text("abc\n")
    sampler = Sampler(CharLM(ModelConfig(vocab_size=len(vocab), hidden=8, embed=4)), vocab)
    for seed in (0, 2**62, 2**63 - 1):
        assert sampler.generate("a", 5, seed=seed) == sampler.generate("a", 5, seed=seed)


@pytest.mark.probe("sample-length")
def test_a_training_sample_past_the_memory_here_is_refused_before_training(capsys, small_corpus, tmp_path):
    code, _, err = cli(capsys, "train", small_corpus, "--out", tmp_path / "run", "--sample-length",
                       99999999999999, *TINY)
    assert code == 2 and err.startswith("error: --sample-length is 99,999,999,999,999: that needs about "), err
    assert len(err.strip().splitlines()) == 1 and "GiB of memory here" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.probe("sample-length")
def test_sigterm_during_a_long_training_sample_stops_the_run_at_once(small_corpus, tmp_path):
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", str(small_corpus), "--out", str(run),
                             "--max-steps", "50", "--log-every", "1", "--sample-every", "1", "--sample-length",
                             "20000000", *TINY], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):  # step 1 logged:
            assert time.monotonic() < deadline and proc.poll() is None             # its sample follows
            time.sleep(0.1)
        time.sleep(1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 130 and stopped < 15, (stopped, err[-2000:])
    assert "(cut short: interrupted)" in err and "Traceback" not in err
    cut = sorted((run / "samples").iterdir())
    assert len(cut) == 1 and 0 < len(cut[0].read_text()) < 20_000_000
    code, _, err = cli_subprocess("train", small_corpus, "--out", run, "--resume", "--max-steps", 2,
                                  "--sample-every", 0, *TINY)
    assert code == 0 and "resuming" in err and "at step 1 " in err, err


def cli_subprocess(*args):
    from ..conftest import run_cli

    r = run_cli(*args)
    return r.returncode, r.stdout, r.stderr


FLAT = "abc cab bca " * 500   # a corpus without a newline


@pytest.mark.probe("sample-prompt")
def test_an_empty_sample_prompt_without_a_newline_is_refused_before_training(capsys, tmp_path):
    corpus = tmp_path / "flat.txt"
    corpus.write_text(FLAT)
    code, _, err = cli(capsys, "train", corpus, "--out", tmp_path / "run", "--sample-prompt", "", "--max-steps", 2,
                       *TINY)
    assert code == 2 and err == ("error: --sample-prompt is empty and this vocabulary has no newline to start from; "
                                 "give some text to continue\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.probe("sample-prompt")
def test_a_sample_that_fails_at_the_end_of_training_never_costs_the_final_checkpoint(small_corpus, tmp_path,
                                                                                    monkeypatch):
    from charrnn.errors import CharRNNError
    from charrnn.sampling import Sampler

    def fail(*args, **kwargs):
        raise CharRNNError("the sample failed")

    with monkeypatch.context() as patch:
        patch.setattr(Sampler, "generate", fail)
        with pytest.raises(CharRNNError, match="the sample failed"):
            charrnn.train(str(small_corpus), tmp_path / "run", progress=False, max_steps=3, **TINY_KW)
    messages = []
    result = charrnn.train(str(small_corpus), tmp_path / "run", resume=True, progress=False, max_steps=4,
                           log=messages.append, **TINY_KW)
    assert result.step == 4 and any("at step 3 " in m for m in messages), messages


# --------------------------------------------------------------------------- int8: no NaN hidden


@pytest.mark.probe("int8-nan")
@pytest.mark.parametrize("portable", [False, True])
def test_a_nan_or_infinite_activation_makes_every_int8_output_of_its_sample_nan(compiled, portable):
    import torch

    from charrnn.stepper import _Linear

    if not portable and not compiled.has_avx2():
        pytest.skip("no AVX2 here")
    torch.manual_seed(0)
    lin = _Linear(torch.randn(40, 37), torch.randn(40), int8=True)
    x = torch.randn(6, 37)
    x[1, 5] = float("nan")          # in the first group of 8
    x[2, 36] = float("inf")         # in the tail past the groups
    x[3, 0] = float("-inf")
    x[4, 8:16] = float("nan")       # a whole group
    x[5, 33] = float("nan")         # the tail
    compiled.set_portable(portable)
    try:
        out = compiled.int8_linear(x, lin.native_parts(), 40)
    finally:
        compiled.set_portable(False)
    ref = lin(x)
    assert torch.isnan(ref[1:]).all() and torch.isnan(out[1:]).all()
    assert torch.equal(out[0], ref[0])


@pytest.mark.probe("int8-nan")
@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn"])
def test_the_int8_sampling_step_carries_a_nan_state_as_the_reference_does(compiled, arch):
    import torch

    from charrnn.models import CharLM, ModelConfig
    from charrnn.stepper import Stepper

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=20, hidden=24, embed=8, layers=2, arch=arch)).eval()
    fast, slow = Stepper(model, "int8", backend="native"), Stepper(model, "int8", backend="python")
    state = model.zero_state(2)
    (state[0] if arch == "lstm" else state)[1, 0, 3] = float("nan")   # the second layer of sample 0
    ids = torch.tensor([3, 4])
    with torch.inference_mode():
        got, _ = fast.step(ids, fast.from_module_state(state))
        want, _ = slow.step(ids, slow.from_module_state(state))
    assert torch.isnan(want[0]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[1], want[1])
