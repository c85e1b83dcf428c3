"""Options as dataclasses whose fields carry their own help, and presets: named bundles of options.

Each option is written once, as a field made by :func:`option`: its default, help text, choices,
metavar and check live there.  :func:`check_fields` validates any such dataclass, and the command
line (:mod:`charrnn.cli`) builds its flags from the same fields, so ``--help`` and docs/flags.md
show the defaults written here.  To add a training option, add a field to :class:`TrainConfig`
(or :class:`ModelConfig` for the model) and use it; ``charrnn train --help`` offers it at once.

The model's options are a dataclass of their own, :class:`ModelConfig`, nested in
:class:`TrainConfig` as ``model``.  Layering: dataclass defaults (the TensorFlow tutorial's
setup) <- preset <- explicit options.  A preset is nothing but a dict of option values, with
the model's options given by their own names (``hidden``, not ``model.hidden``), as on the
command line; there is no second code path.  No torch here, so that the parser needs none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields

from .cells import ARCHS, cell
from .errors import CharRNNError, OptionError

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LOSS_ON = ("all", "last")
TOKENIZERS = ("char", "word", "bpe")
LABEL_ON = ("input", "state", "both")
BPE_VOCAB = 4096

Check = tuple[Callable[[object], bool], str]  # (is the value good?, the rule it breaks: "must be ...")


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT: Check = (lambda v: _integer(v) and v > 0, "must be a positive integer")
NON_NEGATIVE_INT: Check = (lambda v: _integer(v) and v >= 0, "must be >= 0")
POSITIVE_NUMBER: Check = (lambda v: _number(v) and v > 0, "must be a positive number")
NON_NEGATIVE: Check = (lambda v: _number(v) and v >= 0, "must be >= 0")
SEED: Check = (lambda v: _integer(v) and 0 <= v < 2**63, "must be an integer from 0 to 2**63 - 1")
DROP_PROBABILITY: Check = (lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1)")
# Sampling divides float32 logits by the temperature: float32 ends at 3.4e38, past which T is infinite there and
# turns the -inf of banned ids into NaN (any T past about 100 samples all but uniformly anyway).
TEMPERATURE: Check = (lambda v: _number(v) and 0 <= v <= 1e38, "must be >= 0 (0 means greedy) and at most 1e38")


def option(default=MISSING, help: str = "", *, factory=MISSING, choices=None, check: Check | None = None,
           metavar: str | None = None, default_text: str | None = None, group: str | None = None,
           parse: Callable[[str], object] | None = None):
    """A dataclass field that is a user option.

    ``help`` (no help: not a command-line option), ``choices``, ``check`` (a :data:`Check`),
    ``metavar``, ``default_text`` (what ``--help`` says instead of the default value), ``group``
    (the heading in ``--help``) and ``parse`` (turns the flag's text into the value, when the
    field's type cannot) are kept in the field's metadata.
    """
    meta = dict(help=help, choices=choices, check=check, metavar=metavar, default_text=default_text, group=group,
                parse=parse)
    return field(default=default, default_factory=factory, metadata={k: v for k, v in meta.items() if v is not None})


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def value_type(cls, f: dataclasses.Field):
    """The type of field ``f`` of ``cls`` without ``| None``, and whether ``None`` is allowed."""
    hint = _hints(cls)[f.name]
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_fields(obj, skip: tuple[str, ...] = ()) -> None:
    """Check every option field of the dataclass ``obj`` against its choices and check (nested
    dataclasses are checked by their own ``validate``); raises :class:`OptionError`."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        kind, optional = value_type(type(obj), f)
        if f.name in skip or dataclasses.is_dataclass(kind) or (value is None and optional):
            continue
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None and value not in choices:
            raise OptionError(f.name, "must be one of {choices}, got '{value}'", choices=", ".join(choices),
                              value=value)
        if check is not None:
            try:
                good = check[0](value)
            except TypeError:
                good = False
            if not good:
                raise OptionError(f.name, check[1] + ", got {value}", value=value)


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`charrnn.models.CharLM`; ``embed=0`` feeds one-hot vectors (Keras recipe).

    ``vocab_size`` comes from the corpus: it is ``None`` in the training options.
    """

    vocab_size: int | None = option(None, check=POSITIVE_INT)
    arch: str = option("gru", "recurrent cell (mingru, minlstm: gates on the input only, trained with a parallel "
                              "scan)", choices=ARCHS)
    embed: int = option(256, "embedding size, 0 for one-hot inputs",
                        check=(NON_NEGATIVE_INT[0], "must be positive (or 0 for one-hot inputs)"))
    hidden: int = option(1024, "units per recurrent layer", check=POSITIVE_INT)
    layers: int = option(1, "stacked recurrent layers", check=POSITIVE_INT)
    dropout: float = option(0.0, "dropout between recurrent layers and on the output", check=DROP_PROBABILITY)
    weight_drop: float = option(0.0, "DropConnect (AWD-LSTM) on the recurrent weights while training, one mask "
                                     "per batch", check=DROP_PROBABILITY)
    # A labelled corpus's labels (charrnn.labels): how many the model conditions on (0: none; set from the corpus)
    n_labels: int = option(0, check=NON_NEGATIVE_INT)
    label_on: str = option("input", "with --labels: where the model reads the label: every step's input (a "
                                    "learned label embedding added to the character's), the initial state (a "
                                    "learned one per label), or both", choices=LABEL_ON)

    def validate(self) -> "ModelConfig":
        if self.vocab_size is None:
            raise OptionError("vocab_size", "must be given: the number of ids the model reads and predicts")
        check_fields(self)
        self.check_weight_drop()
        return self

    def check_weight_drop(self) -> None:
        if self.weight_drop and cell(self.arch).input_only:
            raise OptionError("weight_drop", "drops recurrent weights, which {arch} {cell} has none of (its gates "
                                             "read the input only); use {dropout}", cell=self.arch)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """The parameter count of the model these options build (as ``CharLM.num_parameters()``)."""
        gates = cell(self.arch).gates * self.hidden
        width = self.embed or self.vocab_size
        hh = 0 if cell(self.arch).input_only else self.hidden + 1     # recurrent weights and their bias
        recurrent = gates * (width + 1 + hh) + (self.layers - 1) * gates * (self.hidden + 1 + hh)
        return (self.vocab_size * self.embed + recurrent + self.hidden * self.vocab_size + self.vocab_size
                + self.label_parameters())

    def label_parameters(self) -> int:
        """The label embedding's and the initial states' parameters (0 for a model without labels)."""
        width = self.embed or self.vocab_size
        on_input = width if self.label_on in ("input", "both") else 0
        on_state = len(cell(self.arch).state) * self.layers * self.hidden if self.label_on in ("state", "both") else 0
        return self.n_labels * (on_input + on_state)

    def training_bytes(self, batch_size: int, seq_len: int) -> int:
        """The least memory a training step takes: float32 weights, gradients and two optimizer moments
        (16 bytes a parameter), and for each of the batch's characters the activations kept for the
        backward pass and their gradients (every layer's gates and output, the logits thrice)."""
        gates = cell(self.arch).gates
        per_char = 4 * (2 * self.layers * (gates + 1) * self.hidden + 3 * self.vocab_size + self.embed)
        return 16 * self.num_parameters() + batch_size * seq_len * per_char


MODEL_OPTIONS = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("help"))
FROM_CORPUS = ("vocab_size", "n_labels")      # the model's sizes the corpus gives, not options

_corpus = functools.partial(option, group="corpus")
_training = functools.partial(option, group="training")
_samples = functools.partial(option, group="samples during training (printed and saved in RUN/samples/)")
_hardware = functools.partial(option, group="reproducibility and hardware")


def _temperatures(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"expected numbers separated by commas, like 0.2,0.5,1.0, got '{text}'") from None


@dataclass
class TrainConfig:
    """Everything ``charrnn train`` (and :func:`charrnn.train`) is asked for; ``model`` holds the model's options."""

    lowercase: bool = _corpus(False, "lowercase the text")
    newlines_to_spaces: bool = _corpus(False, "replace newlines by spaces")
    tokenizer: str = _corpus("char", "what a token is: a character, a word (words, runs of punctuation and runs of "
                                     "whitespace), or a byte-level BPE subword learned from the training split",
                             choices=TOKENIZERS)
    labels: bool = _corpus(False, "the corpus is labelled (one model for many labelled texts, generated by "
                                  "label): a folder whose sub-folders are the labels, each holding .txt files "
                                  "(.txt files beside them are unlabelled), or a .tsv manifest of label<TAB>path "
                                  "lines")
    max_vocab: int | None = _corpus(None, "the most ids of a word or bpe vocabulary ([UNK] included): word keeps "
                                          "the most frequent tokens of the training split, bpe merges up to it",
                                    check=(lambda v: _integer(v) and v >= 2, "must be an integer >= 2"),
                                    default_text=f"word: every token; bpe: {BPE_VOCAB}")
    model: ModelConfig = option(factory=ModelConfig, group="model")
    # data: shuffled windows (stateless, every `window_step` characters) or contiguous streams (stateful)
    seq_len: int = _training(100, "characters per training sequence", check=POSITIVE_INT)
    batch_size: int = _training(64, "sequences per batch", check=POSITIVE_INT)
    stateful: bool = _training(False, "truncated back-propagation through time: batch-size contiguous streams, each "
                                      "batch continuing the last one with the recurrent state carried over (reset "
                                      "every epoch)")
    window_step: int | None = _training(None, "stateless windows start every N characters", check=POSITIVE_INT,
                                        default_text="--seq-len, no overlap")
    loss_on: str = _training("all", "predict every next character of a window (all) or only the one after it "
                                    "(last, the Keras recipe)", choices=LOSS_ON)
    # optimisation
    sampled_softmax: int = _training(0, "train the output layer on each true token and N tokens sampled from "
                                        "their unigram frequencies (sampled softmax; evaluation and generation "
                                        "keep the full softmax); 0: full softmax", check=NON_NEGATIVE_INT)
    lr: float = _training(1e-3, "learning rate", check=POSITIVE_NUMBER)
    optimizer: str = _training("adam", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _training(0.0, "weight decay", check=NON_NEGATIVE)
    clip: float | None = _training(5.0, "clip the gradient norm to this; 0 turns it off",
                                   check=(NON_NEGATIVE[0], "must be >= 0 (0 turns clipping off)"))
    lr_schedule: str = _training("constant", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int = _training(0, "linear learning-rate warm-up steps", check=NON_NEGATIVE_INT)
    min_lr_ratio: float = _training(0.1, "cosine decays to lr x this",
                                    check=(lambda v: _number(v) and 0 <= v <= 1, "must be in [0, 1]"))
    # how long
    epochs: int | None = _training(10, "passes over the training text", check=POSITIVE_INT,
                                   default_text="10, unless --max-steps or --time-limit is given")
    max_steps: int | None = _training(None, "stop after this many steps in all", check=POSITIVE_INT)
    time_limit: float | None = _training(None, "stop after this many seconds of training in all (checkpoint "
                                               "included)", check=POSITIVE_NUMBER)
    # validation, logging, checkpoints
    val_fraction: float = _training(0.1, "the last fraction of the text held out for validation",
                                    check=(lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1)"))
    eval_every: int | None = _training(None, "also evaluate every N steps", check=POSITIVE_INT,
                                       default_text="each epoch")
    eval_streams: int = _training(16, "parallel contiguous streams in evaluation", check=POSITIVE_INT)
    log_every: int = _training(10, "log the training loss every N steps", check=POSITIVE_INT)
    checkpoint_every: int | None = _training(None, "also checkpoint every N steps", check=POSITIVE_INT,
                                             default_text="at each evaluation")
    # samples during training: every `sample_every` steps (None: at each epoch end; 0: never)
    sample_every: int | None = _samples(None, "sample every N steps",
                                        check=(NON_NEGATIVE_INT[0], "must be >= 0 (0 turns samples off)"),
                                        default_text="at the end of each epoch and of training; 0: never")
    sample_temperatures: list[float] = _samples(
        help="one sample per temperature", factory=lambda: [0.2, 0.5, 1.0, 1.2], metavar="T1,T2,...",
        parse=_temperatures,
        check=(lambda ts: bool(ts) and all(TEMPERATURE[0](t) for t in ts),
               "must be numbers >= 0 (0 is greedy) and at most 1e38"))
    sample_length: int = _samples(200, "characters per sample", check=POSITIVE_INT)
    sample_prompt: str | None = _samples(None, "text the samples continue",
                                         default_text="the first 40 characters of the validation text")
    init_from: str | None = _training(None, "start from a trained charrnn run (its directory), a shipped model "
                                             "(charrnn models: base-en) or a Hugging Face causal LM (a "
                                             "save_pretrained folder or a hub id; the hf extra): its architecture, "
                                             "tokenizer and weights; characters the corpus adds are appended to a "
                                             "character vocabulary", metavar="SOURCE",
                                      check=(lambda v: isinstance(v, str),
                                             "must be the path of a run directory or a model's name"))
    lora: int | None = _training(None, "with --init-from a Hugging Face model: train LoRA adapters of this rank "
                                       "(peft) instead of every weight", metavar="RANK", check=POSITIVE_INT)
    # reproducibility and hardware
    seed: int = _hardware(0, "random seed", check=SEED)
    device: str = _hardware("auto", "where to train", choices=DEVICES, default_text="auto: cuda if available")
    precision: str = _hardware("auto", "bf16 autocast or fp32; auto picks bf16 where the hardware computes it "
                                       "natively", choices=PRECISIONS)

    def model_config(self, vocab_size: int, n_labels: int = 0) -> ModelConfig:
        """The model's options with the corpus's ``vocab_size`` and number of labels."""
        return dataclasses.replace(self.model, vocab_size=vocab_size, n_labels=n_labels)

    def validate(self) -> "TrainConfig":
        check_fields(self.model, skip=("vocab_size",))  # not known until the corpus is read
        self.model.check_weight_drop()
        check_fields(self)
        if self.stateful and (self.window_step not in (None, self.seq_len) or self.loss_on != "all"):
            raise OptionError("stateful", "reads contiguous streams: it cannot be combined with {window_step} or "
                                          "{loss_on} last; drop one of them")
        if self.tokenizer == "char" and self.max_vocab is not None:
            raise OptionError("max_vocab", "applies to {tokenizer} word or bpe; a character vocabulary holds every "
                                           "character of the text")
        if self.tokenizer == "bpe" and (self.max_vocab or BPE_VOCAB) < 257:
            raise OptionError("max_vocab", "is {value}: a byte-level BPE vocabulary holds the 256 bytes and [UNK] at "
                                           "least; give 257 or more", value=self.max_vocab)
        if self.lora is not None and self.init_from is None:
            raise OptionError("lora", "trains adapters on a Hugging Face model; give the model with {init_from}")
        if self.epochs is None and self.max_steps is None and self.time_limit is None:
            raise OptionError("epochs", "give at least one of {epochs}, {max_steps} and {time_limit}")
        return self

    def to_dict(self) -> dict:
        """The options as JSON-ready values, the model's nested under ``model`` (without what the corpus gives:
        ``vocab_size``, ``n_labels``)."""
        d = asdict(self)
        for name in FROM_CORPUS:
            del d["model"][name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From :meth:`to_dict`'s form, or flat (the model's options beside the others, as presets, the command
        line and the config.json of runs written before the model's options were nested give them)."""
        values = flatten(d)
        names = {f.name for f in fields(cls)} - {"model"}
        unknown = set(values) - names - set(MODEL_OPTIONS)
        if unknown:
            raise CharRNNError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        model = {k: v for k, v in values.items() if k in MODEL_OPTIONS}
        return cls(model=ModelConfig(**model), **{k: v for k, v in values.items() if k in names})


def flatten(options: dict) -> dict:
    """``options`` with a nested ``model`` (a dict or :class:`ModelConfig`) spread out beside the others;
    options given flat win over nested ones."""
    options = dict(options)
    model = options.pop("model", None) or {}
    if isinstance(model, ModelConfig):
        model = model.to_dict()
    return {**{k: v for k, v in model.items() if k not in FROM_CORPUS}, **options}


def option_fields(cls=TrainConfig, group: str | None = None) -> Iterator[tuple[type, dataclasses.Field, str | None]]:
    """``(dataclass, field, group)`` of every command-line option of ``cls``, nested dataclasses' included
    (in place, under the nesting field's group)."""
    for f in fields(cls):
        kind, _ = value_type(cls, f)
        if dataclasses.is_dataclass(kind):
            yield from option_fields(kind, f.metadata.get("group", group))
        elif f.metadata.get("help"):
            yield cls, f, f.metadata.get("group", group)


def option_names(cls=TrainConfig) -> list[str]:
    """The names of :func:`option_fields`, which are also their command-line destinations."""
    return [f.name for _, f, _ in option_fields(cls)]


# Named bundles of the options above.  `charrnn train --help` lists them.
PRESETS: dict[str, dict] = {
    "tutorial-gru": {},  # the TensorFlow tutorial: embedding 256, GRU 1024, seq 100, batch 64, Adam
    # The best configuration found for a 20-minute CPU budget on Tiny Shakespeare (see README).
    "shakespeare-20min": {
        "arch": "gru", "layers": 2, "hidden": 640, "embed": 256, "dropout": 0.1,
        "seq_len": 200, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.4, "clip": 1.0,
        "lr_schedule": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.05, "time_limit": 1200.0,
        "eval_streams": 64,
    },
    # The same on CPUs with native bf16 (AVX-512 BF16, AMX), where `auto` trains in bf16:
    # a GRU twice as wide, with more dropout.
    "shakespeare-20min-bf16": {
        "arch": "gru", "layers": 1, "hidden": 2048, "embed": 256, "dropout": 0.25,
        "seq_len": 200, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.4, "clip": 1.0,
        "lr_schedule": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.05, "time_limit": 1200.0,
        "eval_streams": 64,
    },
    # The Keras "character-level text generation with LSTM" example on Nietzsche (seed 004).
    "keras-lstm": {
        "lowercase": True, "newlines_to_spaces": True, "arch": "lstm", "layers": 1, "hidden": 128, "embed": 0,
        "seq_len": 40, "window_step": 3, "loss_on": "last", "batch_size": 1024, "optimizer": "rmsprop",
        "lr": 0.01, "clip": 0.0, "epochs": 40, "sample_length": 400,
    },
}

PRESET_HELP = {
    "tutorial-gru": "the TensorFlow tutorial's model and training (the defaults)",
    "shakespeare-20min": "a GRU of 2 x 640 with dropout 0.1 between the layers and on the output, "
                         "sequences of 200 in batches of 32, AdamW 3e-3 (weight decay 0.4) with cosine decay "
                         "over a 20-minute --time-limit, validation read as 64 streams: "
                         "the best found for 20 CPU minutes",
    "shakespeare-20min-bf16": "shakespeare-20min with one GRU layer of 2048 and output dropout 0.25, for CPUs "
                              "that compute bf16 natively (AVX-512 BF16, AMX; there --precision auto trains in bf16): "
                              "the best found for 20 minutes on such a CPU",
    "keras-lstm": "the Keras Nietzsche example: lowercased, newlines as spaces, one-hot 40-character windows "
                  "every 3 characters, LSTM 128, loss on the next character after each window, RMSprop 0.01, "
                  "batch 1024, 40 epochs, samples at 0.2/0.5/1.0/1.2 after each epoch",
}


def build_config(preset: str | None = None, **options) -> TrainConfig:
    """Defaults <- preset <- options (``None`` values in ``options`` mean "not given").

    ``options`` are :class:`TrainConfig`'s fields and :class:`ModelConfig`'s by their own names
    (``hidden=512``), or ``model=`` a :class:`ModelConfig` or dict.
    """
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise OptionError("preset", "'{value}' is unknown; choose one of {presets}", value=preset,
                              presets=", ".join(PRESETS))
        values.update(PRESETS[preset])
    values.update(flatten({k: v for k, v in options.items() if v is not None}))
    # --max-steps or --time-limit alone means "train until then", not "until then or 10 epochs".
    if "epochs" not in values and (values.get("max_steps") or values.get("time_limit")):
        values["epochs"] = None
    return TrainConfig.from_dict(values).validate()
