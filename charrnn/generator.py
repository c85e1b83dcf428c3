"""The generation methods shared by the model kinds that :class:`charrnn.sampling.Sampler` runs.

Its own module, below :mod:`charrnn.api` and :mod:`charrnn.hf`, so that each imports it and neither imports the
other (:func:`charrnn.api.load` alone knows both).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sampling import Completion


class Generator:
    """Generation through ``self.sampler`` (a :class:`charrnn.sampling.Sampler`): the
    :class:`charrnn.interfaces.TextGenerator` and :class:`~charrnn.interfaces.Completer` methods of every kind
    of model charrnn's sampler runs (a run, a pretrained transformer from :mod:`charrnn.hf`; the torch-free
    :mod:`charrnn.runtime` implements its own).  A subclass sets ``vocab``, ``sampler`` and ``capabilities``.

    The decoding ``options`` are the fields of :class:`charrnn.options.SamplingParams`, as keywords or as
    ``params=SamplingParams(...)``: ``temperature`` (0 is greedy), ``top_k``, ``top_p``, ``min_p``, ``seed``,
    ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``stop`` (texts that end a sample,
    never included) and, for :meth:`complete`, ``logprobs`` (alternatives per token).  ``prompt`` may be a
    list of prompts, one sample each.
    """

    def unknown_chars(self, text: str) -> list[str]:
        """Characters (or words) of ``text`` the model does not know (they are read as ``[UNK]``)."""
        return self.vocab.unknown(text)

    def generate(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
                 **options) -> list[str]:
        """``num_samples`` texts (prompt + up to ``length`` new characters), sampled in one batch."""
        return self.sampler.generate(prompt, length, num_samples, **options)

    def complete(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
                 **options) -> list[Completion]:
        """As :meth:`generate`, with why each sample ended and its log-probability records
        (:class:`charrnn.sampling.Completion`)."""
        return self.sampler.complete(prompt, length, num_samples, **options)

    def stream(self, prompt: str | Sequence[str] = "\n", length: int = 1000, *, num_samples: int = 1,
               **options) -> Iterator[list[str]]:
        """Yield the new text of every sample, step by step, until each has ``length`` characters or met a stop
        text (the prompt is not repeated; a character model gives one character per step)."""
        prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
        return self.sampler.stream(prompts, length, **options)
