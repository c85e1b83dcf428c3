"""From one array of ids to training batches and validation streams.

The corpus stays one array (usually memory-mapped); batches are cut from it by
index arithmetic.  Validation is the last ``val_fraction`` of the text,
contiguous, as in nanoGPT's character-level Shakespeare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import OptionError


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the ids for training, the rest for validation."""
    if not 0 <= val_fraction < 1:
        raise OptionError("val_fraction", "must be in [0, 1), got {value}", value=val_fraction)
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): the data order of any epoch can be rebuilt
    # on resume from two integers, without storing a permutation.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


@dataclass
class WindowBatches:
    """Random windows of ``seq_len + 1`` characters, shuffled, in batches of ``batch_size``.

    Every epoch picks a random offset in ``[0, window_step)`` and cuts the training text into
    windows starting every ``window_step`` characters from it (by default ``seq_len``: consecutive
    windows then share one character, the last target of one being the first input of the next,
    so each (char, next) pair is used once per epoch), shuffles them and groups them into batches,
    dropping the remainder, like the TensorFlow tutorial's
    ``shuffle(...).batch(64, drop_remainder=True)``.  The Keras recipe's overlapping windows
    (40 characters every 3) are ``seq_len=40, window_step=3``.
    """

    ids: np.ndarray
    seq_len: int
    batch_size: int
    seed: int
    window_step: int | None = None

    def __post_init__(self) -> None:
        self.step = self.window_step or self.seq_len
        if self._n_windows(self.step - 1) < self.batch_size:
            raise OptionError(
                "batch_size",
                f"the training text ({len(self.ids):,} characters) is shorter than one batch of "
                f"{self.batch_size} sequences of {self.seq_len + 1}"
                + (f" every {self.window_step}" if self.window_step else "")
                + "; use a longer corpus or lower {batch_size} / {seq_len}"
                + (" / {window_step}" if self.window_step else "")
            )
        self._epoch = None

    def _n_windows(self, offset: int) -> int:
        return max(0, (len(self.ids) - offset - self.seq_len - 1) // self.step + 1)

    def _plan(self, epoch: int):
        if self._epoch != epoch:
            g = _epoch_generator(self.seed, epoch)
            offset = int(torch.randint(self.step, (1,), generator=g))
            self._perm = torch.randperm(self._n_windows(offset), generator=g).numpy()
            self._offset = offset
            self._epoch = epoch
        return self._offset, self._perm

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._plan(epoch)[1]) // self.batch_size

    def nominal_steps_per_epoch(self) -> int:
        return self._n_windows(self.step // 2) // self.batch_size

    def batch(self, epoch: int, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(batch, seq_len)`` int64 for batch ``step`` of ``epoch``.

        ``rows`` selects part of the batch (a data-parallel rank's share).
        """
        offset, perm = self._plan(epoch)
        windows = perm[step * self.batch_size : (step + 1) * self.batch_size][rows]
        starts = offset + windows.astype(np.int64) * self.step
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(np.asarray(self.ids[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]


@dataclass
class StreamBatches:
    """Contiguous streams for stateful training (truncated back-propagation through time).

    Every epoch the training text, from a random offset in ``[0, seq_len)``, is cut into
    ``batch_size`` contiguous streams of equal length; batch ``k`` holds characters
    ``[k * seq_len, (k + 1) * seq_len]`` of every stream, so row ``i`` of batch ``k + 1``
    continues row ``i`` of batch ``k`` exactly where it stopped, and the recurrent state at
    the end of one batch is the right state to start the next.  Consecutive batches are not
    independent samples: that is the price of learning dependencies longer than ``seq_len``.
    """

    ids: np.ndarray
    seq_len: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self._stream_len(self.seq_len - 1) < self.seq_len:
            raise OptionError(
                "batch_size",
                f"the training text ({len(self.ids):,} characters) is too short for {self.batch_size} "
                f"streams of at least {self.seq_len + 1} characters; use a longer corpus or lower "
                "{batch_size} / {seq_len}"
            )
        self._epoch = None

    def _stream_len(self, offset: int) -> int:
        # Characters of input per stream (each stream also needs one more as the last target).
        return (len(self.ids) - offset - 1) // self.batch_size

    def _offset(self, epoch: int) -> int:
        if self._epoch != epoch:
            self._off = int(torch.randint(self.seq_len, (1,), generator=_epoch_generator(self.seed, epoch)))
            self._epoch = epoch
        return self._off

    def steps_in_epoch(self, epoch: int) -> int:
        return self._stream_len(self._offset(epoch)) // self.seq_len

    def nominal_steps_per_epoch(self) -> int:
        return self._stream_len(self.seq_len // 2) // self.seq_len

    def batch(self, epoch: int, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(batch, seq_len)`` int64: the next ``seq_len`` characters of each stream.

        ``rows`` selects some of the streams (a data-parallel rank's share).
        """
        offset = self._offset(epoch)
        length = self._stream_len(offset)
        streams = np.arange(self.batch_size, dtype=np.int64)[rows]
        starts = offset + streams * length + step * self.seq_len
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(np.asarray(self.ids[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]


@dataclass
class LabelTargets:
    """Batches of label-space ids (``label * vocab_size + id``, :mod:`charrnn.labels`) whose targets are plain ids:
    ``batches``' inputs as they are, its targets modulo ``vocab_size``."""

    batches: WindowBatches | StreamBatches
    vocab_size: int

    @property
    def ids(self) -> np.ndarray:
        return self.batches.ids

    def steps_in_epoch(self, epoch: int) -> int:
        return self.batches.steps_in_epoch(epoch)

    def nominal_steps_per_epoch(self) -> int:
        return self.batches.nominal_steps_per_epoch()

    def batch(self, epoch: int, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.batch(epoch, step, rows)
        return x, y % self.vocab_size


def eval_streams(ids: np.ndarray, n_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a text into ``n_streams`` contiguous streams for evaluation.

    Returns inputs and targets ``(n_streams, length)``; every character but the first is a
    target exactly once, and padding targets are -100 (ignored by the loss).  Evaluating
    the columns in order with the recurrent state carried predicts each character from
    everything before it in its stream.
    """
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise OptionError("val_fraction", "the validation text is shorter than two characters; raise {val_fraction}")
    n_streams = max(1, min(n_streams, n_pred))
    length = -(-n_pred // n_streams)
    # Compact storage (a long validation split must not cost 8 bytes per character); the
    # evaluation loop widens one chunk at a time.
    dtype = torch.int16 if int(np.max(ids)) < 2**15 else torch.int32
    x = torch.zeros(n_streams * length, dtype=dtype)
    y = torch.full((n_streams * length,), -100, dtype=dtype)
    for i in range(0, n_pred, 1 << 24):
        chunk = torch.from_numpy(np.asarray(ids[i : min(i + (1 << 24), n_pred) + 1], dtype=np.int32)).to(dtype)
        x[i : i + len(chunk) - 1] = chunk[:-1]
        y[i : i + len(chunk) - 1] = chunk[1:]
    return x.view(n_streams, length), y.view(n_streams, length)
