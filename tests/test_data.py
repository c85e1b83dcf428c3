"""Batching and evaluation streams."""

import numpy as np
import pytest
import torch

from charrnn.data import WindowBatches, eval_streams, split_train_val
from charrnn.errors import CharRNNError


def test_split_keeps_the_last_fraction_contiguous():
    ids = np.arange(1000)
    train, val = split_train_val(ids, 0.1)
    assert len(train) == 900 and (val == np.arange(900, 1000)).all()


def test_each_pair_is_a_target_at_most_once_per_epoch_and_targets_follow_inputs():
    ids = np.arange(5000) % 251
    b = WindowBatches(ids.astype(np.uint8), seq_len=10, batch_size=8, seed=3)
    seen = []
    for step in range(b.steps_in_epoch(0)):
        x, y = b.batch(0, step)
        assert x.shape == (8, 10) and x.dtype == torch.int64
        assert (y[:, :-1] == x[:, 1:]).all()
        seen.append(x[:, 0])
    # Window starts are distinct within an epoch; positions are known from the first input.
    starts = torch.cat(seen)
    assert len(starts) == 8 * b.steps_in_epoch(0)
    assert b.steps_in_epoch(0) >= (5000 // 10 - 1) // 8 - 1


def test_epoch_order_depends_only_on_seed_and_epoch():
    ids = np.arange(3000).astype(np.uint16)
    a = WindowBatches(ids, 10, 4, seed=1)
    b = WindowBatches(ids, 10, 4, seed=1)
    assert torch.equal(a.batch(2, 5)[0], b.batch(2, 5)[0])
    assert not torch.equal(a.batch(0, 0)[0], a.batch(1, 0)[0])
    # A rank's share is a slice of the global batch.
    assert torch.equal(a.batch(0, 1, rows=slice(2, 4))[0], a.batch(0, 1)[0][2:4])


def test_too_short_for_one_batch():
    with pytest.raises(CharRNNError, match="shorter than one batch"):
        WindowBatches(np.zeros(100, dtype=np.uint8), 10, 16, 0)


def test_eval_streams_predict_every_character_once_in_order():
    ids = np.arange(1, 104)
    x, y = eval_streams(ids, 4)
    targets = y[y >= 0]
    assert sorted(targets.tolist()) == list(range(2, 104))
    # Within a stream, each target is the input of the next column.
    mask = y[:, 1:] >= 0
    assert (x[:, 1:][mask] == y[:, :-1][mask]).all()
