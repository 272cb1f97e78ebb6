"""``GET /metrics`` (Prometheus text format; :mod:`service.metrics`) and the middleware that
times every request by its route template.

Who may scrape (``LSTM_HPO_METRICS``): ``admin`` (default) needs an admin API token as a
bearer token (a server in open mode needs none, as for every route); ``public`` needs
none, for a scraper on a network only it reaches; ``off`` answers 404. The numbers are
aggregates over every principal's studies (counts by state and task kind, worker host
names), never a study's name, parameters or values, but still more than a non-admin may
see of other principals.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth
from service.api.deps import get_backend
from service.schemas import ErrorPublic

router = APIRouter()
#: A bearer token when one is sent; whether one is needed is the route's decision (mode).
_bearer = HTTPBearer(auto_error=False)

#: Methods that keep their name in the ``method`` label; any other is ``other``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@router.get("/metrics", include_in_schema=False)
def metrics(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Response:
    """The app's registry in the text format the scraper asks for (``Accept``: Prometheus
    0.0.4 or OpenMetrics). 401 without a valid token and 403 for a non-admin one (mode
    ``admin``); 404 when off."""
    mode: str = request.app.state.metrics_mode
    if mode == "off":
        body = ErrorPublic(detail="metrics are off (LSTM_HPO_METRICS=off)", error="NotFound")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=404)
    if mode == "admin":
        token = credentials.credentials if credentials else None
        principal = auth.authenticate(get_backend(request).sessions, token)  # 401: no token
        if not principal.admin:
            body = ErrorPublic(
                detail="GET /metrics needs an admin token (or LSTM_HPO_METRICS=public)",
                error="Forbidden",
            )
            return JSONResponse(body.model_dump(exclude_none=True), status_code=403)
    registry: CollectorRegistry = request.app.state.metrics_registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)


def compile_templates(paths: Iterable[str]) -> list[tuple[re.Pattern[str], str]]:
    """Patterns of the OpenAPI path templates, fewest parameters first (a literal segment
    wins over a parameter: ``/v1/studies/estimate`` before ``/v1/studies/{job_id}``)."""
    ordered = sorted(paths, key=lambda template: (template.count("{"), template))
    # re.escape writes {job_id} as \{job_id\}: a path parameter is one segment.
    return [(re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t))), t) for t in ordered]


def route_label(
    scope: Scope,
    templates: Sequence[tuple[re.Pattern[str], str]],
    mounts: Mapping[int, str] | None = None,
) -> str:
    """The route a request is counted under: the OpenAPI path template its path matches
    (``/v1/studies/{job_id}``), else the path of the route that answered (``/metrics``),
    the name of the mount that answered (``mounts``: ``id`` of its app -> name, e.g.
    ``dashboard``), or ``unmatched``. Never the raw path: the label set stays bounded
    whatever clients send."""
    path = scope.get("path", "")
    for pattern, template in templates:
        if pattern.fullmatch(path):
            return template
    # Routing put the mounted app that answered in the scope as its endpoint.
    if mounts and id(scope.get("endpoint")) in mounts:
        return mounts[id(scope.get("endpoint"))]
    route = scope.get("route")
    route_path = getattr(route, "path", None)
    if isinstance(route_path, str) and ":path}" not in route_path:
        return route_path
    return "unmatched"


class RequestLatency:
    """ASGI middleware: observes each HTTP request's duration, seconds, into ``histogram``
    by method, route template and status (500 when the app raised before answering)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram
        self._templates: list[tuple[re.Pattern[str], str]] | None = None
        self._mounts: dict[int, str] = {}

    def _label(self, scope: Scope) -> str:
        if self._templates is None:  # the app is complete once the first request comes
            app = scope.get("app")
            routes = app.routes if isinstance(app, FastAPI) else []
            paths = app.openapi().get("paths", {}) if isinstance(app, FastAPI) else {}
            self._mounts = {
                id(r.app): r.name or r.path or "/" for r in routes if isinstance(r, Mount)
            }
            self._templates = compile_templates(paths)
        return route_label(scope, self._templates, self._mounts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = self._label(scope)
            self.histogram.labels(method, route, str(status)).observe(time.perf_counter() - started)
