"""The API key: with one set, every ``/v1/`` request needs ``Authorization: Bearer KEY`` (401 otherwise).

The page (``/``, ``/static/``), ``/healthz`` and ``/metrics`` stay open.  The key comes from ``--api-key``,
``--api-key-file`` (its first line, so that the key is not in the process list) or ``CHARRNN_API_KEY``.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..corpus import check_regular_file
from ..errors import CharRNNError

ENV = "CHARRNN_API_KEY"
PROTECTED = "/v1/"
# Endpoints that answer errors in OpenAI's shape, so that its client libraries can read them.
OPENAI_PATHS = ("/v1/completions", "/v1/models")


def resolve_api_key(api_key: str | None = None, api_key_file: str | None = None) -> str | None:
    """The key from ``api_key``, else the first line of ``api_key_file``, else ``$CHARRNN_API_KEY``; None: no key."""
    if api_key is not None and api_key_file is not None:
        raise CharRNNError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        key, source = _first_line(Path(api_key_file)), f"--api-key-file {api_key_file}"
    elif api_key is not None:
        key, source = api_key, "--api-key"
    elif ENV in os.environ:
        key, source = os.environ[ENV], f"the environment variable {ENV}"
    else:
        return None
    key = key.strip()
    if not key:
        raise CharRNNError(f"the API key from {source} is empty")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise CharRNNError(f"the API key from {source} must be printable ASCII without spaces, as an HTTP header "
                           "carries it")
    return key


def _first_line(path: Path) -> str:
    check_regular_file(path, "--api-key-file", "give a file holding the key")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CharRNNError(f"cannot read --api-key-file {path} ({e})") from None
    return lines[0] if lines else ""


def _refusal(path: str, message: str) -> JSONResponse:
    if any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class BearerAuth:
    """Refuses a ``/v1/`` request without ``Authorization: Bearer <api_key>`` (401); no key: lets all through."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode("ascii") if api_key else None

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and (scope["path"] + "/").startswith(PROTECTED):
            message = self.check(Headers(scope=scope).get("authorization"))
            if message:
                return await _refusal(scope["path"], message)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, header: str | None) -> str | None:
        """What is wrong with the ``Authorization`` header, or None when it carries the key."""
        if header is None:
            return "this server needs an API key: send the header Authorization: Bearer KEY"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
            return "the API key is not valid"
        return None
