"""/v1/studies: submit, list, get, trials, best, cancel, delete. Thin: parse, one call, return."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse

from service import studies
from service.api.deps import BackendDep, OwnerDep
from service.errors import FieldError, InvalidSpec
from service.schemas import BestPublic, Page, StudyPublic, TrialPublic
from service.search_space import parse_spec
from service.states import JobState, TrialState

router = APIRouter(prefix="/studies", tags=["studies"])

_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_SPEC_EXAMPLE = {
    "task": {"kind": "adding", "seq_len": 50},
    "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 3},
    "study": {"n_trials": 10},
}


async def _spec_document(request: Request) -> Any:
    """The request body as a mapping: JSON by default, YAML with a YAML content type."""
    limit: int = request.app.state.max_request_bytes
    body = await request.body()
    if len(body) > limit:
        raise InvalidSpec([FieldError("body", f"larger than {limit} bytes")])
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type in _YAML_TYPES:
        return body.decode("utf-8", errors="replace")  # parse_spec reports YAML errors
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        msg = f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        raise InvalidSpec(
            [FieldError("body", msg + " (send YAML with Content-Type: application/yaml)")]
        ) from None


@router.post(
    "",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}, "example": _SPEC_EXAMPLE},
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    },
)
async def submit(
    request: Request,
    response: Response,
    backend: BackendDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> StudyPublic:
    """Queue a study from a spec (JSON, or YAML with ``Content-Type: application/yaml``).

    Retrying with the same ``Idempotency-Key`` header returns the same study (200).
    """
    spec = parse_spec(await _spec_document(request), backend.limits)
    study, created = studies.submit_study(
        backend, spec, owner=owner, idempotency_key=idempotency_key
    )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/studies/{study.id}"
    return study


@router.get("")
def list_(
    backend: BackendDep,
    owner: OwnerDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[StudyPublic]:
    """Studies, newest first."""
    return studies.list_studies(backend, state=state, owner=owner, limit=limit, offset=offset)


@router.get("/{study_id}")
def get(study_id: str, backend: BackendDep, owner: OwnerDep) -> StudyPublic:
    """State, trial counts, best value and elapsed time."""
    return studies.get_study(backend, study_id, owner=owner)


@router.get("/{study_id}/trials")
def trials(
    study_id: str,
    *,
    backend: BackendDep,
    owner: OwnerDep,
    state: TrialState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[TrialPublic]:
    """Trials in number order: params, value, duration, intermediate values, failure reason."""
    return studies.study_trials(
        backend, study_id, owner=owner, state=state, limit=limit, offset=offset
    )


@router.get("/{study_id}/best", response_model=None)
def best(
    study_id: str,
    backend: BackendDep,
    owner: OwnerDep,
    k: Annotated[int | None, Query(ge=1, le=100)] = None,
    format: Annotated[Literal["json", "yaml"], Query()] = "json",
) -> BestPublic | list[BestPublic] | PlainTextResponse:
    """The best config (``?k=N``: the top N). ``?format=yaml``: a file `lstm-hpo train` takes.

    409 while no trial has completed.
    """
    top = studies.best_configs(backend, study_id, k=k or 1, owner=owner)
    if format == "yaml":
        if k is None:
            text = yaml.safe_dump(top[0].config, sort_keys=False)
        else:
            text = yaml.safe_dump_all([b.config for b in top], sort_keys=False)
        return PlainTextResponse(text, media_type="application/yaml")
    return top if k is not None else top[0]


@router.post("/{study_id}/cancel")
def cancel(study_id: str, backend: BackendDep, owner: OwnerDep) -> StudyPublic:
    """Stop claiming new trials. Trials already running finish and are recorded."""
    return studies.cancel_study(backend, study_id, owner=owner)


@router.delete("/{study_id}", status_code=204)
def delete(study_id: str, backend: BackendDep, owner: OwnerDep) -> Response:
    """Delete a study: cancel it if it runs, then remove its trials (Optuna's study) and
    its record. A trial still training has its result rejected. 404 for an unknown id."""
    studies.delete_study(backend, study_id, owner=owner)
    return Response(status_code=204)
