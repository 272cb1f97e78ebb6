"""FastAPI dependencies: the backend and the calling principal (authentication is here only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.studies import Backend

#: Declares the scheme in the OpenAPI schema (the "Authorize" button of /docs); a missing
#: or malformed header is left to :func:`get_principal`, which answers 401 itself.
_bearer = HTTPBearer(
    auto_error=False, description="An API token: `lstm-hpo token create NAME` prints one."
)


def get_backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> auth.Principal:
    """The principal of ``Authorization: Bearer <token>``; ``Unauthorized`` (401) without a
    valid token once authentication is on (see :mod:`service.auth`)."""
    backend = get_backend(request)
    return auth.authenticate(backend.sessions, credentials.credentials if credentials else None)


BackendDep = Annotated[Backend, Depends(get_backend)]
PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]
