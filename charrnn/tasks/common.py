"""What the sequence tasks share: alphabet checks, padded batches, a small training loop,
and the task run directory.

A task run directory holds::

    DIR/config.json          format version, "task", model and training options, results
    DIR/vocab.json           the input characters in id order (id 0 is padding / [UNK])
    DIR/target-vocab.json    (dates) the output characters
    DIR/model.safetensors    the weights

written atomically with :mod:`charrnn.fileio`, like a language-model run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoint import CONFIG, FORMAT_VERSION, VOCAB, prepare_new_run_dir, weights_bytes
from ..config import POSITIVE_INT, POSITIVE_NUMBER, SEED
from ..errors import CharRNNError, OptionError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..hardware import memory_bytes
from ..vocab import Vocab

WEIGHTS = "model.safetensors"
TARGET_VOCAB = "target-vocab.json"


def check_alphabet(vocab: Vocab, texts: Sequence[str], what: str) -> None:
    """Raise a :class:`CharRNNError` naming every character of ``texts`` outside ``vocab``."""
    bad: set[str] = set()
    for t in texts:
        bad.update(vocab.unknown_chars(t))
    empty = [t for t in texts if t == ""]
    if bad:
        shown = ", ".join(repr(c) for c in sorted(bad))
        raise CharRNNError(f"{what} contain characters outside the alphabet {''.join(vocab.chars)!r}: {shown}; "
                           "remove or replace them")
    if empty:
        raise CharRNNError(f"{what} contain an empty string; give at least one character")


def pad_batch(vocab: Vocab, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (batch, longest) padded with 0, lengths (batch,))``: variable lengths, no truncation."""
    lengths = [len(t) for t in texts]
    ids = np.zeros((len(texts), max(lengths)), dtype=np.int64)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = vocab.encode(t)
    return torch.from_numpy(ids), torch.tensor(lengths, dtype=torch.long)


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator,
                            pool: int = 50) -> list[np.ndarray]:
    """Shuffled batches of indices, similar lengths together (sorted within pools of ``pool`` batches)."""
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    chunk = batch_size * pool
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def fit(model: torch.nn.Module, batches: Callable[[int], Iterable], loss_fn: Callable, validate: Callable[[], dict],
        *, epochs: int, lr: float, time_limit: float | None = None, clip: float = 1.0, log=None,
        stop: Callable[[dict], bool] | None = None) -> dict:
    """Adam over ``batches(epoch)`` for ``epochs`` epochs (or until ``time_limit`` seconds or ``stop``),
    each step the language model's own :func:`charrnn.training.optimizer_step`.

    ``validate()`` runs after every epoch and returns a dict of metrics (printed).
    Returns ``{"epochs", "train_time", "cpu_time", "history"}``; times exclude nothing but the
    start-up (validation included, as a user waiting for training sees it).
    """
    from ..training import optimizer_step  # here: a task's predict / evaluate needs no training code

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr * 0.05)
    t0, c0 = time.perf_counter(), time.process_time()
    history = []
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        total, n = 0.0, 0
        for batch in batches(epoch):
            loss = loss_fn(model, batch)
            optimizer_step(opt, loss, model.parameters(), clip)
            total += loss.item()
            n += 1
            if time_limit and time.perf_counter() - t0 > time_limit:
                break
        sched.step()
        model.eval()
        metrics = {"epoch": epoch, "loss": total / max(n, 1), **validate(),
                   "time": round(time.perf_counter() - t0, 1)}
        history.append(metrics)
        log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) and not k == "time" else f"{k} {v}"
                      for k, v in metrics.items()))
        if time_limit and time.perf_counter() - t0 > time_limit:
            log(f"time limit of {time_limit:g} s reached")
            break
        if stop is not None and stop(metrics):
            break
    return {"epochs": epoch, "train_time": round(time.perf_counter() - t0, 2),
            "cpu_time": round(time.process_time() - c0, 2), "history": history}


# What one example costs while a task trains or is evaluated on it: its text, its label or target, and its
# padded ids (int64), with Python's overheads.
EXAMPLE_BYTES = 1024
_EXAMPLES = ("train_size", "val_size", "size")


def check_options(**values) -> None:
    """Refuse, in one line naming the option, a size, count or rate that is not a positive (finite) number, a
    seed out of range (see :data:`charrnn.config.SEED`), or more examples than the memory here holds
    (``None``: not given)."""
    for name, v in values.items():
        if v is None:
            continue
        if name == "seed":
            good, rule = SEED
        elif isinstance(v, float):
            good, rule = POSITIVE_NUMBER
        else:
            good, rule = POSITIVE_INT
        if not good(v):
            raise OptionError(name, rule + ", got {value}", value=v)
        if name in _EXAMPLES:
            check_memory(name, v, v * EXAMPLE_BYTES)


def _past_memory(need: int) -> dict | None:
    """``{need, have}`` in GiB when ``need`` bytes are more than this machine's memory, else None."""
    have = memory_bytes(torch.device("cpu"))
    return dict(need=need / 2**30, have=have / 2**30) if have is not None and need > have else None


def check_memory(option: str, value, need: int) -> None:
    """Refuse ``option`` = ``value`` when it needs ``need`` bytes, more than this machine's memory."""
    if past := _past_memory(need):
        raise OptionError(option, "is {value:,}: that needs about {need:,.1f} GiB, more than the {have:,.1f} GiB "
                                  "of memory here; ask for less", value=value, **past)


def check_model(embed: int, hidden: int) -> None:
    """Refuse an ``embed`` and ``hidden`` whose recurrent weights alone (float32, with their gradients and Adam's
    two moments) are past the memory here."""
    if past := _past_memory(16 * 3 * hidden * (embed + hidden)):
        raise OptionError("hidden", "{embed} {e:,} and {hidden} {h:,} make a model that needs about {need:,.1f} GiB "
                                    "to train, more than the {have:,.1f} GiB of memory here; choose smaller ones",
                          e=embed, h=hidden, **past)


def save_run(out, task: str, cfg: dict, vocab: Vocab, model: torch.nn.Module,
             target_vocab: Vocab | None = None) -> None:
    out = Path(out)
    vocab.save(out / VOCAB)
    if target_vocab is not None:
        target_vocab.save(out / TARGET_VOCAB)
    atomic_write_bytes(out / WEIGHTS, weights_bytes(model, {"format": "pt", "task": task}))
    atomic_write_json(out / CONFIG, {"format_version": FORMAT_VERSION, "task": task, **cfg})


def new_run_dir(out, force: bool) -> Path:
    """Create ``out`` for a new task run; an existing run is only replaced with ``force``."""
    path = Path(out)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CharRNNError(f"{path} is not empty; use --force to replace the run in it, or choose another --out")
    return prepare_new_run_dir(path, force=force)


def read_run(path, task: str) -> tuple[dict, Vocab, dict]:
    """``(config, input vocabulary, weights)`` of a task run, with clear errors for anything else."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise CharRNNError(f"{path} is not a trained {task} run (no {CONFIG}); train one with "
                           f"`charrnn task {task} train --out {path}`")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CharRNNError(f"{cfg_path} is not valid JSON ({e}); train the run again") from None
    if not isinstance(cfg, dict) or cfg.get("task") != task:
        what = f"a {cfg.get('task')} run" if isinstance(cfg, dict) and cfg.get("task") else "a language-model run"
        raise CharRNNError(f"{path} is {what}, not a {task} run; give a directory written by "
                           f"`charrnn task {task} train`")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CharRNNError(f"{path} has format version {cfg.get('format_version')}, this charrnn reads "
                           f"{FORMAT_VERSION}; train the run again")
    for name in (VOCAB, WEIGHTS):
        if not (path / name).is_file():
            raise CharRNNError(f"run directory {path} is incomplete (no {name}); train it again")
    vocab = Vocab.load(path / VOCAB)
    try:
        weights = load_file(str(path / WEIGHTS), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CharRNNError(f"{path / WEIGHTS} cannot be read ({type(e).__name__}); train the run again") from None
    return cfg, vocab, weights


def load_weights(model: torch.nn.Module, weights: dict, path) -> torch.nn.Module:
    try:
        model.load_state_dict(weights)
    except Exception as e:  # noqa: BLE001
        raise CharRNNError(f"the weights in {path} do not fit the model in its config.json "
                           f"({str(e).splitlines()[0][:200]}); train the run again") from None
    return model.eval()
