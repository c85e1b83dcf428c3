"""Labelled corpora: texts that each carry a label (an author, a genre, a speaker), for one model that generates
by label (``charrnn train CORPUS --labels``).

A labelled corpus is a folder whose sub-folders are the labels, each holding ``.txt`` files (``.txt`` files in the
folder itself are unlabelled text), or a manifest: a ``.tsv`` file of ``label<TAB>path`` lines, each path a file
or a folder of ``.txt`` files, relative to the manifest (an empty label is unlabelled).  Label 0 is always
:data:`UNLABELLED`: text without a label trains it, and generation without a label uses it.

Every label's text is read as any corpus is (:func:`charrnn.corpus.load_corpus`: cached, checked, normalised)
and re-encoded with one vocabulary, the union of their characters.  The model reads ids in label space,
``label * vocab_size + id`` (:class:`charrnn.models.CharLM`), so the training windows, the fused kernels and the
sampling step are a plain model's; targets are plain ids.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import EncodedCorpus, load_corpus
from .errors import CharRNNError, OptionError
from .vocab import Vocab

UNLABELLED = "unlabelled"
MANIFEST_SUFFIX = ".tsv"
FORBIDDEN = ",="        # a label request's separators (a=0.7,b=0.3)


@dataclass
class LabelledCorpus:
    """Each label's text (its parts, in order) under one vocabulary; ``labels[0]`` is :data:`UNLABELLED`."""

    name: str
    labels: list[str]
    parts: list[list[EncodedCorpus]]
    vocab: Vocab
    sha256: str
    lowercase: bool = False
    newlines_to_spaces: bool = False

    def __len__(self) -> int:
        return sum(len(p) for ps in self.parts for p in ps)

    def ids(self, label: int, vocab: Vocab | None = None) -> np.ndarray:
        """Label ``label``'s text as ids of ``vocab`` (default :attr:`vocab`), its parts one after another."""
        vocab = vocab or self.vocab
        pieces = [part.reencode(vocab) for part in self.parts[label]]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=vocab.dtype)

    def corpus(self, label: int, vocab: Vocab | None = None) -> EncodedCorpus:
        """Label ``label``'s text as one corpus, in ``vocab``'s characters (default :attr:`vocab`)."""
        digest = hashlib.sha256(" ".join(p.sha256 for p in self.parts[label]).encode()).hexdigest()
        return EncodedCorpus(f"{self.name}#{self.labels[label]}", self.ids(label, vocab), vocab or self.vocab,
                             digest, self.lowercase, self.newlines_to_spaces)

    def splits(self, val_fraction: float, vocab=None) -> list:
        """Every label's :class:`charrnn.tokenized.Splits` (training and validation ids, and the characters they
        cover) under ``vocab``: the run's (a character vocabulary re-encodes the text; a word or BPE one reads
        it), default :attr:`vocab`.  The last ``val_fraction`` of each label's text is its validation part."""
        from .tokenized import split

        vocab = vocab or self.vocab
        out = []
        for label in range(len(self.labels)):
            corpus = self.corpus(label, self.vocab)
            if not len(corpus.ids):
                out.append(None)
                continue
            out.append(split(corpus, val_fraction, vocab.kind, vocab=None if vocab is self.vocab else vocab))
        return out

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "chars": len(self),
                "labels": {label: sum(len(p) for p in ps) for label, ps in zip(self.labels, self.parts)},
                "lowercase": self.lowercase, "newlines_to_spaces": self.newlines_to_spaces}

    def training_text(self, val_fraction: float) -> str:
        """Every label's training part as text, one after another (what a word or BPE vocabulary learns from)."""
        from .data import split_train_val
        from .tokenized import corpus_text

        texts = []
        for label in range(len(self.labels)):
            corpus = self.corpus(label)
            cut = len(split_train_val(corpus.ids, val_fraction)[0]) if val_fraction else len(corpus.ids)
            texts.append(corpus_text(corpus, 0, cut))
        return "".join(texts)


def _check_name(label: str, where: str) -> str:
    label = label.strip()
    if any(c in label for c in FORBIDDEN):
        raise CharRNNError(f"label '{label}' ({where}) holds ',' or '=', which separate labels in a request such as "
                           "--label a=0.7,b=0.3; rename it")
    return label or UNLABELLED


def _sources(spec: str) -> dict[str, list[str]]:
    """Each label's corpus specs (files or folders), from a folder of label folders or a manifest."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found: dict[str, list[str]] = {}
        unlabelled = [str(p) for p in sorted(path.iterdir()) if p.suffix == ".txt" and p.is_file()]
        if unlabelled:
            found[UNLABELLED] = unlabelled
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found.setdefault(_check_name(sub.name, f"folder {sub}"), []).append(str(sub))
        if set(found) <= {UNLABELLED}:
            raise CharRNNError(f"corpus {spec} has no label folders; --labels reads a folder whose sub-folders are "
                               f"the labels (each holding .txt files), or a {MANIFEST_SUFFIX} manifest")
        return found
    if path.is_file() and path.suffix == MANIFEST_SUFFIX:
        return _manifest(path)
    raise CharRNNError(f"corpus {spec} is neither a folder of label folders nor a {MANIFEST_SUFFIX} manifest of "
                       "label<TAB>path lines, which --labels reads")


def _manifest(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CharRNNError(f"cannot read the manifest {path} ({e}); give a UTF-8 file of label<TAB>path lines") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, tab, file = line.partition("\t")
        if not tab or not file.strip():
            raise CharRNNError(f"{path} line {n} is not label<TAB>path: {line[:80]!r}")
        target = (path.parent / file.strip()).expanduser()
        if not target.exists():
            raise CharRNNError(f"{path} line {n}: {target} does not exist; fix the path (relative to the manifest)")
        found.setdefault(_check_name(label, f"{path} line {n}"), []).append(str(target))
    if not found:
        raise CharRNNError(f"the manifest {path} lists no files; give label<TAB>path lines")
    return found


def load_labelled(spec: str, lowercase: bool = False, newlines_to_spaces: bool = False,
                  progress: bool = True) -> LabelledCorpus:
    """The labelled corpus ``spec`` (a folder of label folders, or a manifest), every label's text read."""
    sources = _sources(spec)
    labels = [UNLABELLED, *sorted(label for label in sources if label != UNLABELLED)]
    parts = []
    for label in labels:
        loaded = []
        for source in sources.get(label, []):
            try:
                loaded.append(load_corpus(source, lowercase=lowercase, newlines_to_spaces=newlines_to_spaces,
                                          download=False, progress=progress))
            except CharRNNError as e:
                raise CharRNNError(f"label '{label}': {e}") from None
        parts.append(loaded)
    chars = sorted({c for ps in parts for p in ps for c in p.vocab.chars})
    digest = hashlib.sha256("\n".join(f"{label}\t{p.sha256}" for label, ps in zip(labels, parts)
                                      for p in ps).encode("utf-8")).hexdigest()
    return LabelledCorpus(str(Path(spec).expanduser().resolve()), labels, parts, Vocab(chars), digest, lowercase,
                          newlines_to_spaces)


def shown(text: str, limit: int = 40) -> str:
    """``text`` as an error message quotes it: cut at ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def label_weights(request: str | None, labels: list[str]) -> np.ndarray:
    """The weight of every label (summing to 1) that ``request`` asks for: a label's name, or a weighted mix
    ``a=0.7,b=0.3`` (weights scaled to sum to 1); ``None`` or empty: :data:`UNLABELLED`."""
    weights = np.zeros(len(labels))
    if request is None or not str(request).strip():
        weights[0] = 1.0
        return weights
    for piece in str(request).split(","):
        name, eq, value = piece.partition("=")
        name = name.strip()
        if name not in labels:
            raise OptionError("label", "'{value}' is not one of the run's labels: {known}", value=shown(name),
                              known=", ".join(labels))
        try:
            w = float(value) if eq else 1.0
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w > 0):
            raise OptionError("label", "weights must be positive numbers, as in a=0.7,b=0.3; got '{value}'",
                              value=shown(piece.strip()))
        weights[labels.index(name)] += w
    return weights / weights.sum()


def requested_weights(request: str | None, labels: list[str]) -> np.ndarray:
    """:func:`label_weights` for a model with the label names ``labels``; a model without labels (``labels``
    empty) takes no request, and its one weight is 1."""
    if not labels:
        if request is not None:
            raise OptionError("label", "applies to a model trained with --labels; this one has no labels")
        return np.ones(1)
    return label_weights(request, labels)


def label_index(request: str | None, labels: list[str]) -> int:
    """The one label ``request`` names (None: unlabelled, 0), for a model with the label names ``labels`` (none:
    a model without labels); an OptionError for any other label, or a mix (evaluation and exported models read
    one label)."""
    weights = requested_weights(request, labels)
    if np.count_nonzero(weights) > 1:
        raise OptionError("label", "asks for a mix of labels ({value}): only generation from a run directory mixes "
                                   "labels; give one label here", value=shown(request))
    return int(np.argmax(weights))
