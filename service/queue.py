"""The trial-slot queue: the only code that claims, heartbeats, finishes, cancels and reaps.

A *job* (one Optuna study) has ``n_trials`` slots. A worker claims one slot at a time (a
*lease*), trains the trial outside any transaction, and finishes the slot with its outcome.
Invariants kept here:

- ``n_running + n_finished <= n_trials`` at every commit, so a job ends with EXACTLY
  ``n_trials`` finished slots however many processes share it.
  ``n_finished`` = complete + pruned + failed-not-retried.
- A running lease has one owner; once it is reaped its result is rejected (``LeaseLost``).
- Every function is ONE short transaction (the reaper: one per stale lease). Rows of
  ``search_jobs`` are locked before rows of ``trial_leases`` everywhere, so concurrent
  claim / finish / reap / cancel calls cannot deadlock each other.

Locking: on PostgreSQL the job row is locked with ``SELECT ... FOR UPDATE`` (``SKIP LOCKED``
when claiming); on SQLite the engine opens every transaction with ``BEGIN IMMEDIATE``
(:func:`service.db.make_engine`), which serialises writers, and ``FOR UPDATE`` is omitted.

Retry of a reaped slot: when the reaper takes a slot back from a silent worker and the
lease's ``attempt < max_retries``, the reaped lease gets ``retry_pending = True`` and the
slot is not counted finished, so it is claimable again. The next claim of that job takes
the oldest pending retry over: it clears the flag and inserts its lease with
``retry_of = <reaped lease id>`` and ``attempt = <reaped attempt> + 1`` (``retry_of`` is
unique: a reaped lease is retried at most once). The caller of :func:`fail_stale_trials`
fails the reaped Optuna trial and enqueues its parameters, which the retrying worker's
``study.ask()`` then receives.

Functions take a ``sessionmaker`` (or an ``Engine``) and plain values and return frozen
dataclasses, never ORM rows. Pass ``now`` (timezone-aware) to control time in tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, NamedTuple, TypeVar

from sqlalchemy import Engine, exc, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from service import errors
from service.db import session_scope
from service.models import (
    ACTIVE_JOB_STATES,
    JobState,
    LeaseState,
    SearchJob,
    TrialLease,
    Worker,
    new_job_id,
    utcnow,
)

__all__ = [
    "CreatedJob",
    "FinishOutcome",
    "JobCounts",
    "JobRecord",
    "JobState",
    "Lease",
    "LeaseRecord",
    "LeaseState",
    "SessionSource",
    "StaleCandidate",
    "StaleLease",
    "WorkerRecord",
    "attach_trial",
    "cancel_job",
    "claim_trial_slot",
    "create_job",
    "end_expired_jobs",
    "fail_stale_trials",
    "find_job",
    "finish_trial_slot",
    "get_job",
    "heartbeat",
    "list_jobs",
    "list_leases",
    "list_workers",
    "register_worker",
    "stale_leases",
    "worker_heartbeat",
]

SessionSource = sessionmaker[Session] | Engine
FinishOutcome = Literal["complete", "pruned", "failed"]

ALL_FAILED_ERROR = "every trial failed; see the trials' failure reasons"
NONE_COMPLETED_ERROR = "no trial completed (every trial was pruned or failed)"
TIMED_OUT_ERROR = "the study timed out before any trial completed"
REAPED_REASON = "worker stopped heartbeating"

#: Attempts for one transaction that PostgreSQL aborted with a deadlock or serialization
#: failure (SQLSTATE class 40: rolled back entirely, so running it again is safe).
_MAX_TRANSACTION_ATTEMPTS = 3

#: PostgreSQL: longest a claim waits for a job row that a concurrent transaction holds.
_CLAIM_LOCK_WAIT_MS = 5000

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------
# Domain records


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
    """

    id: int
    job_id: str
    worker_id: str
    optuna_study_name: str
    spec: dict[str, Any]
    attempt: int
    retry_of: int | None
    retry_of_trial_number: int | None
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
    optuna_trial_id: int | None
    trial_number: int | None
    claimed_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    failure_reason: str | None


@dataclass(frozen=True)
class StaleLease:
    """A lease the reaper took back. When ``retry`` is True the slot is claimable again:
    the caller should FAIL Optuna trial ``optuna_trial_id`` (if any) and enqueue its
    parameters; otherwise the slot counted as finished-failed."""

    id: int
    job_id: str
    optuna_study_name: str
    worker_id: str
    attempt: int
    optuna_trial_id: int | None
    trial_number: int | None
    retry: bool
    job_state: JobState


@dataclass(frozen=True)
class StaleCandidate:
    """A running lease whose heartbeat is older than the grace period (read, not locked)."""

    id: int
    job_id: str
    optuna_study_name: str
    optuna_trial_id: int | None
    trial_number: int | None


@dataclass(frozen=True)
class WorkerRecord:
    """One registered worker process."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime


# ---------------------------------------------------------------------------------------
# Plumbing


def _session_factory(source: SessionSource) -> sessionmaker[Session]:
    if isinstance(source, Engine):
        return sessionmaker(bind=source, expire_on_commit=False)
    return source


def _rolled_back_by_server(error: errors.DatabaseUnavailable) -> bool:
    cause = error.__cause__
    if not isinstance(cause, exc.DBAPIError):
        return False
    return str(getattr(cause.orig, "sqlstate", "") or "").startswith("40")


def _transact(source: SessionSource, work: Callable[[Session], _T]) -> _T:
    """Run ``work`` in one transaction (commit / rollback / close via ``session_scope``)."""
    factory = _session_factory(source)
    for attempt in range(1, _MAX_TRANSACTION_ATTEMPTS + 1):
        try:
            with session_scope(factory) as session:
                return work(session)
        except errors.DatabaseUnavailable as error:
            # Deadlock / serialization failure: the server rolled everything back, so a
            # bounded re-run is safe. Locks, lost connections: surface to the caller.
            if attempt == _MAX_TRANSACTION_ATTEMPTS or not _rolled_back_by_server(error):
                raise
            time.sleep(random.uniform(0.005, 0.02) * attempt)
    raise AssertionError("unreachable")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _job_record(job: SearchJob) -> JobRecord:
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


def _lease_record(lease: TrialLease) -> LeaseRecord:
    return LeaseRecord(
        id=lease.id,
        job_id=lease.job_id,
        worker_id=lease.worker_id,
        state=LeaseState(lease.state),
        attempt=lease.attempt,
        retry_of=lease.retry_of,
        retry_pending=lease.retry_pending,
        optuna_trial_id=lease.optuna_trial_id,
        trial_number=lease.trial_number,
        claimed_at=lease.claimed_at,
        heartbeat_at=lease.heartbeat_at,
        finished_at=lease.finished_at,
        failure_reason=lease.failure_reason,
    )


def _worker_record(worker: Worker) -> WorkerRecord:
    return WorkerRecord(
        id=worker.id,
        hostname=worker.hostname,
        pid=worker.pid,
        started_at=worker.started_at,
        heartbeat_at=worker.heartbeat_at,
    )


def _lock_job(session: Session, job_id: str) -> SearchJob | None:
    # Row lock on PostgreSQL: concurrent claim / finish / reap / cancel of one job take
    # turns, so the counters stay exact (a no-op on SQLite, where BEGIN IMMEDIATE serialises).
    return session.scalars(
        select(SearchJob).where(SearchJob.id == job_id).with_for_update()
    ).one_or_none()


def _is_past_deadline(job: SearchJob, now: datetime) -> bool:
    return job.deadline_at is not None and job.deadline_at <= now


def _end_job_if_done(session: Session, job: SearchJob, now: datetime) -> None:
    """End an active job whose slots are all finished, or whose timeout passed with nothing
    running: succeeded when any trial completed, else failed. Caller holds the job lock."""
    if not JobState(job.state).is_active:
        return
    all_finished = job.n_finished >= job.n_trials
    timed_out = _is_past_deadline(job, now) and job.n_running == 0
    if not (all_finished or timed_out):
        return
    job.finished_at = now
    if job.n_complete > 0:
        job.state = JobState.SUCCEEDED
        job.error = None
        return
    job.state = JobState.FAILED
    if not all_finished:
        job.error = TIMED_OUT_ERROR
        return
    n_pruned = session.scalar(
        select(func.count())
        .select_from(TrialLease)
        .where(TrialLease.job_id == job.id, TrialLease.state == LeaseState.PRUNED)
    )
    job.error = NONE_COMPLETED_ERROR if n_pruned else ALL_FAILED_ERROR


# ---------------------------------------------------------------------------------------
# Jobs


def create_job(
    sm: SessionSource,
    *,
    spec: Mapping[str, Any],
    name: str,
    owner: str = "local",
    optuna_study_name: str,
    n_trials: int,
    max_retries: int = 0,
    timeout_s: float | None = None,
    idempotency_key: str | None = None,
    job_id: str | None = None,
    now: datetime | None = None,
) -> CreatedJob:
    """Insert a queued job, or return the existing one for the same ``(owner,
    idempotency_key)`` with ``created=False`` (a client retrying after a lost response, or
    a server killed mid-request, gets the job it already made).

    Raises ``AlreadyExists`` when the id or ``optuna_study_name`` is taken by another job.
    """
    if n_trials < 1:
        raise ValueError("n_trials must be at least 1")
    if max_retries < 0:
        raise ValueError("max_retries must be >= 0")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    created_at = _now(now)

    def find_existing(session: Session) -> CreatedJob | None:
        job = session.scalars(
            select(SearchJob).where(
                SearchJob.owner == owner, SearchJob.idempotency_key == idempotency_key
            )
        ).one_or_none()
        return None if job is None else CreatedJob(_job_record(job), created=False)

    def insert(session: Session) -> CreatedJob:
        job = SearchJob(
            id=job_id or new_job_id(),
            name=name,
            owner=owner,
            state=JobState.QUEUED,
            spec=dict(spec),
            optuna_study_name=optuna_study_name,
            n_trials=n_trials,
            max_retries=max_retries,
            timeout_s=timeout_s,
            n_running=0,
            n_finished=0,
            n_complete=0,
            idempotency_key=idempotency_key,
            created_at=created_at,
        )
        session.add(job)
        session.flush()
        return CreatedJob(_job_record(job), created=True)

    if idempotency_key is not None:
        existing = _transact(sm, find_existing)
        if existing is not None:
            return existing
    try:
        return _transact(sm, insert)
    except errors.AlreadyExists:
        # Lost a race with a concurrent request carrying the same key: return its job.
        if idempotency_key is not None:
            existing = _transact(sm, find_existing)
            if existing is not None:
                return existing
        raise


def find_job(sm: SessionSource, job_id: str) -> JobRecord | None:
    """The job with that id, or None."""

    def work(session: Session) -> JobRecord | None:
        job = session.get(SearchJob, job_id)
        return None if job is None else _job_record(job)

    return _transact(sm, work)


def get_job(sm: SessionSource, job_id: str, *, owner: str | None = None) -> JobRecord:
    """The job with that id (and owner, when given); ``StudyNotFound`` otherwise."""

    def work(session: Session) -> JobRecord:
        job = session.get(SearchJob, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise errors.StudyNotFound()
        return _job_record(job)

    return _transact(sm, work)


def list_jobs(
    sm: SessionSource,
    *,
    state: JobState | str | None = None,
    owner: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[JobRecord], int]:
    """One page of jobs, newest first, and the total matching the filters."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")

    def work(session: Session) -> tuple[list[JobRecord], int]:
        conditions = []
        if state is not None:
            conditions.append(SearchJob.state == JobState(state))
        if owner is not None:
            conditions.append(SearchJob.owner == owner)
        total = session.scalar(select(func.count()).select_from(SearchJob).where(*conditions))
        jobs = session.scalars(
            select(SearchJob)
            .where(*conditions)
            .order_by(SearchJob.created_at.desc(), SearchJob.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return [_job_record(job) for job in jobs], int(total or 0)

    return _transact(sm, work)


def cancel_job(sm: SessionSource, job_id: str, *, now: datetime | None = None) -> JobState:
    """Stop a queued or running job from taking new slots. Leases already running finish
    normally and their results are recorded. Pending retries are dropped.

    Raises ``StudyNotFound`` for an unknown id, ``StudyNotActive`` if the job already ended.
    """
    at = _now(now)

    def work(session: Session) -> JobState:
        job = _lock_job(session, job_id)
        if job is None:
            raise errors.StudyNotFound()
        if not JobState(job.state).is_active:
            raise errors.StudyNotActive()
        job.state = JobState.CANCELLED
        job.finished_at = at
        session.execute(
            update(TrialLease)
            .where(TrialLease.job_id == job_id, TrialLease.retry_pending.is_(True))
            .values(retry_pending=False)
            .execution_options(synchronize_session=False)
        )
        return JobState.CANCELLED

    return _transact(sm, work)


def end_expired_jobs(sm: SessionSource, *, now: datetime | None = None) -> list[str]:
    """End active jobs whose timeout passed while nothing of theirs is running (a job with
    running leases ends when the last one finishes). Returns the ids of the ended jobs.

    :func:`fail_stale_trials` calls this, so the reaper's periodic pass covers it.
    """
    at = _now(now)

    def find(session: Session) -> list[str]:
        return list(
            session.scalars(
                select(SearchJob.id).where(
                    SearchJob.state.in_(ACTIVE_JOB_STATES),
                    SearchJob.deadline_at <= at,
                    SearchJob.n_running == 0,
                )
            ).all()
        )

    def end(session: Session, *, job_id: str) -> bool:
        job = _lock_job(session, job_id)
        if job is None:
            return False
        was_active = JobState(job.state).is_active
        _end_job_if_done(session, job, at)
        return was_active and not JobState(job.state).is_active

    ended = []
    for job_id in _transact(sm, find):
        if _transact(sm, partial(end, job_id=job_id)):
            ended.append(job_id)
    return ended


# ---------------------------------------------------------------------------------------
# Trial slots


def claim_trial_slot(
    sm: SessionSource, worker_id: str, *, now: datetime | None = None
) -> Lease | None:
    """Claim one trial slot for ``worker_id``, or return None when nothing is claimable.

    Picks an active job with a free slot (``n_running + n_finished < n_trials``) whose
    timeout has not passed, fairly across jobs: fewest running slots first, then the one
    claimed longest ago (never-claimed first), then the oldest. A pending retry of a reaped
    lease of that job is taken over first (see the module docstring). Sets the job running
    (and its ``started_at`` / deadline) on its first claim.
    """
    at = _now(now)

    def work(session: Session) -> Lease | None:
        claimable = (
            select(SearchJob)
            .where(
                SearchJob.state.in_(ACTIVE_JOB_STATES),
                SearchJob.n_running + SearchJob.n_finished < SearchJob.n_trials,
                or_(SearchJob.deadline_at.is_(None), SearchJob.deadline_at > at),
            )
            .order_by(
                SearchJob.n_running.asc(),
                SearchJob.last_claimed_at.asc().nulls_first(),
                SearchJob.created_at.asc(),
                SearchJob.id.asc(),
            )
            .limit(1)
        )
        # PostgreSQL: lock the chosen job row, skipping rows another claim holds, so
        # concurrent claimers spread over jobs instead of queueing on one row.
        job = session.scalars(claimable.with_for_update(skip_locked=True)).first()
        if job is None and _is_postgresql(session):
            # Every claimable row may be locked by a concurrent claim or finish (held for
            # milliseconds): wait for it rather than reporting an empty queue. The
            # conditions are re-checked on the row once the lock is granted; the wait is
            # bounded so a stuck transaction elsewhere surfaces as DatabaseUnavailable.
            session.execute(text(f"SET LOCAL lock_timeout = '{_CLAIM_LOCK_WAIT_MS}ms'"))
            job = session.scalars(claimable.with_for_update()).first()
        if job is None:
            return None

        retried = session.scalars(
            select(TrialLease)
            .where(TrialLease.job_id == job.id, TrialLease.retry_pending.is_(True))
            .order_by(TrialLease.id)
            .limit(1)
        ).first()
        lease = TrialLease(
            job_id=job.id,
            worker_id=worker_id,
            state=LeaseState.RUNNING,
            attempt=0 if retried is None else retried.attempt + 1,
            retry_of=None if retried is None else retried.id,
            retry_pending=False,
            claimed_at=at,
            heartbeat_at=at,
        )
        if retried is not None:
            retried.retry_pending = False
        session.add(lease)

        job.n_running += 1
        job.last_claimed_at = at
        if job.started_at is None:
            job.started_at = at
            if job.timeout_s is not None:
                job.deadline_at = at + timedelta(seconds=job.timeout_s)
        job.state = JobState.RUNNING
        session.flush()
        return Lease(
            id=lease.id,
            job_id=job.id,
            worker_id=worker_id,
            optuna_study_name=job.optuna_study_name,
            spec=dict(job.spec),
            attempt=lease.attempt,
            retry_of=lease.retry_of,
            retry_of_trial_number=None if retried is None else retried.trial_number,
            claimed_at=at,
        )

    return _transact(sm, work)


def attach_trial(
    sm: SessionSource, lease_id: int, *, optuna_trial_id: int, trial_number: int
) -> None:
    """Record which Optuna trial runs in this slot. ``LeaseLost`` if it is no longer running."""

    def work(session: Session) -> None:
        # One conditional UPDATE: it takes the lease row's lock and checks that it is still
        # running in the same statement (a reaped or finished lease matches no row).
        attached = session.scalars(
            update(TrialLease)
            .where(TrialLease.id == lease_id, TrialLease.state == LeaseState.RUNNING)
            .values(optuna_trial_id=optuna_trial_id, trial_number=trial_number)
            .returning(TrialLease.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not attached:
            raise errors.LeaseLost()

    _transact(sm, work)


def heartbeat(sm: SessionSource, lease_ids: Iterable[int], now: datetime | None = None) -> set[int]:
    """Mark the worker's running leases alive (one UPDATE). Returns the ids that are no
    longer running (reaped, finished or unknown): the worker should abandon those trials."""
    ids = set(lease_ids)
    if not ids:
        return set()
    at = _now(now)

    def work(session: Session) -> set[int]:
        alive = session.scalars(
            update(TrialLease)
            .where(TrialLease.id.in_(ids), TrialLease.state == LeaseState.RUNNING)
            .values(heartbeat_at=at)
            .returning(TrialLease.id)
            .execution_options(synchronize_session=False)
        ).all()
        return ids - set(alive)

    return _transact(sm, work)


def finish_trial_slot(
    sm: SessionSource,
    lease_id: int,
    outcome: FinishOutcome | LeaseState,
    failure_reason: str | None = None,
    *,
    job_id: str | None = None,
    now: datetime | None = None,
) -> JobState:
    """Record the outcome of a running lease and count its slot finished; returns the
    job's state afterwards (the job ends when its last slot finishes, or when its timeout
    passed and nothing else runs: succeeded if any trial completed, else failed).

    ``job_id``: the lease's job (``Lease.job_id``), when the caller knows it; saves a
    lookup. Idempotent: finishing again with the same outcome changes nothing. Raises
    ``LeaseLost`` when the lease is no longer running (reaped, or finished with another
    outcome) or does not belong to ``job_id``: a late result never overwrites.
    """
    state = LeaseState(outcome)
    if state not in (LeaseState.COMPLETE, LeaseState.PRUNED, LeaseState.FAILED):
        raise ValueError(f"outcome must be complete, pruned or failed, not {outcome!r}")
    at = _now(now)

    def work(session: Session) -> JobState:
        lease_job_id = job_id
        if lease_job_id is None:
            lease_job_id = session.scalar(
                select(TrialLease.job_id).where(TrialLease.id == lease_id)
            )
            if lease_job_id is None:
                raise errors.LeaseLost()
        job = _lock_job(session, lease_job_id)
        if job is None:
            raise errors.LeaseLost()
        # Then the lease row, so a concurrent reap or heartbeat of it is ordered after us:
        # one conditional UPDATE locks it and records the outcome only if it still runs.
        finished = session.scalars(
            update(TrialLease)
            .where(
                TrialLease.id == lease_id,
                TrialLease.job_id == job.id,
                TrialLease.state == LeaseState.RUNNING,
            )
            .values(state=state, finished_at=at, failure_reason=failure_reason)
            .returning(TrialLease.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not finished:
            current = session.scalar(select(TrialLease.state).where(TrialLease.id == lease_id))
            if current == state:
                # A retried call whose first attempt committed (its reply was lost with
                # the connection): the outcome is already recorded, count nothing twice.
                return JobState(job.state)
            raise errors.LeaseLost()
        job.n_running -= 1
        job.n_finished += 1
        if state == LeaseState.COMPLETE:
            job.n_complete += 1
        _end_job_if_done(session, job, at)
        return JobState(job.state)

    return _transact(sm, work)


def fail_stale_trials(
    sm: SessionSource, *, grace_s: float, now: datetime | None = None
) -> list[StaleLease]:
    """The reaper: take back running leases whose heartbeat is older than ``grace_s``.

    Each becomes ``reaped`` ("worker stopped heartbeating") in its own short transaction,
    and its job's ``n_running`` drops. If the job is still active, not past its timeout,
    and ``attempt < max_retries``, the slot is NOT counted finished: it is claimable again
    (``StaleLease.retry`` is True; see the module docstring). Otherwise it counts as
    finished-failed and may end the job. Finally ends jobs whose timeout passed with
    nothing running (:func:`end_expired_jobs`).
    """
    at = _now(now)
    cutoff = at - timedelta(seconds=grace_s)

    def find(session: Session) -> list[tuple[int, str]]:
        rows = session.execute(
            select(TrialLease.id, TrialLease.job_id)
            .where(TrialLease.state == LeaseState.RUNNING, TrialLease.heartbeat_at < cutoff)
            .order_by(TrialLease.id)
        ).all()
        return [(lease_id, job_id) for lease_id, job_id in rows]

    def reap(session: Session, *, lease_id: int, job_id: str) -> StaleLease | None:
        job = _lock_job(session, job_id)
        lease = session.get(TrialLease, lease_id, with_for_update=True)
        if job is None or lease is None:
            return None
        if lease.state != LeaseState.RUNNING or lease.heartbeat_at >= cutoff:
            return None  # finished or heartbeated since we looked
        lease.state = LeaseState.REAPED
        lease.finished_at = at
        lease.failure_reason = REAPED_REASON
        job.n_running -= 1
        retry = (
            JobState(job.state).is_active
            and not _is_past_deadline(job, at)
            and lease.attempt < job.max_retries
        )
        if retry:
            lease.retry_pending = True
        else:
            job.n_finished += 1
        _end_job_if_done(session, job, at)
        return StaleLease(
            id=lease.id,
            job_id=job.id,
            optuna_study_name=job.optuna_study_name,
            worker_id=lease.worker_id,
            attempt=lease.attempt,
            optuna_trial_id=lease.optuna_trial_id,
            trial_number=lease.trial_number,
            retry=retry,
            job_state=JobState(job.state),
        )

    reaped = []
    for lease_id, job_id in _transact(sm, find):
        stale = _transact(sm, partial(reap, lease_id=lease_id, job_id=job_id))
        if stale is not None:
            reaped.append(stale)
    end_expired_jobs(sm, now=at)
    return reaped


def stale_leases(sm: SessionSource, *, cutoff: datetime) -> list[StaleCandidate]:
    """Running leases whose last heartbeat is older than ``cutoff``; a read, nothing changes.

    The reaper looks at their Optuna trials before :func:`fail_stale_trials` takes any back.
    """

    def work(session: Session) -> list[StaleCandidate]:
        rows = session.execute(
            select(
                TrialLease.id,
                TrialLease.job_id,
                SearchJob.optuna_study_name,
                TrialLease.optuna_trial_id,
                TrialLease.trial_number,
            )
            .join(SearchJob, SearchJob.id == TrialLease.job_id)
            .where(TrialLease.state == LeaseState.RUNNING, TrialLease.heartbeat_at < cutoff)
            .order_by(TrialLease.id)
        ).all()
        return [StaleCandidate(*row) for row in rows]

    return _transact(sm, work)


def list_leases(
    sm: SessionSource, job_id: str, *, state: LeaseState | str | None = None
) -> list[LeaseRecord]:
    """The job's leases in claim order (optionally only those in ``state``)."""

    def work(session: Session) -> list[LeaseRecord]:
        query = select(TrialLease).where(TrialLease.job_id == job_id).order_by(TrialLease.id)
        if state is not None:
            query = query.where(TrialLease.state == LeaseState(state))
        return [_lease_record(lease) for lease in session.scalars(query).all()]

    return _transact(sm, work)


# ---------------------------------------------------------------------------------------
# Workers


def register_worker(
    sm: SessionSource,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    now: datetime | None = None,
) -> WorkerRecord:
    """Insert (or refresh) the row of a starting worker process."""
    at = _now(now)

    def work(session: Session) -> WorkerRecord:
        worker = session.get(Worker, worker_id)
        if worker is None:
            worker = Worker(id=worker_id, hostname=hostname, pid=pid, started_at=at)
            session.add(worker)
        else:
            worker.hostname, worker.pid, worker.started_at = hostname, pid, at
        worker.heartbeat_at = at
        session.flush()
        return _worker_record(worker)

    return _transact(sm, work)


def worker_heartbeat(sm: SessionSource, worker_id: str, now: datetime | None = None) -> bool:
    """Mark a worker alive; False if it is not registered (it should register again)."""
    at = _now(now)

    def work(session: Session) -> bool:
        alive = session.scalars(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(heartbeat_at=at)
            .returning(Worker.id)
            .execution_options(synchronize_session=False)
        ).all()
        return bool(alive)

    return _transact(sm, work)


def list_workers(sm: SessionSource, *, seen_since: datetime | None = None) -> list[WorkerRecord]:
    """Registered workers (only those that heartbeated at or after ``seen_since``)."""

    def work(session: Session) -> list[WorkerRecord]:
        query = select(Worker).order_by(Worker.started_at, Worker.id)
        if seen_since is not None:
            query = query.where(Worker.heartbeat_at >= seen_since)
        return [_worker_record(worker) for worker in session.scalars(query).all()]

    return _transact(sm, work)
