"""A corpus read by a run's vocabulary: the training and validation ids, cut at the same character.

Every tokenizer splits the text at the same character (the last ``val_fraction`` of the characters is
validation, as for a character model), so runs with different tokenizers are validated on the same
text, and :attr:`Splits.val_chars` turns their per-token losses into losses per character.

A word or BPE vocabulary is trained on the training split only; it and the ids it gives are cached
under ``$CHARRNN_HOME/encoded/tokens/`` (keyed by the corpus, the tokenizer and the split), so a second
run on the same corpus starts at once.  Cached ids are checked as the character cache is (corpus.py):
``PART.json`` beside ``PART.npy`` names the vocabulary, the corpus and the span they encode, their length
and checksum; ids that fail any check are encoded again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import BPE_VOCAB
from .corpus import EncodedCorpus, charrnn_home
from .data import split_train_val
from .errors import CharRNNError, OptionError
from .fileio import atomic_save, atomic_write_json
from .tokens import VERSION, TokenVocab
from .vocab import UNK_ID, Vocab

CHUNK_IDS = 1 << 24     # ids counted at a time (a corpus's ids may be a memory-mapped file)


@dataclass
class Splits:
    vocab: Vocab | TokenVocab
    train: np.ndarray
    val: np.ndarray
    val_chars: int        # the characters of the validation text its targets (every id but the first) cover
    train_chars: int      # the characters of the training text

    @property
    def chars_per_token(self) -> float:
        """Of the training text: turns a loss per token into one per character, tokens/s into chars/s."""
        return self.train_chars / max(len(self.train), 1)


def corpus_text(corpus: EncodedCorpus, start: int = 0, stop: int | None = None) -> str:
    """Characters ``start:stop`` of an encoded (character) corpus, as text."""
    return corpus.vocab.decode_array(corpus.ids[start:stop])


def target_chars(vocab, ids: np.ndarray, chars: int) -> int:
    """The characters covered by ``ids[1:]`` of a text of ``chars`` characters."""
    return chars - len(vocab.decode(ids[:1])) if len(ids) else 0


def id_counts(ids: np.ndarray, size: int) -> np.ndarray:
    """How often each of the ``size`` ids occurs in ``ids``."""
    counts = np.zeros(size, dtype=np.int64)
    for i in range(0, len(ids), CHUNK_IDS):
        counts += np.bincount(np.asarray(ids[i : i + CHUNK_IDS]), minlength=size)
    return counts


def unknown(vocab, ids: np.ndarray, chars: int) -> tuple[int, int]:
    """(the ``[UNK]`` ids among ``ids``, the characters they stand for, of the ``chars`` that ``ids`` spell): text
    no model predicts, which losses and bits per character leave out."""
    if not any(np.any(np.asarray(ids[i : i + CHUNK_IDS]) == UNK_ID) for i in range(0, len(ids), CHUNK_IDS)):
        return 0, 0                                  # most texts: a pass far cheaper than counting every id
    counts = id_counts(ids, len(vocab))
    lengths = np.array([len(b.decode("utf-8", errors="replace")) for b in vocab.token_bytes])
    return int(counts[UNK_ID]), chars - int(counts @ lengths)


def split(corpus: EncodedCorpus, val_fraction: float, tokenizer: str = "char", size: int | None = None,
          vocab: TokenVocab | None = None, progress: bool = False) -> Splits:
    """The corpus as ids of ``vocab`` (a run's own, on resume, or the one it starts from) or of a new
    ``tokenizer`` vocabulary of ``size`` ids (--max-vocab; default: every word, or BPE_VOCAB subwords) learned
    from the training split (``progress``: with the library's progress bars)."""
    if tokenizer == "char":
        ids = corpus.ids if vocab is None or vocab.chars == corpus.vocab.chars else corpus.reencode(vocab)
        train, val = split_train_val(ids, val_fraction)
        return Splits(vocab or corpus.vocab, train, val, max(len(val) - 1, 0), len(train))
    train, val = split_train_val(corpus.ids, val_fraction)
    cut = len(train)
    key = _key(corpus, tokenizer, size, val_fraction)
    if vocab is None:
        target = size or (BPE_VOCAB if tokenizer == "bpe" else 1 << 31)     # word: every token
        vocab = _cached_vocab(key) or _train_vocab(key, tokenizer, corpus_text(corpus, 0, cut), target, progress)
        if size is not None and len(vocab) < size:
            raise OptionError("max_vocab", "is {value:,}, but the training split gives only {n:,} {kind} ids "
                                           "([UNK] included); give at most {n:,}, or leave it out",
                              value=size, n=len(vocab), kind=tokenizer)
    folder = charrnn_home() / "encoded" / "tokens" / _key(corpus, vocab.sha256(), None, val_fraction)
    ids = [_cached_ids(folder, part, vocab, corpus, span) for part, span in
           (("train", (0, cut)), ("val", (cut, len(corpus.ids))))]
    return Splits(vocab, ids[0], ids[1], target_chars(vocab, ids[1], len(corpus.ids) - cut), cut)


def _key(corpus: EncodedCorpus, *parts) -> str:
    text = json.dumps([corpus.sha256, corpus.lowercase, corpus.newlines_to_spaces, *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cached_vocab(key: str) -> TokenVocab | None:
    path = charrnn_home() / "encoded" / "tokens" / key / "vocab.json"
    try:
        vocab = TokenVocab.load(path, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, CharRNNError):     # missing or damaged: learn it again
        return None
    return vocab if vocab.version == VERSION else None      # an older charrnn's: learn it as this one does


def _train_vocab(key: str, kind: str, text: str, size: int, progress: bool) -> TokenVocab:
    vocab = TokenVocab.train(kind, text, size, progress)
    folder = charrnn_home() / "encoded" / "tokens" / key
    folder.mkdir(parents=True, exist_ok=True)
    vocab.save(folder / "vocab.json")
    return vocab


def _cached_ids(folder: Path, part: str, vocab: TokenVocab, corpus: EncodedCorpus, span) -> np.ndarray:
    """Characters ``span`` of ``corpus`` as ids of ``vocab``: the cached ``part``, or encoded (again)."""
    path = folder / f"{part}.npy"
    meta = {"vocab": vocab.sha256(), "corpus": corpus.describe(), "span": list(span)}
    ids = _read_ids(path, meta, vocab)
    if ids is None:                  # not encoded yet, or a damaged cache
        ids = vocab.encode(corpus_text(corpus, *span))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda f: np.save(f, ids))
        atomic_write_json(path.with_suffix(".json"), {**meta, "length": len(ids), "sha256": _checksum(ids)})
    return ids


def _checksum(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids)).hexdigest()


def _read_ids(path: Path, meta: dict, vocab: TokenVocab) -> np.ndarray | None:
    """The memory-mapped ids at ``path`` if its ``.json`` is ``meta`` (the vocabulary, corpus and span they
    encode) and they have the length, the range and the checksum it records; else None."""
    try:
        saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        good = ({key: saved[key] for key in meta} == meta and ids.ndim == 1 and ids.dtype == vocab.dtype
                and len(ids) == saved["length"] and (len(ids) == 0 or int(ids.max()) < len(vocab))
                and _checksum(ids) == saved["sha256"])
    except (OSError, ValueError, EOFError, RecursionError, KeyError, TypeError):
        return None
    return ids if good else None
