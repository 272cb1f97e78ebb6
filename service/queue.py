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
when claiming). The hot paths, claim and finish, are ONE autocommitted statement each
(``_PG_CLAIM``, ``_PG_FINISH``): the server releases the job row's lock when the statement
ends, never after another client round trip, so many workers do not queue behind a lock
holder that waits for a CPU. On SQLite the engine opens every transaction with ``BEGIN
IMMEDIATE`` (:func:`service.db.make_engine`), which serialises writers; there claim and
finish are ORM transactions with the same semantics (the contract tests run on both).

Idle workers on PostgreSQL block in :func:`wait_for_work` (``LISTEN``); creating a job and
queueing a retry ``NOTIFY`` them on commit.

Retry of a reaped slot (the order is the protocol, see :mod:`service.reaper`): the reaper
first enqueues the lost trial's parameters in Optuna as a WAITING trial, and only then
:func:`reap_stale_lease` takes the slot back. When the job is active, not past its
timeout and ``attempt < max_retries``, that same transaction sets ``retry_pending`` and
``retry_trial_id`` (the WAITING trial) on the reaped lease and does not count the slot
finished, so the slot becomes claimable together with the trial it must run. The next
claim of that job takes the oldest pending retry over: it clears the flag, inserts its
lease with ``retry_of = <reaped lease id>`` and ``attempt = <reaped attempt> + 1``
(``retry_of`` is unique: a reaped lease is retried at most once), and hands
``retry_trial_id`` to the worker, which pops exactly that trial.

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

from sqlalchemy import (
    JSON,
    Engine,
    Integer,
    Row,
    String,
    delete,
    exc,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Select
from sqlalchemy.sql.selectable import TextualSelect

from service import errors
from service.db import session_scope, translate_db_error
from service.models import SearchJob, TrialLease, Worker, new_job_id, utcnow
from service.states import ACTIVE_JOB_STATES, JobState, LeaseState, TrialOutcome

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
    "delete_job",
    "end_expired_jobs",
    "fail_job",
    "find_job",
    "finish_trial_slot",
    "get_job",
    "heartbeat",
    "list_jobs",
    "list_leases",
    "list_workers",
    "reap_stale_lease",
    "register_worker",
    "stale_leases",
    "wait_for_work",
    "worker_heartbeat",
]

SessionSource = sessionmaker[Session] | Engine
FinishOutcome = TrialOutcome | Literal["complete", "pruned", "failed"]

ALL_FAILED_ERROR = "every trial failed; see the trials' failure reasons"
NONE_COMPLETED_ERROR = "no trial completed (every trial was pruned or failed)"
TIMED_OUT_ERROR = "the study timed out before any trial completed"
REAPED_REASON = "worker stopped heartbeating"

#: Attempts for one transaction that PostgreSQL aborted with a deadlock or serialization
#: failure (SQLSTATE class 40: rolled back entirely, so running it again is safe).
_MAX_TRANSACTION_ATTEMPTS = 3

#: Longest study timeout a deadline is computed from: ~100 years. A job row written before
#: the submit-time bound existed (or by hand) can hold any float; its deadline must never
#: overflow a datetime (an OverflowError in every claim stopped every worker).
MAX_DEADLINE_S = 100 * 365 * 24 * 3600.0

#: PostgreSQL: longest a claim waits for a job row that a concurrent transaction holds.
_CLAIM_LOCK_WAIT_MS = 5000

#: PostgreSQL LISTEN / NOTIFY channel on which a slot becoming claimable (a new job, a
#: retry) is announced to idle workers (payload: the job id).
WORK_CHANNEL = "lstm_hpo_work"

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


def _transact(
    source: SessionSource, work: Callable[[Session], _T], *, one_statement: bool = False
) -> _T:
    """Run ``work`` in one transaction (commit / rollback / close via ``session_scope``).

    ``one_statement``: ``work`` runs a single statement. On PostgreSQL it then runs in
    autocommit mode: the server commits it as it ends, so the row locks it takes are held
    for the statement alone, never across a client round trip (BEGIN and COMMIT cost two
    more). With many workers on few cores, a lock holder waiting to be scheduled to send
    its COMMIT is what queued every other claim behind it.
    """
    factory = _session_factory(source)
    for attempt in range(1, _MAX_TRANSACTION_ATTEMPTS + 1):
        try:
            with session_scope(factory) as session:
                if one_statement and _is_postgresql(session):
                    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
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


def _engine(source: SessionSource) -> Engine:
    engine: Engine = source if isinstance(source, Engine) else source.kw["bind"]
    return engine


def _backend_name(source: SessionSource) -> str:
    return str(_engine(source).dialect.name)


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
        retry_trial_id=lease.retry_trial_id,
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
        _announce_work(session, job.id)
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
        _drop_pending_retries(session, job_id)
        return JobState.CANCELLED

    return _transact(sm, work)


def fail_job(sm: SessionSource, job_id: str, reason: str, *, now: datetime | None = None) -> bool:
    """End a job that cannot run (its spec, data or Optuna study is unusable) as ``failed``
    with ``reason``; pending retries are dropped, running leases finish normally.

    Also marks an already-ended job failed when its Optuna study was deleted (its results
    are gone). Returns False when the job does not exist or was already failed.
    """
    at = _now(now)

    def work(session: Session) -> bool:
        job = _lock_job(session, job_id)
        if job is None or job.state == JobState.FAILED:
            return False
        job.state = JobState.FAILED
        job.error = reason[:2000]
        job.finished_at = job.finished_at or at
        _drop_pending_retries(session, job_id)
        return True

    return _transact(sm, work)


def delete_job(sm: SessionSource, job_id: str) -> bool:
    """Delete a job row and its leases (the caller removed its Optuna study first).

    Returns False when there was no such job. A worker still running one of its trials
    gets ``LeaseLost`` when it finishes (its result has nowhere to go).
    """

    def work(session: Session) -> bool:
        job = _lock_job(session, job_id)
        if job is None:
            return False
        # Leases first: SQLite enforces the foreign key, and ON DELETE CASCADE needs
        # PRAGMA foreign_keys, which an Alembic batch migration may have left off.
        session.execute(
            update(TrialLease)
            .where(TrialLease.job_id == job_id)
            .values(retry_of=None)
            .execution_options(synchronize_session=False)
        )
        session.execute(delete(TrialLease).where(TrialLease.job_id == job_id))
        session.delete(job)
        return True

    return _transact(sm, work)


def _drop_pending_retries(session: Session, job_id: str) -> None:
    session.execute(
        update(TrialLease)
        .where(TrialLease.job_id == job_id, TrialLease.retry_pending.is_(True))
        .values(retry_pending=False)
        .execution_options(synchronize_session=False)
    )


def end_expired_jobs(sm: SessionSource, *, now: datetime | None = None) -> list[str]:
    """End active jobs whose timeout passed while nothing of theirs is running (a job with
    running leases ends when the last one finishes). Returns the ids of the ended jobs.

    The reaper calls this every round.
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
    if _backend_name(sm) == "postgresql":
        return _claim_postgresql(sm, worker_id, at)

    def work(session: Session) -> Lease | None:
        # SQLite: BEGIN IMMEDIATE (service.db) already serialises this transaction.
        job = session.scalars(_claimable_jobs(at).limit(1)).first()
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
                job.deadline_at = at + timedelta(seconds=min(job.timeout_s, MAX_DEADLINE_S))
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
            retry_trial_id=None if retried is None else retried.retry_trial_id,
            claimed_at=at,
        )

    return _transact(sm, work)


def _claimable_jobs(at: datetime) -> Select[SearchJob]:
    """Active jobs with a free slot and time left, in the order claims serve them."""
    return (
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
    )


#: PostgreSQL claim: the SQLite path of :func:`claim_trial_slot` as ONE statement, so the
#: job row is locked only while the server runs it. ``{wait}`` is ``SKIP LOCKED`` (spread
#: concurrent claims over jobs) or empty (wait for the row). Lock order as everywhere:
#: the job row (``job``), then the lease row of a pending retry (``retried``).
_PG_CLAIM = """
WITH job AS (
    SELECT id FROM search_jobs
    WHERE state IN (:queued, :running)
      AND n_running + n_finished < n_trials
      AND (deadline_at IS NULL OR deadline_at > :now)
    ORDER BY n_running, last_claimed_at NULLS FIRST, created_at, id
    LIMIT 1
    FOR UPDATE {wait}
), retried AS (
    SELECT lease.id, lease.attempt, lease.trial_number, lease.retry_trial_id
    FROM trial_leases AS lease JOIN job ON lease.job_id = job.id
    WHERE lease.retry_pending
    ORDER BY lease.id
    LIMIT 1
    FOR UPDATE OF lease
), taken_over AS (
    UPDATE trial_leases SET retry_pending = false
    FROM retried WHERE trial_leases.id = retried.id
), claimed AS (
    UPDATE search_jobs SET
        n_running = search_jobs.n_running + 1,
        last_claimed_at = :now,
        started_at = COALESCE(search_jobs.started_at, :now),
        deadline_at = CASE
            WHEN search_jobs.started_at IS NULL AND search_jobs.timeout_s IS NOT NULL
            THEN :now + make_interval(secs => LEAST(search_jobs.timeout_s, :max_deadline_s))
            ELSE search_jobs.deadline_at
        END,
        state = :running
    FROM job WHERE search_jobs.id = job.id
    RETURNING search_jobs.id, search_jobs.optuna_study_name, search_jobs.spec
), lease AS (
    INSERT INTO trial_leases
        (job_id, worker_id, state, attempt, retry_of, retry_pending, claimed_at, heartbeat_at)
    SELECT claimed.id, :worker_id, :lease_running, COALESCE(retried.attempt + 1, 0),
           retried.id, false, :now, :now
    FROM claimed LEFT JOIN retried ON true
    RETURNING id, attempt, retry_of
)
SELECT lease.id, claimed.id AS job_id, claimed.optuna_study_name, claimed.spec,
       lease.attempt, lease.retry_of, retried.trial_number AS retry_of_trial_number,
       retried.retry_trial_id
FROM lease CROSS JOIN claimed LEFT JOIN retried ON true
"""


def _pg_claim_statement(*, skip_locked: bool) -> TextualSelect:
    return text(_PG_CLAIM.format(wait="SKIP LOCKED" if skip_locked else "")).columns(
        id=Integer,
        job_id=String,
        optuna_study_name=String,
        spec=JSON,
        attempt=Integer,
        retry_of=Integer,
        retry_of_trial_number=Integer,
        retry_trial_id=Integer,
    )


_PG_CLAIM_SKIP_LOCKED = _pg_claim_statement(skip_locked=True)
_PG_CLAIM_WAIT = _pg_claim_statement(skip_locked=False)


def _claim_postgresql(sm: SessionSource, worker_id: str, at: datetime) -> Lease | None:
    params = {
        "queued": JobState.QUEUED.value,
        "running": JobState.RUNNING.value,
        "lease_running": LeaseState.RUNNING.value,
        "now": at,
        "worker_id": worker_id,
        "max_deadline_s": MAX_DEADLINE_S,
    }

    def claim(session: Session) -> Row[Any] | None:
        return session.execute(_PG_CLAIM_SKIP_LOCKED, params).first()

    def wait_and_claim(session: Session) -> Row[Any] | None:
        # Every claimable row may be locked by a concurrent claim or finish (for well
        # under a millisecond): wait for it rather than report an empty queue. The
        # conditions are re-checked on the row once the lock is granted; the wait is
        # bounded so a stuck transaction elsewhere surfaces as DatabaseUnavailable.
        session.execute(text(f"SET LOCAL lock_timeout = '{_CLAIM_LOCK_WAIT_MS}ms'"))
        return session.execute(_PG_CLAIM_WAIT, params).first()

    row = _transact(sm, claim, one_statement=True) or _transact(sm, wait_and_claim)
    if row is None:
        return None
    return Lease(
        id=row.id,
        job_id=row.job_id,
        worker_id=worker_id,
        optuna_study_name=row.optuna_study_name,
        spec=dict(row.spec),
        attempt=row.attempt,
        retry_of=row.retry_of,
        retry_of_trial_number=row.retry_of_trial_number,
        retry_trial_id=row.retry_trial_id,
        claimed_at=at,
    )


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

    _transact(sm, work, one_statement=True)


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

    return _transact(sm, work, one_statement=True)


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
    if _backend_name(sm) == "postgresql":
        finished = _finish_postgresql(
            sm, lease_id, job_id=job_id, state=state, failure_reason=failure_reason, at=at
        )
        if finished is not None:
            return finished
        # The lease no longer runs (or is not this job's): the path below tells a retried
        # call whose first attempt committed from a lost lease.

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


#: The condition under which a finish ends the job (as :func:`_end_job_if_done`), on the
#: job row ``j`` as it was before the finish's decrement / increment.
_PG_FINISH_ENDS_JOB = """
    j.state IN (:queued, :running)
    AND (j.n_finished + 1 >= j.n_trials OR (j.deadline_at <= :now AND j.n_running = 1))
"""

#: PostgreSQL finish: the common path of :func:`finish_trial_slot` as ONE statement. Lock
#: order: the job row (``job``), then the lease row, which is only updated while it still
#: runs. The job ends here too when this was its last slot, so no crash can leave it open.
#: The EXISTS sees the leases as they were before this statement: hence ``:pruned_now``.
_PG_FINISH = text(
    f"""
WITH job AS (
    SELECT search_jobs.id
    FROM search_jobs JOIN trial_leases ON trial_leases.job_id = search_jobs.id
    WHERE trial_leases.id = :lease_id
      AND search_jobs.id = COALESCE(CAST(:job_id AS VARCHAR), search_jobs.id)
    FOR UPDATE OF search_jobs
), lease AS (
    UPDATE trial_leases SET state = :state, finished_at = :now, failure_reason = :reason
    FROM job
    WHERE trial_leases.id = :lease_id
      AND trial_leases.job_id = job.id
      AND trial_leases.state = :lease_running
    RETURNING trial_leases.job_id
)
UPDATE search_jobs AS j SET
    n_running = j.n_running - 1,
    n_finished = j.n_finished + 1,
    n_complete = j.n_complete + :completed,
    state = CASE WHEN {_PG_FINISH_ENDS_JOB}
        THEN CASE WHEN j.n_complete + :completed > 0 THEN :succeeded ELSE :failed END
        ELSE j.state END,
    finished_at = CASE WHEN {_PG_FINISH_ENDS_JOB} THEN :now ELSE j.finished_at END,
    error = CASE WHEN {_PG_FINISH_ENDS_JOB} THEN CASE
            WHEN j.n_complete + :completed > 0 THEN NULL
            WHEN j.n_finished + 1 < j.n_trials THEN :timed_out_error
            WHEN :pruned_now OR EXISTS (
                SELECT 1 FROM trial_leases AS other
                WHERE other.job_id = j.id AND other.state = :pruned
            ) THEN :none_completed_error
            ELSE :all_failed_error
        END
        ELSE j.error END
FROM lease WHERE j.id = lease.job_id
RETURNING j.state
"""
).columns(state=String)


def _finish_postgresql(
    sm: SessionSource,
    lease_id: int,
    *,
    job_id: str | None,
    state: LeaseState,
    failure_reason: str | None,
    at: datetime,
) -> JobState | None:
    """The job's state after finishing a running lease; None when the lease is not running."""
    params = {
        "job_id": job_id,
        "lease_id": lease_id,
        "state": state.value,
        "reason": failure_reason,
        "now": at,
        "lease_running": LeaseState.RUNNING.value,
        "pruned": LeaseState.PRUNED.value,
        "completed": int(state == LeaseState.COMPLETE),
        "pruned_now": state == LeaseState.PRUNED,
        "queued": JobState.QUEUED.value,
        "running": JobState.RUNNING.value,
        "succeeded": JobState.SUCCEEDED.value,
        "failed": JobState.FAILED.value,
        "timed_out_error": TIMED_OUT_ERROR,
        "none_completed_error": NONE_COMPLETED_ERROR,
        "all_failed_error": ALL_FAILED_ERROR,
    }

    def work(session: Session) -> str | None:
        job_state = session.scalar(_PG_FINISH, params)
        return None if job_state is None else str(job_state)

    job_state = _transact(sm, work, one_statement=True)
    return None if job_state is None else JobState(job_state)


def reap_stale_lease(
    sm: SessionSource,
    lease_id: int,
    *,
    cutoff: datetime,
    retry_trial_id: int | None = None,
    now: datetime | None = None,
) -> StaleLease | None:
    """Take back one running lease whose heartbeat is older than ``cutoff``, in one short
    transaction; None when it finished or heartbeated since it was read.

    The lease becomes ``reaped`` ("worker stopped heartbeating") and its job's
    ``n_running`` drops. The slot is retried (claimable again, NOT counted finished) when
    the job is active, not past its timeout, ``attempt < max_retries``, and the retry has
    something to run: ``retry_trial_id`` (the WAITING Optuna trial with the lost trial's
    parameters, enqueued by the caller BEFORE this call) or no Optuna trial at all (died
    between claim and ask). Pending flag, trial id and the NOTIFY to idle workers commit
    together, so no worker can claim the slot before its trial exists. Otherwise the slot
    counts as finished-failed and may end the job; the caller then fails ``retry_trial_id``.
    """
    at = _now(now)

    def reap(session: Session) -> StaleLease | None:
        job_id = session.scalar(select(TrialLease.job_id).where(TrialLease.id == lease_id))
        if job_id is None:
            return None
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
        retry = _retry_allowed(job, lease, at) and (
            lease.optuna_trial_id is None or retry_trial_id is not None
        )
        if retry:
            lease.retry_pending = True
            lease.retry_trial_id = retry_trial_id
            _announce_work(session, job.id)
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
            retry_trial_id=retry_trial_id if retry else None,
            job_state=JobState(job.state),
        )

    return _transact(sm, reap)


def _retry_allowed(job: SearchJob, lease: TrialLease, at: datetime) -> bool:
    return (
        JobState(job.state).is_active
        and not _is_past_deadline(job, at)
        and lease.attempt < job.max_retries
    )


def stale_leases(
    sm: SessionSource, *, cutoff: datetime, now: datetime | None = None
) -> list[StaleCandidate]:
    """Running leases whose last heartbeat is older than ``cutoff``; a read, nothing changes.

    The reaper settles their Optuna trials before :func:`reap_stale_lease` takes any back.
    """
    at = _now(now)

    def work(session: Session) -> list[StaleCandidate]:
        rows = session.execute(
            select(TrialLease, SearchJob)
            .join(SearchJob, SearchJob.id == TrialLease.job_id)
            .where(TrialLease.state == LeaseState.RUNNING, TrialLease.heartbeat_at < cutoff)
            .order_by(TrialLease.id)
        ).all()
        return [
            StaleCandidate(
                id=lease.id,
                job_id=job.id,
                optuna_study_name=job.optuna_study_name,
                worker_id=lease.worker_id,
                optuna_trial_id=lease.optuna_trial_id,
                trial_number=lease.trial_number,
                retry_expected=_retry_allowed(job, lease, at),
            )
            for lease, job in rows
        ]

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


def _announce_work(session: Session, job_id: str) -> None:
    # Delivered at commit, and only then: a listener never wakes for a rolled-back job.
    if _is_postgresql(session):
        session.execute(select(func.pg_notify(WORK_CHANNEL, job_id)))


def wait_for_work(sm: SessionSource, timeout_s: float) -> bool:
    """Block an idle worker until a slot may have become claimable, at most ``timeout_s``.

    PostgreSQL: LISTEN on ``WORK_CHANNEL`` on one of the caller's pooled connections (no
    extra connection) and return True as soon as a job is created or a retry is queued:
    idle workers start a new study within milliseconds instead of a poll interval, without
    polling faster. An announcement sent between the caller's empty claim and its LISTEN
    is missed; the timeout is the fallback. SQLite: sleeps ``timeout_s``; returns False.
    """
    engine = _engine(sm)
    if engine.dialect.name != "postgresql":
        time.sleep(timeout_s)
        return False
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"LISTEN {WORK_CHANNEL}")
            driver = connection.connection.driver_connection
            assert driver is not None  # checked out and valid
            try:
                woken = any(True for _ in driver.notifies(timeout=timeout_s, stop_after=1))
            except engine.dialect.loaded_dbapi.Error as error:  # psycopg's own, unwrapped
                connection.invalidate()  # never hand this connection out again
                raise errors.DatabaseUnavailable(
                    f"{errors.DatabaseUnavailable.__doc__} ({type(error).__name__}: {error})"
                ) from error
            connection.exec_driver_sql(f"UNLISTEN {WORK_CHANNEL}")
            return woken
    except exc.SQLAlchemyError as error:
        translated = translate_db_error(error)
        if translated is None:
            raise
        raise translated from error


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
