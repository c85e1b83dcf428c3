"""The run directory: every file ``charrnn train`` writes and every other command reads.

::

    RUN/config.json          format version, model, corpus and training options
    RUN/vocab.json           the characters in id order ([UNK] is id 0)
    RUN/model.safetensors    latest weights
    RUN/best.safetensors     weights with the lowest validation loss so far
    RUN/trainer-state.pt     what exact resume needs: weights, optimizer, RNG, data position
                             (saved by :func:`save_checkpoint`, restored by :func:`restore_checkpoint`)
    RUN/metrics.jsonl        one JSON object per logged step or evaluation
    RUN/samples/             text sampled during training

Every write is atomic (temporary file + rename); the temporary files of a writer killed
in the middle of one are deleted by the next (see :func:`writer_lock`).  ``trainer-state.pt``
carries its own copy of the weights, so a kill between two file writes can never pair weights
of one step with an optimizer state of another.  It holds only tensors, numbers and strings and
is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .config import build_config
from .distributed import Dist, rank_seed
from .errors import CharRNNError, OptionError, options_error
from .fileio import (NoSpaceError, append_text, atomic_save, atomic_write_bytes, atomic_write_json,
                     atomic_write_text, is_full_disk, is_temp_name, reporting_full_disk)
from .models.charlm import CharLM, ModelConfig, State
from .tokens import TOKENIZER_FILE, load_vocab
from .vocab import Vocab

FORMAT_VERSION = 1
CONFIG = "config.json"
VOCAB = "vocab.json"
LATEST = "model.safetensors"
BEST = "best.safetensors"
STATE = "trainer-state.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
RUN_FILES = (CONFIG, VOCAB, TOKENIZER_FILE, LATEST, BEST, STATE, METRICS)
METRIC_NUMBERS = ("step", "epoch", "time", "loss", "bpc", "val_loss", "val_bpc", "val_unk_share", "epoch_loss", "lr",
                  "chars_per_s")
HF_FOLDER = "hf"       # a run fine-tuned from a Hugging Face model: its model, as transformers loads it
HF_KIND = "huggingface"     # such a run's config.json "model" "kind"
LOCK = ".lock"         # held by the one process that trains into the directory (see writer_lock)


def is_run_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def is_hf_run(path) -> bool:
    """Whether ``path`` holds a run fine-tuned from a Hugging Face model (read leniently: a damaged run is
    :func:`read_config`'s to report)."""
    try:
        cfg = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and "format_version" in cfg and is_hf_config(cfg)


def is_hf_config(cfg: dict) -> bool:
    """Whether a run's config.json is that of a run fine-tuned from a Hugging Face model (charrnn.hf_training)."""
    return isinstance(cfg.get("model"), dict) and cfg["model"].get("kind") == HF_KIND


def _refuse_a_file(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OptionError("out", "{out} {path} is a file, not a directory; choose another {out}", path=path)


@contextlib.contextmanager
def writer_lock(path, create: bool = True):
    """Hold ``path`` (a run directory, created if missing) for this process alone while the block runs:
    a second trainer on the same directory is refused with one line naming the holder's pid.  The lock
    is the operating system's (``flock``), so a process that dies releases it; readers (generate, eval,
    serve) never take it.  The new holder deletes what killed writers left (:func:`remove_stale_temp_files`).
    Without ``create`` a missing directory is left to the caller's checks.  Where ``fcntl`` does not exist
    (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    path = Path(path)
    if fcntl is None or (not create and not path.is_dir()):
        yield
        return
    _refuse_a_file(path)
    created = not path.exists()
    pid = str(os.getpid()).encode()
    with reporting_full_disk(path / LOCK, len(pid)):
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise OptionError("out", "{path} is being trained by another charrnn process (pid {holder}); wait for "
                              "it to finish or stop it, or choose another {out}", path=path, holder=holder) from None
        os.ftruncate(fd, 0)
        try:
            with reporting_full_disk(path / LOCK, len(pid)):
                os.write(fd, pid)
            remove_stale_temp_files(path)
            yield
        finally:
            if created and [p.name for p in path.iterdir()] == [LOCK]:   # refused before writing anything
                (path / LOCK).unlink()
                path.rmdir()
    finally:
        os.close(fd)


def remove_stale_temp_files(path) -> None:
    """Delete the temporary files (see :func:`charrnn.fileio.is_temp_name`) that writers killed in the
    middle of a write left in the run directory ``path`` and its samples.  Only the holder of
    :func:`writer_lock` calls this: no other process is writing there."""
    for folder in (Path(path), Path(path) / SAMPLES):
        if folder.is_dir():
            for p in folder.iterdir():
                if is_temp_name(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


@contextlib.contextmanager
def out_of_space_advice(path, corpus):
    """A full disk while training into ``path`` on ``corpus`` (as the user named it): the error says how
    to go on, from the last checkpoint (all of it is kept: every write is atomic) or from the start."""
    try:
        yield
    except NoSpaceError as e:
        if (Path(path) / STATE).is_file():
            raise e.advise("free some space, then continue with `{command}`",   # a command line, as typed
                           command=f"charrnn train {shlex.quote(str(corpus))} --out {shlex.quote(str(path))} "
                                   "--resume") from None
        again = " with {force}" if (Path(path) / CONFIG).exists() else ""
        raise e.advise(f"free some space and start the run again{again}") from None


def check_new_run_dir(path, force: bool = False) -> Path:
    """Refuse ``path`` for a new run when it is a file, holds files that are not a run, or holds a run
    and not ``force``.  Deletes nothing: :func:`start_run` replaces a forced run only once every other
    check has passed, so a refused option never costs the run it would have replaced."""
    path = Path(path)
    _refuse_a_file(path)
    if path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        if not force:
            what = "a run" if is_run_dir(path) else "files"
            raise OptionError("resume", "{path} already holds {what}; use {resume} to continue it, {force} to "
                              "overwrite it, or choose another {out}", path=path, what=what)
        if not is_run_dir(path) and not (path / STATE).exists():
            raise OptionError("force", "{path} holds files that are not a charrnn run; {force} only replaces runs, "
                              "choose another {out}", path=path)
    return path


def _clear_run_dir(path: Path) -> None:
    """Delete a replaced run's files (the folder and anything else in it stay) and make the folder."""
    if path.is_dir():
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        for folder in (SAMPLES, HF_FOLDER, HF_FOLDER + ".new", HF_FOLDER + ".old"):   # hf_training.write_folder's
            shutil.rmtree(path / folder, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def prepare_new_run_dir(path, force: bool = False) -> Path:
    """:func:`check_new_run_dir`, then clear and create it at once (for callers with nothing left to check)."""
    path = check_new_run_dir(path, force)
    _clear_run_dir(path)
    return path


def damaged(path, problem: str, fix: str = "train the run again") -> CharRNNError:
    """The one-line error for a run file that cannot be used: which file, what is wrong, what to do.
    ``fix`` names options as ``{field}`` (``start the run again with {force}``), spelled as the caller
    spells them (see :func:`charrnn.errors.options_error`)."""
    return options_error("{path} is damaged ({problem}); " + fix, path=path, problem=problem)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__


def read_config(path) -> dict:
    """The run's config.json, after checking that the directory is a complete, readable run and that
    the file's sections have the shape this charrnn writes."""
    path = Path(path)
    if not path.exists():
        raise CharRNNError(f"run directory {path} does not exist; train one with `charrnn train CORPUS --out {path}`")
    if not path.is_dir():
        raise CharRNNError(f"{path} is not a run directory (it is a file); give the folder `charrnn train` wrote")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise CharRNNError(f"run directory {path} is incomplete (no {CONFIG}); train it again or pick another run")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:      # not UTF-8, or not JSON
        raise CharRNNError(f"{cfg_path} is not valid JSON ({e}); the run is damaged, train it again") from None
    if not isinstance(cfg, dict):
        raise damaged(cfg_path, f"it holds a JSON {type(cfg).__name__}, not an object")
    if "format_version" not in cfg:
        raise CharRNNError(f"{path} is neither a charrnn run nor a Hugging Face model (its {CONFIG} has no "
                           "format_version and no model_type); give a run directory or a directory written by "
                           "save_pretrained")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CharRNNError(f"{cfg_path} has format version {cfg.get('format_version')}, but this charrnn reads "
                           f"version {FORMAT_VERSION}; use a matching charrnn version or train the run again")
    problem = _config_problem(cfg)
    if problem:
        raise damaged(cfg_path, problem)
    if not is_hf_config(cfg) and not (path / VOCAB).is_file():
        raise CharRNNError(f"run directory {path} is incomplete (no {VOCAB}); train it again")
    return cfg


def _config_problem(cfg: dict) -> str | None:
    """What is wrong with the sections of a config.json (None: nothing)."""
    if not isinstance(cfg.get("model"), dict):
        return f"its model section is {json.dumps(cfg.get('model'))[:40]}, not an object"
    for section in ("corpus", "training"):     # optional: runs written by the Python API may lack them
        if not isinstance(cfg.get(section, {}), dict):
            return f"its {section} section is {json.dumps(cfg[section])[:40]}, not an object"
    if not isinstance(cfg.get("corpus", {}).get("name", ""), str):
        return "its corpus name is not a string"
    try:
        if not is_hf_config(cfg):          # a Hugging Face model is described by its own folder
            ModelConfig(**cfg["model"]).validate()
        if "training" in cfg:
            build_config(None, **cfg["training"])
    except TypeError as e:
        return f"model: {e}"
    except CharRNNError as e:
        return str(e)
    return None


def read_vocab(run, cfg: dict) -> Vocab:
    """The run's vocabulary, checked against the number of ids its config.json gives the model."""
    vocab = load_vocab(Path(run) / VOCAB)
    if len(vocab) != cfg["model"]["vocab_size"]:
        raise CharRNNError(f"{Path(run) / VOCAB} holds {len(vocab)} ids but the model in {CONFIG} has "
                           f"{cfg['model']['vocab_size']}: one of the two belongs to another run; train the run again")
    return vocab


def write_config(path, cfg: dict) -> None:
    atomic_write_json(Path(path) / CONFIG, {"format_version": FORMAT_VERSION, **cfg})


def start_run(path, cfg: dict, vocab: Vocab | None) -> None:
    """The first files of a new run (in a directory :func:`check_new_run_dir` accepted): a run it
    replaces (``--force``) goes first, then the config and vocabulary (when the run has one of its own) are
    written."""
    _clear_run_dir(Path(path))
    write_config(path, cfg)
    if vocab is not None:
        vocab.save(Path(path) / VOCAB)
    (Path(path) / METRICS).unlink(missing_ok=True)


def save_weights(path, model: CharLM, step: int) -> None:
    atomic_write_bytes(path, *weights_parts(model, {"format": "pt", "step": str(step)}))


def weights_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """The model's weights as a safetensors file (:func:`weights_parts` joined)."""
    return b"".join(weights_parts(model, metadata))


def weights_parts(model: torch.nn.Module, metadata: dict[str, str]) -> tuple:
    """The model's weights as a safetensors file, the same bytes for the same weights, in two parts (the header,
    and the tensors without a copy): safetensors writes ``__metadata__`` in a random order
    (safetensors/safetensors#584), so the header is written again sorted."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        return (data,)
    return data[:8] + text.ljust(n), memoryview(data)[8 + n:]


# --------------------------------------------------------------------------- the trainer state (exact resume)


@dataclass
class TrainState:
    """Where a run stands: saved in every checkpoint, restored on resume."""

    step: int = 0                   # optimizer steps taken
    epoch: int = 0                  # epochs completed
    step_in_epoch: int = 0          # steps taken in the current epoch: with (seed, epoch), the data position
    best_val: float | None = None   # the lowest validation loss so far (its weights: best.safetensors)
    last_val: float | None = None
    train_time: float = 0.0         # seconds of training, over all the sessions of the run
    chars_seen: int = 0
    epoch_loss_sum: float = 0.0     # the current epoch's training losses: their sum and count
    epoch_loss_count: int = 0


def save_checkpoint(run, model: CharLM, optimizer: torch.optim.Optimizer, train_state: TrainState,
                    stream_state: State | None, device: torch.device, dist: Dist, latest: bool = True) -> None:
    """Write ``trainer-state.pt`` (weights, optimizer, random states, :class:`TrainState`, the carried
    state of stateful training) and (``latest``) the latest weights.

    Every rank calls this: the ranks' random states (torch's CPU generator, and CUDA's on a GPU)
    and their rows of the carried state are gathered, rank 0 writes, and nobody goes on before
    the files are there.  :func:`restore_checkpoint` reads back every field written here.
    """
    stream = None
    if stream_state is not None:
        held = stream_state if isinstance(stream_state, tuple) else (stream_state,)
        stream = [dist.cat_rows(t.detach(), dim=1).cpu() for t in held]  # the whole global batch
    rng = dist.all_objects(torch.get_rng_state())
    rng_cuda = dist.all_objects(torch.cuda.get_rng_state()) if device.type == "cuda" else None

    def write() -> None:
        state = {
            "format_version": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng_cpu": rng[0],
            **asdict(train_state),
        }
        if dist.active:
            state["rng_cpu_ranks"] = rng
        if stream is not None:
            state["stream_state"] = stream
        if rng_cuda is not None:
            state["rng_cuda"] = rng_cuda[0]
            if dist.active:
                state["rng_cuda_ranks"] = rng_cuda
        path = Path(run) / STATE
        try:
            atomic_save(path, lambda f: torch.save(state, f))     # streamed: no copy of the state in memory
        except (OSError, RuntimeError) as e:
            if not is_full_disk(e):
                raise
            raise NoSpaceError(path, _saved_size(state)) from None
        if latest:
            save_weights(Path(run) / LATEST, model, train_state.step)

    dist.on_rank0(write)   # a failed write (a full disk) stops every rank


class _Counter(io.RawIOBase):
    """A file that keeps nothing and counts the bytes written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.bytes += n
        return n


def _saved_size(obj) -> int:
    """The bytes ``torch.save(obj)`` writes (counted, not kept)."""
    counter = _Counter()
    torch.save(obj, counter)
    return counter.bytes


def restore_checkpoint(state: dict, model: CharLM, optimizer: torch.optim.Optimizer, device: torch.device,
                       dist: Dist, rows: slice, seed: int) -> tuple[TrainState, State | None]:
    """Load a trainer state written by :func:`save_checkpoint` into ``model`` and ``optimizer`` and this
    rank's random generators; return its :class:`TrainState` and this rank's ``rows`` of the carried state.

    A run resumes with any number of processes: a rank whose random state was not saved (the run had
    fewer) starts from a seed of its own.  Fields a run saved before they existed take their defaults.
    A state that does not fit (another run's, another optimizer's) is refused in one line.
    """
    try:
        return _restore(state, model, optimizer, device, dist, rows, seed)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise damaged(STATE, f"it does not fit this run: {_first_line(e)}", "start the run again with {force}") \
            from None


def _restore(state, model, optimizer, device, dist, rows, seed):
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    train_state = TrainState(**{f.name: state[f.name] for f in fields(TrainState) if f.name in state})
    rng = state.get("rng_cpu_ranks") or [state["rng_cpu"]]
    if dist.rank < len(rng):
        torch.set_rng_state(rng[dist.rank])
    else:
        torch.manual_seed(rank_seed(seed, dist.rank, train_state.step))
    if device.type == "cuda" and "rng_cuda" in state:
        rng = state.get("rng_cuda_ranks") or [state["rng_cuda"]]
        if dist.rank < len(rng):
            torch.cuda.set_rng_state(rng[dist.rank])
    stream = state.get("stream_state")
    if stream is not None:
        held = tuple(t[:, rows].to(device) for t in stream)  # the whole global batch was saved
        stream = held if len(held) > 1 else held[0]           # an LSTM's (h, c), else h
    return train_state, stream


def load_trainer_state(run) -> dict:
    """``trainer-state.pt``, read with ``weights_only=True`` (tensors, numbers and strings only: a pickled
    object is refused, never run), and checked to have the shape :func:`save_checkpoint` gives it."""
    path = Path(run) / STATE
    if not path.is_file():
        raise OptionError("force", "run directory {run} has no {state} to resume from; start it again with {force}",
                          run=run, state=STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise OptionError("force", "{path} cannot be read ({kind}); the run is damaged, start it again with {force}",
                          path=path, kind=type(e).__name__) from None
    problem = _trainer_state_problem(state)
    if problem:
        raise damaged(path, problem, "start the run again with {force}")
    return state


def _trainer_state_problem(state) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a trainer state"
    if state.get("format_version") != FORMAT_VERSION:
        return f"format version {state.get('format_version')!r}, this charrnn reads {FORMAT_VERSION}"
    for key in ("model", "optimizer"):
        if not isinstance(state.get(key), dict):
            return f"no {key} state"
    if not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        return "its model state is not all tensors"
    stream = state.get("stream_state")
    if stream is not None and not (isinstance(stream, (list, tuple)) and stream
                                   and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in stream)):
        return "its carried state (stateful training) is not a list of (layers, streams, hidden) tensors"
    for f in fields(TrainState):
        value = state.get(f.name, f.default)
        kinds = (int,) if f.type == "int" else (int, float)
        if not (isinstance(value, kinds) and not isinstance(value, bool) or value is None and f.default is None):
            return f"its {f.name} is {value!r}"
    return None


def _param_group_keys(optimizer_state: dict) -> list:
    groups = optimizer_state.get("param_groups")
    return [sorted(g) for g in groups] if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) \
        else []


def weights_mismatch(tensors: dict, model: CharLM) -> str | None:
    """What keeps the named ``tensors`` from loading into ``model``: a missing, extra or differently shaped
    tensor (None: they fit)."""
    want = model.state_dict()
    for name, t in want.items():
        got = tensors.get(name)
        if not isinstance(got, torch.Tensor):
            return f"no tensor {name}"
        if got.shape != t.shape:
            return f"{name} is {list(got.shape)}, this model's is {list(t.shape)}"
    extra = sorted(set(tensors) - set(want))
    return f"a tensor {extra[0]} this model does not have" if extra else None


def open_for_resume(run, vocab: Vocab, model_cfg: ModelConfig, batch_size: int,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Check that the run in ``run`` can go on with this vocabulary, model, batch size and ``optimizer``;
    its config.json and its trainer state (for :func:`restore_checkpoint`).  Nothing is written before
    every file has passed."""
    run = Path(run)
    saved = read_config(run)
    saved_vocab = read_vocab(run, saved)
    if saved_vocab.kind != vocab.kind or saved_vocab.to_json() != vocab.to_json() and vocab.kind != "char":
        raise OptionError("tokenizer", "the run in {run} was trained with a {saved} vocabulary of {saved_ids} ids, "
                          "not this {new} one of {new_ids}; resume with the run's own {tokenizer} and {max_vocab}",
                          run=run, saved=saved_vocab.kind, saved_ids=len(saved_vocab), new=vocab.kind,
                          new_ids=len(vocab))
    if saved_vocab.chars != vocab.chars:
        extra = sorted(set(vocab.chars) - set(saved_vocab.chars))
        missing = sorted(set(saved_vocab.chars) - set(vocab.chars))
        raise CharRNNError(
            f"the corpus's vocabulary does not match the checkpoint's in {run} (new characters "
            f"{''.join(extra)!r}, missing {''.join(missing)!r}); resume with the corpus the run was trained on"
        )
    # Filled in with the defaults, so runs saved before an option existed still match.
    saved_model = {**ModelConfig(1).to_dict(), **saved.get("model", {})}
    new_model = model_cfg.to_dict()
    changed = [key for key in new_model if new_model[key] != saved_model.get(key)]
    if changed:
        raise OptionError(changed[0], "is {new} but the run in {run} was trained with {saved}; resume without "
                                      "changing the model's options", new=new_model[changed[0]], run=run,
                          saved=saved_model.get(changed[0]))
    with torch.device("meta"):               # shapes only, no memory
        model = CharLM(model_cfg)
    state = check_trainer_state(run, model, optimizer)
    saved_stream = state.get("stream_state")
    if saved_stream is not None and saved_stream[0].shape[1] != batch_size:
        raise OptionError("batch_size", "the run carries the state of {streams} streams ({stateful}); resume with "
                                        "{batch_size} {streams}", streams=saved_stream[0].shape[1])
    return saved, state


def check_trainer_state(run, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """The run's trainer state, once checked to fit ``model`` and ``optimizer``, and its metrics log readable
    (a garbage line is refused before anything is written)."""
    state = load_trainer_state(run)
    problem = weights_mismatch(state["model"], model)
    if not problem and optimizer is not None and _param_group_keys(state["optimizer"]) != _param_group_keys(
            optimizer.state_dict()):
        problem = "its optimizer state is another optimizer's"
    if problem:
        raise damaged(Path(run) / STATE, f"it belongs to another run: {problem}", "start the run again with {force}")
    read_metrics(run)
    return state


# --------------------------------------------------------------------------- metrics


def append_metric(run, record: dict) -> None:
    """Add one record (a logged step, an evaluation, an epoch's end) to ``metrics.jsonl``."""
    append_text(Path(run) / METRICS, json.dumps(record) + "\n")


def _metric_lines(run) -> list[tuple[str, dict]]:
    """``(line, record)`` of every record in ``metrics.jsonl``.

    A last line without its newline that is not a record is a write cut short by a kill: it is
    left out.  Any other line that is not a record (an object with an integer ``step``, a number
    ``time`` and numbers for the losses) is garbage, refused in one line naming the file and line."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")  # the last item follows the last newline: nothing, or a torn write
    out = []
    for number, raw in enumerate(lines, 1):
        record = _metric_record(raw)
        if record is not None:
            out.append((raw.decode("utf-8"), record))
        elif raw.strip() and number < len(lines):
            raise damaged(path, f"line {number} is not a metrics record: {raw[:40]!r}",
                          "delete that line (or the file) and run the command again")
    return out


def _metric_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):     # not UTF-8, or not JSON
        return None
    if not (isinstance(record, dict) and isinstance(record.get("step"), int) and "time" in record):
        return None
    numbers = [v for k, v in record.items() if k in METRIC_NUMBERS]
    return record if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) else None


def read_metrics(run) -> list[dict]:
    """The records of ``metrics.jsonl``, in order (see :func:`_metric_lines`)."""
    return [record for _, record in _metric_lines(run)]


def truncate_metrics(run, step: int) -> None:
    """Drop the records logged after ``step``, the checkpoint a run resumes from (they will be logged again),
    and a last line cut by a kill."""
    path = Path(run) / METRICS
    if not path.exists():
        return
    kept = [line for line, record in _metric_lines(run) if record["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- loading a run for inference


@dataclass
class LoadedRun:
    path: Path
    config: dict
    vocab: Vocab
    model: CharLM
    weights: str  # which file the weights came from


def weights_file(run, weights: str = "best") -> Path:
    run = Path(run)
    if weights not in ("best", "latest"):
        raise OptionError("weights", "must be 'best' or 'latest', got {value!r}", value=weights)
    best, latest = run / BEST, run / LATEST
    if weights == "best" and best.is_file():
        return best
    if latest.is_file():
        return latest
    raise CharRNNError(f"run directory {run} is incomplete (no {LATEST}); it has not finished a checkpoint yet, "
                       "train or resume it")


def load_run(run, weights: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run's model (on ``device``, default CPU, whatever device trained it) and vocabulary.
    The weights are checked against the model config.json describes before that model is built."""
    cfg = read_config(run)
    vocab = read_vocab(run, cfg)
    path = weights_file(run, weights)
    model_cfg = ModelConfig(**cfg["model"])
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise damaged(path, f"not a safetensors file: {_first_line(e)}", _other_weights(path)) from None
    with torch.device("meta"):               # shapes only, no memory
        problem = weights_mismatch(state, CharLM(model_cfg))
    if problem:
        raise damaged(path, f"not the weights of the model in {CONFIG}: {problem}", _other_weights(path))
    model = CharLM(model_cfg)
    model.load_state_dict(state)
    return LoadedRun(Path(run), cfg, vocab, model.to(device).eval(), path.name)


def _other_weights(path: Path) -> str:
    """What to do when the weights file ``path`` cannot be used."""
    if path.name == BEST:
        return "use {weights} latest, or delete it"
    if (path.parent / BEST).is_file():
        return "use {weights} best, or resume the run to write it again"
    return "resume the run to write it again, or train the run again"
