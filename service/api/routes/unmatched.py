"""The last ``/v1`` route: a path no API route has answers in the API's JSON error shape.

Without it the request would fall through to the dashboard mounted at the root and get
its HTML 404 page; a client of ``/v1`` always reads ``ErrorPublic``.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.guards import API_METHODS
from service.schemas import ErrorPublic

router = APIRouter()

_METHODS = sorted(API_METHODS)


def _allowed_methods(request: Request) -> set[str]:
    """The methods the OpenAPI schema documents for the request's path (none: unknown).
    A path without parameters names its own resource: ``/v1/studies/estimate`` takes
    only what its route takes, not also what ``/v1/studies/{study_id}`` does."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    if request.url.path in paths:
        return {method.upper() for method in paths[request.url.path]}
    allowed: set[str] = set()
    for template, operations in paths.items():
        # re.escape writes {study_id} as \{study_id\}: a path parameter is one segment.
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            allowed |= {method.upper() for method in operations}
    return allowed


@router.api_route("", methods=_METHODS, include_in_schema=False)  # "/v1" itself
@router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
def unmatched(request: Request, path: str = "") -> JSONResponse:
    """405 with ``Allow`` when the path exists under other methods, else 404."""
    where = f"{request.method} {request.url.path}"
    allowed = _allowed_methods(request)
    if allowed:
        body = ErrorPublic(detail=f"method not allowed: {where}", error="MethodNotAllowed")
        headers = {"Allow": ", ".join(sorted(allowed))}
        return JSONResponse(body.model_dump(exclude_none=True), status_code=405, headers=headers)
    body = ErrorPublic(detail=f"no such endpoint: {where} (see /docs)", error="NotFound")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=404)
