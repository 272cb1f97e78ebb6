"""Webhooks (``study.notify``): the server POSTs a study's summary to its URL when the
study ends (``finished``: succeeded, ``failed``, ``cancelled``) or a trial beats every
earlier one (``new_best``).

Sent from the server, never from a worker: a :class:`Notifier` thread looks at the
studies that have a webhook every ``interval_s`` (a few cheap reads: the database is the
truth, whichever process changed it), and sender threads POST what it found. A slow or
dead receiver delays only other webhooks, never a trial. Deliveries are not ordered (two
senders; retries): a receiver orders by ``sent_at`` or by the study's state.

Once per event: each event is claimed before it is queued, by inserting its
``event_id`` into ``webhook_events`` (primary key: of servers sharing a database exactly
one wins). What was told is also recorded on the study's Optuna record (system attribute
:data:`NOTIFIED_ATTR`: the best trial told, the ``n_trials`` whose end was told), so a
restarted server neither repeats what was sent nor misses a study that ended while it was
down (within :data:`LOOKBACK`). An extended study ends again at its new ``n_trials``: a
new end event. Delivery is at most once; each POST carries the ``event_id``
(``<study id>:new_best:<trial>``, ``<study id>:finished:<n_trials>``). ``new_best`` is
coalesced: one POST for the newest best a look finds.

Delivery: a JSON POST (:func:`payload`), 10 s timeout, redirects not followed (a
redirect could lead anywhere), the URL checked against ``LSTM_HPO_WEBHOOK_ALLOW`` again
(the list may have changed since the submit). 2xx: delivered. 408, 425, 429, 5xx and
connection errors: retried after 1, 2, 4, 8 s (:data:`MAX_ATTEMPTS` in all); any other
answer: given up. Outcomes count in ``lstm_hpo_webhook_deliveries_total``.
"""

from __future__ import annotations

import json
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any, Final

import httpx
from pydantic import ValidationError
from sqlalchemy import or_, select

from service import confirm, studies
from service.auth import LOCAL
from service.db import session_scope
from service.errors import AlreadyExists, NotFound, OptunaStudyDeleted
from service.logs import log_context
from service.metrics import WEBHOOK_DELIVERIES
from service.models import SearchJob, WebhookEvent
from service.periodic import look_every, skip_unless_outage
from service.search_space import NotifyEvent, NotifySettings
from service.states import ACTIVE_JOB_STATES, JobState
from service.webhooks import url_allowed

log = logging.getLogger("lstm_hpo.notify")

#: Optuna study system attribute, what was told: ``{"best_trial": n | null, "ended": bool,
#: "ended_for": n_trials | null}`` (``ended`` alone: a server before 2026-12-02, see
#: :func:`_ended_for`).
NOTIFIED_ATTR: Final = "lstm_hpo:notified"
#: A study that ended longer ago than this is not looked at (a server down for longer
#: does not send its end).
LOOKBACK: Final = timedelta(hours=24)
MAX_ATTEMPTS: Final = 5
MAX_BACKOFF_S: Final = 60.0
TIMEOUT_S: Final = 10.0
#: Deliveries waiting to be sent; past it new events are dropped (and logged).
MAX_PENDING: Final = 1000
_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_END_EVENTS: Final[dict[str, NotifyEvent]] = {
    JobState.SUCCEEDED: "finished",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


@dataclass(order=True)
class Delivery:
    """One POST to make: due at ``due`` (``time.monotonic``), ``attempt`` tries made."""

    due: float
    seq: int
    url: str = field(compare=False)
    event_id: str = field(compare=False)
    body: bytes = field(compare=False, repr=False)
    attempt: int = field(default=0, compare=False)


@dataclass
class _Seen:
    """What this server knows was told for one study (a cache of :data:`NOTIFIED_ATTR`)."""

    optuna_id: int
    best_trial: int | None = None
    #: The study's ``n_trials`` when its end was told (an extension raises it: a new end).
    ended_for: int | None = None
    #: :data:`NOTIFIED_ATTR` as last read or written: an old server's record is read
    #: (:func:`_ended_for`) only when it changes.
    record: dict[str, Any] | None = None


#: ``ended_for`` of an end told for an ``n_trials`` no longer known (see :func:`_ended_for`).
_AN_EARLIER_END: Final = -1


def _ended_for(told: dict[str, Any], ended_now: int | None) -> int | None:
    """The ``n_trials`` whose end :data:`NOTIFIED_ATTR` ``told`` says was told, or None.

    A record of a server before 2026-12-02 (or of one in a rolling upgrade) says only
    ``"ended": true``: the end of a study ended now (``ended_now``: its ``n_trials``) is
    taken as told (the old server told the end it saw, and never a later one); for a
    study running again it was an earlier end, and the coming one is new.
    """
    if told.get("ended_for") is not None:
        return int(told["ended_for"])
    if not told.get("ended"):
        return None
    return ended_now if ended_now is not None else _AN_EARLIER_END


def payload(
    backend: studies.Backend,
    job_id: str,
    event: NotifyEvent,
    *,
    best: tuple[int, float | None, dict[str, Any]] | None = None,
    ended_for: int | None = None,
) -> dict[str, Any]:
    """The JSON a webhook receives::

        {"event": "new_best", "event_id": "<study id>:new_best:7", "sent_at": "...Z",
         "study": {"id", "name", "state", "task", "metric", "direction", "n_trials",
                   "n_finished", "counts", "best_value", "best_trial_number",
                   "best_params", "error", "created_at", "started_at", "finished_at",
                   "elapsed_s", "url" (the API's), "dashboard_url",
                   "confirmation": null, or for a confirmation study {"confirms",
                   "winner_trial_number", "verdict", "best_url"}}}

    ``best``: the trial a ``new_best`` tells of (number, value, params); else the study's
    best now. ``ended_for``: the ``n_trials`` an end event is for (its ``event_id``: an
    extended study ends again; default the study's now). Raises ``StudyNotFound`` for a
    study deleted meanwhile.
    """
    study = studies.get_study(backend, job_id, principal=LOCAL)
    summary = study.model_dump(mode="json", exclude={"spec", "optuna_study_name"})
    if best is None and study.best_trial_number is not None:
        number = study.best_trial_number
        best = (number, study.best_value, _trial_params(backend, study.optuna_study_name, number))
    summary["best_params"] = None
    if best is not None:
        summary["best_trial_number"], summary["best_value"], summary["best_params"] = best
    summary["url"] = f"{backend.base_url}/v1/studies/{job_id}"
    # A confirmation study (study.confirm keeps the webhook): the study it confirms, its
    # winner and verdict; the best trial above is one (config, seed) pair, not the answer.
    found = confirm.own_result(backend, job_id)
    summary["confirmation"] = None
    if found is not None:
        winner = next((c for c in found.configs if c.rank == 1), None)
        summary["confirmation"] = {
            "confirms": found.confirms,
            "winner_trial_number": winner.trial_number if winner else None,
            "verdict": found.verdict,
            "best_url": f"{backend.base_url}/v1/studies/{found.confirms}/best?confirmed=true",
        }
    event_id = f"{job_id}:{event}"
    if event == "new_best":
        event_id += f":{best[0]}" if best is not None else ""
    else:
        event_id += f":{study.n_trials if ended_for is None else ended_for}"
    return {
        "event": event,
        "event_id": event_id,
        "sent_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "study": summary,
    }


def _trial_params(backend: studies.Backend, study_name: str, number: int) -> dict[str, Any]:
    optuna_id = studies.optuna_study_id(backend, study_name)
    trial_id = backend.storage.get_trial_id_from_study_id_trial_number(optuna_id, number)
    return dict(backend.storage.get_trial(trial_id).params)


class Notifier:
    """Finds study events (a thread) and sends them (``senders`` threads).

    ``allow``: the ``LSTM_HPO_WEBHOOK_ALLOW`` prefixes (each URL is checked against them
    again before it is sent); ``interval_s``: seconds between looks; ``backoff_s``: the
    first retry's delay (doubled per attempt, at most :data:`MAX_BACKOFF_S`).
    """

    def __init__(
        self,
        backend: studies.Backend,
        *,
        allow: Sequence[str],
        interval_s: float,
        backoff_s: float = 1.0,
        senders: int = 2,
    ) -> None:
        self.backend = backend
        self.allow = tuple(allow)
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self._pending: queue_mod.PriorityQueue[Delivery] = queue_mod.PriorityQueue(MAX_PENDING)
        self._stop = threading.Event()
        self._seen: dict[str, _Seen] = {}
        #: (study, n_trials) whose end was told (or that are gone): not looked at again
        #: unless extended (a new n_trials).
        self._done: set[tuple[str, int]] = set()
        self._seq = 0
        self._threads = [threading.Thread(target=self._watch, name="lstm-hpo-notify", daemon=True)]
        self._threads += [
            threading.Thread(target=self._send_loop, name=f"lstm-hpo-webhook-{i}", daemon=True)
            for i in range(senders)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop looking and sending; deliveries still pending are dropped (and logged)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        if dropped := self._pending.qsize():
            log.warning("webhooks: %d deliveries not sent (the server stopped)", dropped)

    # ----------------------------------------------------------------------------------
    # Looking

    def _watch(self) -> None:
        look_every(self._stop, self.interval_s, self.scan_once, what="webhooks", log=log)

    def scan_once(self, now: datetime | None = None) -> int:
        """One look at every study with a webhook that is active or ended within
        :data:`LOOKBACK`; queues what is new and returns how many deliveries it queued.
        One study's error is logged with its id and never stops the others."""
        at = now or datetime.now(UTC)
        url = SearchJob.spec[("study", "notify", "url")].as_string()
        with session_scope(self.backend.sessions) as session:
            rows = session.execute(
                select(
                    SearchJob.id,
                    SearchJob.state,
                    SearchJob.optuna_study_name,
                    SearchJob.spec,
                    SearchJob.n_trials,
                )
                .where(
                    url.is_not(None),
                    or_(
                        SearchJob.state.in_(ACTIVE_JOB_STATES),
                        SearchJob.finished_at >= at - LOOKBACK,
                    ),
                )
                .order_by(SearchJob.created_at)
            ).all()
        queued = 0
        for job_id, state, study_name, spec, n_trials in rows:
            if (job_id, n_trials) in self._done:
                continue
            with log_context(study_id=job_id):
                try:
                    queued += self._scan_job(job_id, JobState(state), study_name, spec, n_trials)
                except Exception as err:  # an outage is raised: the next look tries again
                    skip_unless_outage(err, f"webhooks: study {job_id} skipped", log=log)
        self._done.intersection_update((row[0], row[4]) for row in rows)  # the rest: gone
        return queued

    def _scan_job(
        self, job_id: str, state: JobState, study_name: str, spec: Any, n_trials: int
    ) -> int:
        try:
            notify = NotifySettings.model_validate(spec["study"]["notify"])
        except (ValidationError, KeyError, TypeError):
            log.error("webhooks: study %s: its study.notify is not valid; ignored", job_id)
            self._done.add((job_id, n_trials))
            return 0
        seen = self._seen.get(job_id)
        ended_now = n_trials if state.is_terminal else None
        try:
            if seen is None:
                seen = self._seen[job_id] = self._read_seen(study_name, ended_now)
            queued = 0
            if "new_best" in notify.on:
                queued += self._check_best(job_id, seen, notify, ended_now)
            if state.is_terminal:
                queued += self._check_end(job_id, seen, notify, state, n_trials)
        except (OptunaStudyDeleted, NotFound):  # deleted meanwhile: nothing to tell
            self._done.add((job_id, n_trials))
            self._seen.pop(job_id, None)
            return 0
        return queued

    def _read_seen(self, study_name: str, ended_now: int | None) -> _Seen:
        optuna_id = studies.optuna_study_id(self.backend, study_name)
        told = self.backend.storage.get_study_system_attrs(optuna_id).get(NOTIFIED_ATTR) or {}
        return _Seen(optuna_id, told.get("best_trial"), _ended_for(told, ended_now), told)

    def _record(self, seen: _Seen) -> None:
        told = {
            "best_trial": seen.best_trial,
            "ended": seen.ended_for is not None,
            "ended_for": seen.ended_for,
        }
        self.backend.storage.set_study_system_attr(seen.optuna_id, NOTIFIED_ATTR, told)
        seen.record = told

    def _refresh(self, seen: _Seen, ended_now: int | None) -> None:
        """Read what was told again (another server may have told it since)."""
        told = self.backend.storage.get_study_system_attrs(seen.optuna_id).get(NOTIFIED_ATTR)
        if told and told != seen.record:
            seen.best_trial = told.get("best_trial")
            seen.ended_for = _ended_for(told, ended_now)
            seen.record = told

    def _claim(self, job_id: str, event_id: str) -> bool:
        """Whether this server is the one to send ``event_id``: the insert of its row is
        atomic, so of servers sharing a database exactly one gets True."""
        try:
            with session_scope(self.backend.sessions) as session:
                session.add(WebhookEvent(event_id=event_id, job_id=job_id))
        except AlreadyExists:
            log.info("webhooks: %s: another server sends it", event_id)
            return False
        return True

    def _check_best(
        self, job_id: str, seen: _Seen, notify: NotifySettings, ended_now: int | None
    ) -> int:
        try:
            best = self.backend.storage.get_best_trial(seen.optuna_id)
        except ValueError:  # no trial has completed yet
            return 0
        except RuntimeError:  # several objectives: no single best to tell
            return 0
        if best.number == seen.best_trial:
            return 0
        self._refresh(seen, ended_now)
        if best.number == seen.best_trial:
            return 0
        told = (best.number, best.value, dict(best.params))
        queued = self._queue(notify.url, payload(self.backend, job_id, "new_best", best=told))
        # Recorded once claimed (the claim makes it once): a database error before this
        # leaves it to the next look, not lost.
        seen.best_trial = best.number
        self._record(seen)
        return queued

    def _check_end(
        self, job_id: str, seen: _Seen, notify: NotifySettings, state: JobState, n_trials: int
    ) -> int:
        queued = 0
        if seen.ended_for != n_trials:
            self._refresh(seen, n_trials)
        if seen.ended_for != n_trials:
            event = _END_EVENTS[state]
            if event in notify.on:
                body = payload(self.backend, job_id, event, ended_for=n_trials)
                queued = self._queue(notify.url, body)
            seen.ended_for = n_trials  # as for a new best: recorded once claimed
            self._record(seen)
        elif (seen.record or {}).get("ended_for") != n_trials:
            # An old server's record ("ended" alone) rewritten with the n_trials it is
            # for: were it kept, a look after an extension and its end could not tell
            # that end from the one told (and it would never be sent).
            self._record(seen)
        self._done.add((job_id, n_trials))
        self._seen.pop(job_id, None)  # read again should it be extended
        return queued

    def _queue(self, url: str, body: dict[str, Any]) -> int:
        if not self._claim(body["study"]["id"], body["event_id"]):
            return 0
        self._seq += 1
        delivery = Delivery(
            time.monotonic(), self._seq, url, body["event_id"], json.dumps(body).encode()
        )
        try:
            self._pending.put_nowait(delivery)
        except queue_mod.Full:
            WEBHOOK_DELIVERIES.labels("dropped").inc()
            log.warning(
                "webhooks: %s dropped: %d deliveries pending", body["event_id"], MAX_PENDING
            )
            return 0
        log.info("webhooks: %s queued", body["event_id"])
        return 1

    # ----------------------------------------------------------------------------------
    # Sending

    def _send_loop(self) -> None:
        headers = {
            "content-type": "application/json",
            "user-agent": f"lstm-hpo/{version('lstm-hpo')}",
        }
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, headers=headers) as http:
            while not self._stop.is_set():
                try:
                    delivery = self._pending.get(timeout=0.2)
                except queue_mod.Empty:
                    continue
                wait_s = delivery.due - time.monotonic()
                if wait_s > 0:  # the earliest is not due yet: put it back and wait a little
                    self._pending.put(delivery)
                    self._stop.wait(min(wait_s, 0.2))
                    continue
                self._send(http, delivery)

    def _send(self, http: httpx.Client, delivery: Delivery) -> None:
        with log_context(study_id=delivery.event_id.split(":", 1)[0]):
            if not url_allowed(delivery.url, self.allow):
                WEBHOOK_DELIVERIES.labels("failed").inc()
                log.warning(
                    "webhooks: %s not sent: its URL is no longer under LSTM_HPO_WEBHOOK_ALLOW",
                    delivery.event_id,
                )
                return
            try:
                status: int | None = http.post(
                    delivery.url,
                    content=delivery.body,
                    headers={"x-lstm-hpo-event-id": delivery.event_id},
                ).status_code
                why = f"HTTP {status}"
            except httpx.HTTPError as err:
                status, why = None, f"{type(err).__name__}: {err}"
            if status is not None and 200 <= status < 300:
                WEBHOOK_DELIVERIES.labels("sent").inc()
                log.info("webhooks: %s sent (%s)", delivery.event_id, why)
                return
            retry = status is None or status in _RETRY_STATUSES or status >= 500
            delivery.attempt += 1
            if retry and delivery.attempt < MAX_ATTEMPTS:
                # Bounded: MAX_ATTEMPTS tries, doubling delays; a receiver down for longer
                # than their sum misses the event (the log says so).
                delay = min(self.backoff_s * 2 ** (delivery.attempt - 1), MAX_BACKOFF_S)
                delivery.due = time.monotonic() + delay
                WEBHOOK_DELIVERIES.labels("retried").inc()
                log.warning("webhooks: %s: %s; retrying in %.0fs", delivery.event_id, why, delay)
                try:
                    self._pending.put_nowait(delivery)
                except queue_mod.Full:
                    WEBHOOK_DELIVERIES.labels("dropped").inc()
                return
            WEBHOOK_DELIVERIES.labels("failed").inc()
            log.warning(
                "webhooks: %s not delivered after %d attempt(s): %s",
                delivery.event_id,
                delivery.attempt,
                why,
            )
