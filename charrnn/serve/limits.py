"""What one request may ask for, and how much the server holds at once (no web dependencies here, so
that ``charrnn --help`` works without the serve extra)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from ..config import POSITIVE_INT, check_fields, option
from ..errors import OptionError

# The command line offers each field as --max-...
_limit = functools.partial(option, metavar="N", check=POSITIVE_INT,
                           group="limits (a request over one is refused with a JSON error)")


@dataclass
class Limits:
    """Per-request maxima (answered 422 when exceeded), the engine's capacity (503 when full) and what a
    connection may hold (slow clients are dropped)."""

    max_prompt_chars: int = _limit(2000, "longest prompt accepted, in characters")
    max_length: int = _limit(2000, "most characters generated per sample")
    max_samples: int = _limit(16, "most samples per request")
    max_queue: int = _limit(256, "requests held at once, running and waiting; one more is answered 503")
    max_batch: int = _limit(64, "sample rows generated together; further requests wait their turn")
    max_connections: int = _limit(1000, "connections held open at once; a request past it is answered 503")
    max_read_seconds: int = _limit(5, "seconds a client has to send a request's head, and then its body; a slower "
                                      "connection is closed (a late body is answered 408)")

    def validate(self) -> "Limits":
        check_fields(self)
        if self.max_batch < self.max_samples:
            raise OptionError("max_batch", "{max_batch} ({batch}) must be at least {max_samples} ({samples}), or a "
                                           "request for the most samples could never run",
                              batch=self.max_batch, samples=self.max_samples)
        return self

    def to_dict(self) -> dict:
        return asdict(self)
