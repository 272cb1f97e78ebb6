"""optuna-dashboard, mounted at the root, behind a guard that keeps a study's two records in step.

The dashboard talks to Optuna's storage directly. Left alone, its trash icon deletes
Optuna's half of a study and leaves our job row behind (every API route on it then
failed, and so did the reaper). The guard answers the dashboard's JSON routes that would
split a study or take a trial from its worker, before the WSGI app sees them:

- ``DELETE /api/studies/{id}``: goes through :func:`service.studies.delete_study` (cancel,
  then both records), as ``DELETE /v1/studies/{id}`` does;
- ``POST /api/studies`` (create) and ``POST /api/studies/{id}/rename`` (a copy plus a
  delete): refused with a message pointing to ``POST /v1/studies``;
- ``POST /api/trials/{id}/tell`` and ``POST /api/studies/{id}/{trial}/skip``: refused,
  workers own their trials' states;
- ``POST /incompatible-rdb-schema`` (Optuna's schema upgrade): refused, run
  ``lstm-hpo migrate``.

Refusals are 403 with ``{"reason": ...}``, the field the dashboard's front end shows.
"""

from __future__ import annotations

import re

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import studies
from service.errors import LstmHpoError, NotFound

_SUBMIT_HINT = "submit studies to lstm-hpo with POST /v1/studies (or `lstm-hpo submit SPEC`)"
_REFUSED: list[tuple[str, re.Pattern[str], str]] = [
    (
        "POST",
        re.compile(r"/api/studies/?"),
        f"lstm-hpo studies cannot be created here: {_SUBMIT_HINT}",
    ),
    (
        "POST",
        re.compile(r"/api/studies/\d+/rename"),
        "lstm-hpo studies cannot be renamed (a rename copies the study and deletes the "
        f"original, which would cut it off from its trial queue); {_SUBMIT_HINT}",
    ),
    (
        "POST",
        re.compile(r"/api/trials/\d+/tell"),
        "trial states are set by lstm-hpo's workers; cancel or delete the study instead "
        "(POST /v1/studies/{id}/cancel, DELETE /v1/studies/{id})",
    ),
    (
        "POST",
        re.compile(r"/api/studies/\d+/\d+/skip"),
        "trial states are set by lstm-hpo's workers; cancel or delete the study instead "
        "(POST /v1/studies/{id}/cancel, DELETE /v1/studies/{id})",
    ),
    (
        "POST",
        re.compile(r"/incompatible-rdb-schema/?"),
        "the schema is upgraded by the lstm-hpo server at start (or `lstm-hpo migrate`)",
    ),
]
_DELETE_STUDY = re.compile(r"/api/studies/(\d+)/?")


class DashboardGuard:
    """ASGI middleware in front of the mounted dashboard (see the module docstring)."""

    def __init__(self, app: ASGIApp, backend: studies.Backend) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = await self._intercept(scope["method"], scope["path"])
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _intercept(self, method: str, path: str) -> Response | None:
        for refused_method, pattern, reason in _REFUSED:
            if method == refused_method and pattern.fullmatch(path):
                return JSONResponse({"reason": reason}, status_code=403)
        match = _DELETE_STUDY.fullmatch(path)
        if method == "DELETE" and match is not None:
            try:
                await run_in_threadpool(
                    studies.delete_study_by_optuna_id, self.backend, int(match.group(1))
                )
            except NotFound:
                return JSONResponse(
                    {"reason": f"study_id={match.group(1)} is not found"}, status_code=404
                )
            except LstmHpoError as err:
                status = 503 if err.retryable else 409
                return JSONResponse({"reason": err.message}, status_code=status)
            return Response(status_code=204)
        return None
