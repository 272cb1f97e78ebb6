"""/v1/studies/{id}/report, /trials.csv and /progress: what a user decides and watches by.
Thin: read one snapshot (:mod:`service.report`), render, return."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse

from service import report, studies
from service.api.deps import BackendDep, PrincipalDep
from service.api.errors import ERROR_RESPONSES
from service.schemas import ProgressPublic, TrialPublic
from service.states import TrialState

router = APIRouter(prefix="/studies", tags=["studies"], responses=ERROR_RESPONSES)

#: The report is served from the dashboard's origin (its sign-in cookie): even if an
#: escape were missed, the page may run no script and load nothing from elsewhere.
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: ``study_trials``'s limit that means every trial (past a SQL INTEGER: no LIMIT at all).
_EVERY_TRIAL = 2**62
#: What the OpenAPI schema says a CSV answer is.
CSV_CONTENT = {"text/csv": {"schema": {"type": "string"}}}


def trials_csv_response(
    trials: Sequence[TrialPublic], study_id: str, *, total: int | None = None
) -> Response:
    """``trials`` as a CSV download (:func:`service.report.trials_csv`); ``total``: every
    trial that matched, sent as ``X-Total-Count`` when the rows are one page of them."""
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", study_id)
    headers = {"Content-Disposition": f'attachment; filename="{safe_id}-trials.csv"'}
    if total is not None:
        headers["X-Total-Count"] = str(total)
    return Response(
        report.trials_csv(trials), media_type="text/csv; charset=utf-8", headers=headers
    )


@router.get(
    "/{study_id}/report",
    # A plain Response class: the error answers stay documented as JSON.
    response_class=Response,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
)
def study_report(
    study_id: str,
    backend: BackendDep,
    principal: PrincipalDep,
    top_k: Annotated[int, Query(ge=1, le=100)] = report.DEFAULT_TOP_K,
) -> HTMLResponse:
    """The study's report, one self-contained HTML page (figures embedded as PNG):
    optimisation history, intermediate values, parallel coordinates, slices,
    hyperparameter importances, the ``top_k`` trials, failures grouped by cause and the
    best config. Works while the study runs (a snapshot). A figure Optuna cannot draw yet
    (e.g. importances before 2 completed trials) is a note in the page."""
    snapshot = report.load_snapshot(backend, study_id, principal=principal)
    page = report.render_html(snapshot, now=datetime.now(UTC), top_k=top_k)
    headers = {"Content-Security-Policy": _REPORT_CSP, "X-Content-Type-Options": "nosniff"}
    return HTMLResponse(page, headers=headers)


@router.get(
    "/{study_id}/trials.csv",
    response_class=Response,
    responses={200: {"content": CSV_CONTENT}},
)
def trials_csv(
    study_id: str,
    backend: BackendDep,
    principal: PrincipalDep,
    state: TrialState | None = None,
) -> Response:
    """Every trial (or those in ``state``) as CSV, one row per trial in number order:
    ``number, state, value, params_<name>..., started_at, finished_at, duration_s,
    epochs, failure_reason``. Text that a spreadsheet would take for a formula (``= + -
    @``) starts with ``'``."""
    page = studies.study_trials(
        backend, study_id, principal=principal, state=state, limit=_EVERY_TRIAL, offset=0
    )
    return trials_csv_response(page.items, study_id)


@router.get("/{study_id}/progress")
def progress(study_id: str, backend: BackendDep, principal: PrincipalDep) -> ProgressPublic:
    """How far the study is: its running trials (epoch, last intermediate value), an ETA
    from finished trials' durations (``eta_basis`` says how) and the ``timeout_s`` left."""
    return report.load_progress(backend, study_id, principal=principal, now=datetime.now(UTC))
