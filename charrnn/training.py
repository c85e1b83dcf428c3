"""The training loop: batches, optimiser, clipping, evaluation, progress, checkpoints, resume.

Exact resume: a checkpoint holds the weights, the optimiser, every RNG state and the
data position (epoch, step within it).  The order of an epoch's batches is a function
of (seed, epoch) alone, so a run stopped at a checkpoint and resumed takes the same
steps, in the same order, with the same dropout masks, as if it had never stopped.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import TrainConfig
from .corpus import EncodedCorpus
from .data import StreamBatches, WindowBatches, eval_streams, split_train_val
from .distributed import SINGLE, Dist
from .errors import CharRNNError
from .fileio import atomic_write_text
from . import ops
from .models.charlm import CharLM, ModelConfig, State

LN2 = math.log(2)


# --------------------------------------------------------------------------- hardware


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CharRNNError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto`` uses bf16 where the hardware has it (CUDA with bf16 support, CPUs with
    AVX-512 BF16 / AMX); elsewhere bf16 is emulated and many times slower than fp32.
    """
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: CharLM, ids: np.ndarray, seq_len: int = 256, n_streams: int = 16,
             device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
             dist: Dist = SINGLE) -> dict:
    """Mean loss over every character of ``ids`` (but the first), each predicted once.

    The text is cut into ``n_streams`` contiguous streams that run side by side; each
    is read in chunks of ``seq_len`` with the recurrent state carried between chunks,
    as char-rnn evaluates.  Returns ``{"loss", "bpc", "perplexity", "chars"}``.

    Under data parallelism (``dist`` active; every rank calls this) each rank reads its own
    share of the streams and the loss sums are added up over the ranks, so every rank gets
    the figure one process would compute.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x, y = eval_streams(ids, n_streams)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = int((y >= 0).sum())
    mine = dist.share(x.shape[0])
    x, y = x[mine], y[mine]
    state = None
    try:
        for t in range(0, x.shape[1] if len(x) else 0, seq_len):
            xb = x[:, t : t + seq_len].to(device=device, dtype=torch.int64)
            yb = y[:, t : t + seq_len].to(device=device, dtype=torch.int64)
            with autocast(device, amp_dtype), ops.evaluation():
                logits, state = model(xb, state)
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                     ignore_index=-100, reduction="sum").double()
    finally:
        model.train(was_training)
    dist.sum_(total)
    loss = float(total) / count
    return {"loss": loss, "bpc": loss / LN2, "perplexity": math.exp(min(loss, 700)), "chars": count}


# --------------------------------------------------------------------------- learning rate


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


def keep_cpu_memory() -> None:
    """Make the large per-step tensors cheap to allocate without keeping freed memory around.

    A training step allocates and frees the same large buffers every time (the recurrent layers
    save their activations: 150 MB a step for the Keras recipe's batch of 1024), and every fresh
    4 kB page costs a page fault: about 15% of a Keras-recipe step on a 2-core CPU.  This asks
    PyTorch for huge pages on large tensors (``THP_MEM_ALLOC_ENABLE``, unless already set: 512x
    fewer faults) and glibc to map every block over 1 MB on its own, so that it goes back to the
    system when freed.  Left alone, glibc's threshold climbs to 32 MB after the first large free
    and such blocks stay in its heap, where huge pages hold on to them: 60-140 MB more peak memory
    for the default model.  Process-wide, harmless elsewhere, no-op off glibc."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        return _eager(torch.optim.Adam)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return _eager(torch.optim.AdamW)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        # Keras's RMSprop: rho 0.9, eps 1e-7 (PyTorch's defaults are 0.99 / 1e-8).
        return _eager(torch.optim.RMSprop)(params, lr=cfg.lr, alpha=0.9, eps=1e-7, weight_decay=cfg.weight_decay)
    return _eager(torch.optim.SGD)(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@functools.cache
def _eager(cls: type) -> type:
    """A subclass of the optimizer ``cls`` whose add_param_group / zero_grad / state_dict /
    load_state_dict / step are the functions torch's decorators wrap.  Those decorators serve
    torch.compile and import torch._dynamo on their first call (the constructor calls
    add_param_group): about 70 MB of resident memory, a quarter of an idle torch process, that
    eager training never uses.  What step's wrapper also does, turning grad mode off, is kept.
    Same algorithm, same state_dict: checkpoints load either way."""
    attrs = {name: inspect.unwrap(getattr(cls, name))
             for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")}
    step = inspect.unwrap(cls.step)

    def eager_step(self, closure=None):
        with torch.no_grad():
            return step(self, closure)

    attrs["step"] = eager_step
    return type(cls.__name__, (cls,), attrs)


def train_step(model: CharLM, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, clip: float | None,
               device: torch.device, amp_dtype: torch.dtype | None, params: list | None = None,
               state: State | None = None, last_only: bool = False) -> tuple[torch.Tensor, State]:
    """One full step (forward, loss, backward, clip, update) from the recurrent ``state`` (None: zeros).

    Returns the loss (not synchronised) and the final state, detached from the graph (stateful
    training starts the next batch from it).  ``last_only`` puts the loss on each window's last
    character only (the Keras recipe).
    """
    with autocast(device, amp_dtype):
        logits, state = model(x, state, last_only=last_only)
    if last_only:
        y = y[:, -1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params if params is not None else model.parameters(), clip)
    opt.step()
    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return loss.detach(), state


# --------------------------------------------------------------------------- signals


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


# --------------------------------------------------------------------------- trainer


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of a rank > 0 that has no saved random state (fresh run, or more ranks than saved)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % 2**63


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    stop_reason: str
    best_val_loss: float | None
    last_val_loss: float | None
    train_time: float
    chars_seen: int


class Trainer:
    """Train a :class:`CharLM` on an encoded corpus into a run directory."""

    def __init__(self, corpus: EncodedCorpus, cfg: TrainConfig, run_dir, resume: bool = False,
                 progress: bool = True, log=None, dist: Dist = SINGLE):
        self.corpus = corpus
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # Data parallelism (see charrnn.distributed): --batch-size is the global batch, each rank
        # takes a contiguous block of its rows; only rank 0 writes files.
        self.dist = dist
        dist.check_batch(cfg.batch_size)
        self.rows = dist.share(cfg.batch_size)
        self.device = resolve_device(cfg.device)
        if dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK by the session
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            keep_cpu_memory()
        self.vocab = corpus.vocab
        if len(set(dist.all_objects(corpus.sha256))) > 1:
            raise CharRNNError("the processes read different corpora (their sha256 differ); give every machine "
                               "the same corpus file")
        train_ids, self.val_ids = split_train_val(corpus.ids, cfg.val_fraction)
        if cfg.val_fraction > 0 and len(self.val_ids) < 2:
            raise CharRNNError(f"the validation split ({len(self.val_ids)} characters) is too short; "
                               "use a longer corpus or a larger --val-fraction")
        self.train_ids = train_ids
        if cfg.stateful:
            self.batches = StreamBatches(train_ids, cfg.seq_len, cfg.batch_size, cfg.seed)
        else:
            self.batches = WindowBatches(train_ids, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.window_step)
        self.model_cfg = cfg.model_config(len(self.vocab))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = CharLM(self.model_cfg).to(self.device)
        if dist.rank:
            # Dropout masks must differ between ranks (they see different rows); rank 0 keeps the
            # single-process stream, so one process is the plain run.
            torch.manual_seed(_rank_seed(cfg.seed, dist.rank, 0))
        self.optimizer = make_optimizer(cfg, self.model)
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.train_time = 0.0
        self.chars_seen = 0
        self.stream_state: State | None = None  # stateful training: this rank's rows of the carried state
        self.epoch_loss = [0.0, 0]  # sum and count of this epoch's training losses
        if resume:
            self._resume()
        else:
            dist.on_rank0(self._start)

    # ----------------------------------------------------------------- set-up

    def _config_json(self) -> dict:
        return {
            "model": self.model_cfg.to_dict(),
            "corpus": self.corpus.describe(),
            "training": self.cfg.to_dict(),
        }

    def _start(self) -> None:
        ckpt.write_config(self.run_dir, self._config_json())
        self.vocab.save(self.run_dir / ckpt.VOCAB)
        (self.run_dir / ckpt.METRICS).unlink(missing_ok=True)

    def _resume(self) -> None:
        # Rank 0 reads and checks the run directory and hands the trainer state to the other ranks,
        # which never need the directory: a run resumes with any number of processes.
        state = self.dist.on_rank0(self._load_checkpoint)
        d = self.dist
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        # Every rank's random state was saved; a rank that has none (the run had fewer processes) starts afresh.
        rng = state.get("rng_cpu_ranks") or [state["rng_cpu"]]
        if d.rank < len(rng):
            torch.set_rng_state(rng[d.rank])
        else:
            torch.manual_seed(_rank_seed(self.cfg.seed, d.rank, self.step))
        if self.device.type == "cuda" and "rng_cuda" in state:
            rng = state.get("rng_cuda_ranks") or [state["rng_cuda"]]
            if d.rank < len(rng):
                torch.cuda.set_rng_state(rng[d.rank])
        self.best_val = state.get("best_val")
        self.last_val = state.get("last_val")
        self.train_time = state.get("train_time", 0.0)
        self.chars_seen = state.get("chars_seen", 0)
        self.epoch_loss = [state.get("epoch_loss_sum", 0.0), state.get("epoch_loss_count", 0)]
        saved_stream = state.get("stream_state")
        if saved_stream is not None:
            # The checkpoint holds the whole global batch's state; this rank carries its own rows.
            held = tuple(t[:, self.rows].to(self.device) for t in saved_stream)
            self.stream_state = held if self.model_cfg.arch == "lstm" else held[0]
        self.log(f"resuming {self.run_dir} at step {self.step} (epoch {self.epoch + 1}, "
                 f"step {self.step_in_epoch} of it)" + (f" with {d.world} processes" if d.active else ""))

    def _load_checkpoint(self) -> dict:
        """Check that the run directory can be resumed with this corpus and these options; its trainer state."""
        saved = ckpt.read_config(self.run_dir)
        saved_vocab = ckpt.Vocab.load(self.run_dir / ckpt.VOCAB)
        if saved_vocab.chars != self.vocab.chars:
            extra = sorted(set(self.vocab.chars) - set(saved_vocab.chars))
            missing = sorted(set(saved_vocab.chars) - set(self.vocab.chars))
            raise CharRNNError(
                f"the corpus's vocabulary does not match the checkpoint's in {self.run_dir} (new characters "
                f"{''.join(extra)!r}, missing {''.join(missing)!r}); resume with the corpus the run was trained on"
            )
        # Filled in with the defaults, so runs saved before an option existed still match.
        saved_model = {**ModelConfig(1).to_dict(), **saved.get("model", {})}
        if saved_model != self.model_cfg.to_dict():
            raise CharRNNError(f"the model options differ from the run's ({saved.get('model')}); resume without "
                               "changing --arch/--hidden/--embed/--layers/--dropout/--weight-drop")
        for stale in self.run_dir.glob(".*.tmp"):  # left by a kill in the middle of a write
            stale.unlink(missing_ok=True)
        state = ckpt.load_trainer_state(self.run_dir)
        saved_stream = state.get("stream_state")
        if saved_stream is not None and saved_stream[0].shape[1] != self.cfg.batch_size:
            raise CharRNNError(f"the run carries the state of {saved_stream[0].shape[1]} streams (--stateful); "
                               f"resume with --batch-size {saved_stream[0].shape[1]}")
        if saved.get("corpus", {}).get("sha256") != self.corpus.sha256:
            self.log(f"warning: the corpus differs from the one {self.run_dir} was trained on "
                     "(same characters); continuing")
        ckpt.write_config(self.run_dir, self._config_json())
        self._truncate_metrics(state["step"])
        return state

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / ckpt.METRICS
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ----------------------------------------------------------------- bookkeeping

    def total_steps(self) -> int | None:
        """The run's length in steps when it is known in advance."""
        candidates = []
        if self.cfg.max_steps:
            candidates.append(self.cfg.max_steps)
        if self.cfg.epochs:
            candidates.append(self.cfg.epochs * self.batches.nominal_steps_per_epoch())
        return min(candidates) if candidates else None

    def _metric(self, record: dict) -> None:
        if not self.dist.main:
            return
        with open(self.run_dir / ckpt.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self) -> None:
        """Write the trainer state and the latest weights.  Every rank calls this: the ranks' random
        states and their rows of a carried stateful state are gathered, rank 0 writes, and nobody
        goes on before the files are there."""
        d = self.dist
        stream = None
        if self.stream_state is not None:
            held = self.stream_state if isinstance(self.stream_state, tuple) else (self.stream_state,)
            stream = [d.cat_rows(t.detach(), dim=1).cpu() for t in held]  # the whole global batch
        rng = d.all_objects(torch.get_rng_state())
        rng_cuda = d.all_objects(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None
        if d.main:
            state = {
                "format_version": ckpt.FORMAT_VERSION,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "rng_cpu": rng[0],
                "step": self.step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "best_val": self.best_val,
                "last_val": self.last_val,
                "train_time": self.train_time,
                "chars_seen": self.chars_seen,
                "epoch_loss_sum": self.epoch_loss[0],
                "epoch_loss_count": self.epoch_loss[1],
            }
            if d.active:
                state["rng_cpu_ranks"] = rng
            if stream is not None:
                state["stream_state"] = stream
            if rng_cuda is not None:
                state["rng_cuda"] = rng_cuda[0]
                if d.active:
                    state["rng_cuda_ranks"] = rng_cuda
            ckpt.save_trainer_state(self.run_dir / ckpt.STATE, state)
            ckpt.save_weights(self.run_dir / ckpt.LATEST, self.model, self.step)
        d.barrier()

    def validate(self) -> float | None:
        """Validation loss (every rank calls this; they share the streams); rank 0 keeps the best weights."""
        if self.cfg.val_fraction == 0:
            return None
        result = evaluate(self.model, self.val_ids, seq_len=max(self.cfg.seq_len, 256),
                          n_streams=self.cfg.eval_streams, device=self.device, amp_dtype=self.amp_dtype,
                          dist=self.dist)
        self.last_val = result["loss"]
        improved = self.best_val is None or result["loss"] < self.best_val
        if improved:
            self.best_val = result["loss"]
            if self.dist.main:
                ckpt.save_weights(self.run_dir / ckpt.BEST, self.model, self.step)
        self._metric({"step": self.step, "epoch": self.epoch, "time": round(self.train_time, 3),
                      "val_loss": result["loss"], "val_bpc": result["bpc"]})
        return result["loss"]

    def sample_prompt(self) -> str:
        if self.cfg.sample_prompt is not None:
            return self.cfg.sample_prompt
        source = self.val_ids if len(self.val_ids) else self.train_ids
        return self.vocab.decode(np.asarray(source[:40]))

    def sample(self, write) -> None:
        """Samples at each of ``--sample-temperatures``: printed, and saved in ``samples/`` (rank 0 only)."""
        from .sampling import Sampler

        if not self.dist.main:
            return

        cfg = self.cfg
        prompt = self.sample_prompt()
        folder = self.run_dir / ckpt.SAMPLES
        folder.mkdir(exist_ok=True)
        try:
            sampler = Sampler(self.model, self.vocab)
            for t in cfg.sample_temperatures:
                # A generator of its own per (seed, step): the training RNG is left untouched.
                text = sampler.generate(prompt, cfg.sample_length, temperature=t,
                                        seed=(cfg.seed * 1_000_003 + self.step) % 2**63)[0]
                atomic_write_text(folder / f"step{self.step:07d}-t{t:g}.txt", text)
                write(f"----- sample at step {self.step}, temperature {t:g} -----\n{text}\n")
        finally:
            self.model.train()

    # ----------------------------------------------------------------- the loop

    def summary(self) -> str:
        c = self.corpus
        n_train, n_val = len(self.batches.ids), len(self.val_ids)
        precision = "bf16 autocast" if self.amp_dtype is not None else "fp32"
        return "\n".join([
            f"corpus {c.name}: {len(c):,} characters, vocabulary {len(self.vocab)} (with [UNK]); "
            f"train {n_train:,}, validation {n_val:,}",
            f"model {self.model_cfg.arch.upper()}, {self.model.num_parameters():,} parameters:",
            self.model.summary(),
            f"device {self.device}, {precision}; batch {self.cfg.batch_size} x {self.cfg.seq_len}, "
            f"{self.cfg.optimizer} lr {self.cfg.lr}, {self.batches.nominal_steps_per_epoch()} steps per epoch"
            + (f"; data-parallel over {self.dist.world} processes, {self.cfg.batch_size // self.dist.world} "
               "sequences each" if self.dist.active else ""),
        ])

    def fit(self) -> TrainResult:
        from tqdm import tqdm

        self.log(self.summary())

        cfg, d = self.cfg, self.dist
        model, opt = self.model, self.optimizer
        total_steps = self.total_steps()
        params = [p for p in model.parameters()]
        # Under data parallelism the step runs through DistributedDataParallel, which averages the
        # ranks' gradients during backward (its hooks fire on the parameters' gradient accumulation,
        # the fast CPU path's custom autograd functions included): the mean over the global batch.
        # Clipping then sees the same, global, gradient norm on every rank.
        step_model = model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        chars_per_step = cfg.batch_size * cfg.seq_len
        stop = StopFlag()
        stop_reason = None
        model.train()
        bar = tqdm(total=total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="training", file=sys.stderr)
        write = bar.write if self.progress else self.log
        running = torch.zeros((), device=self.device)
        running_n = 0
        epoch_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # flushed into self.epoch_loss

        def flush_epoch_loss() -> None:
            self.epoch_loss[0] += float(d.sum_(epoch_sum)) / d.world  # the global batch's losses
            epoch_sum.zero_()

        def checkpoint() -> None:
            flush_epoch_loss()
            self.checkpoint()
        session_start = time.perf_counter()
        time_at_start = self.train_time
        window_t, window_chars = time.perf_counter(), 0
        last_eval_step = last_sample_step = None

        def elapsed() -> float:
            return time_at_start + time.perf_counter() - session_start

        def report_val(loss: float | None, why: str) -> None:
            if loss is not None:
                write(f"step {self.step} ({why}): val loss {loss:.4f} nats/char, {loss / LN2:.4f} bits/char"
                      + (" (best)" if loss == self.best_val else ""))

        def agree() -> tuple[bool, float]:
            """(stop signal, training time) of the whole job: the ranks stop on the same step and
            use the same time-based learning rate whichever of them was signalled or is slowest."""
            interrupted, now = stop.reason is not None, elapsed()
            if d.active:
                flags = d.max_(torch.tensor([float(interrupted), now], dtype=torch.float64, device=d.device))
                interrupted, now = bool(flags[0] > 0), float(flags[1])
            return interrupted, now

        with stop.installed():
            while True:
                # Stopping rules, checked between steps (a checkpoint is always taken at a stop).
                interrupted, now = agree()
                if interrupted:
                    stop_reason = "interrupted"
                elif cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stop_reason = "max_steps"
                elif cfg.epochs is not None and self.epoch >= cfg.epochs:
                    stop_reason = "epochs"
                elif cfg.time_limit is not None and now >= cfg.time_limit:
                    stop_reason = "time_limit"
                if stop_reason:
                    break

                x, y = self.batches.batch(self.epoch, self.step_in_epoch, rows=self.rows)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                lr = learning_rate(cfg, self.step, total_steps, now / cfg.time_limit if cfg.time_limit else None)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, state = train_step(step_model, opt, x, y, cfg.clip, self.device, self.amp_dtype, params,
                                         state=self.stream_state, last_only=cfg.loss_on == "last")
                if cfg.stateful:
                    self.stream_state = state

                self.step += 1
                self.step_in_epoch += 1
                self.chars_seen += chars_per_step
                window_chars += chars_per_step
                running += loss
                running_n += 1
                epoch_sum += loss
                self.epoch_loss[1] += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    mean = float(d.sum_(running)) / d.world / running_n  # the global batch's mean loss
                    if not math.isfinite(mean):
                        raise CharRNNError(f"the training loss became {mean} at step {self.step}; lower --lr or "
                                           "set --clip (the last good checkpoint is kept)")
                    now = time.perf_counter()
                    cps = window_chars / max(now - window_t, 1e-9)
                    window_t, window_chars = now, 0
                    running.zero_()
                    running_n = 0
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{mean:.4f}", chars_per_s=f"{cps:,.0f}")
                    self._metric({"step": self.step, "epoch": self.epoch, "time": round(elapsed(), 3),
                                  "loss": mean, "lr": lr, "chars_per_s": round(cps, 1)})

                epoch_done = self.step_in_epoch >= self.batches.steps_in_epoch(self.epoch)
                if epoch_done:
                    flush_epoch_loss()
                    mean = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
                    write(f"epoch {self.epoch + 1}: mean training loss {mean:.4f} nats/char over "
                          f"{self.epoch_loss[1]} steps")
                    self._metric({"step": self.step, "epoch": self.epoch, "time": round(elapsed(), 3),
                                  "epoch_loss": mean})
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.epoch_loss = [0.0, 0]
                    self.stream_state = None  # stateful streams restart from zeros every epoch
                eval_due = epoch_done or (cfg.eval_every and self.step % cfg.eval_every == 0)
                if cfg.sample_every is None:
                    sample_due = epoch_done
                else:
                    sample_due = cfg.sample_every > 0 and self.step % cfg.sample_every == 0
                self.train_time = elapsed()
                if eval_due:
                    report_val(self.validate(), f"end of epoch {self.epoch}" if epoch_done else "eval")
                    last_eval_step = self.step
                if sample_due:
                    self.sample(write)
                    last_sample_step = self.step
                if eval_due or sample_due:
                    self.train_time = elapsed()
                if eval_due:
                    checkpoint()
                elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    checkpoint()

            if stop_reason == "interrupted":
                # Save first: a launcher (torchrun) kills its workers some seconds after passing on
                # the signal, and the final evaluation can take longer than that.
                self.train_time = elapsed()
                checkpoint()
            if last_eval_step != self.step and self.step > 0:
                report_val(self.validate(), "final")
            if cfg.sample_every != 0 and last_sample_step != self.step and self.step > 0:
                self.sample(write)
            self.train_time = elapsed()
            checkpoint()
        bar.close()
        return TrainResult(self.run_dir, self.step, self.epoch, stop_reason, self.best_val, self.last_val,
                           self.train_time, self.chars_seen)
