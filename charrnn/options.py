"""Checks of the generation options, shared by the PyTorch sampler and the torch-free runtime.

Kept free of torch so that :mod:`charrnn.runtime` (onnxruntime + NumPy) gives exactly the
same messages as ``charrnn generate RUN``.
"""

from __future__ import annotations

from .errors import CharRNNError


def check_sampling_options(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           length: int = 1, num_samples: int = 1) -> None:
    if temperature is None or temperature < 0:
        raise CharRNNError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise CharRNNError(f"--top-k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CharRNNError(f"--top-p must be in (0, 1], got {top_p}")
    if length is None or length < 0:
        raise CharRNNError(f"--length must be >= 0, got {length}")
    if num_samples is None or num_samples <= 0:
        raise CharRNNError(f"--num-samples must be a positive integer, got {num_samples}")


def check_beam_width(beam_width) -> None:
    if beam_width is None or isinstance(beam_width, bool) or int(beam_width) != beam_width or beam_width < 1:
        raise CharRNNError(f"--beam-width must be a positive integer, got {beam_width}")


def start_text(prompt: str, chars) -> str:
    """The text generation starts from: ``prompt``, or a newline when it is empty (and the
    vocabulary ``chars`` has one)."""
    if prompt == "":
        if "\n" not in chars:
            raise CharRNNError("the prompt is empty and this vocabulary has no newline to start from; give --prompt")
        return "\n"
    return prompt
