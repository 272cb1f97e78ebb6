"""FastAPI dependencies: the backend and the calling principal (auth goes here, in one place)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.studies import Backend


def get_backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def get_owner() -> str:
    """The principal making the request. Until API tokens exist everyone is ``local``."""
    return "local"


BackendDep = Annotated[Backend, Depends(get_backend)]
OwnerDep = Annotated[str, Depends(get_owner)]
