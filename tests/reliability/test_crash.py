"""Crash consistency and full disks: `kill -9` at seeded random moments (checkpoint writes included), the
temporary files a killed writer leaves, the run files' mode, and a disk that fills up under a run."""

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from safetensors.torch import load_file

import charrnn
from charrnn import checkpoint as ckpt
from charrnn import fileio

from ..conftest import TINY, TINY_KW, cli, make_text

REPO = Path(charrnn.__file__).resolve().parents[1]
HAS_ONNX = find_spec("onnx") is not None and find_spec("onnxruntime") is not None
# The files a run directory may hold; anything else after a trainer has started is a leftover.
RUN_NAMES = {*ckpt.RUN_FILES, ckpt.LOCK, ckpt.SAMPLES}
SAMPLE_NAME = re.compile(r"step\d{7}-t[0-9.e+-]+\.txt")
OPTIONS = dict(TINY_KW, checkpoint_every=1, eval_every=5, epochs=1000, sample_length=20)


def leftovers(run: Path) -> list[str]:
    """Whatever in ``run`` (and its samples) is not a run file."""
    if not run.exists():
        return []
    found = [p.name for p in run.iterdir() if p.name not in RUN_NAMES]
    if (run / ckpt.SAMPLES).is_dir():
        found += [f"samples/{p.name}" for p in (run / ckpt.SAMPLES).iterdir() if not SAMPLE_NAME.fullmatch(p.name)]
    return sorted(found)


def fingerprint(run: Path, names=(ckpt.STATE, ckpt.LATEST, ckpt.BEST)) -> dict:
    return {name: (run / name).read_bytes() for name in names}


def assert_loadable(run: Path) -> None:
    ckpt.load_trainer_state(run)
    for weights in ("best", "latest"):
        ckpt.load_run(run, weights=weights)


def assert_one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()                           # the run's own log lines, then the error
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A corpus and a run trained on it for two steps (a checkpoint every step) under umask 002, to copy."""
    root = tmp_path_factory.mktemp("template")
    corpus = root / "small.txt"
    corpus.write_text(make_text(20_000), encoding="utf-8")
    old = os.umask(0o002)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CHARRNN_HOME", str(root / "home"))
            charrnn.train(str(corpus), root / "run", progress=False, log=lambda msg: None, max_steps=2, **OPTIONS)
    finally:
        os.umask(old)
    return corpus, root / "run"


@pytest.fixture
def trained(template, tmp_path):
    corpus, run = template
    shutil.copytree(run, tmp_path / "run")
    return corpus, tmp_path / "run"


# --------------------------------------------------------------------------- temporary files and modes


@pytest.mark.probe("stale-temp-files")
def test_a_killed_writers_temporary_files_are_removed_by_the_next_writer(capsys, trained, tmp_path):
    corpus, run = trained
    before = fingerprint(run)
    stale = [run / ".trainer-state.pt.k2j_l4m5.tmp", run / ".model.safetensors.0a1b2c3d.tmp",
             run / ".tmpAb12Cd", run / "samples" / ".step0000002-t1.txt.00ff00ff.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert len(leftovers(run)) == len(stale)
    assert_loadable(run)                                       # readers are not confused by them
    assert fingerprint(run) == before
    code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", 3, "--quiet")
    assert code == 0, err
    assert leftovers(run) == []
    assert ckpt.load_trainer_state(run)["step"] == 3

    # A first writer killed before config.json: its folder is taken for a new run, not for foreign files.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.json.x1y2z3w4.tmp").write_text("{")
    (fresh / ckpt.LOCK).write_text("999999999")
    code, _, err = cli(capsys, "train", corpus, "--out", fresh, "--max-steps", 1, "--sample-every", 0, *TINY)
    assert code == 0, err
    assert leftovers(fresh) == []


@pytest.mark.probe("file-mode")
def test_run_files_get_the_usual_mode(template, tmp_path):
    _, run = template                                          # trained under umask 002
    files = [p for p in [*run.iterdir(), *(run / ckpt.SAMPLES).iterdir()] if p.is_file() and p.name != ckpt.LOCK]
    assert {p.name for p in files} >= set(ckpt.RUN_FILES) - {ckpt.TOKENIZER_FILE}     # a character run has no tokenizer.json
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o664) for p in files}
    old = os.umask(0o027)
    try:
        fileio.atomic_write_json(tmp_path / "a.json", {})
        fileio.append_text(tmp_path / "b.jsonl", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- full disks


class _FullFile(io.FileIO):
    """A file on a disk that fills up during the first write: part of it is written, then ENOSPC."""

    def write(self, data):
        if getattr(self, "_wrote", False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        self._wrote = True
        return super().write(memoryview(data)[: max(1, len(memoryview(data)) // 2)])


def fill_disk_for(monkeypatch, name: str) -> None:
    """Writes (atomic or appended) of the run file ``name`` ("samples/": of any sample) meet a full disk."""
    def hit(path: Path) -> bool:
        if name == ckpt.SAMPLES + "/":
            return path.parent.name == ckpt.SAMPLES
        return path.name == name or path.name.startswith(f".{name}.")

    def full_open(file, mode="r", buffering=-1, **kwargs):
        if buffering == 0 and hit(Path(file)):
            return _FullFile(file, mode)
        return open(file, mode, buffering, **kwargs)

    monkeypatch.setattr(fileio, "open", full_open, raising=False)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of its own (4 MiB), or None where mounting one is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system but ``leave`` bytes with one file; return it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(shutil.disk_usage(folder).free - leave))
    return filler


@pytest.mark.probe("disk-full-checkpoint")
@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_and_says_what_it_needs(capsys, trained, small_disk,
                                                                               monkeypatch, disk):
    corpus, run = trained
    if disk == "tmpfs":
        if small_disk is None:
            pytest.skip("mounting a tmpfs is not allowed here (the 'patched' case stands in)")
        run = Path(shutil.copytree(run, small_disk / "run"))
        filler = fill(small_disk, leave=16 * 1024)            # room for config.json and metrics, not a checkpoint
    else:
        fill_disk_for(monkeypatch, ckpt.STATE)
    before = fingerprint(run)
    code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", 6, "--quiet")
    line = assert_one_line_error(code, err)
    assert line.startswith(f"error: no space left on device writing {run / ckpt.STATE}: about "), line
    needed = re.search(r"about ([\d.]+) KiB needed, ([\d.]+ \w+|unknown) free", line)
    assert needed, line
    assert abs(float(needed.group(1)) * 1024 / len(before[ckpt.STATE]) - 1) < 0.1, line
    assert f"then continue with `charrnn train {corpus} --out {run} --resume`" in line
    assert fingerprint(run) == before and leftovers(run) == []
    assert_loadable(run)
    if disk == "tmpfs":
        number, unit = needed.group(2).split()
        assert float(number) * {"bytes": 1, "KiB": 1024}[unit] <= 16 * 1024, line
        filler.unlink()
    else:
        monkeypatch.undo()
    code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", 4, "--quiet")
    assert code == 0, err
    assert ckpt.load_trainer_state(run)["step"] == 4 and leftovers(run) == []


@pytest.mark.probe("disk-full-run-files")
@pytest.mark.parametrize("name,resume", [
    (ckpt.CONFIG, False), (ckpt.VOCAB, False), (ckpt.METRICS, False), (ckpt.CONFIG, True), (ckpt.METRICS, True),
    pytest.param(ckpt.SAMPLES + "/", False, marks=pytest.mark.slow),    # these two train, then resume
    pytest.param(ckpt.BEST, False, marks=pytest.mark.slow),
])
def test_any_run_file_on_a_full_disk_is_one_line(capsys, trained, monkeypatch, name, resume):
    corpus, run = trained
    fill_disk_for(monkeypatch, name)
    if resume:
        before = fingerprint(run, [ckpt.STATE, ckpt.LATEST, ckpt.BEST, ckpt.METRICS])
        code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", 4, "--quiet")
    else:
        run = run.parent / "new"
        code, _, err = cli(capsys, "train", corpus, "--out", run, "--max-steps", 2, "--checkpoint-every", 1,
                           "--sample-length", 20, *TINY)
    line = assert_one_line_error(code, err)
    assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(run))}/{re.escape(name)}\S*: "
                        r"about [\d.]+ (bytes|KiB) needed, .+ free; free some space.*", line), line
    assert leftovers(run) == []
    for line_ in (run / ckpt.METRICS).read_text().splitlines() if (run / ckpt.METRICS).exists() else []:
        json.loads(line_)                                      # no half line left
    if resume:
        assert fingerprint(run, before) == before
    if (run / ckpt.STATE).exists():                            # a checkpoint was made: resume from it
        assert "--resume`" in line
        monkeypatch.undo()
        code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", 4, "--quiet")
        assert code == 0, err
    else:
        assert line.endswith("free some space and start the run again" + (" with --force" if run.exists() else "")), line


# --------------------------------------------------------------------------- kill -9


# A process that forks a `charrnn train` per line of JSON [argv, log] on stdin and answers the child's pid,
# then its exit status (negative: the signal that killed it).  It first runs the command of its first line
# itself, so that the children start with torch's lazy imports and first calls done (in one thread: a
# fork copies no thread pool).
ZYGOTE = r"""
import contextlib, json, os, sys
import torch
torch.set_num_threads(1)
import charrnn.cli
argv, log = json.loads(sys.stdin.readline())
with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
    assert charrnn.cli.main(argv) == 0
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = charrnn.cli.main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self, warm_up, log):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.child = None
        self._send(warm_up, log)
        if self.proc.stdout.readline() != "ready\n":
            self.close()
            pytest.fail(f"the zygote did not start: {Path(log).read_text()}")

    def _send(self, argv, log) -> None:
        self.proc.stdin.write(json.dumps([[str(a) for a in argv], str(log)]) + "\n")
        self.proc.stdin.flush()

    def start(self, argv, log) -> int:
        self._send(argv, log)
        self.child = int(self.proc.stdout.readline())
        return self.child

    def exit_status(self) -> int:
        status, self.child = int(self.proc.stdout.readline()), None
        return status

    def close(self):
        """Stop the zygote, and its child if one still runs (a failed trial)."""
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(self.child, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


TRIALS = 30
CHECKPOINT_TEMP = tuple(f".{name}." for name in (ckpt.STATE, ckpt.LATEST, ckpt.BEST))


def wait_for_a_checkpoint_write(run: Path, timeout: float) -> bool:
    """Wait until a checkpoint file is being written in ``run`` (its temporary file is there)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(name.startswith(CHECKPOINT_TEMP) for name in os.listdir(run)):
            return True
    return False


@pytest.mark.slow
@pytest.mark.probe("kill-9")
def test_kill_9_at_random_moments_never_costs_the_run(capsys, trained, tmp_path):
    """kill -9 `charrnn train --resume` (a checkpoint every step) at seeded random moments and, every third
    time, as soon as a checkpoint file is being written; after each kill
    generate/eval/export load the run, `--resume` takes a step from it and leaves nothing but run files;
    at the end the run is bit-identical to one trained without a kill."""
    import torch

    corpus, run = trained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                   # as the children's (see ZYGOTE)
    zygote = Zygote(["train", corpus, "--out", tmp_path / "warm-up", "--max-steps", 2, "--checkpoint-every", 1,
                     *TINY], tmp_path / "warm-up.log")
    mid_write = before_checkpoint = 0
    try:
        for trial in range(TRIALS):
            step = ckpt.load_trainer_state(run)["step"]
            log = tmp_path / f"trial{trial}.log"
            pid = zygote.start(["train", corpus, "--out", run, "--resume", "--max-steps", 100_000, "--quiet"], log)
            if trial % 3 == 2:                                 # every third: while a checkpoint is written
                assert wait_for_a_checkpoint_write(run, timeout=30), f"trial {trial}: {log.read_text()}"
            else:
                time.sleep(random.Random(trial).uniform(0.02, 1.0))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = zygote.exit_status()
            assert status == -signal.SIGKILL, f"trial {trial}: exit {status}: {log.read_text()}"
            left = leftovers(run)
            assert all(fileio.is_temp_name(Path(name).name) for name in left), left
            mid_write += bool(left)
            killed_at = ckpt.load_trainer_state(run)["step"]
            assert killed_at >= step
            before_checkpoint += killed_at == step

            for args in (["generate", run, "--length", 20, "--seed", trial], ["eval", run, "--device", "cpu"],
                         ["generate", run, "--weights", "latest", "--length", 20]):
                code, _, err = cli(capsys, *args)
                assert code == 0, f"trial {trial}: {args}: {err}"
            if HAS_ONNX:
                code, _, err = cli(capsys, "export", run, "--out", tmp_path / f"trial{trial}.onnx")
                assert code == 0, f"trial {trial}: export: {err}"
            code, _, err = cli(capsys, "train", corpus, "--out", run, "--resume", "--max-steps", killed_at + 1,
                               "--quiet")
            assert code == 0, f"trial {trial}: resume: {err}"
            assert ckpt.load_trainer_state(run)["step"] == killed_at + 1
            assert leftovers(run) == [], f"trial {trial}"
        steps = ckpt.load_trainer_state(run)["step"]
        reference = tmp_path / "reference"
        charrnn.train(str(corpus), reference, progress=False, log=lambda msg: None,   # checkpoints change no weight
                      **{**OPTIONS, "checkpoint_every": None, "eval_every": None, "max_steps": steps})
    finally:
        zygote.close()
        torch.set_num_threads(threads)
    got, want = load_file(run / ckpt.LATEST), load_file(reference / ckpt.LATEST)
    assert all((got[k] == want[k]).all() for k in want), "the killed and resumed run differs from an unkilled one"
    with capsys.disabled():
        print(f"\nkill -9: {TRIALS} of {TRIALS} trials survived ({mid_write} killed in the middle of a write, "
              f"{before_checkpoint} before a new checkpoint); {steps} steps, bit-identical to an unkilled run")
