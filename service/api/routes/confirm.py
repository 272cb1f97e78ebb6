"""/v1/studies/{id}/confirm and /confirmation: re-train a study's top configs over new
seeds as their own study, and read what that found. Thin: parse, one call, return."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import confirm, studies
from service.api.deps import BackendDep, PrincipalDep
from service.api.errors import ERROR_RESPONSES
from service.api.routes.studies import _bounded_body, _json_document, media_type
from service.errors import UnsupportedMediaType
from service.schemas import ConfirmationPublic, StudyPublic

router = APIRouter(prefix="/studies", tags=["studies"], responses=ERROR_RESPONSES)

_BODY_SCHEMA = {
    "type": "object",
    "properties": {
        "top_k": {
            "type": "integer",
            "minimum": confirm.TOP_K_RANGE[0],
            "maximum": confirm.TOP_K_RANGE[1],
            "default": confirm.DEFAULT_TOP_K,
        },
        "seeds": {
            "type": "integer",
            "minimum": confirm.SEEDS_RANGE[0],
            "maximum": confirm.SEEDS_RANGE[1],
            "default": confirm.DEFAULT_SEEDS,
        },
    },
    "additionalProperties": False,
}


@router.post(
    "/{study_id}/confirm",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": _BODY_SCHEMA,
                    "example": {"top_k": confirm.DEFAULT_TOP_K, "seeds": confirm.DEFAULT_SEEDS},
                }
            },
        }
    },
)
async def confirm_winner(
    study_id: str,
    request: Request,
    response: Response,
    backend: BackendDep,
    principal: PrincipalDep,
) -> StudyPublic:
    """Re-train the study's ``top_k`` best distinct configs, each with ``seeds`` new seeds
    (the same for every config), as a new linked study: 202 with that study (its ``id``
    takes every study route; ``n_trials`` = top_k x seeds). Each of its trials is scored
    on the validation and the test split; ``GET /v1/studies/{id}/confirmation`` reports
    the statistics, and ``best`` of this study then names the confirmation's winner.

    409 when the study has fewer completed distinct configs than ``top_k``, is itself a
    confirmation, or has several objectives; 422 naming ``top_k`` / ``seeds`` out of range
    (1..20, 2..20); 404 for another principal's study, whatever the body."""
    # Another principal's study is a 404 whatever the body, as for extend.
    await run_in_threadpool(partial(studies.get_study, principal=principal), backend, study_id)
    body = await _bounded_body(request, request.app.state.max_request_bytes)
    document = None
    if body.strip():
        content_type = media_type(request)
        if content_type != "application/json":
            raise UnsupportedMediaType(
                f'send {{"top_k": K, "seeds": S}} as JSON (Content-Type: application/json), '
                f"not {content_type}"
            )
        document = _json_document(body, spec=False)
    top_k, seeds = confirm.confirm_request(document)
    # Reads the study's trials, may read the task's data, writes two databases.
    study = await run_in_threadpool(
        partial(confirm.confirm_study, principal=principal), backend, study_id, top_k, seeds
    )
    response.headers["Location"] = f"/v1/studies/{study.id}"
    return study


@router.get("/{study_id}/confirmation")
def confirmation(study_id: str, backend: BackendDep, principal: PrincipalDep) -> ConfirmationPublic:
    """What a confirmation study found (so far, while it runs): per config the mean,
    standard deviation and 95% interval (Student t) of the validation and test metric over
    the seeds, best mean validation first, and the paired t-test over seeds of the best
    against the runner-up. For a study that was confirmed: its newest confirmation's.
    404 for a study never confirmed."""
    return confirm.confirmation(backend, study_id, principal=principal)
