"""What one request may ask for, and how much the server holds at once (no web dependencies here, so
that ``charrnn --help`` works without the serve extra)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import CharRNNError

# field: (default, help); the command line offers each as --max-...
LIMIT_HELP = {
    "max_prompt_chars": (2000, "longest prompt accepted, in characters"),
    "max_length": (2000, "most characters generated per sample"),
    "max_samples": (16, "most samples per request"),
    "max_queue": (256, "requests held at once, running and waiting; one more is answered 503"),
    "max_batch": (64, "sample rows generated together; further requests wait their turn"),
}


@dataclass
class Limits:
    """Per-request maxima (answered 422 when exceeded) and the engine's capacity (503 when full)."""

    max_prompt_chars: int = LIMIT_HELP["max_prompt_chars"][0]
    max_length: int = LIMIT_HELP["max_length"][0]
    max_samples: int = LIMIT_HELP["max_samples"][0]
    max_queue: int = LIMIT_HELP["max_queue"][0]
    max_batch: int = LIMIT_HELP["max_batch"][0]

    def validate(self) -> "Limits":
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharRNNError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.max_batch < self.max_samples:
            raise CharRNNError(f"--max-batch ({self.max_batch}) must be at least --max-samples ({self.max_samples}), "
                               "or a request for the most samples could never run")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
