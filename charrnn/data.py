"""From one array of ids to training batches and validation streams.

The corpus stays one array (usually memory-mapped); batches are cut from it by
index arithmetic.  Validation is the last ``val_fraction`` of the text,
contiguous, as in nanoGPT's character-level Shakespeare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import CharRNNError


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the ids for training, the rest for validation."""
    if not 0 <= val_fraction < 1:
        raise CharRNNError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): the data order of any epoch can be rebuilt
    # on resume from two integers, without storing a permutation.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


@dataclass
class WindowBatches:
    """Random windows of ``seq_len + 1`` characters, each pair (char, next) used once per epoch.

    Every epoch picks a random offset in ``[0, seq_len)`` and cuts the training text into
    windows starting every ``seq_len`` characters from it (consecutive windows share one
    character: the last target of one is the first input of the next), shuffles them and
    groups them into batches of ``batch_size``, dropping the remainder, like the
    TensorFlow tutorial's ``shuffle(...).batch(64, drop_remainder=True)``.
    """

    ids: np.ndarray
    seq_len: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.ids) < self.seq_len * self.batch_size + self.seq_len + 1:
            raise CharRNNError(
                f"the training text ({len(self.ids):,} characters) is shorter than one batch of "
                f"{self.batch_size} sequences of {self.seq_len + 1}; use a longer corpus or lower "
                f"--batch-size / --seq-len"
            )
        self._epoch = None

    def _plan(self, epoch: int):
        if self._epoch != epoch:
            g = _epoch_generator(self.seed, epoch)
            offset = int(torch.randint(self.seq_len, (1,), generator=g))
            n_windows = (len(self.ids) - offset - 1) // self.seq_len
            self._perm = torch.randperm(n_windows, generator=g).numpy()
            self._offset = offset
            self._epoch = epoch
        return self._offset, self._perm

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._plan(epoch)[1]) // self.batch_size

    def nominal_steps_per_epoch(self) -> int:
        return (len(self.ids) - self.seq_len // 2 - 1) // self.seq_len // self.batch_size

    def batch(self, epoch: int, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(batch, seq_len)`` int64 for batch ``step`` of ``epoch``.

        ``rows`` selects part of the batch (a data-parallel rank's share).
        """
        offset, perm = self._plan(epoch)
        windows = perm[step * self.batch_size : (step + 1) * self.batch_size][rows]
        starts = offset + windows.astype(np.int64) * self.seq_len
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(np.asarray(self.ids[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def eval_streams(ids: np.ndarray, n_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a text into ``n_streams`` contiguous streams for evaluation.

    Returns inputs and targets ``(n_streams, length)``; every character but the first is a
    target exactly once, and padding targets are -100 (ignored by the loss).  Evaluating
    the columns in order with the recurrent state carried predicts each character from
    everything before it in its stream.
    """
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise CharRNNError("the validation text is shorter than two characters; raise --val-fraction")
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
