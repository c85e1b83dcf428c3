"""Stopping ``charrnn serve`` (SIGTERM or Ctrl-C): the server stops accepting connections at once, requests in
flight have ``grace`` seconds to finish, then their jobs end with an error (a stream's last event is ``error``, a
plain request is answered 503) and the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

log = logging.getLogger("charrnn.serve")
# Time the answers of the jobs ended at the grace's end have to go out before uvicorn cuts what is left.
FLUSH_SECONDS = 2.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, ending the engine's jobs ``grace`` seconds into its shutdown."""

    def __init__(self, config: uvicorn.Config, engine, grace: float):
        config.timeout_graceful_shutdown = grace + FLUSH_SECONDS
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets=None) -> None:
        ending = asyncio.get_running_loop().call_later(self.grace, self._end_jobs)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    def _end_jobs(self) -> None:
        if self.engine.active or self.engine.waiting:
            log.warning("ending %d requests still running after %g seconds (--shutdown-seconds)",
                        len(self.engine.active) + len(self.engine.waiting), self.grace)
        asyncio.ensure_future(self.engine.stop())


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (uvicorn raises the signal again once it has stopped; its
    default action would kill the process instead of letting it exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
