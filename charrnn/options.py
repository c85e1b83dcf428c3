"""The generation options and their checks, shared by the PyTorch sampler, the server and the torch-free runtime.

Kept free of torch so that :mod:`charrnn.runtime` (onnxruntime + NumPy) gives exactly the
same messages as ``charrnn generate RUN``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import NON_NEGATIVE_INT, POSITIVE_INT, SEED, TEMPERATURE, check_fields, option
from .errors import OptionError

# Temperatures below this sample as greedily as 0 does: the distribution is one-hot long before, and
# logits / T would overflow to inf (and sample nonsense) near float32's smallest numbers.
GREEDY_BELOW = 1e-6


_OPENAI_PENALTY = (lambda v: -2 <= v <= 2, "must be between -2 and 2")


@dataclass
class GenerationOptions:
    """What ``charrnn generate`` (and :meth:`charrnn.api.LanguageModel.generate`) is asked for, each
    option with its help and check (see :func:`charrnn.config.option`)."""

    prompt: str = option("", "text to continue", default_text="start after a newline")
    length: int = option(1000, "characters to generate per sample", check=NON_NEGATIVE_INT)
    temperature: float = option(1.0, f"0 (or below {GREEDY_BELOW:g}) is greedy; lower is safer, higher wilder",
                                check=TEMPERATURE,
                                default_text="1, or the default stored in an .onnx file")
    top_k: int | None = option(None, "sample only among the K most likely characters", metavar="K",
                               check=POSITIVE_INT)
    top_p: float | None = option(None, "sample only among the most likely characters holding mass P", metavar="P",
                                 check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    repetition_penalty: float = option(1.0, "CTRL's penalty on ids already in the text, prompt included (as "
                                            "transformers applies it): above 1 discourages repeats, 1 is off",
                                       metavar="R", check=(lambda v: 0 < v < float("inf"), "must be > 0 (1 is off)"))
    presence_penalty: float = option(0.0, "subtracted from the logit of every id already generated (the OpenAI "
                                          "API's; -2 to 2)", metavar="P", check=_OPENAI_PENALTY)
    frequency_penalty: float = option(0.0, "subtracted from an id's logit once per time it was generated (the "
                                           "OpenAI API's; -2 to 2)", metavar="F", check=_OPENAI_PENALTY)
    num_samples: int = option(1, "samples, generated together in one batch", check=POSITIVE_INT)
    seed: int | None = option(None, "random seed: same seed, same text", check=SEED)

    def validate(self) -> "GenerationOptions":
        check_fields(self)
        return self


@dataclass
class DynamicOptions:
    """The options of dynamic evaluation (``charrnn eval --dynamic``, ``charrnn generate --adapt``)."""

    dynamic_lr: float = option(1e-4, "step size of the adaptation, in units of the training gradients' RMS",
                               metavar="LR", check=(lambda v: 0 < v < 1, "must be in (0, 1)"))
    dynamic_decay: float = option(1e-3, "pull back toward the trained weights per segment",
                                  metavar="D", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    dynamic_segment: int = option(50, "ids read between two adaptation steps", metavar="N", check=POSITIVE_INT)

    def validate(self) -> "DynamicOptions":
        check_fields(self)
        return self


def check_sampling_options(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           length: int = 1, num_samples: int = 1, seed: int | None = None, *,
                           repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, stop: Sequence[str] = ()) -> None:
    """Raises :class:`charrnn.errors.OptionError` for a bad value."""
    GenerationOptions(length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                      seed=seed, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty).validate()
    if "" in stop:
        raise OptionError("stop", "is an empty text, which every text starts with; give stop texts of one character "
                                  "or more")


def check_beam_width(beam_width) -> None:
    if not POSITIVE_INT[0](beam_width) and not (isinstance(beam_width, float) and beam_width.is_integer()
                                               and beam_width >= 1):
        raise OptionError("beam_width", "must be a positive integer, got {value}", value=beam_width)


def start_text(prompt: str, chars, option: str = "prompt") -> str:
    """The text generation starts from: ``prompt``, or a newline when it is empty (and the
    vocabulary ``chars`` has one); ``option`` is the option that gave the prompt, for the error."""
    if prompt == "":
        if "\n" not in chars:
            raise OptionError(option, "is empty and this vocabulary has no newline to start from; give some text "
                                      "to continue")
        return "\n"
    return prompt
