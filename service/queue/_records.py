"""What the queue hands out: frozen records (never ORM rows), the type names its functions
take, and the texts it writes into rows (failure reasons, job errors)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.models import SearchJob, TrialLease, Worker
from service.states import JobState, LeaseState, TrialOutcome

SessionSource = sessionmaker[Session] | Engine
FinishOutcome = TrialOutcome | Literal["complete", "pruned", "failed"]

ALL_FAILED_ERROR = "every trial failed; see the trials' failure reasons"
NONE_COMPLETED_ERROR = "no trial completed (every trial was pruned or failed)"
TIMED_OUT_ERROR = "the study timed out before any trial completed"
REAPED_REASON = "worker stopped heartbeating"

#: Longest study timeout a deadline is computed from: ~100 years. A job row written before
#: the submit-time bound existed (or by hand) can hold any float; its deadline must never
#: overflow a datetime (an OverflowError in every claim stopped every worker).
MAX_DEADLINE_S = 100 * 365 * 24 * 3600.0


@dataclass(frozen=True)
class JobCounts:
    """Slot accounting of one job."""

    n_trials: int
    n_running: int
    n_finished: int
    n_complete: int

    @property
    def n_claimable(self) -> int:
        """Slots neither running nor finished (claimable while the job is active)."""
        return self.n_trials - self.n_running - self.n_finished


@dataclass(frozen=True)
class JobRecord:
    """One search job (a row of ``search_jobs``)."""

    id: str
    name: str
    owner: str
    state: JobState
    spec: dict[str, Any]
    optuna_study_name: str
    n_trials: int
    max_retries: int
    timeout_s: float | None
    n_running: int
    n_finished: int
    n_complete: int
    idempotency_key: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    deadline_at: datetime | None
    finished_at: datetime | None
    last_claimed_at: datetime | None

    @property
    def counts(self) -> JobCounts:
        """The slot counters as a :class:`JobCounts`."""
        return JobCounts(self.n_trials, self.n_running, self.n_finished, self.n_complete)


class CreatedJob(NamedTuple):
    """What :func:`create_job` returns; unpacks as ``job, created = create_job(...)``.

    ``created`` is False when an idempotency key matched a job that already existed.
    """

    job: JobRecord
    created: bool


@dataclass(frozen=True)
class Lease:
    """A trial slot just claimed by ``worker_id``: everything the worker needs to run it.

    ``retry_of`` is the reaped lease this one retries (None for a fresh slot); its Optuna
    trial number is ``retry_of_trial_number`` (None when it died before attaching one).
    ``retry_trial_id``: the WAITING Optuna trial a retry must run (same parameters); None
    for a fresh slot, or for a retry whose lost lease never attached a trial.
    """

    id: int
    job_id: str
    worker_id: str
    optuna_study_name: str
    spec: dict[str, Any]
    attempt: int
    retry_of: int | None
    retry_of_trial_number: int | None
    retry_trial_id: int | None
    claimed_at: datetime


@dataclass(frozen=True)
class LeaseRecord:
    """One row of ``trial_leases``."""

    id: int
    job_id: str
    worker_id: str
    state: LeaseState
    attempt: int
    retry_of: int | None
    retry_pending: bool
    retry_trial_id: int | None
    optuna_trial_id: int | None
    trial_number: int | None
    claimed_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    failure_reason: str | None


@dataclass(frozen=True)
class StaleLease:
    """A lease the reaper took back. When ``retry`` is True the slot is claimable again
    (with ``retry_trial_id`` to run, if the lease had a trial); otherwise the slot counted
    as finished-failed."""

    id: int
    job_id: str
    optuna_study_name: str
    worker_id: str
    attempt: int
    optuna_trial_id: int | None
    trial_number: int | None
    retry: bool
    retry_trial_id: int | None
    job_state: JobState


@dataclass(frozen=True)
class StaleCandidate:
    """A running lease whose heartbeat is older than the grace period (read, not locked).

    ``retry_expected``: whether reaping it now would queue a retry (its job active, not
    past its timeout, ``attempt < max_retries``); :func:`reap_stale_lease` decides again
    under the job's lock.
    """

    id: int
    job_id: str
    optuna_study_name: str
    worker_id: str
    optuna_trial_id: int | None
    trial_number: int | None
    retry_expected: bool


@dataclass(frozen=True)
class WorkerRecord:
    """One registered worker process."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    device: str | None = None


def job_record(job: SearchJob) -> JobRecord:
    """The record of one ``search_jobs`` row."""
    return JobRecord(
        id=job.id,
        name=job.name,
        owner=job.owner,
        state=JobState(job.state),
        spec=dict(job.spec),
        optuna_study_name=job.optuna_study_name,
        n_trials=job.n_trials,
        max_retries=job.max_retries,
        timeout_s=job.timeout_s,
        n_running=job.n_running,
        n_finished=job.n_finished,
        n_complete=job.n_complete,
        idempotency_key=job.idempotency_key,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        deadline_at=job.deadline_at,
        finished_at=job.finished_at,
        last_claimed_at=job.last_claimed_at,
    )


def lease_record(lease: TrialLease) -> LeaseRecord:
    """The record of one ``trial_leases`` row."""
    return LeaseRecord(
        id=lease.id,
        job_id=lease.job_id,
        worker_id=lease.worker_id,
        state=LeaseState(lease.state),
        attempt=lease.attempt,
        retry_of=lease.retry_of,
        retry_pending=lease.retry_pending,
        retry_trial_id=lease.retry_trial_id,
        optuna_trial_id=lease.optuna_trial_id,
        trial_number=lease.trial_number,
        claimed_at=lease.claimed_at,
        heartbeat_at=lease.heartbeat_at,
        finished_at=lease.finished_at,
        failure_reason=lease.failure_reason,
    )


def worker_record(worker: Worker) -> WorkerRecord:
    """The record of one ``workers`` row."""
    return WorkerRecord(
        id=worker.id,
        hostname=worker.hostname,
        pid=worker.pid,
        started_at=worker.started_at,
        heartbeat_at=worker.heartbeat_at,
        device=worker.device,
    )
