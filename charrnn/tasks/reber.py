"""The embedded Reber grammar: strings, corrupted strings, a checker, and a GRU classifier.

The plain Reber grammar (Hochreiter & Schmidhuber's automaton, letters B E P S T V X)::

    0 -B-> 1;  1 -T-> 2 | -P-> 3;  2 -S-> 2 | -X-> 4;  3 -T-> 3 | -V-> 5;
    4 -X-> 3 | -S-> 6;  5 -P-> 4 | -V-> 6;  6 -E-> end

The embedded grammar wraps it: ``B`` ``T|P`` <plain Reber string> ``T|P`` ``E``, with the
same letter in the second and second-to-last place, so a classifier must remember the
second letter across the whole string.

A corrupted string is a grammatical one with one character replaced by a different
letter of the alphabet (re-drawn in the rare case that the result is still grammatical,
so that every label is right).  Everything is seeded: same seed, same strings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CharRNNError
from ..models.classifier import ClassifierConfig, SequenceClassifier
from ..vocab import Vocab
from . import common

ALPHABET = "BEPSTVX"

# state -> list of (letter, next state); None ends the string.
REBER = {
    0: [("B", 1)],
    1: [("T", 2), ("P", 3)],
    2: [("S", 2), ("X", 4)],
    3: [("T", 3), ("V", 5)],
    4: [("X", 3), ("S", 6)],
    5: [("P", 4), ("V", 6)],
    6: [("E", None)],
}

TRICKY = {  # differ only in the second-to-last character
    "BPBTSSSSSSSXXTTVPXVPXTTTTTVVETE": False,
    "BPBTSSSSSSSXXTTVPXVPXTTTTTVVEPE": True,
}


def vocab() -> Vocab:
    return Vocab(sorted(ALPHABET))


def reber_string(rng: random.Random) -> str:
    out, state = [], 0
    while state is not None:
        letter, state = rng.choice(REBER[state])
        out.append(letter)
    return "".join(out)


def embedded_reber_string(rng: random.Random) -> str:
    second = rng.choice("TP")
    return "B" + second + reber_string(rng) + second + "E"


def is_reber(s: str) -> bool:
    state = 0
    for ch in s:
        if state is None:
            return False
        nxt = dict(REBER[state]).get(ch, -1)
        if nxt == -1:
            return False
        state = nxt
    return state is None


def is_embedded_reber(s: str) -> bool:
    return (len(s) >= 4 and s[0] == "B" and s[1] in "TP" and s[-2] == s[1] and s[-1] == "E"
            and is_reber(s[2:-2]))


def corrupt(s: str, rng: random.Random) -> str:
    """``s`` with one character replaced by a different letter of the alphabet."""
    i = rng.randrange(len(s))
    bad = rng.choice(sorted(set(ALPHABET) - {s[i]}))
    return s[:i] + bad + s[i + 1 :]


def corrupted_string(rng: random.Random, embedded: bool = True) -> str:
    make, check = (embedded_reber_string, is_embedded_reber) if embedded else (reber_string, is_reber)
    while True:
        s = corrupt(make(rng), rng)
        if not check(s):
            return s


def dataset(n: int, seed: int, embedded: bool = True) -> tuple[list[str], list[int]]:
    """``n`` strings, half grammatical (label 1) and half corrupted (label 0), shuffled."""
    rng = random.Random(seed)
    make = embedded_reber_string if embedded else reber_string
    items = [(make(rng), 1) for _ in range(n - n // 2)] + [(corrupted_string(rng, embedded), 0) for _ in range(n // 2)]
    rng.shuffle(items)
    return [s for s, _ in items], [y for _, y in items]


# Seeds for the data: training and validation strings come from different streams.
TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 1, 2, 3


def _seed(seed: int, stream: int) -> int:
    return seed * 1000 + stream


@torch.inference_mode()
def predict_proba(model: SequenceClassifier, voc: Vocab, strings: Sequence[str], batch_size: int = 512) -> list[float]:
    common.check_alphabet(voc, strings, "the strings")
    out: list[float] = []
    for i in range(0, len(strings), batch_size):
        ids, lengths = common.pad_batch(voc, strings[i : i + batch_size])
        out.extend(torch.sigmoid(model(ids, lengths)).tolist())
    return out


def accuracy(model, voc, strings, labels) -> float:
    probs = predict_proba(model, voc, strings)
    return sum((p >= 0.5) == bool(y) for p, y in zip(probs, labels)) / len(labels)


DEFAULTS = dict(train_size=10_000, val_size=2_000, epochs=20, batch_size=32, lr=0.005, embed=5, hidden=32, seed=0)


def train(out, *, train_size: int = 10_000, val_size: int = 2_000, epochs: int = 20, batch_size: int = 32,
          lr: float = 0.005, embed: int = 5, hidden: int = 32, seed: int = 0, time_limit: float | None = None,
          force: bool = False, log=None) -> dict:
    """Train a classifier of embedded Reber strings into ``out``; returns the config written (with results)."""
    common.check_options(train_size=train_size, val_size=val_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         embed=embed, hidden=hidden, seed=seed, time_limit=time_limit)
    common.check_model(embed=embed, hidden=hidden)
    if train_size < 2:
        raise CharRNNError("--train-size must be at least 2 (one good and one corrupted string)")
    out = common.new_run_dir(out, force)
    torch.manual_seed(seed)
    voc = vocab()
    strings, labels = dataset(train_size, _seed(seed, TRAIN_STREAM))
    val_strings, val_labels = dataset(val_size, _seed(seed, VAL_STREAM))
    model = SequenceClassifier(ClassifierConfig(len(voc), embed, hidden))
    lengths = [len(s) for s in strings]
    y_all = torch.tensor(labels, dtype=torch.float32)
    def batches(epoch):
        rng = np.random.default_rng([seed, epoch])
        for idx in common.length_bucketed_batches(lengths, batch_size, rng):
            ids, lens = common.pad_batch(voc, [strings[i] for i in idx])
            yield ids, lens, y_all[torch.from_numpy(idx)]

    def loss_fn(m, batch):
        ids, lens, y = batch
        return F.binary_cross_entropy_with_logits(m(ids, lens), y)

    def validate():
        return {"val_accuracy": accuracy(model, voc, val_strings, val_labels)}

    result = common.fit(model, batches, loss_fn, validate, epochs=epochs, lr=lr, time_limit=time_limit, log=log)
    tricky = dict(zip(TRICKY, predict_proba(model, voc, list(TRICKY))))
    cfg = {
        "model": model.config.to_dict(),
        "training": dict(train_size=train_size, val_size=val_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed, time_limit=time_limit),
        "result": {**{k: v for k, v in result.items() if k != "history"},
                   "val_accuracy": result["history"][-1]["val_accuracy"], "tricky": tricky},
    }
    common.save_run(out, "reber", cfg, voc, model)
    return cfg


def load(path) -> tuple[SequenceClassifier, Vocab, dict]:
    cfg, voc, weights = common.read_run(path, "reber")
    try:
        model = SequenceClassifier(ClassifierConfig(**cfg["model"]))
    except (KeyError, TypeError) as e:
        raise CharRNNError(f"{Path(path) / 'config.json'} has no valid model section ({e}); train again") from None
    return common.load_weights(model, weights, path), voc, cfg


def evaluate(path, size: int = 2_000, seed: int = 12345) -> dict:
    """Accuracy on ``size`` freshly generated strings (half corrupted) and the two tricky strings."""
    common.check_options(size=size, seed=seed)
    model, voc, _ = load(path)
    strings, labels = dataset(size, _seed(seed, EVAL_STREAM))
    probs = predict_proba(model, voc, strings)
    correct = sum((p >= 0.5) == bool(y) for p, y in zip(probs, labels))
    tricky = dict(zip(TRICKY, predict_proba(model, voc, list(TRICKY))))
    return {"accuracy": correct / size, "correct": correct, "strings": size, "seed": seed,
            "tricky": {s: {"probability": p, "grammatical": TRICKY[s], "correct": (p >= 0.5) == TRICKY[s]}
                       for s, p in tricky.items()}}
