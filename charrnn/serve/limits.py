"""What one request may ask for, and how much the server holds at once (no web dependencies here, so
that ``charrnn --help`` works without the serve extra)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from ..config import NON_NEGATIVE_INT, POSITIVE_INT, check_fields, option
from ..errors import OptionError

# JSON may spell one character as a surrogate pair of escapes ("\ud83d\ude00"); the other fields fit in the rest.
BODY_BYTES_PER_CHAR = 12
BODY_OTHER_FIELDS = 4096
# What a request holds per character: its body, then the prompt (a str, UCS-4 at worst) and its int64 ids;
# a generated character is held as text and as the piece streamed.
HELD_BYTES_PER_PROMPT_CHAR = BODY_BYTES_PER_CHAR + 4 + 8
HELD_BYTES_PER_TEXT_CHAR = 2 * 4

# The command line offers each field as --max-...
LIMITS_GROUP = "limits (a request over one is refused with a JSON error)"
_limit = functools.partial(option, metavar="N", check=POSITIVE_INT, group=LIMITS_GROUP)


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
    prompt_cache_mb: int = option(64, "memory for the recurrent state after recent prompts, so that a repeated "
                                      "prompt is not read again (charrnn runs; 0 turns it off)", metavar="MB",
                                  check=NON_NEGATIVE_INT, group=LIMITS_GROUP)
    max_read_seconds: int = _limit(5, "seconds a client has to send a request's head, and then its body; a slower "
                                      "connection is closed (a late body is answered 408)")

    def validate(self) -> "Limits":
        check_fields(self)
        if self.max_batch < self.max_samples:
            raise OptionError("max_batch", "{max_batch} ({batch}) must be at least {max_samples} ({samples}), or a "
                                           "request for the most samples could never run",
                              batch=self.max_batch, samples=self.max_samples)
        self._check_fits()
        return self

    def max_body(self) -> int:
        """The bytes of the largest request body read (a prompt of ``max_prompt_chars``, however escaped)."""
        return BODY_BYTES_PER_CHAR * self.max_prompt_chars + BODY_OTHER_FIELDS

    def _check_fits(self) -> None:
        """Refuse limits under which the requests held at once could outgrow this machine's memory."""
        import torch

        from ..hardware import memory_bytes

        need = (self.max_connections * self.max_prompt_chars * HELD_BYTES_PER_PROMPT_CHAR
                + self.max_queue * self.max_samples * self.max_length * HELD_BYTES_PER_TEXT_CHAR)
        have = memory_bytes(torch.device("cpu"))
        if have is not None and self.prompt_cache_mb << 20 > have // 2:
            raise OptionError("prompt_cache_mb", "is {value:,} MB, more than half the {have:,.1f} GiB of memory here; "
                              "give less", value=self.prompt_cache_mb, have=have / 2**30)
        if have is not None and need > have:
            raise OptionError("max_prompt_chars", "prompts of {max_prompt_chars} ({chars:,}) on {max_connections} "
                              "({conns:,}) and texts of {max_length} ({length:,}) x {max_samples} ({samples}) x "
                              "{max_queue} ({queue}) could take {need:,.1f} GiB, more than the {have:,.1f} GiB of "
                              "memory here; lower some of them", chars=self.max_prompt_chars,
                              conns=self.max_connections, length=self.max_length, samples=self.max_samples,
                              queue=self.max_queue, need=need / 2**30, have=have / 2**30)

    def to_dict(self) -> dict:
        return asdict(self)
