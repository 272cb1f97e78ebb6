"""The one mapping from domain errors to HTTP status codes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service import errors

_STATUS: list[tuple[type[errors.LstmHpoError], int]] = [
    (errors.Unauthorized, 401),
    (errors.PayloadTooLarge, 413),
    (errors.InvalidSpec, 422),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.DatabaseUnavailable, 503),
    (errors.SchemaNotReady, 503),
    (errors.DataError, 422),
]


def status_for(error: errors.LstmHpoError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.LstmHpoError)
    status = status_for(exc)
    body: dict[str, object] = {"detail": exc.message, "error": type(exc).__name__}
    if isinstance(exc, errors.InvalidSpec):
        body["errors"] = [{"loc": e.loc, "msg": e.msg} for e in exc.errors]
    headers = {"Retry-After": "1"} if exc.retryable else {}
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.LstmHpoError, _handle)
