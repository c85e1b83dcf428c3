"""Word and byte-level BPE vocabularies, built with Hugging Face ``tokenizers``; the character one is vocab.py.

Every vocabulary maps text to ids and back, exactly: decoding the ids of a text gives the text again
(for ``word``, when every token is in the vocabulary).  ``[UNK]`` is id 0 in every kind and is never
generated.

- ``word``: words (``\\w+``), runs of punctuation (``[^\\w\\s]+``) and runs of whitespace (``\\s+``) are the
  tokens, so spaces, tabs and newlines survive decoding; ``max_vocab`` keeps the most frequent tokens of
  the training split and reads the rest as ``[UNK]``.
- ``bpe``: GPT-2's byte-level BPE trained on the training split to ``vocab_size`` ids: any text, in any
  script, encodes without ``[UNK]``.

A run directory holds ``vocab.json`` (``{"kind", "version", "size", "sha256"}``) beside
``tokenizer.json``, the library's own file; a character run's ``vocab.json`` holds its characters
(vocab.py), as it always has.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CharRNNError
from .vocab import UNK, UNK_ID

KINDS = ("char", "word", "bpe")
VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
WORD_PATTERN = r"\w+|[^\w\s]+|\s+"
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


class TokenVocab:
    """A word or BPE vocabulary: a ``tokenizers.Tokenizer`` and each id's text as bytes."""

    def __init__(self, kind: str, tokenizer):
        if tokenizer.token_to_id(UNK) != UNK_ID:
            raise CharRNNError(f"{TOKENIZER_FILE} does not have {UNK} at id {UNK_ID}; retrain the run")
        self.kind, self.tokenizer = kind, tokenizer
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        if kind == "bpe":
            table = _byte_decoder()
            self.token_bytes = [bytes(table[c] for c in t) for t in tokens]
        else:
            self.token_bytes = [t.encode("utf-8") for t in tokens]
        self.token_bytes[UNK_ID] = b""
        self._masks: dict[bytes, np.ndarray] = {}     # starting_with's, by prefix

    @classmethod
    def train(cls, kind: str, text: str, size: int) -> "TokenVocab":
        """A ``kind`` vocabulary of at most ``size`` ids (``[UNK]`` included) learned from ``text``."""
        tk = _library()
        if kind == "word":
            tokenizer = tk.Tokenizer(tk.models.WordLevel(unk_token=UNK))
            tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(WORD_PATTERN), behavior="isolated")
            tokenizer.decoder = tk.decoders.Fuse()
            trainer = tk.trainers.WordLevelTrainer(vocab_size=size, special_tokens=[UNK], show_progress=False)
        elif kind == "bpe":
            tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=UNK))
            tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = tk.decoders.ByteLevel()
            trainer = tk.trainers.BpeTrainer(vocab_size=size, special_tokens=[UNK], show_progress=False,
                                             initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        else:
            raise ValueError(kind)
        tokenizer.train_from_iterator(_chunks(text), trainer, length=None)
        return cls(kind, tokenizer)

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

    def unknown(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` read as ``[UNK]`` (none for ``bpe``; a last word that token healing
        completes is not one)."""
        found = self.tokenizer.encode(text, add_special_tokens=False)
        pieces = [text[a:b] for (a, b), i in zip(found.offsets, found.ids) if i == UNK_ID]
        if pieces and found.ids[-1] == UNK_ID and self.heal(text)[1]:
            pieces.pop()                 # the word a prompt ends inside is completed, not read as [UNK]
        return sorted(set(pieces))

    def heal(self, text: str) -> tuple[np.ndarray, bytes]:
        """Token healing: a prompt may end inside a token ("the qu" of "the quick").  The ids of ``text``
        without its last token, and that token's bytes, which the first generated token must then start
        with; ``(ids, b"")`` when nothing is cut (one token only, or no token starts with the last one)."""
        found = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(found.ids, dtype=np.int64)
        if len(ids) < 2:
            return ids, b""
        a, b = found.offsets[-1]
        tail = self.token_bytes[ids[-1]] if ids[-1] != UNK_ID else text[a:b].encode("utf-8")
        if not self.starting_with(tail).any():
            return ids, b""
        return ids[:-1], tail

    def starting_with(self, prefix: bytes) -> np.ndarray:
        """A mask of the ids whose text starts with ``prefix`` (a new array; the scan is done once per prefix:
        healing, priming and each sample's text stream ask for the same one)."""
        if prefix not in self._masks:
            if len(self._masks) >= MASKS_KEPT:
                self._masks.clear()
            self._masks[prefix] = np.fromiter((b.startswith(prefix) and i != UNK_ID
                                               for i, b in enumerate(self.token_bytes)),
                                              dtype=bool, count=len(self.token_bytes))
        return self._masks[prefix].copy()

    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {"kind": self.kind, "version": VERSION, "size": len(self), "unk_id": UNK_ID,
                "tokenizer": TOKENIZER_FILE, "sha256": self.sha256()}

    def save(self, vocab_path) -> None:
        from .fileio import atomic_write_text

        vocab_path = Path(vocab_path)
        atomic_write_text(vocab_path.parent / TOKENIZER_FILE, self.tokenizer.to_str())
        atomic_write_text(vocab_path, json.dumps(self.to_json()) + "\n")

    @classmethod
    def from_json(cls, meta: dict, tokenizer_json: str) -> "TokenVocab":
        """The vocabulary described by ``meta`` (a vocab.json) and the text of its tokenizer.json."""
        if meta.get("kind") not in KINDS[1:] or meta.get("version") != VERSION:
            raise CharRNNError(f"vocab.json describes a {meta.get('kind')!r} vocabulary of version "
                               f"{meta.get('version')!r}, which this charrnn cannot read; upgrade charrnn")
        if hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest() != meta.get("sha256"):
            raise CharRNNError(f"{TOKENIZER_FILE} is not the one this run was trained with (its checksum differs "
                               "from vocab.json's); restore the run's own file or retrain")
        try:
            tokenizer = _library().Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise CharRNNError(f"{TOKENIZER_FILE} cannot be read ({e}); restore the run's own file") from None
        return cls(meta["kind"], tokenizer)

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
