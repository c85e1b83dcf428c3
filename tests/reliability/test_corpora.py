"""Hostile corpora: each one trains correctly or is refused in one line with exit status 2, leaving nothing behind."""

import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import charrnn
from charrnn import corpus as corpus_mod
from charrnn.corpus import load_corpus
from charrnn.errors import CharRNNError

from ..conftest import TINY, TINY_KW, cli, make_text


def one_line_error(code, err, expect):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], err
    return lines[0]


def leftovers(home: Path) -> list[str]:
    """Whatever encoding left in CHARRNN_HOME besides finished caches (temporary files, half-made folders)."""
    encoded = home / "encoded"
    if not encoded.exists():
        return []
    return [str(p) for p in encoded.rglob("*") if p.name.startswith(".") or (p.is_dir() and not any(p.iterdir()))
            or (p.is_dir() and not (p / "meta.json").exists())]


@pytest.fixture
def deadline():
    """Fail, rather than hang, a test whose command does not answer within 30 s."""
    def expired(*_):
        raise TimeoutError("the command hung")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _hostile(tmp_path: Path, kind: str) -> str:
    """Make the hostile corpus ``kind`` under ``tmp_path``; returns what the user types."""
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "one-char":
        path.write_bytes(b"a")
    elif kind == "binary":
        path.write_bytes(bytes([0xF6, 0x00, 0xFF]) + os.urandom(4096))
    elif kind == "latin1":
        path.write_bytes("caf\xe9 au lait, na\xefve\n".encode("latin-1") * 200)
    elif kind == "utf16":
        path.write_bytes(make_text(2000).encode("utf-16"))     # with its byte-order mark
    elif kind == "no-text-dir":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "notes.md").write_text(make_text(2000))
        (path / "fifo.txt").unlink(missing_ok=True)
        os.mkfifo(path / "fifo.txt")                           # a .txt that is no file is not read either
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-loop":
        os.symlink(tmp_path / "b.txt", path)
        os.symlink(path, tmp_path / "b.txt")
    elif kind == "unknown-name":
        return "shakespear"
    elif kind == "device":
        return "/dev/zero"                                     # endless: reading it would never stop
    return str(path)


@pytest.mark.probe("corpus-refused")
@pytest.mark.parametrize("kind,expect", [
    ("empty", "is empty"),
    ("one-char", "too short"),
    ("binary", "is not UTF-8 text: invalid byte 0xf6 at byte offset 0; convert it to UTF-8, e.g. iconv"),
    ("latin1", "invalid byte 0xe9 at byte offset 3; convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8"),
    ("utf16", "is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; convert it, e.g. iconv -f UTF-16"),
    ("no-text-dir", "holds no .txt files"),
    ("fifo", "is a FIFO, not a file"),
    ("symlink-loop", "is a symlink loop, not a file"),
    ("device", "is a device, not a file"),
    ("unknown-name", "give the path of a text file or folder, or one of those names"),
])
def test_a_hostile_corpus_is_refused_in_one_line(capsys, tmp_path, charrnn_home, deadline, kind, expect):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", _hostile(tmp_path, kind), "--out", out, "--max-steps", 1, *TINY)
    one_line_error(code, err, expect)
    assert not out.exists()
    assert leftovers(charrnn_home) == []


@pytest.mark.probe("corpus-line-endings")
@pytest.mark.parametrize("text", ["ab\x00cd\x00\n" * 300, "the fox\r" * 300, "the fox\r\n" * 300, "a\rb\r\nc\n" * 300])
def test_nul_bytes_and_every_line_ending_are_kept_as_written(tmp_path, text):
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode())
    c = load_corpus(str(path))
    assert c.vocab.decode(c.ids) == text                       # the model learns the file as it is


@pytest.mark.probe("corpus-line-endings")
@pytest.mark.parametrize("chunk", [corpus_mod.CHUNK_BYTES, 5, 6])   # a CRLF whole, and cut between two chunks
def test_newlines_to_spaces_makes_each_line_ending_of_any_kind_one_space(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", chunk)
    path = tmp_path / "c.txt"
    path.write_bytes(b"abcd\r\nef\rgh\nij\r\n\r\nk")
    c = load_corpus(str(path), newlines_to_spaces=True)
    assert c.vocab.decode(c.ids) == "abcd ef gh ij  k"


@pytest.mark.slow
@pytest.mark.probe("corpus-line-endings")
@pytest.mark.parametrize("ending", ["\x00\n", "\r", "\r\n"])
def test_a_corpus_with_nul_bytes_or_cr_line_endings_trains(capsys, tmp_path, ending):
    path = tmp_path / "c.txt"
    path.write_bytes(make_text(20_000).replace("\n", ending).encode())
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", path, "--out", run, "--max-steps", 2, *TINY)
    assert code == 0, err
    assert ending[-1] in json.loads((run / "vocab.json").read_text())["chars"]
    # (A vocabulary with no LF has nothing to start an empty prompt from: generation then needs a --prompt.)
    code, out, err = cli(capsys, "generate", run, "--prompt", "the ", "--length", 50, "--seed", 1)
    assert code == 0 and out.startswith("the "), err


def _edit_while_encoding(monkeypatch, path: Path, edit):
    """Call ``edit(path)`` once, in the middle of reading the corpus (after its second chunk)."""
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 1024)
    real, calls = corpus_mod.codepoints, []

    def codepoints(text):
        calls.append(1)
        if len(calls) == 2:
            edit(path)
        return real(text)

    monkeypatch.setattr(corpus_mod, "codepoints", codepoints)


@pytest.mark.probe("corpus-changes")
@pytest.mark.parametrize("edit,expect", [
    (lambda p: p.open("a").write("more text, appended while the corpus is read\n" * 50),
     "changed while it was being read"),
    (lambda p: p.unlink(), "disappeared while the corpus was being read"),
    (lambda p: p.write_text("rewritten"), "changed while it was being read"),
])
def test_a_corpus_that_changes_while_it_is_read_is_refused(capsys, tmp_path, monkeypatch, charrnn_home, edit, expect):
    path = tmp_path / "c.txt"
    path.write_text(make_text(20_000))
    _edit_while_encoding(monkeypatch, path, edit)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", path, "--out", out, "--max-steps", 1, *TINY)
    one_line_error(code, err, expect)
    assert not out.exists() and leftovers(charrnn_home) == []


@pytest.mark.probe("corpus-changes")
def test_a_corpus_that_grows_between_the_two_passes_is_refused(tmp_path, monkeypatch, charrnn_home):
    # The second pass reads more characters than the first counted (this was a broadcast traceback).
    path = tmp_path / "c.txt"
    path.write_text(make_text(5_000))
    real = corpus_mod.Vocab.from_codepoints
    stats = path.stat()

    def grow(codes):
        with path.open("a") as f:
            f.write("x" * 100)
        os.utime(path, ns=(stats.st_atime_ns, stats.st_mtime_ns))   # even when its mtime is put back
        return real(codes)

    monkeypatch.setattr(corpus_mod.Vocab, "from_codepoints", staticmethod(grow))
    monkeypatch.setattr(corpus_mod, "_check_unchanged", lambda files, stats: None)   # as if the stat missed it
    with pytest.raises(CharRNNError, match="changed while it was being read"):
        load_corpus(str(path))
    assert leftovers(charrnn_home) == []


@pytest.mark.slow
@pytest.mark.probe("corpus-changes")
def test_a_corpus_appended_to_by_another_process_is_refused(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text(make_text(1 << 20) * 24)
    stop = threading.Event()

    def append():
        with path.open("a") as f:
            while not stop.is_set():
                f.write("another line of the log\n")
                f.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        r = subprocess.run([sys.executable, "-m", "charrnn", "train", str(path), "--out", str(tmp_path / "run"),
                            "--max-steps", "1", *TINY], capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        writer.join()
    one_line_error(r.returncode, r.stderr, "changed while it was being read")


def _no_space_write(monkeypatch):
    """Encoding's writes fail with ENOSPC after the first few bytes, as on a disk that fills up meanwhile."""
    def write_ids(out, chunks, dtype, n, bar):
        out.write(b"\x93NUMPY" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corpus_mod, "_write_ids", write_ids)


def _no_space_for_meta(monkeypatch):
    def atomic_write_json(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corpus_mod, "atomic_write_json", atomic_write_json)


@pytest.mark.probe("corpus-disk-full")
@pytest.mark.parametrize("fill", [_no_space_write, _no_space_for_meta])
def test_a_disk_that_fills_up_while_encoding_gives_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch,
                                                                                 charrnn_home, fill):
    fill(monkeypatch)
    path = tmp_path / "c.txt"
    path.write_text(make_text(20_000))
    code, _, err = cli(capsys, "train", path, "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, f"KiB in CHARRNN_HOME ({charrnn_home}); free some space there or set CHARRNN_HOME")
    assert not (charrnn_home / "encoded").exists() or not any((charrnn_home / "encoded").iterdir())


@pytest.mark.probe("corpus-disk-full")
def test_too_little_space_is_refused_before_writing(capsys, tmp_path, monkeypatch, charrnn_home):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    path = tmp_path / "c.txt"
    path.write_text(make_text(3 << 20))
    code, _, err = cli(capsys, "train", path, "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, f"needs 3.0 MiB in CHARRNN_HOME ({charrnn_home}), 1.0 MiB free")
    assert not (charrnn_home / "encoded").exists()


@pytest.mark.probe("corpus-disk-full")
def test_charrnn_home_that_is_not_a_folder_gives_one_line(capsys, tmp_path, monkeypatch, small_corpus):
    home = tmp_path / "home"
    home.write_text("a file")
    monkeypatch.setenv("CHARRNN_HOME", str(home))
    code, _, err = cli(capsys, "train", small_corpus, "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, "cannot write the encoded corpus in")
    assert "set CHARRNN_HOME to a writable folder" in err and home.read_text() == "a file"


def _tmpfs_train(tmp_path, corpus, size):
    """`charrnn train` with CHARRNN_HOME on a tmpfs of ``size`` in a private mount namespace (None where no
    namespace or mount can be made here)."""
    if not shutil.which("unshare"):
        return None
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        return None
    script = (f'mount -t tmpfs -o size={size} tmpfs {mnt} && CHARRNN_HOME={mnt} "$@"; code=$?; '
              f'find {mnt} -mindepth 1 >&2; exit $code')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "charrnn", "train",
                           str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.probe("corpus-disk-full")
def test_charrnn_home_on_a_full_tmpfs(capsys, tmp_path, monkeypatch, charrnn_home):
    # This was a bus error (exit 135, no message), with a temporary file of the corpus's size left behind.
    path = tmp_path / "c.txt"
    path.write_text(make_text(3 << 20))
    r = _tmpfs_train(tmp_path, path, "1M")
    if r is None:          # no mount namespace here: the same failure, from a patched write
        _no_space_write(monkeypatch)
        code, _, err = cli(capsys, "train", path, "--out", tmp_path / "run", "--max-steps", 1, *TINY)
        one_line_error(code, err, "needs 3.0 MiB in CHARRNN_HOME")
        return
    # The error, and nothing listed by `find` in the tmpfs afterwards.
    one_line_error(r.returncode, r.stderr, "not enough disk space to encode the corpus: it needs 3.0 MiB in "
                   f"CHARRNN_HOME ({tmp_path / 'mnt'}), 1.0 MiB free")
    assert not (tmp_path / "run").exists()


@pytest.mark.probe("corpus-path-absolute")
def test_a_corpus_path_is_recorded_absolute_and_an_old_relative_one_is_taken_from_here(tmp_path, monkeypatch):
    from charrnn.evaluation import held_out_ids

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "small.txt").write_text(make_text(2_000))
    monkeypatch.chdir(tmp_path)
    c = load_corpus("data/small.txt")
    assert c.describe()["name"] == str(tmp_path / "data" / "small.txt")
    old_config = {"corpus": {"name": "data/small.txt"}, "training": {"val_fraction": 0.1}}
    assert len(held_out_ids(old_config, c.vocab)[0]) == 200
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(CharRNNError, match=f"the run's corpus data/small.txt is not found from {tmp_path / 'data'}; "
                                           "pass corpus PATH"):
        held_out_ids(old_config, c.vocab)
    assert len(held_out_ids({**old_config, "corpus": c.describe()}, c.vocab)[0]) == 200


@pytest.mark.slow
@pytest.mark.probe("corpus-path-absolute")
def test_a_run_records_its_corpus_absolute_and_evaluates_from_anywhere(capsys, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "small.txt").write_text(make_text(20_000))
    monkeypatch.chdir(tmp_path)
    charrnn.train("data/small.txt", "run", progress=False, max_steps=1, **TINY_KW)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["corpus"]["name"] == str(tmp_path / "data" / "small.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli(capsys, "eval", tmp_path / "run", "--json")
    assert code == 0, err
    assert json.loads(out)["chars"] > 0

    # A run of an older version recorded the path as typed: it still evaluates from where it was trained,
    # and elsewhere says what to do.
    config["corpus"]["name"] = "data/small.txt"
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, "eval", tmp_path / "run")
    one_line_error(code, err, f"the run's corpus data/small.txt is not found from {elsewhere}; pass --corpus PATH")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "eval", "run", "--json")
    assert code == 0, err


@pytest.mark.probe("corpus-named-offline")
def test_an_unknown_name_or_a_failed_download_says_what_to_do(capsys, tmp_path, monkeypatch, charrnn_home):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = cli(capsys, "train", "shakespeare", "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, "set CHARRNN_DATA to a directory holding tinyshakespeare.txt")
    assert "cannot download corpus 'shakespeare'" in err and "Network is unreachable" in err
    assert not list((charrnn_home / "corpora").iterdir())         # no partial download left
    code, _, err = cli(capsys, "train", "nietzche", "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, "not a named corpus (nietzsche, shakespeare); give the path of a text file or folder")
    home = tmp_path / "home"
    home.write_text("a file, where the download would go")
    monkeypatch.setenv("CHARRNN_HOME", str(home))
    code, _, err = cli(capsys, "train", "shakespeare", "--out", tmp_path / "run", "--max-steps", 1, *TINY)
    one_line_error(code, err, f"cannot save corpus 'shakespeare' in {home / 'corpora'}")
    assert "set CHARRNN_DATA to a directory holding tinyshakespeare.txt" in err


def _peak_rss_train(tmp_path, corpus, *options):
    """Run `charrnn train` in a process of its own: (result, its peak RSS in MiB)."""
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", str(corpus), "--out", str(tmp_path / "run"),
                             *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(600, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, proc.stderr.read(), usage.ru_maxrss / 1024


@pytest.mark.slow
@pytest.mark.probe("corpus-huge-line")
def test_a_50_mb_single_line_trains_in_bounded_memory(tmp_path):
    path = tmp_path / "line.txt"
    with path.open("w") as f:
        for _ in range(50):
            f.write(make_text(1 << 20).replace("\n", " "))
    code, err, peak = _peak_rss_train(tmp_path, path, "--max-steps", 1, "--val-fraction", "0.001", *TINY)
    assert code == 0, err
    print(f"50 MB single line: peak RSS {peak:.0f} MiB")
    assert peak < 1024, peak


@pytest.mark.slow
@pytest.mark.probe("corpus-huge-vocab")
def test_100000_distinct_characters_train_in_bounded_memory(tmp_path):
    # The evaluation's logits once took 16 streams x 256 steps x 100,001 ids x 4 bytes = 1.6 GB at a time.
    chars = [chr(c) for c in range(0x100, 0x100 + 110_000) if not 0xD800 <= c < 0xE000][:100_000]
    path = tmp_path / "wide.txt"
    path.write_text("".join(chars) * 2)
    code, err, peak = _peak_rss_train(tmp_path, path, "--max-steps", 1, "--val-fraction", "0.05",
                                      "--sample-length", 20, *TINY)
    assert code == 0, err
    assert len(json.loads((tmp_path / "run" / "vocab.json").read_text())["chars"]) == 100_000
    print(f"100,000 distinct characters: peak RSS {peak:.0f} MiB")
    assert peak < 1536, peak
