"""``study.confirm``: the server confirms a study's winner by itself once it has succeeded,
as ``POST /v1/studies/{id}/confirm`` would (:func:`service.confirm.confirm_study`), so that
``best`` names the config with the best mean over new seeds without anyone asking.

Runs in the server (an :class:`AutoConfirmer` thread, like the webhooks' notifier): every
``interval_s`` it looks at the studies with ``study.confirm`` that succeeded within
:data:`LOOKBACK` and queues each one's confirmation once. Once, across restarts and
servers sharing a database: the confirmation is submitted with an idempotency key derived
from the study (two servers racing get the same confirmation study), and what was done is
recorded on the study's Optuna record (system attribute :data:`AUTO_CONFIRM_ATTR`) and
never redone, even when the user deletes that confirmation. A study extended after it was
confirmed (``lstm-hpo extend``) is confirmed again once it has succeeded again: its top
configs may have changed. A study that cannot be
confirmed (fewer completed distinct configs than ``top_k``: most trials failed or were
pruned) gets a note saying why (``GET /v1/studies/{id}``'s ``notes``). The confirmation
keeps the study's webhook (``study.notify``), so whoever is told the search ended is told
when its answer is confirmed too. A failed or
cancelled study is not confirmed: ``lstm-hpo confirm`` still can be asked.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final

from sqlalchemy import select

from service import confirm, queue, studies
from service.auth import Principal
from service.db import session_scope
from service.errors import (
    Conflict,
    InvalidSpec,
    NotFound,
    OptunaStudyDeleted,
    QuotaExceeded,
)
from service.logs import log_context
from service.models import SearchJob
from service.periodic import look_every, skip_unless_outage
from service.search_space import ConfirmSettings
from service.states import NOTES_ATTR, JobState

log = logging.getLogger("lstm_hpo.auto_confirm")

#: Optuna study system attribute: ``{"n_trials": N, "confirmation": id}`` or
#: ``{"n_trials": N, "skipped": reason}``: what was done when the study had N trials.
AUTO_CONFIRM_ATTR: Final = "lstm_hpo:auto_confirm"
#: A study that succeeded longer ago than this is not looked at (a server down for longer
#: does not confirm it; ``lstm-hpo confirm`` still can).
LOOKBACK: Final = timedelta(hours=24)


def idempotency_key(job_id: str, n_trials: int) -> str:
    """The key a study's automatic confirmation is submitted with: one per study and size."""
    return f"study.confirm:{job_id}:{n_trials}"


class AutoConfirmer:
    """Queues the confirmation of every study with ``study.confirm`` once it has succeeded
    (a thread; :meth:`scan_once` is one look)."""

    def __init__(self, backend: studies.Backend, *, interval_s: float) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._stop = threading.Event()
        #: Studies settled (confirmed, skipped, gone) at their n_trials: not looked at again
        #: until they are extended.
        self._done: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._watch, name="lstm-hpo-confirm", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _watch(self) -> None:
        look_every(self._stop, self.interval_s, self.scan_once, what="study.confirm", log=log)

    def scan_once(self, now: datetime | None = None) -> list[str]:
        """One look; returns the ids of the confirmation studies it queued (or found queued
        by another server). One study's error is logged with its id and never stops the
        others; a quota reached leaves the study for a later look."""
        at = now or datetime.now(UTC)
        top_k = SearchJob.spec[("study", "confirm", "top_k")].as_integer()
        with session_scope(self.backend.sessions) as session:
            rows = session.execute(
                select(
                    SearchJob.id,
                    SearchJob.owner,
                    SearchJob.optuna_study_name,
                    SearchJob.spec,
                    SearchJob.n_trials,
                )
                .where(
                    top_k.is_not(None),
                    SearchJob.state == JobState.SUCCEEDED,
                    SearchJob.finished_at >= at - LOOKBACK,
                )
                .order_by(SearchJob.finished_at)
            ).all()
        queued: list[str] = []
        for job_id, owner, study_name, spec, n_trials in rows:
            if (job_id, n_trials) in self._done:
                continue
            with log_context(study_id=job_id):
                try:
                    found = self._confirm(job_id, owner, study_name, spec, n_trials)
                except QuotaExceeded:
                    log.info("study.confirm: %s waits: its owner's quota is reached", job_id)
                    continue
                except Exception as err:  # an outage is raised: never marked done
                    skip_unless_outage(err, f"study.confirm: study {job_id} skipped", log=log)
                    found = None
            self._done.add((job_id, n_trials))
            if found is not None:
                queued.append(found)
        self._done.intersection_update((row[0], row[4]) for row in rows)  # out of sight
        return queued

    def _confirm(
        self, job_id: str, owner: str, study_name: str, spec: Any, n_trials: int
    ) -> str | None:
        """Queue ``job_id``'s confirmation unless it was settled at this size before; its
        id, or None. Raises ``QuotaExceeded`` while its owner's quota is full (a note
        says it waits; no Optuna study is made and dropped each look)."""
        storage = self.backend.storage
        try:
            optuna_id = studies.optuna_study_id(self.backend, study_name)
            done = storage.get_study_system_attrs(optuna_id).get(AUTO_CONFIRM_ATTR)
            if isinstance(done, dict) and done.get("n_trials") == n_trials:
                return None  # settled before (this server before a restart, or another)
            settings = ConfirmSettings.model_validate(spec["study"]["confirm"])
            most = self.backend.max_active_studies
            if most is not None and queue.count_active_jobs(self.backend.sessions, owner) >= most:
                self._note(
                    optuna_id,
                    f"study.confirm: waits for a free slot: its owner has {most} active "
                    "studies (LSTM_HPO_MAX_ACTIVE_STUDIES); queued once one ends",
                )
                raise QuotaExceeded()
            ask = partial(
                confirm.confirm_study,
                self.backend,
                job_id,
                settings.top_k,
                settings.seeds,
                principal=Principal(owner),
                idempotency_key=idempotency_key(job_id, n_trials),
            )
            without_webhook = ""
            try:
                try:
                    study = ask(keep_notify=True)  # nobody waits on it: its webhook tells
                except InvalidSpec as err:
                    if not all(e.loc.startswith("study.notify") for e in err.errors):
                        raise
                    # The server's webhook allow-list changed since the submit: confirm
                    # without it rather than never.
                    study = ask(keep_notify=False)
                    without_webhook = f"; without the study's webhook ({err.message})"
            except (InvalidSpec, Conflict) as err:
                if isinstance(err, (QuotaExceeded, OptunaStudyDeleted)):
                    raise
                self._skip(optuna_id, n_trials, job_id, err.message)
                return None
        except (OptunaStudyDeleted, NotFound):  # deleted meanwhile: nothing to confirm
            return None
        note = (
            f"study.confirm: confirmation {study.id} of its {n_trials} trials (top "
            f"{settings.top_k} x {settings.seeds} seeds){without_webhook}; lstm-hpo best "
            "ID --confirmed gives its winner's config once it has run"
        )
        self._settle(optuna_id, {"n_trials": n_trials, "confirmation": study.id}, note)
        log.info("study.confirm: study %s -> confirmation %s", job_id, study.id)
        return study.id

    def _skip(self, optuna_id: int, n_trials: int, job_id: str, reason: str) -> None:
        """Record on the study why it was not confirmed: a note users see, and the mark."""
        note = f"study.confirm: not run: {reason} (lstm-hpo confirm ID --top-k N asks again)"
        self._settle(optuna_id, {"n_trials": n_trials, "skipped": reason}, note)
        log.warning("study.confirm: study %s not confirmed: %s", job_id, reason)

    def _settle(self, optuna_id: int, mark: dict[str, Any], note: str) -> None:
        """Say ``note`` on the study and mark it settled."""
        self._note(optuna_id, note)
        self.backend.storage.set_study_system_attr(optuna_id, AUTO_CONFIRM_ATTR, mark)

    def _note(self, optuna_id: int, note: str) -> None:
        """``note`` in the study's notes (``GET /v1/studies/{id}``, ``lstm-hpo status``) in
        place of what study.confirm said there before: the newest state only."""
        storage = self.backend.storage
        notes = storage.get_study_user_attrs(optuna_id).get(NOTES_ATTR) or []
        kept = [n for n in notes if not str(n).startswith("study.confirm:")]
        if [*kept, note] != notes:
            storage.set_study_user_attr(optuna_id, NOTES_ATTR, [*kept, note])
