"""Dynamic evaluation (Krause et al., "Dynamic Evaluation of Neural Sequence Models", 2018): the model
adapts to the text as it reads it.

The text is read once, in order, in segments of ``segment`` ids, the recurrent state carried.  Each
segment is scored with the current weights *before* the model trains on it, so every id is predicted
from what came before it only.  Then one gradient step on that segment, normalised by the root mean
squared gradients of the training data (``MS_g``, measured once on training segments), with a decay
back toward the trained weights ``θ₀``:

    θ ← θ − lr · g / (√MS_g + ε) + decay · (θ₀ − θ) ⊙ min(√MS_g / mean(√MS_g), 1 / decay)

(the paper's "RMS with a global prior").  The model adapted is a copy: the run's weights are never
changed, on disk or in memory.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .errors import OptionError
from .evaluation import scores
from .hardware import check_rows_fit
from .models.charlm import CharLM
from .options import DynamicOptions
from .threads import ThreadPolicy
from .vocab import UNK_ID

EPS = 1e-5
PROGRESS_AFTER = 2.0    # seconds: reading a text that takes longer than this shows a progress bar


def gradient_rms(model: CharLM, train_ids: np.ndarray, segment: int, batches: int = 20, rows: int = 16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """√MS_g: the root mean squared gradient of each weight over ``batches`` batches of ``rows`` random
    training segments (the normalisation the adaptation steps use).  A ``segment`` (``--dynamic-segment``)
    whose backward pass the memory here cannot hold, or that ``rows`` times over is longer than the training
    split, is refused before any work."""
    device = next(model.parameters()).device
    check_rows_fit(device, "dynamic_segment", segment, 1, model.config.training_bytes(rows, segment))
    most = max(1, (len(train_ids) - 1) // rows)
    if segment > most:
        raise OptionError("dynamic_segment", "must be at most {most:,} for this run: the step sizes are measured on "
                                             "{rows} segments of its training split ({ids:,} ids) at a time; got "
                                             "{value:,}", most=most, rows=rows, ids=len(train_ids), value=segment)
    rng = np.random.default_rng(seed)
    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()        # no dropout: the same network the adaptation trains
    try:
        for _ in range(batches):
            starts = rng.integers(0, max(1, len(train_ids) - segment - 1), rows)
            x = torch.from_numpy(np.stack([train_ids[s:s + segment] for s in starts]).astype(np.int64)).to(device)
            y = torch.from_numpy(np.stack([train_ids[s + 1:s + segment + 1] for s in starts]).astype(np.int64))
            model.zero_grad()
            with torch.enable_grad():
                logits, _ = model(x)
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.to(device).reshape(-1)).backward()
            for n, p in model.named_parameters():
                squares[n] += p.grad.detach() ** 2 / batches
    finally:
        model.zero_grad()
        model.train(was_training)
    return {n: s.sqrt() for n, s in squares.items()}


class Adapter:
    """A copy of a model that adapts to what it reads (the update in the module docstring)."""

    def __init__(self, model: CharLM, rms: dict[str, torch.Tensor], options: DynamicOptions):
        self.model = copy.deepcopy(model).eval()
        self.lr, self.decay, self.segment = options.dynamic_lr, options.dynamic_decay, options.dynamic_segment
        self.rms = rms
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        mean = torch.cat([r.flatten() for r in rms.values()]).mean()
        self.pull = {n: (r / mean).clamp(max=1 / self.decay) * self.decay if self.decay else None
                     for n, r in rms.items()}

    def read(self, x: torch.Tensor, y: torch.Tensor, state=None) -> tuple[float, object]:
        """Score ``y`` after ``x`` (ids ``(t,)``) with the current weights, then take one adaptation step on
        them; the summed loss (nats) of its scored targets (all but ``[UNK]``) and the state after ``x``."""
        self.model.zero_grad()
        with torch.enable_grad():
            logits, state = self.model(x[None], state)
            losses = F.cross_entropy(logits[0].float(), y, reduction="none")
            losses.mean().backward()         # learning from every target, [UNK] too, as training does
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p -= self.lr * p.grad / (self.rms[n] + EPS)
                if self.pull[n] is not None:
                    p += self.pull[n] * (self.start[n] - p)
        return float(losses.detach()[y != UNK_ID].sum()), _detach(state)


    def read_all(self, ids, progress: bool = False) -> float:
        """Read ``ids`` in order, a segment at a time (each scored, then learned from); the summed loss of
        every id but the first.  ``progress``: a progress bar on stderr once it takes a while."""
        from tqdm import tqdm

        device = next(self.model.parameters()).device
        seq = torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)
        total, state, seg = 0.0, None, self.segment
        with tqdm(total=len(seq) - 1, unit="token", desc="adapting", delay=PROGRESS_AFTER,
                  disable=not progress) as bar, ThreadPolicy(on=device.type == "cpu") as threads:
            for start in range(0, len(seq) - 1, seg):
                threads.update()
                x, y = seq[start:start + seg], seq[start + 1:start + seg + 1]
                loss, state = self.read(x[:len(y)], y, state)
                total += loss
                bar.update(len(y))
        return total


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def dynamic_evaluate(model: CharLM, ids: np.ndarray, rms: dict[str, torch.Tensor], options: DynamicOptions,
                     chars: int | None = None, unk_chars: int | None = None) -> dict:
    """The loss of ``ids`` (every id but the first, each scored once, but ``[UNK]``) read with dynamic evaluation:
    :func:`charrnn.evaluation.scores` (``chars`` and ``unk_chars`` as :func:`charrnn.evaluation.evaluate` takes
    them) and the options used."""
    total = Adapter(model, rms, options).read_all(ids)
    unk_tokens = int(np.count_nonzero(np.asarray(ids[1:]) == UNK_ID))
    return {**scores(total, len(ids) - 1, unk_tokens, chars, unk_chars), "dynamic_lr": options.dynamic_lr,
            "dynamic_decay": options.dynamic_decay, "dynamic_segment": options.dynamic_segment}
