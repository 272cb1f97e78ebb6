"""A small typed Python client for the lstm-hpo REST API.

from service.client import Client
with Client("http://127.0.0.1:8000") as c:
    study = c.submit(open("search_spaces/adding.yaml").read())
    c.wait(study.id)
    print(c.best(study.id).config)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from service.errors import FieldError, InvalidSpec, LstmHpoError
from service.schemas import (
    BestPublic,
    ConfirmationPublic,
    Page,
    ProgressPublic,
    StudyPublic,
    TrialPublic,
)
from service.states import TERMINAL_JOB_STATES

#: Study states after which nothing of a study runs any more (``JobState.is_terminal``).
TERMINAL_STATES = TERMINAL_JOB_STATES


class ApiError(LstmHpoError):
    """The server answered with an error."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        super().__init__(f"HTTP {status_code}: {message}")


class Client:
    """Talks to one lstm-hpo server. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``token``: an API token (``lstm-hpo token create NAME``), sent as
        ``Authorization: Bearer``; default ``LSTM_HPO_TOKEN``; none for a server in open mode."""
        token = token or os.environ.get("LSTM_HPO_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ApiError(0, f"cannot reach {self._http.base_url}: {err}") from None
        if response.status_code == 422:
            body = response.json()
            errors = [FieldError(e["loc"], e["msg"]) for e in body.get("errors", [])]
            raise InvalidSpec(errors or [FieldError("", str(body.get("detail")))])
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, str(detail))
        return response

    def submit(
        self, spec: str | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> StudyPublic:
        """Queue a study from YAML/JSON text or a mapping."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if isinstance(spec, str):
            headers["Content-Type"] = "application/yaml"
            response = self._request("POST", "/v1/studies", content=spec, headers=headers)
        else:
            response = self._request("POST", "/v1/studies", json=dict(spec), headers=headers)
        return StudyPublic.model_validate(response.json())

    def get(self, study_id: str) -> StudyPublic:
        return StudyPublic.model_validate(self._request("GET", f"/v1/studies/{study_id}").json())

    def studies(
        self, *, state: str | None = None, limit: int = 20, offset: int = 0
    ) -> Page[StudyPublic]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        response = self._request("GET", "/v1/studies", params=params)
        return Page[StudyPublic].model_validate(response.json())

    def trials(self, study_id: str, *, limit: int = 100, offset: int = 0) -> Page[TrialPublic]:
        response = self._request(
            "GET", f"/v1/studies/{study_id}/trials", params={"limit": limit, "offset": offset}
        )
        return Page[TrialPublic].model_validate(response.json())

    def trials_csv(self, study_id: str) -> str:
        """Every trial as CSV text (``GET /v1/studies/{id}/trials.csv``), for spreadsheets."""
        return self._request("GET", f"/v1/studies/{study_id}/trials.csv").text

    def report(self, study_id: str, *, top_k: int | None = None) -> str:
        """The study's report: one self-contained HTML page (``GET .../report``)."""
        params = {"top_k": top_k} if top_k is not None else {}
        return self._request("GET", f"/v1/studies/{study_id}/report", params=params).text

    def progress(self, study_id: str) -> ProgressPublic:
        """Running trials (epoch, last intermediate value), ETA and timeout left."""
        response = self._request("GET", f"/v1/studies/{study_id}/progress")
        return ProgressPublic.model_validate(response.json())

    def best(self, study_id: str) -> BestPublic:
        """The best completed trial and its resolved config (ApiError 409 before one exists)."""
        return BestPublic.model_validate(
            self._request("GET", f"/v1/studies/{study_id}/best").json()
        )

    def top(self, study_id: str, k: int) -> list[BestPublic]:
        response = self._request("GET", f"/v1/studies/{study_id}/best", params={"k": k})
        return [BestPublic.model_validate(b) for b in response.json()]

    def best_yaml(self, study_id: str) -> str:
        """The best config as YAML, as `lstm-hpo train` takes it."""
        response = self._request("GET", f"/v1/studies/{study_id}/best", params={"format": "yaml"})
        return response.text

    def best_checkpoint(self, study_id: str, dest: Path) -> None:
        """Save the best trial's checkpoint to ``dest`` (ApiError 409 before a trial has
        completed, 404 when it has no checkpoint)."""
        response = self._request("GET", f"/v1/studies/{study_id}/best/checkpoint")
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(response.content)
        tmp.replace(dest)  # never a torn file at dest

    def cancel(self, study_id: str) -> StudyPublic:
        return StudyPublic.model_validate(
            self._request("POST", f"/v1/studies/{study_id}/cancel").json()
        )

    def extend(self, study_id: str, n_trials: int) -> StudyPublic:
        """Add ``n_trials`` trials to a study (queued, running or ended); the study as it
        is now. ApiError 409 for a failed study, 404 unknown; InvalidSpec past the limit."""
        response = self._request(
            "POST", f"/v1/studies/{study_id}/extend", json={"n_trials": n_trials}
        )
        return StudyPublic.model_validate(response.json())

    def confirm(self, study_id: str, *, top_k: int = 3, seeds: int = 5) -> StudyPublic:
        """Re-train the study's ``top_k`` best configs with ``seeds`` new seeds each, as
        their own study: that study (``n_trials`` = top_k x seeds; wait on its id, then
        :meth:`confirmation`). ApiError 409 with fewer completed configs than ``top_k``,
        404 unknown; InvalidSpec for top_k outside 1..20 or seeds outside 2..20."""
        response = self._request(
            "POST", f"/v1/studies/{study_id}/confirm", json={"top_k": top_k, "seeds": seeds}
        )
        return StudyPublic.model_validate(response.json())

    def confirmation(self, study_id: str) -> ConfirmationPublic:
        """A confirmation study's statistics (or a confirmed study's newest confirmation's):
        per config mean, sd and 95% interval of the validation and test metric, and the
        paired test of the best against the runner-up. ApiError 404 if never confirmed."""
        response = self._request("GET", f"/v1/studies/{study_id}/confirmation")
        return ConfirmationPublic.model_validate(response.json())

    def delete(self, study_id: str) -> None:
        """Delete a study and its trials (cancelled first if it runs); ApiError 404 if unknown."""
        self._request("DELETE", f"/v1/studies/{study_id}")

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = self._request("GET", "/v1/health").json()
        return body

    def wait(
        self,
        study_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[StudyPublic], None] | None = None,
    ) -> StudyPublic:
        """Poll until the study is succeeded, failed or cancelled (or ``timeout_s`` passes)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            study = self.get(study_id)
            if on_update is not None:
                on_update(study)
            if study.state in TERMINAL_STATES:
                return study
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"study {study_id} still {study.state} after {timeout_s}s")
            time.sleep(poll_s)
