"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A kill at any moment leaves either the old file or the new one, never half of one; what it can
leave besides is a temporary file named by :func:`is_temp_name`, which the next writer deletes.
New files get the usual mode (``0666`` less the umask).  A full disk is a :class:`NoSpaceError`:
one line saying which file, how much it needed and how much is free, and the file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from .errors import CharRNNError, spell

# Ours (".NAME.RANDOM.tmp"), and the ".tmpRANDOM" that safetensors' save_file (the tempfile crate) writes.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-z_]+\.tmp|\.tmp[0-9A-Za-z]{6}")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def sha256_of(paths, block: int = 16 << 20) -> str:
    """The sha256 of the files ``paths``' bytes, one after another, read ``block`` bytes at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(block), b""):
                digest.update(chunk)
    return digest.hexdigest()


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of an atomic write (one left by a killed writer, unless
    a writer is running)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class NoSpaceError(CharRNNError):
    """A write that found its disk (or quota) full.  ``then`` says what to do about it, a template that
    may name options as ``{field}`` and values given in ``values`` (see :class:`charrnn.errors.OptionError`);
    :meth:`advise` gives the same error with other advice (a caller knows better how to go on)."""

    def __init__(self, path, needed: int, then: str = "free some space and try again", **values):
        self.path, self.needed, self.then, self.values = Path(path), needed, then, values
        try:
            self.free = _size(shutil.disk_usage(self.path.parent).free)
        except OSError:
            self.free = "unknown"
        super().__init__(self.render())

    def render(self, name=str) -> str:
        return (f"no space left on device writing {self.path}: about {_size(self.needed)} needed, {self.free} free; "
                f"{spell(self.then, self.values, name)}")

    def advise(self, then: str, **values) -> NoSpaceError:
        return NoSpaceError(self.path, self.needed, then, **values)

    def __reduce__(self):
        return _no_space_error, (self.path, self.needed, self.then, self.values)


def _no_space_error(path, needed: int, then: str, values: dict) -> NoSpaceError:
    return NoSpaceError(path, needed, then, **values)


def is_full_disk(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling, is a full disk's (or quota's) OSError
    (a library may report a failed write as another error: torch.save raises a RuntimeError)."""
    for _ in range(8):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(path, needed: int):
    """An ``OSError`` of a full disk (or quota) in the block becomes a :class:`NoSpaceError` for ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise NoSpaceError(path, needed) from None


def _new_temp(path: Path):
    """A new file beside ``path``, open for writing, and its name (``open``'s "x" mode: the usual file mode)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return open(tmp, "xb", buffering=0), tmp
        except FileExistsError:
            continue


def _write_all(f, data) -> None:
    """Write all of ``data`` to the unbuffered file ``f`` (a write may take only part of it)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


def atomic_write_bytes(path, *parts) -> None:
    """Replace ``path`` by ``parts`` (bytes or any buffers, one after another): all of it or, after any failure or
    kill, the old file."""
    path = Path(path)
    with reporting_full_disk(path, sum(memoryview(data).nbytes for data in parts)):
        f, tmp = _new_temp(path)
        try:
            with f:
                for data in parts:
                    _write_all(f, data)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_save(path, write) -> None:
    """Replace ``path`` by what ``write(file)`` writes into a new binary file, for data too large to hold in
    memory: all of it or, after any failure or kill, the old file.  Errors (a full disk included) are left
    to the caller to word."""
    path = Path(path)
    raw, tmp = _new_temp(path)
    try:
        with io.BufferedWriter(raw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_folder(folder, write) -> None:
    """Replace the folder ``folder`` (if any) by what ``write(path)`` writes into the new folder ``path``: it is
    built beside (``FOLDER.new``), then swapped in; a failure leaves the old folder as it was."""
    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    try:
        new.mkdir()
        write(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_text(path, text: str) -> None:
    """Add ``text`` at the end of ``path`` (created if missing); a full disk leaves the file as it was."""
    path = Path(path)
    data = text.encode("utf-8")
    with reporting_full_disk(path, len(data)), open(path, "ab", buffering=0) as f:
        end = f.seek(0, os.SEEK_END)
        try:
            _write_all(f, data)
        except OSError:
            f.truncate(end)
            raise
