"""The reaper: takes trials back from workers that stopped heartbeating, retries them with
the same parameters, and fails what no process will ever finish. Runs in the server
(:class:`Reaper`), so it works even when every worker is gone.

A trial has two records: its slot in our queue (a *lease*) and its Optuna trial. A worker
tells Optuna first and finishes its slot second, and Optuna moves a trial out of RUNNING
at most once (under a row lock), so Optuna's state decides who owns a stale slot's outcome:

============================== ============================ ===============================
lease (queue)                  Optuna trial                 action
============================== ============================ ===============================
running, heartbeat fresh       any                          none
running, stale                 none attached                reap; retry asks a fresh trial
                               (died between claim and ask)
running, stale                 RUNNING                      FAIL it ("worker stopped
                                                            heartbeating"), enqueue a
                                                            WAITING copy (it resumes from
                                                            the chain's checkpoint), reap
                                                            with its id
running, stale                 FAIL by the reaper (an       find the WAITING copy (or
                               interrupted earlier round),  enqueue it), reap with its id
                               or by a preempted worker
                               that died before requeueing
running, stale                 COMPLETE / PRUNED / FAIL     finish the slot with that
                               told by the worker           outcome (it died between tell
                                                            and finish); no retry
reaped, not retried            its WAITING copy             FAIL the copy ("not retried")
(job ended meanwhile)
no running lease               RUNNING, older than grace    FAIL it (an orphan: ask()
                                                            without attach)
job ended                      WAITING (a retry's copy, or  FAIL it (nothing will run it)
                               an enqueued configuration)
job active or ended            the study itself is gone     job ``failed`` ("its Optuna
                                                            study was deleted"), its
                                                            stale leases reaped, no retry
============================== ============================ ===============================

The order of the steps for one stale lease is the protocol, and every step is idempotent
(a round cut short by a database error is completed by the next one):

1. settle with Optuna: FAIL the RUNNING trial (from then on a late ``tell`` is rejected),
   or adopt the outcome its worker told before dying;
2. if the slot will be retried, enqueue the WAITING copy (same params, ``retry_of``) —
   or find the one an interrupted round enqueued;
3. reap the lease in the queue with that trial's id: the slot becomes claimable, and
   idle workers are NOTIFYed, in the same commit that names the trial to run, so a
   worker woken early can never ask a fresh trial for a retry slot;
4. if the queue reaped the lease but did not retry it (the job ended in between), FAIL
   the copy; if it did not reap it (the worker beat just now), keep the copy for the
   round that will.

A round is per job: one job it cannot process is logged with its id and skipped, and the
others are reaped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from service import metrics, queue, studies
from service.db import translate_any
from service.errors import LeaseLost, OptunaStudyDeleted
from service.periodic import skip_unless_outage
from service.states import (
    FAILURE_ATTR,
    ORIGINAL_TRIAL_ATTR,
    PREEMPTED_ATTR,
    RETRY_OF_ATTR,
    JobState,
    TrialOutcome,
)

log = logging.getLogger("lstm_hpo.reaper")
_T = TypeVar("_T")

ORPHAN_REASON = "no worker owned this trial (its worker lost the database before claiming it)"
#: Finished studies the sweep still looks at (newest first): a trial orphaned just before
#: its study's last slot finished is failed on the next rounds.
RECENTLY_FINISHED_SWEPT = 20


def reap_once(
    backend: studies.Backend, *, grace_s: float, now: datetime | None = None
) -> list[queue.StaleLease]:
    """One reaper round over every job (see the module docstring); returns the reaped leases.

    ``grace_s``: seconds without a heartbeat after which a running lease is stale. Errors
    of one job are logged with its id and never stop the others; a database outage
    (``LstmHpoError`` that is retryable) propagates to the caller.
    """
    at = now or datetime.now(UTC)
    cutoff = at - timedelta(seconds=grace_s)
    by_job: defaultdict[str, list[queue.StaleCandidate]] = defaultdict(list)
    for candidate in queue.stale_leases(backend.sessions, cutoff=cutoff, now=at):
        by_job[candidate.job_id].append(candidate)
    reaped: list[queue.StaleLease] = []
    for job_id, candidates in by_job.items():
        reaped += _per_job(
            job_id, partial(_reap_job, backend, candidates, cutoff=cutoff, at=at), []
        )
    metrics.REAPED_TRIALS.inc(len(reaped))
    queue.end_expired_jobs(backend.sessions, now=at)
    metrics.ORPHANS_FAILED.inc(sweep_unowned_trials(backend, grace_s=grace_s))
    prune_ended_checkpoints(backend)
    return reaped


def prune_ended_checkpoints(backend: studies.Backend) -> int:
    """Apply ``study.keep_checkpoints`` to recently ended studies whose last trial has
    finished (once each: ``studies.prune_checkpoints``); returns how many were deleted."""
    if backend.checkpoints is None:
        return 0
    removed = 0
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        jobs, _total = queue.list_jobs(backend.sessions, state=state, limit=RECENTLY_FINISHED_SWEPT)
        for job in jobs:
            removed += _per_job(job.id, partial(studies.prune_checkpoints, backend, job), None) or 0
    return removed


def _per_job(job_id: str, work: Callable[[], _T], default: _T) -> _T:
    """Run one job's part of a round; log and skip it on anything but a database outage."""
    try:
        return work()
    except Exception as err:  # an outage is raised: the whole round waits for it
        skip_unless_outage(err, f"reaper: job {job_id} skipped this round", log=log)
        return default


def _reap_job(
    backend: studies.Backend,
    candidates: list[queue.StaleCandidate],
    *,
    cutoff: datetime,
    at: datetime,
) -> list[queue.StaleLease]:
    job_id = candidates[0].job_id
    try:
        study_id = studies.optuna_study_id(backend, candidates[0].optuna_study_name)
    except OptunaStudyDeleted as err:
        studies.mark_optuna_study_deleted(backend, job_id)
        log.error("reaper: job %s: %s; reaping its leases without retries", job_id, err.message)
        return [
            stale
            for c in candidates
            if (stale := queue.reap_stale_lease(backend.sessions, c.id, cutoff=cutoff, now=at))
        ]
    reaped = []
    for candidate in candidates:
        stale = _reap_lease(backend, study_id, candidate, cutoff=cutoff, at=at)
        if stale is not None:
            reaped.append(stale)
    return reaped


def _reap_lease(
    backend: studies.Backend,
    study_id: int,
    candidate: queue.StaleCandidate,
    *,
    cutoff: datetime,
    at: datetime,
) -> queue.StaleLease | None:
    """Steps 1-4 of the module docstring for one stale lease."""
    retry_trial_id: int | None = None
    if candidate.optuna_trial_id is not None:
        trial = studies.fail_trial_if_running(
            backend, candidate.optuna_trial_id, queue.REAPED_REASON
        )  # step 1
        if not _failed_by_reaper(trial):
            _adopt_told_outcome(backend, candidate, trial)
            return None
        if candidate.retry_expected:  # step 2
            retry_trial_id = enqueue_retry_copy(backend.storage, study_id, trial)
    stale = queue.reap_stale_lease(  # step 3
        backend.sessions, candidate.id, cutoff=cutoff, retry_trial_id=retry_trial_id, now=at
    )
    if retry_trial_id is not None and stale is not None and not stale.retry:  # step 4
        studies.fail_trial_if_waiting(backend, retry_trial_id, studies.NOT_RUN_REASON)
    # stale None: the lease beat or finished since it was read. Its trial is FAIL already
    # (a late tell is rejected), so the worker gives the slot up and a later round reaps
    # it and reuses the copy; if the job ends first, the sweep FAILs the copy.
    if stale is not None:
        log.warning(
            "reaped trial %s of %s (worker %s)%s",
            stale.trial_number,
            stale.optuna_study_name,
            stale.worker_id,
            "; retrying it" if stale.retry else "",
        )
    return stale


def enqueue_retry_copy(
    storage: optuna.storages.BaseStorage, study_id: int, lost: FrozenTrial
) -> int:
    """The WAITING copy of ``lost`` (same params, ``retry_of`` = its number): the one an
    interrupted round enqueued, or a new one. Returns its Optuna trial id. The reaper's
    step 2, and a preempted worker's (``service.worker``)."""
    for waiting in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if waiting.user_attrs.get(RETRY_OF_ATTR) == lost.number:
            return waiting._trial_id
    # What Study.enqueue_trial does, keeping the new trial's id. The chain's first trial
    # keys its checkpoints: a retry of a retry resumes from what either of them saved.
    original = lost.user_attrs.get(ORIGINAL_TRIAL_ATTR, lost.number)
    # A trial lost before it sampled (killed between attach and its first suggest) holds
    # no params yet, but a retry's fixed ones are in its system attrs: carry both forward,
    # or a retry of a retry killed that early would sample new parameters.
    fixed = {**lost.system_attrs.get("fixed_params", {}), **lost.params}
    template = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={"fixed_params": fixed},
        user_attrs={RETRY_OF_ATTR: lost.number, ORIGINAL_TRIAL_ATTR: original},
    )
    return storage.create_new_trial(study_id, template_trial=template)


def _adopt_told_outcome(
    backend: studies.Backend, candidate: queue.StaleCandidate, trial: FrozenTrial
) -> None:
    """The worker told Optuna ``trial``'s result and died before finishing its slot:
    finish the slot with that result (it counts, and is not retried)."""
    outcome = _OPTUNA_OUTCOMES.get(trial.state)
    if outcome is None:
        return  # WAITING: never attached to a lease; leave it to the queue
    reason = trial.user_attrs.get(FAILURE_ATTR)
    try:
        queue.finish_trial_slot(
            backend.sessions,
            candidate.id,
            outcome,
            None if reason is None else str(reason)[:2000],
        )
    except LeaseLost:
        return  # its worker finished the slot itself meanwhile
    log.warning(
        "trial %s of %s: worker told %s but stopped before finishing its slot; "
        "counted as %s, not retried",
        candidate.trial_number,
        candidate.optuna_study_name,
        trial.state.name,
        outcome,
    )


_OPTUNA_OUTCOMES = {TrialState[outcome.optuna_name]: outcome for outcome in TrialOutcome}


def sweep_unowned_trials(backend: studies.Backend, *, grace_s: float) -> int:
    """FAIL Optuna trials no process will finish; returns how many.

    RUNNING trials with no running lease behind them that are older than the grace period
    (a worker whose ``ask()`` created a trial but which lost the database or died before
    attaching it: no heartbeat can ever end it), in running and recently ended studies;
    and WAITING trials of ended studies (a retry the study ended before running).
    """
    running, _ = queue.list_jobs(backend.sessions, state=JobState.RUNNING, limit=1000)
    ended: list[queue.JobRecord] = []
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        jobs, _total = queue.list_jobs(backend.sessions, state=state, limit=RECENTLY_FINISHED_SWEPT)
        ended += jobs
    cutoff = datetime.now() - timedelta(seconds=grace_s)  # Optuna stores naive local times
    failed = 0
    for job in [*running, *ended]:
        failed += _per_job(job.id, partial(_sweep_job, backend, job, cutoff), 0)
    return failed


def _sweep_job(backend: studies.Backend, job: queue.JobRecord, cutoff: datetime) -> int:
    try:
        study_id = studies.optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        studies.mark_optuna_study_deleted(backend, job.id)
        return 0
    states = (
        (TrialState.RUNNING,) if job.state.is_active else (TrialState.RUNNING, TrialState.WAITING)
    )
    trials = backend.storage.get_all_trials(study_id, deepcopy=False, states=states)
    if not trials:
        return 0
    owned = {
        lease.optuna_trial_id
        for lease in queue.list_leases(backend.sessions, job.id, state="running")
    }
    failed = 0
    for trial in trials:
        if trial.state == TrialState.WAITING:
            reason = studies.not_run_reason(trial)
            if studies.fail_trial_if_waiting(backend, trial._trial_id, reason):
                failed += 1
            continue
        started = trial.datetime_start
        if trial._trial_id in owned or started is None or started > cutoff:
            continue
        if (
            studies.fail_trial_if_running(backend, trial._trial_id, ORPHAN_REASON).state
            == TrialState.FAIL
        ):
            failed += 1
            log.warning(
                "failed orphaned trial %d of %s (no worker owns it)",
                trial.number,
                job.optuna_study_name,
            )
    return failed


def _failed_by_reaper(trial: FrozenTrial) -> bool:
    """FAIL by a reaper round, or by a preempted worker that died before it requeued the
    slot: both are retried (the latter as a reap, which counts as an attempt)."""
    return trial.state == TrialState.FAIL and (
        trial.user_attrs.get(FAILURE_ATTR) == queue.REAPED_REASON
        or PREEMPTED_ATTR in trial.user_attrs
    )


class Reaper(threading.Thread):
    """Runs :func:`reap_once` every ``interval_s`` in the server, even when every worker is gone."""

    def __init__(self, backend: studies.Backend, *, grace_s: float, interval_s: float) -> None:
        super().__init__(name="lstm-hpo-reaper", daemon=True)
        self.backend = backend
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        #: While the reaper itself cannot reach the database, neither can the workers'
        #: heartbeats: their silence then says nothing about them. After an outage the
        #: reaper waits one grace period (monotonic deadline) before reaping again.
        self._database_down = False
        self._amnesty_until = 0.0

    def run(self) -> None:
        # The first round at start-up: a server restarted after a crash fails the trials
        # whose workers died while it was down at once, not one interval later.
        while True:
            self.run_once()
            if self._stop_event.wait(self.interval_s):
                return

    def run_once(self) -> None:
        """One reaper round; errors are logged, never raised (the next round retries)."""
        try:
            studies.check_database(self.backend)
            if self._database_down:
                self._database_down = False
                self._amnesty_until = time.monotonic() + self.grace_s
                log.warning("reaper: database back; reaping resumes in %.0fs", self.grace_s)
            if time.monotonic() < self._amnesty_until:
                return
            reap_once(self.backend, grace_s=self.grace_s)
            metrics.REAPER_ROUNDS.labels("ok").inc()
        except Exception as err:  # never let one bad round end the reaper
            metrics.REAPER_ROUNDS.labels("error").inc()
            ours = translate_any(err)  # the database away for a moment: try next round
            if ours is None:
                log.exception("reaper round failed")
                return
            self._database_down = self._database_down or ours.retryable
            log.warning("reaper: %s", ours)

    def stop(self) -> None:
        self._stop_event.set()
