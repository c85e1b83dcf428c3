"""Reading text: files, directories of ``.txt`` files and named corpora.

A corpus is read once, in chunks, and encoded to a compact array of ids on disk
(``$CHARRNN_HOME/encoded/<key>/ids.npy``) that later runs memory-map.  The key is
made of the files' paths, sizes and modification times and the normalisation
options, so a second run on the same (possibly huge) corpus starts in seconds and
never holds the text in memory as Python objects.

Named corpora (``shakespeare``, ``nietzsche``) are looked up in the cache
(``$CHARRNN_HOME/corpora``), then in ``$CHARRNN_DATA``, then downloaded from the
addresses the original tutorials use, with a progress bar and an integrity check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CharRNNError, OptionError
from .fileio import atomic_save, atomic_write_json, sha256_of
from .vocab import Vocab, codepoints

CHUNK_BYTES = 16 << 20
ENCODING_FORMAT = 2  # the encoded cache's version, part of its key: a new one re-encodes every corpus


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    filename: str
    url: str
    sha256: str
    description: str
    # Copies of nietzsche.txt in circulation differ by a few characters, so only a
    # loose check (length and opening) is possible for it.
    exact: bool = True
    approx_chars: int = 0
    starts_with: str = ""


NAMED_CORPORA = {
    "shakespeare": NamedCorpus(
        "shakespeare",
        "tinyshakespeare.txt",
        "https://storage.googleapis.com/download.tensorflow.org/data/shakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "Tiny Shakespeare (1,115,394 characters), the TensorFlow tutorial's corpus",
    ),
    "nietzsche": NamedCorpus(
        "nietzsche",
        "nietzsche.txt",
        "https://s3.amazonaws.com/text-datasets/nietzsche.txt",
        "dea01ca2da603db6736fd856c585d073ccf3dca68efe4a59c5e73242cdf0b028",
        "Nietzsche (600,901 characters), the Keras LSTM example's corpus",
        exact=False,
        approx_chars=600_901,
        starts_with="PREFACE",
    ),
}


def charrnn_home() -> Path:
    return Path(os.environ.get("CHARRNN_HOME") or Path.home() / ".cache" / "charrnn")


# --------------------------------------------------------------------------- named corpora


def _check_named(nc: NamedCorpus, path: Path) -> str | None:
    """None if ``path`` holds the named corpus, else what is wrong with it."""
    if nc.exact:
        digest = sha256_of([path], CHUNK_BYTES)
        return None if digest == nc.sha256 else f"sha256 {digest} is not the expected {nc.sha256}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    if not text.startswith(nc.starts_with) or abs(len(text) - nc.approx_chars) > nc.approx_chars // 100:
        return f"it does not look like {nc.filename} ({len(text):,} characters, expected about {nc.approx_chars:,})"
    return None


def named_corpus_locations(name: str) -> list[tuple[str, Path]]:
    """Where a named corpus is looked for, in order: (label, path)."""
    nc = NAMED_CORPORA[name]
    places = [("cache", charrnn_home() / "corpora" / nc.filename)]
    if os.environ.get("CHARRNN_DATA"):
        places.append(("$CHARRNN_DATA", Path(os.environ["CHARRNN_DATA"]) / nc.filename))
    return places


def find_named_corpus(name: str) -> Path | None:
    for _, path in named_corpus_locations(name):
        if path.is_file():
            return path
    return None


def download_named_corpus(name: str, progress: bool = True) -> Path:
    """Download a named corpus into the cache, checking its integrity."""
    nc = NAMED_CORPORA[name]
    dest = charrnn_home() / "corpora" / nc.filename
    how_to = (
        f"download {nc.url} yourself and put it at {dest}, or set CHARRNN_DATA to a directory holding {nc.filename}"
    )
    try:
        return _download(nc, dest, how_to, progress)
    except OSError as e:  # writing it: a full disk, a CHARRNN_HOME that cannot be written
        raise CharRNNError(f"cannot save corpus '{name}' in {dest.parent} ({e.strerror}); {how_to}") from None


def _download(nc: NamedCorpus, dest: Path, how_to: str, progress: bool) -> Path:
    from tqdm import tqdm

    name = nc.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{nc.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(nc.url, timeout=30) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {nc.filename}",
                              disable=not progress, leave=False) as bar:
                        for block in iter(lambda: resp.read(1 << 16), b""):
                            out.write(block)
                            bar.update(len(block))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                reason = getattr(e, "reason", None) or e
                raise CharRNNError(f"cannot download corpus '{name}' ({reason}); {how_to}") from None
        if not nc.exact:  # the Keras copy: drop a byte-order mark, CRLF -> LF
            raw = Path(tmp).read_bytes()
            Path(tmp).write_bytes(raw.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n"))
        problem = _check_named(nc, Path(tmp))
        if problem:
            raise CharRNNError(f"downloaded corpus '{name}' failed its integrity check ({problem}); {how_to}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_named_corpus(name: str, download: bool = True, progress: bool = True) -> Path:
    nc = NAMED_CORPORA[name]
    for label, path in named_corpus_locations(name):
        if path.is_file():
            problem = _check_named(nc, path)
            if problem:
                raise CharRNNError(
                    f"{path} ({label}) is not the expected {nc.filename}: {problem}; replace or delete it"
                )
            return path
    if not download:
        raise CharRNNError(f"corpus '{name}' is not available; set CHARRNN_DATA to a directory holding {nc.filename}")
    return download_named_corpus(name, progress=progress)


# --------------------------------------------------------------------------- files


def resolve_corpus_files(spec: str, download: bool = True, progress: bool = True) -> tuple[str, list[Path]]:
    """``spec`` (a path, a directory or a corpus name) -> (display name, files).

    A path's display name is absolute (it is stored in the run's config.json, which is read from
    other directories); a named corpus is named by its name.
    """
    path = Path(spec).expanduser()
    kind = _path_kind(path)
    if kind == "file":
        return os.path.abspath(path), [path]
    if kind == "directory":
        return os.path.abspath(path), _text_files_in(path, spec)
    if kind is not None:
        raise CharRNNError(f"corpus path {spec} is {kind}, not a file; give a text file or a folder of .txt files")
    if spec in NAMED_CORPORA:
        return spec, [resolve_named_corpus(spec, download=download, progress=progress)]
    if os.sep in spec or "." in spec:
        raise CharRNNError(f"corpus path {spec} does not exist; check the path")
    known = ", ".join(sorted(NAMED_CORPORA))
    raise CharRNNError(f"unknown corpus '{spec}': not a file or directory, and not a named corpus ({known}); "
                       "give the path of a text file or folder, or one of those names")


def recorded_corpus(name: str) -> str:
    """The corpus a run's config.json names, checked: a path (absolute; older runs stored it as typed, and a
    relative one is taken from the current directory) or a corpus name."""
    if Path(name).expanduser().exists() or name in NAMED_CORPORA:
        return name
    where = "" if os.path.isabs(name) else f" from {os.getcwd()}"
    raise OptionError("corpus", "the run's corpus {name} is not found{where}; pass {corpus} PATH to evaluate on "
                                "it where it is now", name=name, where=where)


def _path_kind(path: Path) -> str | None:
    """"file", "directory", what else ``path`` is (a FIFO, a symlink loop...), or None if it does not exist."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        raise CharRNNError(f"cannot read corpus path {path} ({e.strerror}); check the path and its "
                           "permissions") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _text_files_in(path: Path, spec: str) -> list[Path]:
    """The regular ``.txt`` files of a corpus folder, sorted by name."""
    try:
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and _path_kind(p) == "file")
    except OSError as e:
        raise CharRNNError(f"cannot list directory {spec} ({e.strerror}); check its permissions") from None
    if not files:
        raise CharRNNError(f"directory {spec} holds no .txt files; point to a text file or a folder of .txt files")
    return files


# Byte-order marks of the encodings a text file is most often in when it is not UTF-8 (UTF-32's first).
_FOREIGN_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
                 b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _not_utf8(path: Path, data: bytes, start: int, offset: int) -> CharRNNError:
    """The error for a file that is not UTF-8: UTF-16/32 named by its byte-order mark, anything else by its first
    bad byte (Latin-1 text is the usual case)."""
    if offset == 0:
        for bom, encoding in _FOREIGN_BOMS.items():
            if data.startswith(bom):
                return CharRNNError(f"{path} is {encoding} text (it starts with a {encoding} byte-order mark), not "
                                    f"UTF-8; convert it, e.g. iconv -f {encoding} -t UTF-8 {path} > "
                                    f"{path.stem}.utf8.txt")
    return CharRNNError(f"{path} is not UTF-8 text: invalid byte 0x{data[start]:02x} at byte offset {offset + start}; "
                        f"convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8 {path} > {path.stem}.utf8.txt "
                        "if it is Latin-1")


def _open_corpus_file(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _disappeared(path) from None
    except OSError as e:
        raise CharRNNError(f"cannot read {path} ({e.strerror}); check the file and its permissions") from None


def _normalise(text: str, lowercase: bool, newlines_to_spaces: bool) -> str:
    """Line endings are kept as written (CRLF, CR or LF); with ``newlines_to_spaces`` each one, of any kind,
    becomes one space."""
    if lowercase:
        text = text.lower()
    if newlines_to_spaces:
        text = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return text


def _iter_text(files: list[Path], lowercase: bool, newlines_to_spaces: bool, hasher=None):
    """Yield the normalised text of ``files`` in chunks, checking that it is UTF-8."""
    for path in files:
        offset = 0  # byte offset in this file of data[0]
        pending = b""
        first = True
        with _open_corpus_file(path) as f:
            while True:
                try:
                    block = f.read(CHUNK_BYTES)
                except OSError as e:
                    raise CharRNNError(f"cannot read {path} ({e.strerror}); check the file and the disk") from None
                if hasher is not None:
                    hasher.update(block)
                data = pending + block
                final = not block
                if first:
                    first = False
                    if data.startswith(b"\xef\xbb\xbf"):
                        data, offset = data[3:], 3
                try:
                    text, pending = data.decode("utf-8"), b""
                except UnicodeDecodeError as e:
                    if not final and e.end == len(data) and len(data) - e.start < 4:
                        text, pending = data[: e.start].decode("utf-8"), data[e.start :]
                    else:
                        raise _not_utf8(path, data, e.start, offset) from None
                if newlines_to_spaces and not final and text.endswith("\r"):  # a CRLF cut in two: one space
                    text, pending = text[:-1], b"\r" + pending
                offset += len(data) - len(pending)
                text = _normalise(text, lowercase, newlines_to_spaces)
                if text:
                    yield text
                if final:
                    break


def read_text(spec: str, lowercase: bool = False, newlines_to_spaces: bool = False) -> str:
    """The whole normalised text of a corpus as one string (for small corpora and tests)."""
    _, files = resolve_corpus_files(spec)
    return "".join(_iter_text(files, lowercase, newlines_to_spaces))


def check_regular_file(path: Path, option: str, fix: str = "give a UTF-8 text file") -> None:
    """Refuse, in one line naming the command-line ``option``, a ``path`` that is not a regular file: missing, a
    folder, or a FIFO or device (which would block, or never end)."""
    kind = _path_kind(path)
    if kind is None:
        raise CharRNNError(f"{option} {path}: no such file; {fix}")
    if kind != "file":
        raise CharRNNError(f"{option} {path} is {'a directory' if kind == 'directory' else kind}, not a regular "
                           f"file; {fix}")


def read_text_file(path: str, option: str) -> str:
    """The text of the UTF-8 file ``path`` that the command-line ``option`` names, checked as a corpus file is."""
    check_regular_file(Path(path).expanduser(), option)
    return "".join(_iter_text([Path(path).expanduser()], False, False))


# --------------------------------------------------------------------------- encoded corpora


@dataclass
class EncodedCorpus:
    """A corpus as one array of ids (memory-mapped from the cache) and its vocabulary."""

    name: str
    ids: np.ndarray
    vocab: Vocab
    sha256: str
    lowercase: bool = False
    newlines_to_spaces: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "chars": len(self.ids),
            "lowercase": self.lowercase,
            "newlines_to_spaces": self.newlines_to_spaces,
        }

    def reencode(self, vocab: Vocab) -> np.ndarray:
        """The ids under another vocabulary (characters it lacks become ``[UNK]``)."""
        table = np.zeros(len(self.vocab), dtype=vocab.dtype)
        table[1:] = vocab.encode_codepoints(self.vocab._codes)
        out = np.empty(len(self.ids), dtype=vocab.dtype)
        for i in range(0, len(self.ids), CHUNK_BYTES):
            out[i : i + CHUNK_BYTES] = table[self.ids[i : i + CHUNK_BYTES]]
        return out


def _file_stats(files: list[Path]) -> list[os.stat_result]:
    """The files' stats when reading starts: they make the cache key, and a file whose stat differs after
    reading changed while it was read."""
    try:
        return [p.stat() for p in files]
    except FileNotFoundError as e:
        raise _disappeared(e.filename) from None
    except OSError as e:
        raise CharRNNError(f"cannot read {e.filename} ({e.strerror}); check the file and its permissions") from None


def _cache_key(files: list[Path], stats: list[os.stat_result], lowercase: bool, newlines_to_spaces: bool) -> str:
    parts = [f"v{ENCODING_FORMAT}", f"lower={lowercase}", f"nl={newlines_to_spaces}"]
    for p, st in zip(files, stats):
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def load_corpus(
    spec: str,
    lowercase: bool = False,
    newlines_to_spaces: bool = False,
    download: bool = True,
    progress: bool = True,
) -> EncodedCorpus:
    """Resolve, read, normalise and encode a corpus, through the on-disk cache."""
    name, files = resolve_corpus_files(spec, download=download, progress=progress)
    stats = _file_stats(files)
    cache = charrnn_home() / "encoded" / _cache_key(files, stats, lowercase, newlines_to_spaces)
    cached = _read_cache(cache)
    if cached is None:                       # not encoded yet, or a damaged cache: (re)encode it
        _encode_to_cache(files, stats, cache, lowercase, newlines_to_spaces, progress)
        cached = _read_cache(cache)
        if cached is None:
            raise CharRNNError(f"the encoded corpus in {cache} cannot be read back after writing it; check the disk, "
                               "or set CHARRNN_HOME to another folder")
    meta, vocab, ids = cached
    if len(ids) == 0:
        raise CharRNNError(f"corpus {name} is empty; give a file with some text in it")
    return EncodedCorpus(name, ids, vocab, meta["sha256"], lowercase, newlines_to_spaces)


def _read_cache(cache: Path) -> tuple[dict, Vocab, np.ndarray] | None:
    """The cached ``meta.json``, vocabulary and memory-mapped ids, checked against each other; None when the
    cache is missing or damaged in any way (then it is encoded again)."""
    try:
        meta = json.loads((cache / "meta.json").read_text(encoding="utf-8"))
        vocab = Vocab(list(meta["chars"]))
        ids = np.load(cache / "ids.npy", mmap_mode="r", allow_pickle=False)
        good = (meta["format"] == ENCODING_FORMAT and isinstance(meta["sha256"], str) and ids.ndim == 1
                and ids.dtype == vocab.dtype and len(ids) == meta["length"]
                and (len(ids) == 0 or int(ids.max()) < len(vocab)))
    except (OSError, ValueError, EOFError, RecursionError, KeyError, TypeError, CharRNNError):
        return None
    return (meta, vocab, ids) if good else None


_STEADY = "train on a copy that nothing writes to or removes while charrnn reads it"


def _changed(files: list[Path], stats: list[os.stat_result]) -> CharRNNError | None:
    """The error for a corpus file whose stat is no longer ``stats``' (None if none changed)."""
    for path, before in zip(files, stats):
        try:
            after = path.stat()
        except FileNotFoundError:
            return _disappeared(path)
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
            return CharRNNError(f"{path} changed while it was being read ({before.st_size:,} bytes, now "
                                f"{after.st_size:,}); {_STEADY}")
    return None


def _disappeared(path) -> CharRNNError:
    return CharRNNError(f"{path} disappeared while the corpus was being read; {_STEADY}")


def _check_unchanged(files: list[Path], stats: list[os.stat_result]) -> None:
    error = _changed(files, stats)
    if error:
        raise error


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{-(-nbytes // 1024):,} KiB"


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(needed: int, free: int | None = None) -> CharRNNError:
    have = "" if free is None else f", {_size(free)} free"
    return CharRNNError(f"not enough disk space to encode the corpus: it needs {_size(needed)} in CHARRNN_HOME "
                        f"({charrnn_home()}){have}; free some space there or set CHARRNN_HOME to a folder on "
                        "a larger disk")


def _encode_to_cache(files, stats, cache: Path, lowercase, newlines_to_spaces, progress) -> None:
    """Read the corpus twice (its characters, then their ids) into ``cache``; nothing is left of a failed try."""
    from tqdm import tqdm

    total_bytes = sum(st.st_size for st in stats)
    show = progress and total_bytes > (64 << 20)
    # Pass 1: the character set, the length and the checksum.
    hasher = hashlib.sha256()
    seen = np.zeros(0x110000, dtype=bool)
    n = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="scanning corpus", disable=not show) as bar:
        for text in _iter_text(files, lowercase, newlines_to_spaces, hasher):
            cps = codepoints(text)
            seen |= np.bincount(cps, minlength=0x110000).astype(bool)
            n += len(cps)
            bar.update(len(text))
    _check_unchanged(files, stats)
    vocab = Vocab.from_codepoints(np.flatnonzero(seen))
    meta = {"format": ENCODING_FORMAT, "sha256": hasher.hexdigest(), "chars": "".join(vocab.chars), "length": n,
            "files": [str(p.resolve()) for p in files]}
    needed = 4096 + n * vocab.dtype.itemsize + 4 * len(meta["chars"])  # the ids, their header and meta.json
    free = _free_bytes(cache)
    if needed > free:
        raise _no_space(needed, free)
    made = not cache.exists()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Pass 2: the ids, written in order (never through a memory map: a full disk must fail a write, not
        # kill the process with SIGBUS) to a temporary file renamed into place, then the metadata.
        def write(out):
            with tqdm(total=n, unit="char", unit_scale=True, desc="encoding corpus", disable=not show) as bar:
                _write_ids(out, _encoded(files, vocab, lowercase, newlines_to_spaces, n, stats), vocab.dtype, n, bar)
            _check_unchanged(files, stats)

        atomic_save(cache / "ids.npy", write)
        try:
            atomic_write_json(cache / "meta.json", meta)
        except BaseException:
            (cache / "ids.npy").unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(needed) from None
        raise CharRNNError(f"cannot write the encoded corpus in {cache} ({e.strerror}); set CHARRNN_HOME to a "
                           "writable folder") from None
    finally:
        if made and not (cache / "meta.json").exists():
            with contextlib.suppress(OSError):
                cache.rmdir()


def _encoded(files, vocab: Vocab, lowercase, newlines_to_spaces, n: int, stats):
    """The ids of the corpus in chunks; a corpus that now holds more than ``n`` characters changed."""
    pos = 0
    for text in _iter_text(files, lowercase, newlines_to_spaces):
        ids = vocab.encode(text)
        pos += len(ids)
        if pos > n:
            break
        yield ids
    if pos != n:
        raise _changed(files, stats) or CharRNNError(f"the corpus changed while it was being read; {_STEADY}")


def _write_ids(out, chunks, dtype: np.dtype, n: int, bar) -> None:
    """Write a ``.npy`` file of ``n`` ids of ``dtype`` from ``chunks`` to the open file ``out``."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(out, header)
    for ids in chunks:
        out.write(ids.tobytes())
        bar.update(len(ids))


def corpora_status() -> list[dict]:
    """For ``charrnn corpora``: each named corpus and where it is (or is not) available."""
    rows = []
    for name, nc in NAMED_CORPORA.items():
        path = find_named_corpus(name)
        where = [f"{label}: {p}" for label, p in named_corpus_locations(name)]
        rows.append({
            "name": name,
            "description": nc.description,
            "available": path is not None,
            "path": str(path) if path else None,
            "searched": where,
            "url": nc.url,
        })
    return rows


def clear_encoded_cache() -> None:
    shutil.rmtree(charrnn_home() / "encoded", ignore_errors=True)
