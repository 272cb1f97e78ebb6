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
    """Liveness and database reachability."""
    studies.check_database(backend)
    return HealthPublic(
        status="ok",
        version=version("lstm-hpo"),
        database=request.app.state.safe_database_url,
        schema_revision=request.app.state.schema_revision,
    )
