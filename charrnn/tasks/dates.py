"""Date conversion with a character encoder-decoder: "September 20, 7075" -> "7075-09-20".

Dates are drawn uniformly between 1000-01-01 and 9999-12-31 (seeded).  Days below 10 are
written with or without a leading zero ("May 2, 2020", "May 02, 2020"), half each.

Input ids: 0 is padding, then the characters of the month names, the digits, comma and
space (a :class:`~charrnn.vocab.Vocab`, whose id 0 is ``[UNK]``, serves as padding here and
never appears in an input).  Output ids: 0 is padding, then ``0123456789-``, then the
end-of-sequence and start-of-sequence ids.  Models: :mod:`charrnn.models.seq2seq`.
Decoding: greedy, or beam search (:mod:`charrnn.beam`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import beam as beam_mod
from ..errors import CharRNNError
from ..models.seq2seq import KINDS, Seq2Seq, Seq2SeqConfig
from ..vocab import Vocab
from . import common

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INPUT_CHARS = "".join(sorted(set("".join(MONTHS)) | set("0123456789, ")))
OUTPUT_CHARS = "-0123456789"
FIRST, LAST = dt.date(1000, 1, 1).toordinal(), dt.date(9999, 12, 31).toordinal()
MAX_OUTPUT = 16  # output characters before decoding gives up (a date needs 10)

TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 1, 2, 3


def input_vocab() -> Vocab:
    return Vocab(list(INPUT_CHARS))


def output_vocab() -> Vocab:
    return Vocab(list(OUTPUT_CHARS))


def ids_of(out_vocab: Vocab) -> tuple[int, int]:
    """``(eos_id, sos_id)``: the two ids after the output characters."""
    return len(out_vocab), len(out_vocab) + 1


def render(d: dt.date, leading_zero: bool = False) -> str:
    day = f"{d.day:02d}" if leading_zero else str(d.day)
    return f"{MONTHS[d.month - 1]} {day}, {d.year}"


def dataset(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` random dates: (inputs like "September 20, 7075", targets like "7075-09-20")."""
    rng = np.random.default_rng(seed)
    ordinals = rng.integers(FIRST, LAST + 1, size=n)
    zeros = rng.random(n) < 0.5
    dates = [dt.date.fromordinal(int(o)) for o in ordinals]
    return [render(d, bool(z)) for d, z in zip(dates, zeros)], [d.isoformat() for d in dates]


def _seed(seed: int, stream: int) -> list[int]:
    return [seed, stream]


def encode_targets(out_vocab: Vocab, targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decoder inputs: sos + target, decoder targets: target + eos)``, both (B, L+1), padded with 0."""
    eos, sos = ids_of(out_vocab)
    L = max(len(t) for t in targets)
    tgt = np.zeros((len(targets), L + 1), dtype=np.int64)
    for i, t in enumerate(targets):
        tgt[i, : len(t)] = out_vocab.encode(t)
        tgt[i, len(t)] = eos
    tgt = torch.from_numpy(tgt)
    tgt_in = torch.cat([torch.full((len(targets), 1), sos, dtype=torch.long), tgt[:, :-1]], 1)
    tgt_in[tgt_in == eos] = 0
    return tgt_in, tgt


class DateConverter:
    """A trained model with its alphabets: greedy and beam conversion, batched."""

    def __init__(self, model: Seq2Seq, in_vocab: Vocab, out_vocab: Vocab):
        self.model = model.eval()
        self.in_vocab, self.out_vocab = in_vocab, out_vocab
        self.eos_id, self.sos_id = ids_of(out_vocab)
        self.banned = (0, self.sos_id)

    def _start(self, texts: Sequence[str]):
        common.check_alphabet(self.in_vocab, texts, "the dates")
        src, lengths = common.pad_batch(self.in_vocab, texts)
        return self.model.start(src, lengths)

    def _decode(self, ids: list[int]) -> str:
        return self.out_vocab.decode([i for i in ids if 0 < i < self.eos_id])

    @torch.inference_mode()
    def greedy(self, texts: Sequence[str], batch_size: int = 1000) -> list[tuple[str, float]]:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, state = self._start(texts[i : i + batch_size])
            hyps = beam_mod.greedy_search(self.model.step, ids, state, MAX_OUTPUT, eos_id=self.eos_id,
                                          banned=self.banned)
            out.extend((self._decode(h.ids), h.log_prob) for h in hyps)
        return out

    def check_beam(self, beam_width: int, texts: int, batch_size: int = 500) -> None:
        """Refuse a ``beam_width`` whose candidates (each text's, for every output character, with their
        states, a batch of texts at once) are past the memory here."""
        rows = min(texts, batch_size) * int(beam_width) * len(self.out_vocab)
        common.check_memory("beam_width", beam_width, rows * 16 * (self.model.config.hidden + len(self.out_vocab)))

    @torch.inference_mode()
    def beam(self, texts: Sequence[str], beam_width: int, batch_size: int = 500,
             with_greedy: bool = True) -> list[list[tuple[str, float]]]:
        """The ``beam_width`` best conversions of every text with their log-probabilities, best first
        (``with_greedy=False``: plain beam search, without the greedy output merged in)."""
        search = beam_mod.search if with_greedy else beam_mod.beam_search
        self.check_beam(beam_width, len(texts), batch_size)
        out = []
        for i in range(0, len(texts), batch_size):
            ids, state = self._start(texts[i : i + batch_size])
            results = search(self.model.step, ids, state, MAX_OUTPUT, beam_width, eos_id=self.eos_id,
                             banned=self.banned)
            out.extend([(self._decode(h.ids), h.log_prob) for h in hyps] for hyps in results)
        return out

    @torch.inference_mode()
    def attention(self, text: str) -> tuple[str, np.ndarray]:
        """The greedy conversion of one text and its attention weights (output chars + eos, input chars)."""
        if self.model.config.kind != "attention":
            raise CharRNNError(f"--plot-attention needs a model trained with --model attention; this one is "
                               f"'{self.model.config.kind}'")
        ids, state = self._start([text])
        rows, out = [], []
        for _ in range(MAX_OUTPUT):
            lp, state, w = self.model.step(ids, state, with_attention=True)
            lp[:, list(self.banned)] = float("-inf")
            ids = lp.argmax(-1)
            rows.append(w[0].numpy().copy())
            out.append(int(ids[0]))
            if out[-1] == self.eos_id:
                break
        return self._decode(out), np.stack(rows)


def plot_attention(converter: DateConverter, text: str, path) -> str:
    """Draw the attention weights of one conversion as a heatmap PNG; returns the conversion."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharRNNError("--plot-attention needs matplotlib; install it with `pip install 'charrnn[plot]'` "
                           "(or `pip install matplotlib`)") from None
    output, weights = converter.attention(text)
    out_labels = list(output) + ["<eos>"] * (len(weights) - len(output))
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(text) + 1.5), max(3, 0.45 * len(weights) + 1.2)))
    im = ax.imshow(weights, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(text)), [repr(c)[1:-1] if c != " " else "␣" for c in text])
    ax.set_yticks(range(len(weights)), out_labels)
    ax.set_xlabel("input character")
    ax.set_ylabel("output character")
    ax.set_title(f"{text!r} -> {output!r}")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return output


def accuracy(converter: DateConverter, inputs: Sequence[str], targets: Sequence[str]) -> float:
    preds = converter.greedy(inputs)
    return sum(p == t for (p, _), t in zip(preds, targets)) / len(targets)


def train(out, *, model: str = "attention", train_size: int = 20_000, val_size: int = 1_000, epochs: int = 20,
          batch_size: int = 64, lr: float = 0.003, embed: int = 32, hidden: int = 128, seed: int = 0,
          time_limit: float | None = None, force: bool = False, log=None) -> dict:
    """Train a date converter into ``out``; returns the config written (with results)."""
    if model not in KINDS:
        raise CharRNNError(f"--model must be one of {', '.join(KINDS)}, got '{model}'")
    common.check_options(train_size=train_size, val_size=val_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         embed=embed, hidden=hidden, seed=seed, time_limit=time_limit)
    common.check_model(embed=embed, hidden=hidden)
    out = common.new_run_dir(out, force)
    torch.manual_seed(seed)
    iv, ov = input_vocab(), output_vocab()
    eos, sos = ids_of(ov)
    net = Seq2Seq(Seq2SeqConfig(model, len(iv), len(ov) + 2, eos, sos, embed, hidden))
    inputs, targets = dataset(train_size, _seed(seed, TRAIN_STREAM))
    val_inputs, val_targets = dataset(val_size, _seed(seed, VAL_STREAM))
    src_all, len_all = common.pad_batch(iv, inputs)
    tin_all, tgt_all = encode_targets(ov, targets)
    lengths = len_all.tolist()
    converter = DateConverter(net, iv, ov)

    def batches(epoch):
        rng = np.random.default_rng([seed, 100, epoch])
        for idx in common.length_bucketed_batches(lengths, batch_size, rng):
            idx = torch.from_numpy(idx)
            lens = len_all[idx]
            yield src_all[idx, : int(lens.max())], lens, tin_all[idx], tgt_all[idx]

    def loss_fn(m, batch):
        src, lens, tin, tgt = batch
        logits = m(src, lens, tin)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=0)

    def validate():
        return {"val_accuracy": accuracy(converter, val_inputs, val_targets)}

    result = common.fit(net, batches, loss_fn, validate, epochs=epochs, lr=lr, time_limit=time_limit, log=log)
    cfg = {
        "model": net.config.to_dict(),
        "training": dict(train_size=train_size, val_size=val_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed, time_limit=time_limit),
        "result": {**{k: v for k, v in result.items() if k != "history"},
                   "val_accuracy": result["history"][-1]["val_accuracy"], "parameters": net.num_parameters()},
    }
    common.save_run(out, "dates", cfg, iv, net, target_vocab=ov)
    return cfg


def load(path) -> tuple[DateConverter, dict]:
    cfg, iv, weights = common.read_run(path, "dates")
    tv_path = Path(path) / common.TARGET_VOCAB
    if not tv_path.is_file():
        raise CharRNNError(f"run directory {path} is incomplete (no {common.TARGET_VOCAB}); train it again")
    ov = Vocab.load(tv_path)
    try:
        net = Seq2Seq(Seq2SeqConfig(**cfg["model"]))
    except (KeyError, TypeError) as e:
        raise CharRNNError(f"{Path(path) / 'config.json'} has no valid model section ({e}); train again") from None
    return DateConverter(common.load_weights(net, weights, path), iv, ov), cfg


def evaluate(path, size: int = 10_000, seed: int = 12345, beam_width: int | None = None) -> dict:
    """Exact-match accuracy on ``size`` fresh dates, greedy (and beam search, with ``beam_width``)."""
    common.check_options(size=size, seed=seed, beam_width=beam_width)
    conv, cfg = load(path)
    if beam_width:
        conv.check_beam(beam_width, size)
    inputs, targets = dataset(size, _seed(seed, EVAL_STREAM))
    t0 = time.perf_counter()
    greedy = conv.greedy(inputs)
    r = {"model": cfg["model"]["kind"], "dates": size, "seed": seed,
         "greedy_accuracy": sum(p == t for (p, _), t in zip(greedy, targets)) / size,
         "greedy_seconds": round(time.perf_counter() - t0, 2),
         "errors": [(i, p, t) for i, (p, _), t in zip(inputs, greedy, targets) if p != t][:10]}
    if beam_width:
        t0 = time.perf_counter()
        plain = conv.beam(inputs, beam_width, with_greedy=False)
        r["beam_seconds"] = round(time.perf_counter() - t0, 2)
        # What beam.search returns: the plain beams with the greedy output merged in (computed above).
        beams = [b if any(o == g[0] for o, _ in b) else sorted(b + [g], key=lambda h: -h[1])[:beam_width]
                 for b, g in zip(plain, greedy)]
        r["beam_width"] = beam_width
        r["beam_accuracy"] = sum(b[0][0] == t for b, t in zip(beams, targets)) / size
        r["plain_beam_accuracy"] = sum(b[0][0] == t for b, t in zip(plain, targets)) / size
        r["beam_worse_than_greedy"] = sum(b[0][1] < g[1] - 1e-6 for b, g in zip(beams, greedy))
        r["beam_better_than_greedy"] = sum(b[0][1] > g[1] + 1e-6 for b, g in zip(beams, greedy))
        r["plain_beam_worse_than_greedy"] = sum(b[0][1] < g[1] - 1e-6 for b, g in zip(plain, greedy))
    return r
