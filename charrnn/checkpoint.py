"""The run directory: every file ``charrnn train`` writes and every other command reads.

::

    RUN/config.json          format version, model, corpus and training options
    RUN/vocab.json           the characters in id order ([UNK] is id 0)
    RUN/model.safetensors    latest weights
    RUN/best.safetensors     weights with the lowest validation loss so far
    RUN/trainer-state.pt     what exact resume needs: weights, optimizer, RNG, data position
    RUN/metrics.jsonl        one JSON object per logged step or evaluation
    RUN/samples/             text sampled during training

Every write is atomic (temporary file + rename).  ``trainer-state.pt`` carries its own
copy of the weights, so a kill between two file writes can never pair weights of one
step with an optimizer state of another.  It holds only tensors, numbers and strings and
is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CharRNNError
from .fileio import atomic_save, atomic_write_json
from .models.charlm import CharLM, ModelConfig
from .vocab import Vocab

FORMAT_VERSION = 1
CONFIG = "config.json"
VOCAB = "vocab.json"
LATEST = "model.safetensors"
BEST = "best.safetensors"
STATE = "trainer-state.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
RUN_FILES = (CONFIG, VOCAB, LATEST, BEST, STATE, METRICS)


def is_run_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def prepare_new_run_dir(path, force: bool = False) -> Path:
    """Create ``path`` for a new run; refuse to touch an existing run unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CharRNNError(f"--out {path} is a file, not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            what = "a run" if is_run_dir(path) else "files"
            raise CharRNNError(f"{path} already holds {what}; use --resume to continue it, --force to "
                               "overwrite it, or choose another --out")
        if not is_run_dir(path) and not (path / STATE).exists():
            raise CharRNNError(f"{path} holds files that are not a charrnn run; --force only replaces runs, "
                               "choose another --out")
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        shutil.rmtree(path / SAMPLES, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_config(path) -> dict:
    """The run's config.json, after checking that the directory is a complete, readable run."""
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CharRNNError(f"{cfg_path} is not valid JSON ({e}); the run is damaged, train it again") from None
    version = cfg.get("format_version") if isinstance(cfg, dict) else None
    if version != FORMAT_VERSION:
        raise CharRNNError(f"run directory {path} has format version {version}, but this charrnn reads version "
                           f"{FORMAT_VERSION}; use a matching charrnn version or train the run again")
    if not (path / VOCAB).is_file():
        raise CharRNNError(f"run directory {path} is incomplete (no {VOCAB}); train it again")
    return cfg


def write_config(path, cfg: dict) -> None:
    atomic_write_json(Path(path) / CONFIG, {"format_version": FORMAT_VERSION, **cfg})


def save_weights(path, model: CharLM, step: int) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "step": str(step)}))


def save_trainer_state(path, state: dict) -> None:
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_trainer_state(run) -> dict:
    path = Path(run) / STATE
    if not path.is_file():
        raise CharRNNError(f"run directory {run} has no {STATE} to resume from; start it again with --force")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CharRNNError(f"{path} cannot be read ({type(e).__name__}); the run is damaged, start it again "
                           "with --force") from None


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
        raise CharRNNError(f"--weights must be 'best' or 'latest', got '{weights}'")
    best, latest = run / BEST, run / LATEST
    if weights == "best" and best.is_file():
        return best
    if latest.is_file():
        return latest
    raise CharRNNError(f"run directory {run} is incomplete (no {LATEST}); it has not finished a checkpoint yet, "
                       "train or resume it")


def load_run(run, weights: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run's model (on ``device``, default CPU, whatever device trained it) and vocabulary."""
    cfg = read_config(run)
    vocab = Vocab.load(Path(run) / VOCAB)
    try:
        model_cfg = ModelConfig(**cfg["model"])
    except (KeyError, TypeError) as e:
        raise CharRNNError(f"{Path(run) / CONFIG} has no valid model section ({e}); train the run again") from None
    if model_cfg.vocab_size != len(vocab):
        raise CharRNNError(f"run {run}: the model has {model_cfg.vocab_size} ids but vocab.json has {len(vocab)}; "
                           "the run is damaged, train it again")
    path = weights_file(run, weights)
    model = CharLM(model_cfg)
    try:
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise CharRNNError(f"{path} cannot be loaded into this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); the run is damaged, train it again") from None
    return LoadedRun(Path(run), cfg, vocab, model.to(device).eval(), path.name)
