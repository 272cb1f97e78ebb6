"""The last ``/v1`` route: a path no API route has answers in the API's JSON error shape.

Without it the request would fall through to the dashboard mounted at the root and get
its HTML 404 page; a client of ``/v1`` always reads ``ErrorPublic``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.guards import API_METHODS, allowed_methods, method_refusal

router = APIRouter()

_METHODS = sorted(API_METHODS)


@router.api_route("", methods=_METHODS, include_in_schema=False)  # "/v1" itself
@router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
def unmatched(request: Request, path: str = "") -> JSONResponse:
    """405 with ``Allow`` when the path exists under other methods, else 404."""
    full = request.url.path
    return method_refusal(request.method, full, allowed_methods(request.app, full))
