"""The contract every kind of model implements: a charrnn run (:class:`charrnn.api.LanguageModel`), an exported
``.onnx`` file (:class:`charrnn.runtime.ExportedModel`) and a Hugging Face model (:class:`charrnn.hf.PretrainedModel`).

Every kind is a :class:`TextGenerator` and :class:`Described`, and declares what else it can do in its
:class:`Capabilities` (the class attribute ``capabilities``, which an instance may narrow to what its reader can
do).  The command line and the server read those flags; they never probe a model for a method.  A kind that
generates with charrnn's own :class:`charrnn.sampling.Sampler` gives it a :class:`Reader`, the model-specific half
(reading prompts, one step, ids back to text); the sampler does the rest (decoding options, stop texts,
log-probabilities, beam search) the same way for every kind.

This module imports neither torch nor NumPy: the torch-free runtime implements it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a model kind can do beyond :class:`TextGenerator` and :class:`Described`."""

    complete: bool = False
    """:class:`Completer`: ``complete()``, stop texts, log-probabilities and presence / frequency penalties."""
    beam_search: bool = False
    """``sampler.beam(prompt, length, beam_width)`` (``charrnn generate --beam-width``)."""
    evaluate: bool = False
    """:class:`Evaluator`: ``evaluate(corpus, val_fraction=...)``."""
    windows: bool = False
    """``evaluate(window=, stride=)``: a model with a bounded context reads the text in overlapping windows."""
    dynamic: bool = False
    """Dynamic evaluation: ``evaluate(dynamic=...)`` and ``adapted(text)`` (:mod:`charrnn.dynamic`)."""
    serve: bool = False
    """A ``sampler`` (:class:`charrnn.sampling.Sampler`) the server's engine steps request by request."""
    batchable: bool = False
    """The server may step several requests as one batch (their states concatenate, and a row's numbers do not
    depend on its neighbours')."""
    prompt_cache: bool = False
    """Its sampler keeps the state after prompts it has read (``sampler.prompt_cache``, the server's
    ``--prompt-cache-mb``)."""
    int8: bool = False
    """Loads with int8 weights on request (``load(..., int8=True)``)."""
    weights: bool = False
    """Loads the best or the latest weights on request (``load(..., weights="latest")``)."""
    torch_free: bool = False
    """Generates without torch installed."""


@runtime_checkable
class TextGenerator(Protocol):
    """Sampling from a model: what every kind implements.  ``options`` are the fields of
    :class:`charrnn.options.SamplingParams`, as keywords or as ``params=SamplingParams(...)`` (a kind without
    :attr:`Capabilities.complete` refuses stop texts, log-probabilities and presence / frequency penalties)."""

    capabilities: Capabilities
    vocab: Any
    """The vocabulary: ``kind`` (``"char"``, ``"word"``, ``"bpe"``, ``"pretrained"``), ``len()``, ``unknown(text)``."""

    def unknown_chars(self, text: str) -> list[str]:
        """Characters (or words) of ``text`` the model does not know (they are read as ``[UNK]``)."""

    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
                 **options) -> list[str]:
        """``num_samples`` texts (prompt + up to ``length`` new characters), or one per prompt of a list."""

    def stream(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
               **options) -> Iterator[list[str]]:
        """The new text of every sample, step by step (the prompt is not repeated)."""


@runtime_checkable
class Described(Protocol):
    """What was loaded, in words."""

    @property
    def label(self) -> str:
        """A few words shown beside the model's name (a run's weights, a Hugging Face model's type, ...)."""

    def describe(self) -> dict:
        """What the server's ``/v1/model`` says about the model (JSON-serialisable)."""


@runtime_checkable
class Completer(Protocol):
    """:attr:`Capabilities.complete`."""

    def complete(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
                 **options) -> list:
        """As ``generate``, with why each sample ended and its log-probability records
        (:class:`charrnn.sampling.Completion`)."""


@runtime_checkable
class Evaluator(Protocol):
    """:attr:`Capabilities.evaluate`."""

    def evaluate(self, corpus: str | None = None, *, val_fraction: float | None = None, **options) -> dict:
        """``{loss, perplexity}`` per token, ``{bpc, nats_per_char}`` per character, ``{tokens, chars}``, and the
        entries its capabilities add (``window``/``stride``, ``dynamic``)."""


@runtime_checkable
class Reader(Protocol):
    """The model-specific half of :class:`charrnn.sampling.Sampler` (ids and states are torch tensors; ids are the
    vocabulary's, 0 being ``[UNK]``, which is never generated)."""

    model: Any
    """The model (``model.config.vocab_size``: the ids beam search scores per beam)."""
    vocab: Any
    """``kind``, ``len()``, ``banned`` (ids never generated), ``steps_for(length)``, ``unknown(text)``;
    ``decode(ids)`` for a character vocabulary (the sampler's fast path)."""
    device: Any
    stepper: Any
    """``step(ids (batch,), state) -> (logits (batch, vocab), state)`` and ``backend`` (``"native"`` or not)."""
    batchable: bool
    """Whether the states of different requests may be stepped as one batch."""
    prompt_cache: Any
    """A :class:`charrnn.prompt_cache.PromptCache` that :meth:`prime` uses when set, or None."""

    def encode_prompt(self, prompt: str) -> tuple[Any, list[str]]:
        """The prompt's ids, and what of it the model does not know; an error for a prompt it cannot read."""

    def healed(self, prompt: str) -> tuple[Any, bytes]:
        """The ids the model reads for ``prompt``, and the bytes its first generated token must start with."""

    def prompt_ids(self, prompt: str) -> Any:
        """The ids the model reads for ``prompt`` (what a repetition penalty counts as seen)."""

    def prime(self, prompts: Sequence[str]) -> tuple[Any, Any]:
        """Every prompt read; the last logits ``(batch, vocab)`` and the state, a row per prompt."""

    def token_text(self, i: int) -> str:
        """The text of id ``i`` alone (the alternatives of a log-probability record)."""

    def text_stream(self, prompts: Sequence[str], length: int) -> Any:
        """What turns the generated ids into text: ``push(ids) -> pieces``, ``done``, ``select_rows(index)``
        (:class:`charrnn.tokens.TextStream`)."""

    def check_fits(self, option: str, value: int, rows: int, length: int = 0) -> None:
        """Refuse (naming ``option`` and its ``value``) a batch of ``rows`` that could not fit in memory."""

