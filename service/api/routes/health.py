"""GET /v1/health."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter, Request

from service import studies
from service.api.deps import BackendDep
from service.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health")
def health(backend: BackendDep, request: Request) -> HealthPublic:
    """Liveness, database reachability and kind (``sqlite`` / ``postgresql``; public, so
    never the database's address), version and schema revision. No token needed."""
    studies.check_database(backend)
    return HealthPublic(
        status="ok",
        version=version("lstm-hpo"),
        database=request.app.state.database_kind,
        schema_revision=request.app.state.schema_revision,
    )
