"""The generation options and their checks, shared by the PyTorch sampler, the server and the torch-free runtime.

Kept free of torch so that :mod:`charrnn.runtime` (onnxruntime + NumPy) gives exactly the
same messages as ``charrnn generate RUN``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

from .config import NON_NEGATIVE_INT, POSITIVE_INT, SEED, TEMPERATURE, check_fields, option
from .errors import OptionError

# Temperatures below this sample as greedily as 0 does: the distribution is one-hot long before, and
# logits / T would overflow to inf (and sample nonsense) near float32's smallest numbers.
GREEDY_BELOW = 1e-6


_OPENAI_PENALTY = (lambda v: -2 <= v <= 2, "must be between -2 and 2")


def _unit_interval(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1


@dataclass(frozen=True)
class SamplingParams:
    """How each next id is chosen: the one object the sampler (:class:`charrnn.decoding.Decoding`), the server's jobs
    and the torch-free runtime take, as vLLM's ``SamplingParams``.

    Made and checked once: a bad value raises :class:`charrnn.errors.OptionError` naming the field when the object
    is made, and an object that exists is valid (it is frozen; :func:`dataclasses.replace` makes a checked copy).
    Each field is written once here, with its help and check (:func:`charrnn.config.option`); ``charrnn generate``
    offers the fields with help as flags, and the keyword arguments of ``generate`` / ``complete`` / ``stream``
    become one of these in :meth:`of`.  Filters apply in the order of ``transformers``: temperature, top-k,
    top-p, min-p.  How much to generate and how many samples (``length``, ``num_samples``) are the batch's shape,
    not how ids are chosen: they stay arguments of their own (:func:`check_shape`).
    """

    temperature: float = option(1.0, f"0 (or below {GREEDY_BELOW:g}) is greedy; lower is safer, higher wilder",
                                check=TEMPERATURE,
                                default_text="1, or the default stored in an .onnx file")
    top_k: int | None = option(None, "sample only among the K most likely characters", metavar="K",
                               check=POSITIVE_INT)
    top_p: float | None = option(None, "sample only among the most likely characters holding mass P", metavar="P",
                                 check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    min_p: float | None = option(None, "sample only among the characters at least P times as likely as the most "
                                       "likely one (min-p, after temperature, top-k and top-p, as transformers' "
                                       "MinPLogitsWarper); 0 is off", metavar="P",
                                 check=(_unit_interval, "must be in [0, 1] (0 is off)"))
    repetition_penalty: float = option(1.0, "CTRL's penalty on ids already in the text, prompt included (as "
                                            "transformers applies it): above 1 discourages repeats, 1 is off",
                                       metavar="R", check=(lambda v: 0 < v < float("inf"), "must be > 0 (1 is off)"))
    presence_penalty: float = option(0.0, "subtracted from the logit of every id already generated (the OpenAI "
                                          "API's; -2 to 2)", metavar="P", check=_OPENAI_PENALTY)
    frequency_penalty: float = option(0.0, "subtracted from an id's logit once per time it was generated (the "
                                           "OpenAI API's; -2 to 2)", metavar="F", check=_OPENAI_PENALTY)
    seed: int | None = option(None, "random seed: same seed, same text", check=SEED)
    label: str | None = option(None, "of a run trained with --labels: the label to generate as (default: "
                                     "unlabelled), or a weighted mix such as a=0.7,b=0.3", metavar="NAME")
    # No help: not flags made from the fields (`charrnn generate` has --stop and --logprobs of its own).
    stop: tuple[str, ...] = option(())        # texts that end a sample (never shown)
    logprobs: int | None = option(None, check=NON_NEGATIVE_INT)   # log-probability alternatives per token

    def __post_init__(self) -> None:
        check_fields(self)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())   # one text, or several
        if "" in stop:
            raise OptionError("stop", "is an empty text, which every text starts with; give stop texts of one "
                                      "character or more")
        object.__setattr__(self, "stop", stop)

    @classmethod
    def of(cls, params: SamplingParams | None = None, **options) -> SamplingParams:
        """The keyword-argument API's conversion, in one place: ``params`` (default: every field's default) with
        the ``options`` given (``temperature=0.8, seed=1``, ...) replaced."""
        if params is None:
            return cls(**options)
        if not isinstance(params, cls):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        return dataclasses.replace(params, **options) if options else params

    @classmethod
    def pick(cls, source, **values) -> SamplingParams:
        """From the attributes of ``source`` (a request body, parsed flags) named as the fields, ``values`` winning;
        ``source`` lacking a field leaves its default."""
        names = [f.name for f in fields(cls) if hasattr(source, f.name)]
        return cls(**{**{name: getattr(source, name) for name in names}, **values})


@dataclass
class GenerationOptions:
    """What ``charrnn generate`` (and :meth:`charrnn.api.LanguageModel.generate`) is asked for, each
    option with its help and check (see :func:`charrnn.config.option`): the text to continue, the batch's
    shape and the :class:`SamplingParams` (their flags beside the others, by their own names)."""

    prompt: str = option("", "text to continue", default_text="start after a newline")
    length: int = option(1000, "characters to generate per sample", check=NON_NEGATIVE_INT)
    sampling: SamplingParams = option(factory=SamplingParams)
    num_samples: int = option(1, "samples, generated together in one batch", check=POSITIVE_INT)

    def validate(self) -> "GenerationOptions":
        check_fields(self)      # the sampling parameters checked themselves when they were made
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "GenerationOptions":
        """From flat values (the command line's), the sampling parameters' among them; checked."""
        names = {f.name for f in fields(SamplingParams)}
        sampling = SamplingParams(**{k: v for k, v in values.items() if k in names})
        return cls(sampling=sampling, **{k: v for k, v in values.items() if k not in names}).validate()


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


def check_shape(length: int = 1, num_samples: int = 1) -> None:
    """Check a batch's shape (``length`` characters per sample, ``num_samples`` rows) with
    :class:`GenerationOptions`' checks; raises :class:`charrnn.errors.OptionError`."""
    GenerationOptions(length=length, num_samples=num_samples).validate()


def check_sampling_options(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           length: int = 1, num_samples: int = 1, seed: int | None = None, *,
                           stop: Sequence[str] = (), **params) -> None:
    """Raises :class:`charrnn.errors.OptionError` for a bad value (kept for callers of the loose-argument form:
    charrnn itself makes a :class:`SamplingParams` and checks the shape with :func:`check_shape`)."""
    check_shape(length, num_samples)
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop, **params)


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
