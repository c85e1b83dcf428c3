"""``charrnn serve``: an HTTP server (Starlette under uvicorn) and a web page for one trained run.

>>> import charrnn
>>> from charrnn.serve import Limits, create_app, serve
>>> app = create_app(charrnn.load("runs/shk"), Limits(max_length=500))   # doctest: +SKIP
>>> serve("runs/shk", port=8000)                                         # doctest: +SKIP

Needs the ``serve`` extra (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import errno
import socket
import sys

from ..errors import CharRNNError
from .limits import Limits

__all__ = ["Limits", "create_app", "bind", "serve"]

# Seconds requests in flight have to finish once the server is asked to stop (--shutdown-seconds).
SHUTDOWN_SECONDS = 5.0


def create_app(lm, limits: Limits | None = None, **options):
    """The Starlette application serving ``lm``; see :func:`charrnn.serve.app.create_app`."""
    return _web().create_app(lm, limits, **options)


def _web():
    """The web modules, imported on first use so that the rest of charrnn works without the serve extra."""
    try:
        import uvicorn  # noqa: F401

        from . import app
    except ImportError as e:
        raise CharRNNError(f"charrnn serve needs the Python package '{e.name}'; install the serve extra: "
                           "pip install -e \".[serve]\"") from None
    return app


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise CharRNNError(f"--port must be between 0 and 65535, got {port}")


def check_shutdown_seconds(seconds: float) -> None:
    if not 0 <= seconds < float("inf"):
        raise CharRNNError(f"--shutdown-seconds must be a number of seconds, 0 or more, got {seconds}")


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on ``host:port`` (``port=0``: any free port), or a one-line error saying why not."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CharRNNError(f"cannot listen on host '{host}' ({e.strerror}); give an address such as 127.0.0.1 "
                           "with --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CharRNNError(f"port {port} on {host} is already in use; stop what is using it or pick another "
                               "with --port") from None
        raise CharRNNError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def serve(run, *, host: str = "127.0.0.1", port: int = 8000, weights: str = "best", device: str = "cpu",
          int8: bool = False, limits: Limits | None = None, log_level: str = "info", api_key: str | None = None,
          api_key_file: str | None = None, cors_origins=(), shutdown_seconds: float = SHUTDOWN_SECONDS) -> None:
    """Load ``run`` (a run directory or a Hugging Face model, see :func:`charrnn.load`) and serve it on
    ``host:port`` until interrupted (Ctrl-C or SIGTERM; requests in flight get ``shutdown_seconds`` to finish).
    ``api_key`` (or the first line of ``api_key_file``, or ``$CHARRNN_API_KEY``): see :mod:`charrnn.serve.auth`."""
    from ..api import load
    from ..threads import leave_to_worker

    web = _web()
    from .auth import resolve_api_key
    from .shutdown import GracefulServer, sigterm_as_interrupt

    limits = (limits or Limits()).validate()
    check_port(port)   # before the run is loaded
    check_shutdown_seconds(shutdown_seconds)
    api_key = resolve_api_key(api_key, api_key_file)
    threads = leave_to_worker()     # before loading: the engine's thread is the only one with a pool of threads
    lm = load(run, weights=weights, device=device, int8=int8)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {run} ({lm.label}) on http://{shown}:{bound_port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    app = web.create_app(lm, limits, api_key=api_key, cors_origins=cors_origins, threads=threads)
    server = GracefulServer(web.server_config(app, log_level=log_level), app.state.engine, shutdown_seconds)
    with sigterm_as_interrupt():
        server.run(sockets=[sock])
