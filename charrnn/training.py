"""The training loop: :class:`Trainer` takes steps until a stopping rule says stop, and calls its hooks.

:func:`train_step` is one step (forward, loss, backward, clip, update); :func:`optimizer_step`, its
second half, is shared with the sequence tasks' loop.  ``Trainer.fit()`` is the stopping rules, the
step and five events.  Everything else a run does is a hook on those events, the built-in ones
(at the end of this file: the metrics log, the console, validation, samples, checkpoints) exactly
like a user's.  ``trainer.add_hook(event, fn)`` calls ``fn(trainer, info)``:

==============  =======================  ==========================================================
event           when                     info
==============  =======================  ==========================================================
``after_step``  after every step         ``{"step", "epoch", "epoch_done"}``
``after_log``   after a logged step      the record written to metrics.jsonl: ``step``, ``epoch``,
                                         ``time``, ``loss``, ``bpc``, ``lr``, ``chars_per_s``
``after_eval``  after an evaluation      the record written: ``step``, ``epoch``, ``time``,
                                         ``val_loss``, ``val_bpc``, ``val_unk_share`` (the share of
                                         the characters in ``[UNK]`` tokens, not scored)
``epoch_end``   at the end of an epoch   the record written: ``step``, ``epoch``, ``time``,
                                         ``epoch_loss`` (the epoch's mean training loss)
``train_end``   after the last step      ``{"step", "stop_reason"}``
==============  =======================  ==========================================================

A hook stops the run with ``trainer.request_stop(reason)``: training ends after the current
step as at any other stop (a last evaluation and sample, a checkpoint), and the result's
``stop_reason`` is ``reason``.  Hooks run in the order they were added, the built-in ones first,
on every process of a data-parallel run (a stop requested by any of them stops them all).
With :func:`charrnn.train` a hook is passed as ``hooks={"after_eval": fn}``.

Exact resume: a checkpoint holds the weights, the optimiser, every RNG state and the data
position (see :mod:`charrnn.checkpoint`).  The order of an epoch's batches is a function of
(seed, epoch) alone, so a run stopped at a checkpoint and resumed takes the same steps, in the
same order, with the same dropout masks, as if it had never stopped.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import ops
from . import sources, tokenized
from .config import TrainConfig
from .corpus import EncodedCorpus
from .data import StreamBatches, WindowBatches
from .distributed import SINGLE, Dist, rank_seed
from .errors import CharRNNError, OptionError
from .evaluation import LN2, evaluate, unscored_note
from .fileio import atomic_write_text
from .hardware import autocast, check_model_fits, check_sampling_fits, resolve_device, resolve_precision
from .models.charlm import CharLM, State
from .ops.sampled_softmax import sampled_softmax_loss, unigram
from .options import start_text
from .threads import ThreadPolicy
from .tokens import load_vocab
from .vocab import UNK_ID

EVENTS = ("after_step", "after_log", "after_eval", "epoch_end", "train_end")
Hook = Callable[["Trainer", dict], None]


# --------------------------------------------------------------------------- one step


def learning_rate(cfg: TrainConfig, step: int, total_steps: int | None, progress_time: float | None) -> float:
    """The learning rate for ``step`` (0-based): optional linear warm-up, then constant or cosine decay.

    Cosine decays over ``total_steps`` when the run's length in steps is known; a run bounded
    only by ``--time-limit`` decays over its time budget instead (``progress_time`` in [0, 1]).
    """
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        if total_steps:
            frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        else:
            frac = progress_time or 0.0
        frac = min(max(frac, 0.0), 1.0)
        return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]     # frozen ones (LoRA's base) are left out
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        # Keras's RMSprop: rho 0.9, eps 1e-7 (PyTorch's defaults are 0.99 / 1e-8).
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.Tensor],
                   clip: float | None) -> None:
    """Back-propagate ``loss`` and update: backward, clip the gradients' global norm to ``clip`` (None or 0: no
    clipping), step, and free the gradients (the next forward pass runs without them in memory)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_step(model: CharLM, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, clip: float | None,
               device: torch.device, amp_dtype: torch.dtype | None, params: list | None = None,
               state: State | None = None, last_only: bool = False,
               sampled: tuple[torch.Tensor, int] | None = None,
               scored: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
    """One full step (forward, loss, backward, clip, update) from the recurrent ``state`` (None: zeros).

    Returns the loss (not synchronised) and the final state, detached from the graph (stateful
    training starts the next batch from it).  ``last_only`` puts the loss on each window's last
    character only (the Keras recipe).  ``params`` (default: the model's) are the ones clipped.  ``sampled``
    = ``(proposal, k)`` trains the output layer with a sampled softmax of ``k`` negatives (ops/sampled_softmax.py).
    ``scored`` (a tensor of two numbers) gets added the summed loss of the targets that bits per character
    scores, every one but ``[UNK]`` (which training learns as any other), and their number.
    """
    if last_only:
        y = y[:, -1:]
    with autocast(device, amp_dtype):
        out, state = model(x, state, last_only=last_only, features=sampled is not None)
    reduction = "mean" if scored is None else "none"
    if sampled is None:
        losses = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)
    else:
        head = getattr(model, "module", model).head
        losses = sampled_softmax_loss(out.float().reshape(-1, out.shape[-1]), head.weight, head.bias, y.reshape(-1),
                                      *sampled, reduction=reduction)
    loss = losses.mean()
    if scored is not None:
        keep = y.reshape(-1) != UNK_ID
        scored += torch.stack([(losses.detach() * keep).sum(), keep.sum().to(scored.dtype)])
    optimizer_step(opt, loss, params if params is not None else model.parameters(), clip)
    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return loss.detach(), state


# --------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    stop_reason: str
    best_val_loss: float | None
    last_val_loss: float | None
    train_time: float
    chars_seen: int         # ids read: characters for a character model, tokens otherwise
    tokenizer: str = "char"


class Trainer:
    """Train a :class:`CharLM` on an encoded corpus into a run directory; see the module's docstring for hooks.
    Another kind of model trains through a subclass that overrides what this class says of the model
    (:meth:`_prepare` and the methods the built-in hooks call: :class:`charrnn.hf_training.HFTrainer`).

    ``trainer.state`` (a :class:`charrnn.checkpoint.TrainState`) is where the run stands: step,
    epoch, best validation loss, training time.  ``progress`` shows a progress bar; ``log(message)``
    receives the summary and the evaluation lines (default: stderr).
    """

    keeps_latest = True     # a checkpoint also writes the latest weights (model.safetensors: --weights latest)

    def __init__(self, corpus: EncodedCorpus, cfg: TrainConfig, run_dir, resume: bool = False,
                 progress: bool = True, log=None, dist: Dist = SINGLE):
        self.corpus, self.cfg = corpus, cfg.validate()
        self.run_dir = Path(run_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # Data parallelism (see charrnn.distributed): --batch-size is the global batch, each rank takes
        # a contiguous block of its rows; only rank 0 writes files.
        self.dist = dist
        dist.check_batch(cfg.batch_size)
        self.rows = dist.share(cfg.batch_size)
        self.device = resolve_device(cfg.device)
        if dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK by the session
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self._prepare(corpus, resume, progress)    # the data, the vocabulary and the model
        self.model = self.model.to(self.device)
        if dist.rank:  # dropout masks differ between the ranks, which see different rows
            torch.manual_seed(rank_seed(cfg.seed, dist.rank, 0))
        self.optimizer = make_optimizer(cfg, self.model)
        self.state = ckpt.TrainState()
        self.stream_state: State | None = None  # stateful training: this rank's rows of the carried state
        self.hooks: dict[str, list[Hook]] = {event: [] for event in EVENTS}
        self.console = Console(progress, self.log)
        self._stop_request: str | None = None
        self._signals = StopFlag()
        add_builtin_hooks(self)
        if resume:
            self._resume()
        else:
            dist.on_rank0(self._start_run)

    def _prepare(self, corpus: EncodedCorpus, resume: bool, progress: bool) -> None:
        """Set the run's data (``vocab``, ``train_ids``, ``val_ids``, ``batches``, the characters per token) and
        its model (on the CPU), from ``--init-from``'s source when given.  A trainer of another kind of model
        (:mod:`charrnn.hf_training`) sets the same attributes its own way."""
        cfg, dist = self.cfg, self.dist
        source = sources.read(cfg.init_from) if cfg.init_from and not resume else None
        self.init = source.describe() if source is not None else None     # config.json's "init" (resumed: its own)
        if resume:
            saved_vocab = dist.on_rank0(lambda: resumed_vocab(self.run_dir, cfg))
        else:
            saved_vocab = sources.vocabulary(source, corpus.vocab) if source is not None else None
        splits, self.batches = split_data(corpus, cfg, dist, saved_vocab, progress)
        self.vocab, self.train_ids, self.val_ids = splits.vocab, splits.train, splits.val
        self.val_chars, self.chars_per_token = splits.val_chars, splits.chars_per_token
        self.val_unk_chars = tokenized.unknown(self.vocab, self.val_ids[1:], self.val_chars)[1]
        # Bits/char leaves [UNK] targets and their characters out, as validation does (tokenized.unknown).
        unk_tokens, unk_chars = tokenized.unknown(self.vocab, self.train_ids, splits.train_chars)
        self.scores_unk = unk_tokens > 0
        self.chars_per_scored_token = (splits.train_chars - unk_chars) / max(len(self.train_ids) - unk_tokens, 1)
        check_sampled_softmax(cfg, len(self.vocab))
        self.proposal = unigram_proposal(self.train_ids, len(self.vocab)) if cfg.sampled_softmax else None
        self.model_cfg = cfg.model_config(len(self.vocab))
        check_model_fits(self.model_cfg.training_bytes(cfg.batch_size // dist.world, cfg.seq_len),
                         self.model_cfg.num_parameters(), self.device)
        check_samples(self)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = CharLM(self.model_cfg)
        if source is not None:
            sources.load_weights(self.model, source)
            self._report_unknown(source, unk_tokens)

    def _config_json(self) -> dict:
        init = {"init": self.init} if self.init else {}
        return {"model": self.model_cfg.to_dict(), "corpus": self.corpus.describe(), "training": self.cfg.to_dict(),
                **init}

    def _start_run(self) -> None:
        ckpt.start_run(self.run_dir, self._config_json(), self.vocab)

    def _report_unknown(self, source, unk: int) -> None:
        """A word or BPE source reads the new corpus with its own tokenizer: say how much of it (``unk`` of the
        training ids) is [UNK]."""
        if self.vocab.kind != "char" or unk:
            self.log(f"starting from {source.path}: {unk / max(len(self.train_ids), 1):.2%} of the training "
                     f"tokens are [UNK] under its {self.vocab.kind} vocabulary")

    def _resume(self) -> None:
        # Rank 0 reads and checks the run directory and hands the trainer state to the other ranks,
        # which never need the directory: a run resumes with any number of processes.
        saved = self.dist.on_rank0(self._open_run)
        self.state, self.stream_state = ckpt.restore_checkpoint(saved, self.model, self.optimizer, self.device,
                                                                self.dist, self.rows, self.cfg.seed)
        s = self.state
        self.log(f"resuming {self.run_dir} at step {s.step} (epoch {s.epoch + 1}, step {s.step_in_epoch} of it)"
                 + (f" with {self.dist.world} processes" if self.dist.active else ""))

    def _open_run(self) -> dict:
        config, state = self._saved()
        self.init = config.get("init")
        check_data_position(self.batches, state, self.run_dir, self.corpus.name)
        if config.get("corpus", {}).get("sha256") != self.corpus.sha256:
            kind = self.vocab.kind
            how = "same characters" if kind == "char" else f"read with the run's own {kind} vocabulary"
            self.log(f"warning: the corpus differs from the one {self.run_dir} was trained on ({how}); continuing")
        ckpt.write_config(self.run_dir, self._config_json())
        ckpt.truncate_metrics(self.run_dir, state["step"])
        return state

    def _saved(self) -> tuple[dict, dict]:
        """The run's config.json and trainer state, once checked to fit this vocabulary, model and optimizer."""
        return ckpt.open_for_resume(self.run_dir, self.vocab, self.model_cfg, self.cfg.batch_size, self.optimizer)

    # ----------------------------------------------------------------- what the built-in hooks ask of the model

    def summary(self) -> str:
        """The lines a run starts with: corpus, model, device and batch."""
        return describe(self)

    def validate(self) -> dict:
        """The validation split's scores (:func:`charrnn.evaluation.scores`), as ``charrnn eval`` computes them."""
        cfg = self.cfg
        return evaluate(self.model, self.val_ids, seq_len=max(cfg.seq_len, 256), n_streams=cfg.eval_streams,
                        device=self.device, amp_dtype=self.amp_dtype, dist=self.dist, chars=self.val_chars,
                        unk_chars=self.val_unk_chars)

    def save_best(self) -> None:
        """Keep the weights as the run's best (rank 0)."""
        ckpt.save_weights(self.run_dir / ckpt.BEST, self.model, self.state.step)

    def sampler(self):
        """What the samples during training are drawn with."""
        from .sampling import Sampler

        return Sampler(self.model, self.vocab)

    def sample_length(self, prompt: str) -> int:
        """The characters a sample during training adds to ``prompt``: --sample-length."""
        return self.cfg.sample_length

    def opening(self) -> str:
        """The first 40 characters of the validation text (of the training text when there is none)."""
        source = self.val_ids if len(self.val_ids) else self.train_ids
        return self.vocab.decode(np.asarray(source[:40]))

    # ----------------------------------------------------------------- hooks

    def add_hook(self, event: str, fn: Hook) -> None:
        """Call ``fn(trainer, info)`` at ``event``, after the hooks added before it (see the module's docstring)."""
        if event not in EVENTS:
            raise CharRNNError(f"unknown hook event '{event}'; use one of {', '.join(EVENTS)}")
        self.hooks[event].append(fn)

    def request_stop(self, reason: str = "requested") -> None:
        """Stop after the current step (a last evaluation, sample and checkpoint follow, as at any stop)."""
        self._stop_request = reason

    def signalled(self) -> bool:
        """Whether Ctrl-C or SIGTERM has asked this process to stop (long work inside a step, such as a
        sample, asks this to stop early)."""
        return self._signals.reason is not None

    def _emit(self, event: str, info: dict) -> None:
        for fn in self.hooks[event]:
            fn(self, info)

    # ----------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Train until a stopping rule says stop: --max-steps, --epochs, --time-limit, Ctrl-C, a hook's request."""
        if self.device.type == "cpu":
            ops.backend.compiled()  # the C++ kernels: built on a machine's first run, before the clock starts
        self.log(self.summary())
        step_model, total_steps = self._step_model(), planned_steps(self.cfg, self.batches)
        self.clock = Clock(self.state.train_time)
        self.losses = LossTracker(self.device, self.dist)
        self.console.open(total_steps, self.state.step)
        self.model.train()
        with self._signals.installed() as signals, ThreadPolicy(on=self.device.type == "cpu") as threads:
            while True:
                reason, now = self._check_stop(signals)
                if reason:
                    break
                threads.update()
                self._step(step_model, total_steps, now)
            if reason == "interrupted":
                # Save first: a launcher (torchrun) kills its workers some seconds after passing on
                # the signal, and the final evaluation can take longer than that.
                self.checkpoint()
            self._emit("train_end", {"step": self.state.step, "stop_reason": reason})
        self.console.close()
        s = self.state
        return TrainResult(self.run_dir, s.step, s.epoch, reason, s.best_val, s.last_val, s.train_time, s.chars_seen,
                           self.vocab.kind)

    def _check_stop(self, signals: StopFlag) -> tuple[str | None, float]:
        """(why to stop, or None; the run's training time), checked between steps.  Under data
        parallelism the ranks agree on both (whichever was signalled or asked to stop, the slowest's
        time), so they stop after the same step and use the same time-based learning rate."""
        flags = [float(signals.reason is not None), float(self._stop_request is not None), self.clock()]
        if self.dist.active:
            flags = self.dist.max_(torch.tensor(flags, dtype=torch.float64, device=self.dist.device)).tolist()
        interrupted, requested, now = flags
        cfg, s = self.cfg, self.state
        if interrupted:
            return "interrupted", now
        if requested:
            return self._stop_request or "requested", now
        if cfg.max_steps is not None and s.step >= cfg.max_steps:
            return "max_steps", now
        if cfg.epochs is not None and s.epoch >= cfg.epochs:
            return "epochs", now
        if cfg.time_limit is not None and now >= cfg.time_limit:
            return "time_limit", now
        return None, now

    def _step(self, step_model: torch.nn.Module, total_steps: int | None, now: float) -> None:
        """One training step, then its events: after_log (when due), epoch_end (when due), after_step."""
        cfg, s = self.cfg, self.state
        x, y = self.batches.batch(s.epoch, s.step_in_epoch, rows=self.rows)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        lr = learning_rate(cfg, s.step, total_steps, now / cfg.time_limit if cfg.time_limit else None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, carried = train_step(step_model, self.optimizer, x, y, cfg.clip, self.device, self.amp_dtype,
                                   state=self.stream_state, last_only=cfg.loss_on == "last",
                                   sampled=(self.proposal, cfg.sampled_softmax) if cfg.sampled_softmax else None,
                                   scored=self.losses.scored if self.scores_unk else None)
        if cfg.stateful:
            self.stream_state = carried
        s.step, s.step_in_epoch, s.epoch_loss_count = s.step + 1, s.step_in_epoch + 1, s.epoch_loss_count + 1
        s.chars_seen += cfg.batch_size * cfg.seq_len
        self.losses.add(loss, cfg.batch_size * cfg.seq_len)  # tokens
        if s.step % cfg.log_every == 0 or s.step == 1:
            mean, scored_mean, tokens_per_s = self.losses.window_mean()
            if not math.isfinite(mean):
                raise not_finite(mean, s.step)
            self._emit("after_log", {"step": s.step, "epoch": s.epoch, "time": round(self.clock(), 3), "loss": mean,
                                     "bpc": scored_mean / LN2 / self.chars_per_scored_token, "lr": lr,
                                     "chars_per_s": round(tokens_per_s * self.chars_per_token, 1)})
        epoch_done = s.step_in_epoch >= self.batches.steps_in_epoch(s.epoch)
        if epoch_done:
            self.losses.flush_epoch(s)
            self._emit("epoch_end", {"step": s.step, "epoch": s.epoch, "time": round(self.clock(), 3),
                                     "epoch_loss": s.epoch_loss_sum / max(s.epoch_loss_count, 1)})
            s.epoch, s.step_in_epoch, s.epoch_loss_sum, s.epoch_loss_count = s.epoch + 1, 0, 0.0, 0
            self.stream_state = None  # stateful streams restart from zeros every epoch
        s.train_time = self.clock()
        self._emit("after_step", {"step": s.step, "epoch": s.epoch, "epoch_done": epoch_done})

    def _step_model(self) -> torch.nn.Module:
        """The model the step runs.  Under data parallelism, DistributedDataParallel averages the ranks'
        gradients during backward (its hooks fire on the parameters' gradient accumulation, the fast
        CPU path's custom autograd functions included): the mean over the global batch.  Clipping
        then sees the same, global, gradient norm on every rank."""
        if not self.dist.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model,
                                       device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def checkpoint(self) -> None:
        """Save the trainer state and the latest weights (during :meth:`fit`; every rank calls this)."""
        self.losses.flush_epoch(self.state)
        self.state.train_time = self.clock()
        ckpt.save_checkpoint(self.run_dir, self.model, self.optimizer, self.state, self.stream_state,
                             self.device, self.dist, latest=self.keeps_latest)


# --------------------------------------------------------------------------- the trainer's parts


def check_sampled_softmax(cfg: TrainConfig, vocab_size: int) -> None:
    if cfg.sampled_softmax >= vocab_size - 1:
        raise OptionError("sampled_softmax", "is {value}: it must be smaller than the {n} ids it samples from "
                                             "(the vocabulary less [UNK]); lower it, or drop it for the full "
                                             "softmax", value=cfg.sampled_softmax, n=vocab_size - 1)


def resumed_vocab(run_dir: Path, cfg: TrainConfig):
    """A resumed word or BPE run's own vocabulary (None for a character run, whose vocabulary is the corpus's,
    checked by ckpt.open_for_resume), after checking that --tokenizer and --max-vocab are still the run's."""
    saved = ckpt.read_config(run_dir).get("training", {})
    for option, default in (("tokenizer", "char"), ("max_vocab", None)):
        if saved.get(option, default) != getattr(cfg, option):
            raise OptionError(option, "is {value}, but the run in {run} was trained with {saved}; resume without "
                                      "changing it", value=getattr(cfg, option), run=run_dir,
                              saved=saved.get(option, default))
    if cfg.tokenizer == "char" and not saved.get("init_from"):     # the corpus's, checked by open_for_resume
        return None
    return load_vocab(run_dir / ckpt.VOCAB)      # its own: a word or BPE one, or one grown from its source


def unigram_proposal(ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """Sampled softmax's proposal: the training ids' frequencies (add-one smoothed), ``[UNK]``'s included: with a
    capped --max-vocab it is a frequent target, which the full softmax trains as any other (the model learns how
    often a word is unknown; evaluation leaves ``[UNK]`` targets unscored) and so must the sampled one."""
    return unigram(torch.from_numpy(tokenized.id_counts(ids, vocab_size)))


def not_finite(loss: float, step: int) -> CharRNNError:
    """The error to raise when the training loss logged at ``step`` is NaN or infinite."""
    if step == 1:       # before any update: not a learning rate too high
        return CharRNNError(f"the loss was {loss} at the first step, before any update: a defect or an input the "
                            "model cannot read, not a divergence; please report it with the command line")
    return OptionError("lr", "the training loss became {loss} at step {step}; lower {lr} or set {clip} (the last good "
                       "checkpoint is kept)", loss=loss, step=step)


def check_same_corpus(corpus, dist: Dist) -> None:
    """Refuse data-parallel processes that read different corpora."""
    if len(set(dist.all_objects(corpus.sha256))) > 1:
        raise CharRNNError("the processes read different corpora (their sha256 differ); give every machine "
                           "the same corpus file")


def split_data(corpus: EncodedCorpus, cfg: TrainConfig, dist: Dist, vocab=None, progress: bool = False):
    """(the training and validation ids and vocabulary, the batches cut from the training ids); ``vocab``
    is a resumed run's own word or BPE vocabulary; ``progress`` shows the progress of learning a new one."""
    check_same_corpus(corpus, dist)
    splits = tokenized.split(corpus, cfg.val_fraction, cfg.tokenizer, cfg.max_vocab, vocab, progress)
    if cfg.val_fraction > 0 and not np.any(np.asarray(splits.val[1:]) != UNK_ID):
        raise OptionError("val_fraction", f"the validation split ({len(splits.val)} tokens) is too short: no target "
                          "of it is scored; use a longer corpus or a larger {val_fraction}"
                          + ("" if cfg.tokenizer == "char" else " or {max_vocab} ([UNK] targets are not scored)"))
    if cfg.stateful:
        batches = StreamBatches(splits.train, cfg.seq_len, cfg.batch_size, cfg.seed)
    else:
        batches = WindowBatches(splits.train, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.window_step)
    return splits, batches


def check_data_position(batches, state: dict, run_dir: Path, corpus: str) -> None:
    """Refuse to resume a run whose saved data position (a step of an epoch) lies past the end of that epoch
    here: another corpus, or a larger --batch-size / --seq-len, can make an epoch shorter."""
    epoch, step = state.get("epoch", 0), state.get("step_in_epoch", 0)
    steps = batches.steps_in_epoch(epoch)
    if step >= steps:
        raise OptionError("batch_size", "the run in {run_dir} stopped after step {step:,} of epoch {epoch}, but that "
                          "epoch has only {steps:,} steps of this corpus ({corpus}) and batch; resume with the "
                          "corpus, {batch_size} and {seq_len} the run was trained with", run_dir=run_dir, step=step,
                          epoch=epoch + 1, steps=steps, corpus=corpus)


def planned_steps(cfg: TrainConfig, batches) -> int | None:
    """The run's length in steps when it is known in advance (--max-steps, --epochs)."""
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.epochs:
        candidates.append(cfg.epochs * batches.nominal_steps_per_epoch())
    return min(candidates) if candidates else None


def describe(t: Trainer) -> str:
    """The lines a run starts with: corpus, model, device and batch."""
    c, cfg = t.corpus, t.cfg
    precision = "bf16 autocast" if t.amp_dtype is not None else "fp32"
    return "\n".join([
        f"corpus {c.name}: {len(c):,} characters, {t.vocab.kind} vocabulary {len(t.vocab)} (with [UNK]); "
        f"train {len(t.batches.ids):,}, validation {len(t.val_ids):,}" + ("" if t.vocab.kind == "char" else " tokens"),
        f"model {t.model_cfg.arch.upper()}, {t.model.num_parameters():,} parameters:",
        t.model.summary(),
        f"device {t.device}, {precision}; batch {cfg.batch_size} x {cfg.seq_len}, "
        f"{cfg.optimizer} lr {cfg.lr}, {t.batches.nominal_steps_per_epoch()} steps per epoch"
        + (f"; data-parallel over {t.dist.world} processes, {cfg.batch_size // t.dist.world} "
           "sequences each" if t.dist.active else ""),
    ] + ([f"started from {t.init['from']} ({t.init['weights']}, sha256 {t.init['sha256'][:12]})"] if t.init else []))


class Clock:
    """Seconds of training in the whole run: those of its earlier sessions (``before``) and this one's."""

    def __init__(self, before: float) -> None:
        self.before, self.start = before, time.perf_counter()

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.start


class LossTracker:
    """The training losses, summed on the device (a step never waits for it) until a log line or the
    end of an epoch reads them: the global batch's figures under data parallelism."""

    def __init__(self, device: torch.device, dist: Dist) -> None:
        self.dist = dist
        self.window = torch.zeros((), device=device)  # since the last log line
        self.window_n = 0
        self.scored = torch.zeros(2, device=device)   # train_step's: the loss of the scored targets and their number
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.epoch = torch.zeros((), dtype=torch.float64, device=device)  # not yet in TrainState.epoch_loss_sum

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.window += loss
        self.window_n += 1
        self.window_tokens += tokens
        self.epoch += loss

    def window_mean(self) -> tuple[float, float, float]:
        """(mean loss, mean loss of the scored targets (without ``[UNK]``; the mean loss when none were
        counted), tokens per second) since the last call."""
        mean = float(self.dist.sum_(self.window)) / self.dist.world / self.window_n
        total, count = self.dist.sum_(self.scored).tolist()
        self.scored.zero_()
        now = time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        self.window.zero_()
        self.window_n = 0
        return mean, total / count if count else mean, tokens_per_s

    def flush_epoch(self, state: ckpt.TrainState) -> None:
        state.epoch_loss_sum += float(self.dist.sum_(self.epoch)) / self.dist.world
        self.epoch.zero_()


class StopFlag:
    """Set by Ctrl-C / SIGTERM; the loop stops after the current step, saves, exits.

    A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.reason = "interrupted"

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# --------------------------------------------------------------------------- the built-in hooks


def add_builtin_hooks(trainer: Trainer) -> None:
    """The metrics log, the console, validation, samples and checkpoints, in that order."""
    for event in ("after_log", "after_eval", "epoch_end"):
        trainer.add_hook(event, write_metric)
    trainer.add_hook("after_step", trainer.console.after_step)
    trainer.add_hook("after_log", trainer.console.after_log)
    trainer.add_hook("epoch_end", trainer.console.epoch_end)
    validation, samples = Validation(), Samples()
    checkpoints = Checkpoints(validation)
    for hook in (validation, samples, checkpoints):
        trainer.add_hook("after_step", hook.after_step)
    for hook in (validation, checkpoints, samples):   # the last checkpoint first: no sample can cost it
        trainer.add_hook("train_end", hook.train_end)


def write_metric(trainer: Trainer, record: dict) -> None:
    """One line of metrics.jsonl per logged step, evaluation and epoch (rank 0 writes)."""
    if trainer.dist.main:
        ckpt.append_metric(trainer.run_dir, record)


class Console:
    """What a run prints: a progress bar (when shown) and the log's lines."""

    def __init__(self, show_bar: bool, log) -> None:
        self.show_bar, self.log, self.bar = show_bar, log, None

    def open(self, total: int | None, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not self.show_bar, unit="step", dynamic_ncols=True,
                        desc="training", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def write(self, message: str) -> None:
        (self.bar.write if self.show_bar else self.log)(message)

    def after_step(self, trainer: Trainer, info: dict) -> None:
        self.bar.update(1)

    def after_log(self, trainer: Trainer, record: dict) -> None:
        self.bar.set_postfix(epoch=record["epoch"] + 1, loss=f"{record['loss']:.4f}",
                             chars_per_s=f"{record['chars_per_s']:,.0f}")

    def epoch_end(self, trainer: Trainer, record: dict) -> None:
        unit = "char" if trainer.vocab.kind == "char" else "token"
        self.write(f"epoch {record['epoch'] + 1}: mean training loss {record['epoch_loss']:.4f} nats/{unit} over "
                   f"{trainer.state.epoch_loss_count} steps")


class Validation:
    """The validation loss at each epoch's end, every --eval-every steps and at the end of training
    (every rank evaluates its share of the streams); rank 0 keeps the best weights."""

    def __init__(self) -> None:
        self.last_step: int | None = None  # of the last evaluation

    def after_step(self, trainer: Trainer, info: dict) -> None:
        every = trainer.cfg.eval_every
        if info["epoch_done"] or (every and info["step"] % every == 0):
            self.run(trainer, f"end of epoch {info['epoch']}" if info["epoch_done"] else "eval")

    def train_end(self, trainer: Trainer, info: dict) -> None:
        if self.last_step != info["step"] and info["step"] > 0:
            self.run(trainer, "final")

    def run(self, trainer: Trainer, why: str) -> None:
        t, s = trainer, trainer.state
        self.last_step = s.step
        if t.cfg.val_fraction == 0:
            return
        result = t.validate()
        loss = s.last_val = result["loss"]
        if s.best_val is None or loss < s.best_val:
            s.best_val = loss
            if t.dist.main:
                t.save_best()
        unit = "char" if t.vocab.kind == "char" else "token"
        t.console.write(f"step {s.step} ({why}): val loss {loss:.4f} nats/{unit}, {result['bpc']:.4f} bits/char"
                        + (" (best)" if loss == s.best_val else "") + unscored_note(result))
        t._emit("after_eval", {"step": s.step, "epoch": s.epoch, "time": round(s.train_time, 3),
                               "val_loss": loss, "val_bpc": result["bpc"], "val_unk_share": result["unk_share"],
                               **({"val_labels": {k: r["bpc"] for k, r in result["labels"].items()}}
                                  if "labels" in result else {})})


class Samples:
    """Samples at each of --sample-temperatures, every --sample-every steps (default: at each epoch's
    end) and at the end of training: printed, and saved in RUN/samples/ (rank 0)."""

    def __init__(self) -> None:
        self.last_step: int | None = None

    def after_step(self, trainer: Trainer, info: dict) -> None:
        every = trainer.cfg.sample_every
        due = info["epoch_done"] if every is None else every > 0 and info["step"] % every == 0
        if due:
            self.run(trainer)

    def train_end(self, trainer: Trainer, info: dict) -> None:
        if (trainer.cfg.sample_every != 0 and self.last_step != info["step"] and info["step"] > 0
                and info["stop_reason"] != "interrupted"):
            self.run(trainer)

    def run(self, trainer: Trainer) -> None:
        t, cfg, step = trainer, trainer.cfg, trainer.state.step
        self.last_step = step
        if not t.dist.main:
            return
        prompt = sample_prompt(t)
        folder = t.run_dir / ckpt.SAMPLES
        folder.mkdir(exist_ok=True)
        try:
            sampler = t.sampler()
            for temperature in cfg.sample_temperatures:
                # A generator of its own per (seed, step): the training RNG is left untouched.
                text = sampler.generate(prompt, t.sample_length(prompt), temperature=temperature,
                                        seed=(cfg.seed * 1_000_003 + step) % 2**63, interrupted=t.signalled)[0]
                atomic_write_text(folder / f"step{step:07d}-t{temperature:g}.txt", text)
                cut = " (cut short: interrupted)" if t.signalled() else ""
                t.console.write(f"----- sample at step {step}, temperature {temperature:g}{cut} -----\n{text}\n")
                if cut:
                    break
        finally:
            t.model.train()


def sample_prompt(trainer: Trainer) -> str:
    """What the samples during training continue: --sample-prompt, or the first 40 characters of the validation
    text (of the training text when there is none)."""
    prompt = trainer.cfg.sample_prompt
    return trainer.opening() if prompt is None else prompt


def check_samples(trainer: Trainer) -> None:
    """Refuse, before training starts, samples that could not be taken: a --sample-prompt the vocabulary
    cannot start from, a --sample-length past the memory here."""
    cfg = trainer.cfg
    if cfg.sample_every == 0:
        return
    start_text(sample_prompt(trainer), trainer.vocab.chars, option="sample_prompt")
    check_sampling_fits(trainer.model_cfg, trainer.device, "sample_length", cfg.sample_length, 1, cfg.sample_length)


class Checkpoints:
    """A checkpoint after every evaluation, every --checkpoint-every steps, and at the end of training."""

    def __init__(self, validation: Validation) -> None:
        self.validation = validation

    def after_step(self, trainer: Trainer, info: dict) -> None:
        every = trainer.cfg.checkpoint_every
        if self.validation.last_step == info["step"] or (every and info["step"] % every == 0):
            trainer.checkpoint()

    def train_end(self, trainer: Trainer, info: dict) -> None:
        trainer.checkpoint()
