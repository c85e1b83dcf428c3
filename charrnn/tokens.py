"""Word and byte-level BPE vocabularies, built with Hugging Face ``tokenizers``; the character one is vocab.py.

Every vocabulary maps text to ids and back, exactly: decoding the ids of a text gives the text again
(for ``word``, when every token is in the vocabulary).  ``[UNK]`` is id 0 in every kind and is never
generated.

- ``word``: words (``\\w+``), runs of punctuation (``[^\\w\\s]+``) and runs of whitespace (``\\s+``) are the
  tokens, so spaces, tabs and newlines survive decoding; ``max_vocab`` keeps the most frequent tokens of
  the training split and reads the rest as ``[UNK]``.
- ``bpe``: GPT-2's byte-level BPE trained on the training split to ``vocab_size`` ids: any text, in any
  script, encodes without ``[UNK]``.  Merges are learned within pieces of at most LONGEST_PIECE bytes (a
  longer run without whitespace is cut), so learning stays linear in the text; the bytes the training
  text never holds are never generated (``banned``).

A prompt that is not valid UTF-8 (a command-line argument keeps each undecodable byte as a lone
surrogate) reads each such byte as ``[UNK]``, as a character model reads a character it does not know.

A run directory holds ``vocab.json`` (``{"kind", "version", "size", "unseen_bytes", "sha256"}``) beside
``tokenizer.json``, the library's own file; ``sha256`` covers the tokenizer, the kind and the unseen bytes
(version 1, still read, covered the tokenizer only).  A character run's ``vocab.json`` holds its characters
(vocab.py), as it always has.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CharRNNError
from .vocab import UNK, UNK_ID

KINDS = ("char", "word", "bpe")
MODELS = {"word": "WordLevel", "bpe": "BPE"}     # the tokenizers model of each kind
VERSION = 2                     # vocab.json's; 1 is still read
TOKENIZER_FILE = "tokenizer.json"
WORD_PATTERN = r"\w+|[^\w\s]+|\s+"
LONGEST_PIECE = 64              # BPE learns (and encodes) within pieces of at most this many bytes
UNDECODABLE = re.compile("[\ud800-\udfff]")   # a byte that was not UTF-8, as Python keeps it in a str
MASKS_KEPT = 256                # starting_with's masks kept (one per distinct prompt ending)
CHUNK_CHARS = 1 << 20           # texts are encoded in pieces of about this size, cut before a line


def _library():
    try:
        import tokenizers
    except ImportError:
        raise CharRNNError("word and bpe tokenizers need Hugging Face tokenizers: pip install tokenizers") from None
    return tokenizers


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the character standing for each byte -> the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _chunks(text: str) -> list[str]:
    """``text`` in pieces of about CHUNK_CHARS, each cut where a line starts with a word (a token boundary)."""
    pieces, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = start + CHUNK_CHARS
        while cut < len(text) and not (text[cut - 1] == "\n" and text[cut].isalnum()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _unseen_bytes(pieces: list[str]) -> list[int]:
    """The byte values the UTF-8 of ``pieces`` never holds."""
    seen = np.zeros(256, dtype=bool)
    for piece in pieces:
        seen[np.frombuffer(piece.encode("utf-8"), dtype=np.uint8)] = True
    return np.flatnonzero(~seen).tolist()


def _digest(kind: str, unseen_bytes, tokenizer_json: str, version: int) -> str:
    """vocab.json's checksum: of the tokenizer, its kind and the bytes never generated (version 1: the tokenizer)."""
    covered = tokenizer_json if version == 1 else json.dumps([kind, unseen_bytes]) + "\n" + tokenizer_json
    return hashlib.sha256(covered.encode("utf-8")).hexdigest()


class TokenVocab:
    """A word or BPE vocabulary: a ``tokenizers.Tokenizer`` and each id's text as bytes.

    ``unseen_bytes`` (BPE): the bytes the training text never holds, whose tokens are never generated;
    ``version``: of the vocab.json it was read from (a version 1 file records no unseen bytes)."""

    def __init__(self, kind: str, tokenizer, unseen_bytes: Sequence[int] = (), version: int = VERSION):
        if tokenizer.token_to_id(UNK) != UNK_ID:
            raise CharRNNError(f"{TOKENIZER_FILE} does not have {UNK} at id {UNK_ID}; retrain the run")
        if type(tokenizer.model).__name__ != MODELS[kind]:
            raise CharRNNError(f"{TOKENIZER_FILE} holds a {type(tokenizer.model).__name__} model, not the "
                               f"{MODELS[kind]} of a {kind} vocabulary; restore the run's own files or retrain")
        self.kind, self.tokenizer, self.version = kind, tokenizer, version
        self.unseen_bytes = list(unseen_bytes)
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        if kind == "bpe":
            table = _byte_decoder()
            self.token_bytes = [bytes(table[c] for c in t) for t in tokens]
        else:
            self.token_bytes = [t.encode("utf-8") for t in tokens]
        self.token_bytes[UNK_ID] = b""
        single = {b[0]: i for i, b in enumerate(self.token_bytes) if len(b) == 1}
        self.banned = sorted(single[b] for b in self.unseen_bytes if b in single)   # never generated, as [UNK]
        self._masks: dict[bytes, np.ndarray] = {}     # starting_with's, by prefix

    @classmethod
    def train(cls, kind: str, text: str, size: int, progress: bool = False) -> "TokenVocab":
        """A ``kind`` vocabulary of at most ``size`` ids (``[UNK]`` included) learned from ``text`` (``progress``:
        the library's progress bars, shown on a terminal)."""
        tk = _library()
        pieces = _chunks(text)
        if kind == "word":
            tokenizer = tk.Tokenizer(tk.models.WordLevel(unk_token=UNK))
            tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(WORD_PATTERN), behavior="isolated")
            tokenizer.decoder = tk.decoders.Fuse()
            trainer = tk.trainers.WordLevelTrainer(vocab_size=size, special_tokens=[UNK], show_progress=progress)
        elif kind == "bpe":
            tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=UNK))
            # GPT-2's pieces, each cut every LONGEST_PIECE bytes (ByteLevel has made each byte one character):
            # merges in a piece of n bytes cost n each, so one long piece made learning quadratic.
            tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
                tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
                tk.pre_tokenizers.Split(tk.Regex(f".{{1,{LONGEST_PIECE}}}"), behavior="isolated")])
            tokenizer.decoder = tk.decoders.ByteLevel()
            trainer = tk.trainers.BpeTrainer(vocab_size=size, special_tokens=[UNK], show_progress=progress,
                                             initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        else:
            raise ValueError(kind)
        tokenizer.train_from_iterator(pieces, trainer, length=None)
        return cls(kind, tokenizer, _unseen_bytes(pieces) if kind == "bpe" else ())

    def __len__(self) -> int:
        return len(self.token_bytes)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if len(self) <= 65536 else np.uint32)

    def encode(self, text: str) -> np.ndarray:
        pieces = self.tokenizer.encode_batch(_chunks(text), add_special_tokens=False)
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate([np.asarray(p.ids, dtype=self.dtype) for p in pieces])

    def decode_bytes(self, ids) -> bytes:
        table = self.token_bytes
        return b"".join(table[int(i)] for i in ids)

    def decode(self, ids) -> str:
        """The text of ``ids`` (``[UNK]`` left out; a BPE sequence cut inside a character ends in U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_each(self, ids) -> list[str]:
        """Each id's own text (a BPE token that is part of a character decodes to U+FFFD here)."""
        return [self.token_bytes[int(i)].decode("utf-8", errors="replace") for i in ids]

    @property
    def chars(self) -> list[str]:
        """The single characters that are tokens of their own (a newline, for one)."""
        texts = (t.decode("utf-8", errors="replace") for t in self.token_bytes)
        return [t for t in texts if len(t) == 1 and t != "\ufffd"]

    def steps_for(self, length: int) -> int:
        """The most steps ``length`` characters can take: a BPE token can be one byte of a 4-byte character."""
        return 4 * length if self.kind == "bpe" else length

    def _read(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of a prompt and the characters each covers; an undecodable byte (a lone surrogate) is one
        ``[UNK]``, the text between them is encoded as usual."""
        ids, offsets, start = [], [], 0
        for bad in [*UNDECODABLE.finditer(text), None]:
            end = bad.start() if bad else len(text)
            if end > start:
                found = self.tokenizer.encode(text[start:end], add_special_tokens=False)
                ids += found.ids
                offsets += [(a + start, b + start) for a, b in found.offsets]
            if bad:
                ids.append(UNK_ID)
                offsets.append(bad.span())
                start = bad.end()
        return ids, offsets

    def unknown(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` read as ``[UNK]`` (for ``bpe``, only bytes that are not UTF-8; a last
        word that token healing completes is not one)."""
        ids, offsets = self._read(text)
        pieces = [text[a:b] for (a, b), i in zip(offsets, ids) if i == UNK_ID]
        if pieces and ids[-1] == UNK_ID and self.heal(text)[1]:
            pieces.pop()                 # the word a prompt ends inside is completed, not read as [UNK]
        return sorted(set(pieces))

    def heal(self, text: str) -> tuple[np.ndarray, bytes]:
        """Token healing: a prompt may end inside a token ("the qu" of "the quick").  The ids of ``text``
        without its last token, and that token's bytes, which the first generated token must then start
        with; ``(ids, b"")`` when nothing is cut (one token only, an undecodable byte, or no token that may
        be generated starts with the last one)."""
        found, offsets = self._read(text)
        ids = np.asarray(found, dtype=np.int64)
        if len(ids) < 2:
            return ids, b""
        a, b = offsets[-1]
        if ids[-1] == UNK_ID and UNDECODABLE.match(text, a):
            return ids, b""
        tail = self.token_bytes[ids[-1]] if ids[-1] != UNK_ID else text[a:b].encode("utf-8")
        if not self.starting_with(tail).any():
            return ids, b""
        return ids[:-1], tail

    def starting_with(self, prefix: bytes) -> np.ndarray:
        """A mask of the ids that may be generated and whose text starts with ``prefix`` (a new array; the scan
        is done once per prefix: healing, priming and each sample's text stream ask for the same one)."""
        if prefix not in self._masks:
            if len(self._masks) >= MASKS_KEPT:
                self._masks.clear()
            mask = np.fromiter((b.startswith(prefix) for b in self.token_bytes), dtype=bool,
                               count=len(self.token_bytes))
            mask[[UNK_ID, *self.banned]] = False
            self._masks[prefix] = mask
        return self._masks[prefix].copy()

    def sha256(self) -> str:
        return _digest(self.kind, self.unseen_bytes, self.tokenizer.to_str(), self.version)

    def to_json(self) -> dict:
        unseen = {} if self.version == 1 else {"unseen_bytes": self.unseen_bytes}
        return {"kind": self.kind, "version": self.version, "size": len(self), "unk_id": UNK_ID,
                "tokenizer": TOKENIZER_FILE, **unseen, "sha256": self.sha256()}

    def save(self, vocab_path) -> None:
        from .fileio import atomic_write_text

        vocab_path = Path(vocab_path)
        atomic_write_text(vocab_path.parent / TOKENIZER_FILE, self.tokenizer.to_str())
        atomic_write_text(vocab_path, json.dumps(self.to_json()) + "\n")

    @classmethod
    def from_json(cls, meta: dict, tokenizer_json: str) -> "TokenVocab":
        """The vocabulary described by ``meta`` (a vocab.json) and the text of its tokenizer.json."""
        kind, version, unseen = meta.get("kind"), meta.get("version"), meta.get("unseen_bytes", [])
        if kind not in KINDS[1:] or version not in (1, VERSION):
            raise CharRNNError(f"vocab.json describes a {kind!r} vocabulary of version {version!r}, which this "
                               "charrnn cannot read; upgrade charrnn")
        if _digest(kind, unseen, tokenizer_json, version) != meta.get("sha256"):
            raise CharRNNError(f"{TOKENIZER_FILE} or vocab.json is not the one this run was trained with (vocab.json's "
                               "checksum differs); restore the run's own files or retrain")
        try:
            tokenizer = _library().Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise CharRNNError(f"{TOKENIZER_FILE} cannot be read ({e}); restore the run's own file") from None
        return cls(kind, tokenizer, unseen if version > 1 else (), version)

    @classmethod
    def load(cls, vocab_path, meta: dict) -> "TokenVocab":
        path = Path(vocab_path).parent / TOKENIZER_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CharRNNError(f"{path} cannot be read ({e.__class__.__name__}); restore the run's own file") from None
        return cls.from_json(meta, text)


class TextStream:
    """The text of ``rows`` samples generated one id per step, as whole characters, cut at ``length`` each.

    ``skip[r]`` bytes are dropped from the start of row ``r`` (the prompt's last token, generated again
    after token healing).  ``push(ids)`` gives each row's new text; ``done`` once every row has ``length``
    characters.
    """

    def __init__(self, token_bytes: list[bytes], rows: int, length: int, skip: list[int] | None = None):
        import codecs

        self.token_bytes, self.length = token_bytes, length
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(rows)]
        self.skip = list(skip or [0] * rows)
        self.chars = [0] * rows

    def push(self, ids) -> list[str]:
        pieces = []
        for r, i in enumerate(ids):
            data = self.token_bytes[int(i)]
            cut = min(self.skip[r], len(data))
            self.skip[r] -= cut
            text = self.decoders[r].decode(data[cut:])[: self.length - self.chars[r]]
            self.chars[r] += len(text)
            pieces.append(text)
        return pieces

    @property
    def done(self) -> bool:
        return all(c >= self.length for c in self.chars)

    def select_rows(self, index) -> TextStream:
        """A stream of the rows ``index`` of this one, each where it is (beam search re-orders its beams)."""
        import copy

        rows = [int(r) for r in index]
        new = copy.copy(self)
        new.decoders = [copy.copy(self.decoders[r]) for r in rows]
        new.skip, new.chars = [self.skip[r] for r in rows], [self.chars[r] for r in rows]
        return new


class StopText:
    """Rows of streamed text that end before the first of the ``stops`` texts.

    ``push(pieces)`` gives each row's text that is safe to show: never a stop text, and not yet a tail
    that could still grow into one (held back until it cannot); ``finished[r]`` once row ``r`` met a stop;
    ``flush(r)`` the held-back tail of a row that ended otherwise (at its length).
    """

    def __init__(self, stops: Sequence[str], rows: int):
        self.stops = [s for s in stops if s]
        self.held = [""] * rows
        self.finished = [False] * rows

    def push(self, pieces: Sequence[str]) -> list[str]:
        out = []
        for r, piece in enumerate(pieces):
            if self.finished[r]:
                out.append("")
                continue
            text = self.held[r] + piece
            hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.finished[r], self.held[r] = True, ""
                out.append(text[:min(hits)])
                continue
            keep = self._open_tail(text)
            self.held[r] = text[len(text) - keep:]
            out.append(text[:len(text) - keep])
        return out

    def _open_tail(self, text: str) -> int:
        """The length of the longest end of ``text`` that a stop text starts with."""
        for k in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def flush(self, row: int) -> str:
        tail, self.held[row] = self.held[row], ""
        return tail


def load_vocab(path):
    """A run's vocabulary from its vocab.json: characters (vocab.py), or a word / BPE tokenizer beside it."""
    from .vocab import Vocab

    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None                      # Vocab.load says what is wrong with the file
    if isinstance(meta, dict) and meta.get("kind", "char") != "char":
        return TokenVocab.load(path, meta)
    return Vocab.load(path)
