"""The one mapping from domain errors to HTTP status codes."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import SQLAlchemyError

from service import errors
from service.db import translate_any
from service.schemas import ErrorPublic

#: Retry-After of a 429: a quota clears only when one of the principal's studies ends,
#: which takes minutes at the least (a study is trials that train for minutes); asking
#: again within a minute cannot succeed, and a client told 1 s would only spend requests.
QUOTA_RETRY_AFTER_S = 60

_STATUS: list[tuple[type[errors.LstmHpoError], int]] = [
    (errors.Unauthorized, 401),
    (errors.PayloadTooLarge, 413),
    (errors.UnsupportedMediaType, 415),
    (errors.InvalidSpec, 422),
    (errors.NotFound, 404),
    (errors.QuotaExceeded, 429),  # a Conflict, answered as Too Many Requests
    (errors.Conflict, 409),
    (errors.DatabaseUnavailable, 503),
    (errors.SchemaNotReady, 503),
    (errors.DataError, 422),
]


#: Where the database is, as libpq's connection errors name it (``server at "db" (10.0.0.5),
#: port 5432``, ``server on socket "/run/postgresql/.s.PGSQL.5432"``, ``host name "db"``):
#: for the server's log, not for any client (``/v1/health`` never names it either).
_DATABASE_ADDRESS = re.compile(
    r'(server at|server on socket|host name) "[^"]*"(?: \([^)]*\))?(?:, port \d+)?'
)


def public_message(error: errors.LstmHpoError) -> str:
    """``error``'s message as a client may read it: a database error's without where the
    database is."""
    if isinstance(error, errors.DatabaseUnavailable):
        return _DATABASE_ADDRESS.sub(r"\1 (address not shown)", error.message)
    return error.message


def status_for(error: errors.LstmHpoError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.LstmHpoError)
    return error_response(exc)


def error_response(exc: errors.LstmHpoError) -> JSONResponse:
    """The API's answer to ``exc`` (``ErrorPublic``, its status, and Retry-After when it
    is retryable): also for middleware, which runs outside FastAPI's exception handlers."""
    status = status_for(exc)
    body: dict[str, object] = {"detail": public_message(exc), "error": type(exc).__name__}
    if isinstance(exc, errors.InvalidSpec):
        body["errors"] = [{"loc": e.loc, "msg": e.msg} for e in exc.errors]
    headers = {"Retry-After": "1"} if exc.retryable else {}
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
    if isinstance(exc, errors.QuotaExceeded):
        headers["Retry-After"] = str(QUOTA_RETRY_AFTER_S)  # RFC 6585: 429 MAY say when
    return JSONResponse(body, status_code=status, headers=headers)


async def _handle_request_validation(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 (a bad query parameter or header) in the same shape as ours."""
    assert isinstance(exc, RequestValidationError)
    field_errors = [
        errors.FieldError(".".join(str(p) for p in e.get("loc", ())), str(e.get("msg", "")))
        for e in exc.errors()
    ]
    return await _handle(request, errors.InvalidSpec(field_errors))


#: What every route may answer besides its success, documented in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorPublic, "description": description}
    for status, description in (
        (401, "No valid API token (`Authorization: Bearer <token>`)"),
        (404, "No such study, or another principal's"),
        (409, "Conflicts with the study's state"),
        (413, "Request body too large"),
        (415, "A body type a spec cannot be (JSON or YAML only)"),
        (422, "Invalid input: every bad field, by its dotted path"),
        (429, "A quota of this principal is reached (see Retry-After)"),
        (503, "The database is unreachable; retry (see Retry-After)"),
    )
}


async def _handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    """A SQLAlchemy error that reached a route untranslated (a query on Optuna's engine),
    or Optuna's ``StorageInternalError``: translated as our own tables' errors are
    (:func:`service.db.translate_any`: a connection a restart dropped is a 503); anything
    else stays a 500."""
    translated = translate_any(exc)
    if translated is None:
        raise exc
    return error_response(translated)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.LstmHpoError, _handle)
    app.add_exception_handler(StorageInternalError, _handle_database_error)
    app.add_exception_handler(SQLAlchemyError, _handle_database_error)
    app.add_exception_handler(RequestValidationError, _handle_request_validation)
