"""The character vocabulary: ``[UNK]`` at id 0, then the corpus's characters sorted (a run started from
another run keeps that run's ids and appends the characters the new corpus adds: :meth:`Vocab.grown`).

This is the TensorFlow tutorial's ``StringLookup(vocabulary=sorted(set(text)))``:
66 ids on Tiny Shakespeare.  Encoding is vectorised with NumPy (code points and
``searchsorted``) so a gigabyte of text encodes at memory speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np

from .errors import CharRNNError

UNK = "[UNK]"
UNK_ID = 0


def codepoints(text: str) -> np.ndarray:
    """``text`` as a uint32 array of Unicode code points (no Python loop)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@dataclass
class Vocab:
    """Characters in id order; id 0 is ``[UNK]`` and is never a real character."""

    kind: ClassVar[str] = "char"
    banned: ClassVar[tuple] = ()     # ids never generated besides [UNK] (none: every character is the corpus's)
    chars: list[str]
    # Where each block of characters appended by grown() starts (an index into chars); each block is sorted.
    blocks: list[int] = field(default_factory=list)
    _codes: np.ndarray = field(init=False, repr=False, compare=False)
    _table: np.ndarray | None = field(init=False, repr=False, default=None, compare=False)

    def __post_init__(self) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise CharRNNError("vocabulary entries must be single characters")
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        bounds = [0, *self.blocks, len(codes)]
        if any(not isinstance(b, int) or not 0 < b < len(codes) for b in self.blocks) or bounds != sorted(bounds):
            raise CharRNNError("vocabulary blocks must be increasing positions inside its characters")
        if len(np.unique(codes)) != len(codes) or any(np.any(np.diff(codes[a:b].astype(np.int64)) <= 0)
                                                      for a, b in zip(bounds, bounds[1:])):
            raise CharRNNError("vocabulary characters must be unique and sorted (in each block of appended ones)")
        self._codes = codes
        self._table = None

    @classmethod
    def from_codepoints(cls, codes: np.ndarray) -> "Vocab":
        return cls([chr(int(c)) for c in np.unique(codes)])

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls.from_codepoints(codepoints(text))

    def grown(self, chars) -> "Vocab":
        """This vocabulary with the characters of ``chars`` it lacks appended as a sorted block: its ids keep their
        meaning."""
        new = sorted(set(chars) - set(self.chars))
        return Vocab(self.chars + new, self.blocks + [len(self.chars)]) if new else self

    def __len__(self) -> int:
        """Number of ids, ``[UNK]`` included."""
        return len(self.chars) + 1

    @property
    def size(self) -> int:
        return len(self)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if len(self) <= 256 else np.uint16 if len(self) <= 65536 else np.uint32)

    def encode_codepoints(self, codes: np.ndarray) -> np.ndarray:
        """Map code points to ids; characters not in the vocabulary become ``[UNK]``."""
        if self._table is None:  # one entry per Unicode code point: encoding is a single gather
            table = np.zeros(0x110000, dtype=self.dtype)
            table[self._codes] = np.arange(1, len(self._codes) + 1, dtype=self.dtype)
            self._table = table
        return self._table[codes]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_codepoints(codepoints(text))

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary."""
        codes = np.unique(codepoints(text))
        missing = codes[~np.isin(codes, self._codes)]
        return [chr(int(c)) for c in missing]

    def unknown(self, text: str) -> list[str]:
        return self.unknown_chars(text)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Each id's text as UTF-8 (``b""`` for ``[UNK]``), as the other vocabularies give it (tokens.py)."""
        return [b"", *(c.encode("utf-8") for c in self.chars)]

    def steps_for(self, length: int) -> int:
        return length

    def heal(self, text: str) -> tuple[np.ndarray, bytes]:
        """The ids of ``text``; a character prompt never ends inside a token, so nothing is cut."""
        return self.encode(text).astype(np.int64), b""

    def decode_each(self, ids) -> list[str]:
        """One string per id: its character, ``""`` for ``[UNK]`` (e.g. the next character of each sample)."""
        chars = self.chars
        return [chars[i - 1] if i > 0 else "" for i in (int(x) for x in ids)]

    def decode_array(self, ids: np.ndarray) -> str:
        """The text of an array of ids with no ``[UNK]`` among them (a whole corpus), without a Python loop."""
        codes = np.concatenate([[0], self._codes]).astype(np.uint32)
        return codes[np.asarray(ids)].tobytes().decode("utf-32-le")

    def decode(self, ids) -> str:
        """The text of ``ids`` (``[UNK]`` left out)."""
        return "".join(self.decode_each(ids))

    def id_to_char(self, i: int) -> str:
        return self.chars[i - 1] if i > 0 else UNK

    def to_json(self) -> dict:
        blocks = {"blocks": self.blocks} if self.blocks else {}
        return {"unk": UNK, "unk_id": UNK_ID, "chars": "".join(self.chars), **blocks}

    @classmethod
    def from_json(cls, obj) -> "Vocab":
        """The vocabulary :meth:`to_json` wrote; :class:`CharRNNError` saying what is wrong with anything else."""
        chars = obj.get("chars") if isinstance(obj, dict) else None
        if not isinstance(chars, (str, list)):
            raise CharRNNError("it has no \"chars\" string")
        if obj.get("unk_id", UNK_ID) != UNK_ID:
            raise CharRNNError(f"its [UNK] id is {obj.get('unk_id')!r}, this charrnn reads {UNK_ID}")
        blocks = obj.get("blocks", [])
        if not isinstance(blocks, list):
            raise CharRNNError("its \"blocks\" is not a list")
        return cls(list(chars), blocks)

    def save(self, path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path) -> "Vocab":
        """A vocab.json; a damaged one is refused in one line naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(json.load(f))
        except (ValueError, RecursionError, CharRNNError) as e:   # not UTF-8, not JSON, not a vocabulary
            raise CharRNNError(f"{path} is damaged ({e}); train the run again") from None
