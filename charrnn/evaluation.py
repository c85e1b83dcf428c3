"""Loss, bits per character and perplexity of a model on a text, as validation and `charrnn eval` measure it.

Importing this module does not import the training code: loading a run to evaluate or to
generate from it needs none of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import tokenized
from .corpus import load_corpus, recorded_corpus
from .data import eval_streams, split_train_val
from .distributed import SINGLE, Dist
from .errors import CharRNNError, OptionError, options_error
from .hardware import autocast
from . import ops
from .models.charlm import CharLM
from .threads import ThreadPolicy
from .vocab import UNK_ID

LN2 = math.log(2)
LOGITS_BYTES = 256 << 20  # the most memory one evaluation chunk's float32 logits take


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of ``logits (..., V)`` summed over the ``targets`` that are scored, and their number:
    every target but ``[UNK]`` (no model predicts the text an unknown word stands for) and padding (-100)."""
    targets = targets.reshape(-1).masked_fill(targets.reshape(-1) == UNK_ID, -100)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=-100, reduction="sum")
    return total, (targets >= 0).sum()


def scores(total: float, targets: int, unk_tokens: int, chars: int | None = None, unk_chars: int | None = None
           ) -> dict:
    """The figures of a text's loss ``total`` (nats), summed over its ``targets`` but the ``unk_tokens`` of them
    that are ``[UNK]``, which are not scored: ``{"loss", "perplexity"}`` per scored token, ``{"bpc",
    "nats_per_char"}`` per scored character (the ``chars`` the targets cover less the ``unk_chars`` inside
    ``[UNK]``; default one character per target, a character model); the counts ``{"tokens", "chars"}`` scored,
    ``{"unk_tokens", "unk_chars"}`` not, and ``"unk_share"``, the share of the characters not scored."""
    tokens, chars = targets - unk_tokens, chars or targets
    unk_chars = unk_tokens if unk_chars is None else unk_chars
    if not tokens:
        raise CharRNNError("every token of the text is [UNK] (outside the run's vocabulary): nothing to score; "
                           "evaluate on text in the run's own words")
    scored = chars - unk_chars
    return {"loss": total / tokens, "bpc": total / scored / LN2, "nats_per_char": total / scored,
            "perplexity": math.exp(min(total / tokens, 700)), "tokens": tokens, "chars": scored,
            "unk_tokens": unk_tokens, "unk_chars": unk_chars, "unk_share": unk_chars / chars}


def unscored_note(r: dict) -> str:
    """What a bits/char figure leaves out, as a clause to print after it ("" when it scores everything)."""
    if not r.get("unk_chars"):
        return ""
    return (f"; {r['unk_share']:.1%} of the characters ({r['unk_chars']:,}) lie in {r['unk_tokens']:,} [UNK] tokens "
            "and are not scored")


@torch.no_grad()
def evaluate(model: CharLM, ids: np.ndarray, seq_len: int = 256, n_streams: int = 16,
             device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
             dist: Dist = SINGLE, chars: int | None = None, unk_chars: int | None = None,
             scored: np.ndarray | None = None, label: int = 0) -> dict:
    """The loss of every id of ``ids`` (but the first), each predicted once, but ``[UNK]``.

    The text is cut into ``n_streams`` contiguous streams that run side by side; each
    is read in chunks of ``seq_len`` with the recurrent state carried between chunks,
    as char-rnn evaluates.  Returns :func:`scores`: ``chars`` are the characters the targets cover,
    ``unk_chars`` those inside ``[UNK]`` targets (default: one per target).  ``scored``, a boolean per id, leaves
    the targets where it is False out as ``[UNK]`` targets are (a character model scored over the characters a
    word model predicts: benchmarks/bits_per_char.py).

    ``label``: a labelled model (:mod:`charrnn.labels`) reads ``ids`` under that label.

    Under data parallelism (``dist`` active; every rank calls this) each rank reads its own
    share of the streams and the loss sums are added up over the ranks, so every rank gets
    the figure one process would compute.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x, y = eval_streams(ids, n_streams)
    if scored is not None:              # laid out as the targets: 2 scored, 1 not (padding -100)
        y = y.masked_fill(eval_streams(np.asarray(scored, dtype=np.int32) + 1, n_streams)[1] == 1, UNK_ID)
    targets, unk_tokens = int((y >= 0).sum()), int((y == UNK_ID).sum())
    total = torch.zeros((), dtype=torch.float64, device=device)
    mine = dist.share(x.shape[0])
    x, y = x[mine], y[mine]
    state = None
    # Shorter chunks where the vocabulary is large: the logits of one chunk stay within LOGITS_BYTES.
    seq_len = max(1, min(seq_len, LOGITS_BYTES // (4 * max(1, len(x)) * model.config.vocab_size)))
    try:
        with ThreadPolicy(on=device.type == "cpu") as threads:
            for t in range(0, x.shape[1] if len(x) else 0, seq_len):
                threads.update()
                xb = x[:, t : t + seq_len].to(device=device, dtype=torch.int64) + label * model.config.vocab_size
                yb = y[:, t : t + seq_len].to(device=device, dtype=torch.int64)
                with autocast(device, amp_dtype), ops.evaluation():
                    logits, state = model(xb, state)
                total += loss_sum(logits, yb)[0].double()
    finally:
        model.train(was_training)
    dist.sum_(total)
    return scores(float(total), targets, unk_tokens, chars, unk_chars)


def label_parts(splits: list, vocab) -> dict[int, tuple[np.ndarray, int, int]]:
    """The validation parts of a labelled corpus's per-label :class:`charrnn.tokenized.Splits` (None: a label
    without text), by label id: (ids, the characters their targets cover, those inside ``[UNK]`` targets)."""
    from .tokenized import unknown

    return {label: (np.asarray(sp.val), sp.val_chars, unknown(vocab, sp.val[1:], sp.val_chars)[1])
            for label, sp in enumerate(splits) if sp is not None and len(sp.val) > 1}


def evaluate_labels(model: CharLM, parts: dict[int, tuple[np.ndarray, int, int]], labels: list[str],
                    **options) -> dict:
    """A labelled model (:mod:`charrnn.labels`) on each label's text (:func:`label_parts`), each read under its
    label with :func:`evaluate`'s ``options``: the figures over all of them (every label's text weighing as its
    characters do), and each label's own under ``"labels"`` (name -> :func:`scores`)."""
    per_label, nats, targets, unk_tokens, chars, unk_chars = {}, 0.0, 0, 0, 0, 0
    for label, (ids, n_chars, n_unk_chars) in parts.items():
        r = evaluate(model, ids, label=label, chars=n_chars, unk_chars=n_unk_chars, **options)
        per_label[labels[label]] = r
        nats += r["loss"] * r["tokens"]
        targets, unk_tokens = targets + r["tokens"] + r["unk_tokens"], unk_tokens + r["unk_tokens"]
        chars, unk_chars = chars + r["chars"] + r["unk_chars"], unk_chars + r["unk_chars"]
    return {**scores(nats, targets, unk_tokens, chars, unk_chars), "labels": per_label}


def held_out_ids(run_config: dict, vocab, corpus: str | None = None,
                 val_fraction: float | None = None) -> tuple[np.ndarray, int]:
    """The text a trained run is evaluated on, as ids of its ``vocab``, and the characters its targets cover:
    the validation split of the corpus it was trained on (``run_config`` is its config.json), or all of
    ``corpus`` (its last ``val_fraction`` when given, split as training splits it); normalised as in
    training."""
    if corpus is None:
        corpus, val_fraction = recorded_split(run_config)
    data = _load(corpus, run_config)
    if vocab.kind == "char":
        ids = data.reencode(vocab)
        ids = split_train_val(ids, val_fraction)[1] if val_fraction else ids
        chars = len(ids) - 1
    elif val_fraction:
        splits = tokenized.split(data, val_fraction, vocab.kind, vocab=vocab)
        ids, chars = splits.val, splits.val_chars
    else:
        ids = vocab.encode(tokenized.corpus_text(data))
        chars = tokenized.target_chars(vocab, ids, len(data))
    if len(ids) < 2:
        raise CharRNNError(f"{'the validation split of ' if val_fraction else ''}corpus {corpus} is shorter than "
                           "two tokens; nothing to evaluate")
    return ids, chars


def held_out_text(corpus: str, val_fraction: float | None = None) -> str:
    """All of ``corpus`` as text, or its last ``val_fraction`` (the characters a run's validation split holds)."""
    data = load_corpus(corpus)
    cut = len(split_train_val(data.ids, val_fraction)[0]) if val_fraction else 0
    return tokenized.corpus_text(data, cut)


def training_ids(run_config: dict, vocab) -> np.ndarray:
    """The training split of the corpus a run was trained on, as ids of its ``vocab``."""
    corpus, fraction = recorded(run_config, "its training split sets the scale of dynamic evaluation's steps; "
                                             "train it with this charrnn")
    data = _load(corpus, run_config)
    if vocab.kind == "char":
        return split_train_val(data.reencode(vocab), fraction)[0]
    return tokenized.split(data, fraction, vocab.kind, vocab=vocab).train


def recorded_split(run_config: dict) -> tuple[str, float]:
    """The corpus a run was trained on and its validation fraction, which ``charrnn eval RUN`` reads; an error
    naming ``--corpus`` when either is missing."""
    corpus, val_fraction = recorded(run_config, "pass {corpus}")
    if not val_fraction:
        raise OptionError("corpus", "the run has no validation split ({val_fraction} 0); pass {corpus}")
    return corpus, val_fraction


def recorded(run_config: dict, fix: str) -> tuple[str, float]:
    """The corpus a run was trained on and its validation fraction; ``fix`` ends the error when it is not recorded
    (a template that may name options: ``{corpus}``)."""
    name = run_config.get("corpus", {}).get("name")
    if not name:
        raise options_error("this run does not record its corpus; " + fix)
    return recorded_corpus(name), run_config.get("training", {}).get("val_fraction", 0.1)


def _load(corpus: str, run_config: dict):
    """``corpus`` normalised as the run's training normalised its text."""
    norm = run_config.get("training", {})
    return load_corpus(corpus, lowercase=norm.get("lowercase", False),
                       newlines_to_spaces=norm.get("newlines_to_spaces", False))
