"""ASGI middleware in front of everything the server answers (the API, the sign-in page and
the mounted dashboard alike): request bodies are bounded, HEAD answers as GET, and a server
in open mode answers only requests that name a loopback address and come from no other site.

Why open mode needs more than binding 127.0.0.1: a web page the user visits can make the
browser send requests to ``http://127.0.0.1:8000`` (a "simple" cross-site POST needs no
CORS preflight), and DNS rebinding can make another site's name resolve to 127.0.0.1 and
read the answers. The ``Host`` and ``Origin`` checks stop both; the API also refuses the
body types a simple request can carry (``service.api.routes.studies``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth, studies
from service.api.errors import error_response
from service.errors import LstmHpoError

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UNSAFE = _WITH_BODY


def _refuse(status: int, detail: str, error: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "error": error}, status_code=status)


_SLASHES = re.compile(r"//+")
_RAW_SLASHES = re.compile(rb"//+")
_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)


class CanonicalPath:
    """Routes see one spelling of a path: runs of slashes merged (as nginx's default
    ``merge_slashes`` does: ``//v1/studies`` from a base URL ending in ``/``), and under
    ``/v1`` no trailing slash (``/v1/studies/``; no resource's id is empty). Every guard
    and route behind it sees the same path, so none can be passed by another spelling.
    ``/V1/...`` is the API's JSON 404 naming ``/v1``: paths are case-sensitive, and it
    would otherwise fall through to the dashboard's HTML page. So is a ``/v1`` path with an
    encoded slash, which the client refuses too (an id never holds one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = _SLASHES.sub("/", scope["path"])
        raw: bytes = _RAW_SLASHES.sub(b"/", scope.get("raw_path") or path.encode())
        if path.startswith("/v1/") and path.endswith("/"):
            path, raw = path.rstrip("/"), raw.rstrip(b"/")
        first = path.split("/", 2)[1]
        why = None
        if first != "v1" and first.lower() == "v1":
            why = "paths are case-sensitive: the API is under /v1"
        elif first == "v1" and _ENCODED_SLASH.search(raw):
            # Starlette routes the decoded path, where ID%2Fbest would be ID/best: an
            # encoded slash is part of a segment (RFC 3986 2.2), and no id holds one.
            why = "an encoded slash (%2F) is not a path separator"
        if why is not None:
            where = f"{scope.get('method', 'GET')} {path}"
            await _refuse(404, f"no such endpoint: {where} ({why}; see /docs)", "NotFound")(
                scope, receive, send
            )
            return
        if path != scope["path"]:
            scope = {**scope, "path": path, "raw_path": raw}
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed, before the app
    reads it; smaller bodies are buffered (at most ``limit`` bytes) and replayed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        too_large = _refuse(
            413, f"the request body is larger than {self.limit:,} bytes", "PayloadTooLarge"
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, replay([message]), send)
                return
            body.extend(message.get("body", b""))
            if len(body) > self.limit:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(
            scope, replay([{"type": "http.request", "body": bytes(body)}], receive), send
        )


def replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that gives ``messages`` (read already), then is ``then`` (the server's,
    which waits for the client to disconnect; None: a disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


class MethodGuard:
    """``HEAD`` answers as ``GET`` without the body, on every route (RFC 9110 9.3.2: the
    same headers, Content-Length included; FastAPI routes only the methods they name).
    Under ``/v1``, a method no API route takes (``PROPFIND``, a lower-case ``get``) is the
    API's JSON 405, not the dashboard's HTML page it would fall through to."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        if method not in API_METHODS and _is_api(scope):
            await _refuse_method(scope, method)(scope, receive, send)
            return
        if method != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b""})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


#: The methods the API's routes (and its JSON 404 / 405 route) take.
API_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"})


def allowed_methods(app: Any, path: str) -> set[str]:
    """The methods the OpenAPI schema of ``app`` (a FastAPI app) documents for ``path``,
    and HEAD wherever GET is (RFC 9110 9.3.2); empty for a path no route has. A path
    without parameters names its own resource: ``/v1/studies/estimate`` takes only what
    its route takes, not also what ``/v1/studies/{study_id}`` does."""
    paths: dict[str, dict[str, Any]] = app.openapi().get("paths", {})
    allowed: set[str] = set()
    if path in paths:
        allowed = {method.upper() for method in paths[path]}
    else:
        for template, operations in paths.items():
            # re.escape writes {study_id} as \{study_id\}: a path parameter is one segment.
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            if re.fullmatch(pattern, path):
                allowed |= {method.upper() for method in operations}
    if "GET" in allowed:
        allowed.add("HEAD")  # every GET route answers HEAD (MethodGuard)
    return allowed


def method_refusal(method: str, path: str, allowed: set[str]) -> JSONResponse:
    """The API's 405 for ``method`` on a path that takes ``allowed`` (with ``Allow``, as
    RFC 9110 15.5.6 requires), or its 404 when no route has the path."""
    where = f"{method} {path}"
    if allowed:
        headers = {"Allow": ", ".join(sorted(allowed))}
        body = {"detail": f"method not allowed: {where}", "error": "MethodNotAllowed"}
        return JSONResponse(body, status_code=405, headers=headers)
    body = {"detail": f"no such endpoint: {where} (see /docs)", "error": "NotFound"}
    return JSONResponse(body, status_code=404)


def _refuse_method(scope: Scope, method: str) -> JSONResponse:
    path: str = scope["path"]
    app = scope.get("app")  # set by Starlette before its middleware runs
    return method_refusal(method, path, allowed_methods(app, path) if app is not None else set())


def _is_api(scope: Scope) -> bool:
    path: str = scope["path"]
    return path == "/v1" or path.startswith("/v1/")


class OpenModeGuard:
    """While no API token exists: refuse requests that name a non-loopback host (DNS
    rebinding) and unsafe requests from another origin (a web page driving the browser)."""

    def __init__(self, app: ASGIApp, backend: studies.Backend) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Read from the database only while off (auth remembers "on", which is final).
        try:
            on = await run_in_threadpool(auth.authentication_on, self.backend.sessions)
        except LstmHpoError as err:  # the database away: the API's 503, not a bare 500
            await error_response(err)(scope, receive, send)
            return
        if on:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not auth.is_loopback(urlsplit(f"//{host}").hostname or ""):
            await _refuse(
                403,
                f"this server runs in open mode (no API token yet) and answers only requests "
                f"to a loopback address, not to {host!r}: create a token to share it "
                "(lstm-hpo token create NAME --admin)",
                "OpenModeRefused",
            )(scope, receive, send)
            return
        origin = headers.get("origin")
        if scope["method"] in _UNSAFE and origin and urlsplit(origin).netloc != host:
            await _refuse(403, "cross-site request refused (open mode)", "OpenModeRefused")(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)
