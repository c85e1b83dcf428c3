"""Where a run starts from: ``charrnn train CORPUS --out DIR --init-from RUN`` (and ``charrnn.train(...,
init_from=RUN)``) fine-tunes a trained charrnn run, or a model shipped with charrnn (:mod:`charrnn.shipped`:
``base-en``), on new text instead of starting from random weights.

The new run takes the source's architecture (an option that conflicts with it is refused, naming the
option), its tokenizer and its vocabulary: the source's ids keep their meaning, and for a character run
the characters the new corpus has and the source lacks are appended (:meth:`charrnn.vocab.Vocab.grown`).
Their rows start so that the model's predictions are the source's: the logits of every character the source
knew are exactly its own, the new characters' output rows are zero with the bias of the source's rarest
character, and their input rows keep the new model's random initialisation (they change nothing until a new
character is read).  A word or BPE source keeps its tokenizer, and training says what share of the new corpus
becomes ``[UNK]``.

Everything else is a normal run.  ``config.json`` records the source under ``init`` (its path, the weights
file and its sha256), and ``charrnn report`` shows it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import shipped
from .config import MODEL_OPTIONS
from .errors import CharRNNError, OptionError
from .models import CharLM
from .vocab import Vocab

# The options that make the architecture: they come from the source.  The others (dropout, weight_drop) may be
# given for the new run; left out, they are the source's too.
ARCHITECTURE = ("arch", "embed", "hidden", "layers")
# What a word or BPE source's vocabulary is made by.
TOKENIZER_OPTIONS = ("tokenizer", "max_vocab")


@dataclass
class Source:
    """A run to start from: its path, config.json, vocabulary and model (its best weights), and the sha256 of
    the weights file."""

    path: Path
    name: str | None      # a shipped model's name (base-en), None for a run directory
    config: dict
    vocab: object
    model: CharLM
    weights: str
    sha256: str

    def describe(self) -> dict:
        """What ``config.json`` records under ``init``."""
        where = ({"from": self.name, "kind": "shipped"} if self.name else
                 {"from": str(self.path.resolve()), "kind": "run"})
        return {**where, "weights": self.weights, "sha256": self.sha256}


def config(path) -> dict:
    """The config.json of the run at ``path``; a one-line :class:`OptionError` naming ``--init-from`` when
    ``path`` is not a run."""
    try:
        saved = ckpt.read_config(shipped.resolve(path))
    except CharRNNError as e:
        raise OptionError("init_from", "{path}: {why}", path=path, why=str(e)) from None
    except OSError as e:            # e.g. a name too long for the file system
        raise OptionError("init_from", "cannot read {path}: {why}", path=path, why=e.strerror or e) from None
    if ckpt.is_hf_config(saved):
        raise OptionError("init_from", "{path} was fine-tuned from a Hugging Face model: go on with {resume}, or "
                                       "start from its folder {folder} (a whole model, not a LoRA adapter)",
                          path=path, folder=Path(path) / ckpt.HF_FOLDER)
    return saved


def read(path) -> Source:
    """The run at ``path`` with its best weights (:func:`config` says why not)."""
    config(path)
    where = Path(shipped.resolve(path))
    try:
        loaded = ckpt.load_run(where)
    except CharRNNError as e:
        raise OptionError("init_from", "{path}: {why}", path=path, why=str(e)) from None
    digest = hashlib.sha256((where / loaded.weights).read_bytes()).hexdigest()
    name = path if shipped.path(path) is not None else None
    return Source(where, name, loaded.config, loaded.vocab, loaded.model, loaded.weights, digest)


def options(given: dict, source_config: dict, path) -> dict:
    """The training options ``given`` (``None``: not given) with the architecture and tokenizer of the source
    (its config.json, read from ``path``); an explicit option that conflicts with them is refused, naming it."""
    model, training = source_config["model"], source_config.get("training", {})
    out = dict(given)
    for name in ARCHITECTURE + TOKENIZER_OPTIONS:
        default = "char" if name == "tokenizer" else None
        theirs = model.get(name) if name in MODEL_OPTIONS else training.get(name, default)
        if given.get(name) is not None and given[name] != theirs:
            raise OptionError(name, "{" + name + "} is {value}, but the run {source} you start from has {theirs}; "
                                    "leave it out: a run started with {init_from} takes its source's",
                              value=given[name], source=path, theirs=theirs)
        out[name] = theirs
    for name in ("dropout", "weight_drop"):
        if given.get(name) is None:
            out[name] = model.get(name, 0.0)
    return out


def check_not_replaced(source, out) -> None:
    """A new run may not be written where its source is (``--force`` would delete the source)."""
    if Path(source).resolve() == Path(out).resolve():
        raise OptionError("init_from", "is {path}, the run {out} would replace; give the new run another {out}",
                          path=out)


def check_resume(saved: str | None, given: str | None, run) -> None:
    """A resumed run goes on from its own checkpoint: ``--init-from`` may be left out or repeated, not changed."""
    if given is not None and (saved is None or Path(given).resolve() != Path(saved).resolve()):
        raise OptionError("init_from", "is {given}, but the run in {run} started from {saved}; resume it without "
                                       "{init_from}, or start a new run (another {out} or {force})", given=given,
                          run=run, saved=saved or "random weights")


def vocabulary(source: Source, corpus_vocab: Vocab):
    """The new run's vocabulary: a character source's with the corpus's new characters appended; a word or BPE
    source's own."""
    return source.vocab.grown(corpus_vocab.chars) if source.vocab.kind == "char" else source.vocab


LABEL_PARAMETERS = ("label_embedding", "initial_state")     # what a labelled CharLM has beyond a plain one


@torch.no_grad()
def load_weights(model: CharLM, source: Source) -> None:
    """Give ``model`` (built for the new vocabulary, randomly initialised) the source's weights: every tensor
    whole, except the rows (or the one-hot input columns) of the ids the source lacks (see the module)."""
    old = source.model.state_dict()
    known = source.model.config.vocab_size
    for name, tensor in model.state_dict().items():
        if name not in old and name.split(".")[0] in LABEL_PARAMETERS:
            continue                    # a labelled model's labels start at zero: each label is the source
        theirs = old[name]
        if tensor.shape == theirs.shape:
            tensor.copy_(theirs)
        elif name == "embedding.weight" or name.startswith("head."):
            tensor[:known].copy_(theirs)
        elif name == "rnn.weight_ih_l0":        # one-hot inputs: a column per id
            tensor[:, :known].copy_(theirs)
        else:
            raise OptionError("init_from", "the run {source} has {name} {theirs} where this model has {ours}",
                              source=source.path, name=name, theirs=tuple(theirs.shape), ours=tuple(tensor.shape))
    if model.config.vocab_size > known:
        model.head.weight[known:].zero_()
        model.head.bias[known:] = model.head.bias[1:known].min()
