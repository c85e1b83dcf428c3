"""Training options as one dataclass, and presets: named bundles of those same options.

Layering: dataclass defaults (the TensorFlow tutorial's setup) <- preset <- explicit
options.  A preset is nothing but a dict of option values; there is no second code path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import CharRNNError

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LOSS_ON = ("all", "last")


@dataclass
class TrainConfig:
    # corpus normalisation
    lowercase: bool = False
    newlines_to_spaces: bool = False
    # model (see models.ModelConfig)
    arch: str = "gru"
    embed: int = 256
    hidden: int = 1024
    layers: int = 1
    dropout: float = 0.0
    weight_drop: float = 0.0
    # data: shuffled windows (stateless, every `window_step` characters) or contiguous streams (stateful)
    seq_len: int = 100
    batch_size: int = 64
    window_step: int | None = None  # default seq_len
    stateful: bool = False
    loss_on: str = "all"  # "last": only the window's last character is a target (the Keras recipe)
    # optimisation
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    clip: float | None = 5.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    # how long
    epochs: int | None = 10
    max_steps: int | None = None
    time_limit: float | None = None
    # validation, logging, checkpoints
    val_fraction: float = 0.1
    eval_every: int | None = None
    eval_streams: int = 16
    log_every: int = 10
    checkpoint_every: int | None = None
    # samples during training: every `sample_every` steps (None: at each epoch end; 0: never)
    sample_every: int | None = None
    sample_temperatures: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0, 1.2])
    sample_length: int = 200
    sample_prompt: str | None = None  # default: the start of the validation text
    # reproducibility and hardware
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def model_config(self, vocab_size: int):
        """The model's options, a :class:`charrnn.models.charlm.ModelConfig`."""
        # Imported here so that the command line's parser (which reads PRESETS) needs no torch.
        from .models.charlm import ModelConfig

        return ModelConfig(vocab_size, self.arch, self.embed, self.hidden, self.layers, self.dropout,
                           self.weight_drop)

    def validate(self) -> "TrainConfig":
        # The model's own options are checked by the model layer (vocab_size is not known yet).
        self.model_config(1).validate()
        for name in ("seq_len", "batch_size", "eval_streams", "log_every", "sample_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CharRNNError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("epochs", "max_steps", "eval_every", "checkpoint_every", "window_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise CharRNNError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.clip is not None and not (self.clip >= 0 and math.isfinite(self.clip)):
            raise CharRNNError(f"--clip must be >= 0 (0 turns clipping off), got {self.clip}")
        for name in ("lr", "time_limit"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise CharRNNError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if self.weight_decay < 0:
            raise CharRNNError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise CharRNNError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CharRNNError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.val_fraction < 1:
            raise CharRNNError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise CharRNNError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                   f"got '{getattr(self, name)}'")
        if self.loss_on not in LOSS_ON:
            raise CharRNNError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got '{self.loss_on}'")
        if self.stateful and (self.window_step not in (None, self.seq_len) or self.loss_on != "all"):
            raise CharRNNError("--stateful reads contiguous streams: it cannot be combined with --window-step or "
                               "--loss-on last; drop one of them")
        if self.sample_every is not None and (not isinstance(self.sample_every, int) or self.sample_every < 0):
            raise CharRNNError(f"--sample-every must be >= 0 (0 turns samples off), got {self.sample_every}")
        if not self.sample_temperatures or any(not (t >= 0 and math.isfinite(t)) for t in self.sample_temperatures):
            raise CharRNNError(f"--sample-temperatures must be numbers >= 0 (0 is greedy), got "
                               f"{self.sample_temperatures}")
        if self.epochs is None and self.max_steps is None and self.time_limit is None:
            raise CharRNNError("give at least one of --epochs, --max-steps and --time-limit")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CharRNNError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# Named bundles of the options above.  `charrnn train --help` lists them.
PRESETS: dict[str, dict] = {
    "tutorial-gru": {},  # the TensorFlow tutorial: embedding 256, GRU 1024, seq 100, batch 64, Adam
    # The best configuration found for a 20-minute CPU budget on Tiny Shakespeare (see README).
    "shakespeare-20min": {
        "arch": "gru", "layers": 1, "hidden": 1024, "embed": 256, "dropout": 0.1,
        "seq_len": 200, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.4, "clip": 1.0,
        "lr_schedule": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.05, "time_limit": 1200.0,
        "eval_streams": 64,
    },
    # The same on CPUs with native bf16 (AVX-512 BF16, AMX), where `auto` trains in bf16 at about
    # twice the fp32 speed: a GRU twice as wide, with more dropout.
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
    "shakespeare-20min": "the tutorial's GRU 1024 with output dropout 0.1, sequences of 200 in batches of 32, "
                         "AdamW 3e-3 (weight decay 0.4) with cosine decay "
                         "over a 20-minute --time-limit, validation read as 64 streams (half the time of 16): "
                         "the best found for 20 CPU minutes",
    "shakespeare-20min-bf16": "shakespeare-20min with a GRU of 2048 and output dropout 0.25, for CPUs that compute "
                              "bf16 natively (AVX-512 BF16, AMX; there --precision auto trains in bf16): "
                              "the best found for 20 minutes on such a CPU",
    "keras-lstm": "the Keras Nietzsche example: lowercased, newlines as spaces, one-hot 40-character windows "
                  "every 3 characters, LSTM 128, loss on the next character after each window, RMSprop 0.01, "
                  "batch 1024, 40 epochs, samples at 0.2/0.5/1.0/1.2 after each epoch",
}


def build_config(preset: str | None = None, **options) -> TrainConfig:
    """Defaults <- preset <- options (``None`` values in ``options`` mean "not given")."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise CharRNNError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in options.items() if v is not None})
    # --max-steps or --time-limit alone means "train until then", not "until then or 10 epochs".
    if "epochs" not in values and (values.get("max_steps") or values.get("time_limit")):
        values["epochs"] = None
    return TrainConfig.from_dict(values).validate()
