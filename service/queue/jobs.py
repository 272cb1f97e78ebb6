"""Jobs: create, read, list, cancel, fail, delete, and end the ones whose timeout passed."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service import errors
from service.models import SearchJob, TrialLease, WebhookEvent, new_job_id
from service.queue._plumbing import resolve_now, transact
from service.queue._records import (
    MAX_DEADLINE_S,
    NONE_COMPLETED_ERROR,
    TIMED_OUT_ERROR,
    CreatedJob,
    JobRecord,
    SessionSource,
    job_record,
)
from service.queue._rules import end_job_if_done, lock_job
from service.queue.listen import announce_work
from service.states import ACTIVE_JOB_STATES, JobState


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
    max_active: int | None = None,
    now: datetime | None = None,
) -> CreatedJob:
    """Insert a queued job, or return the existing one for the same ``(owner,
    idempotency_key)`` with ``created=False`` (a client retrying after a lost response, or
    a server killed mid-request, gets the job it already made).

    ``max_active``: the most queued + running jobs ``owner`` may have; counted in the
    insert's own transaction, with the owner's submits serialised (a PostgreSQL advisory
    lock on the owner; SQLite's ``BEGIN IMMEDIATE``), so parallel submits cannot pass it.
    Raises ``QuotaExceeded`` past it, ``AlreadyExists`` when the id or
    ``optuna_study_name`` is taken by another job.
    """
    if n_trials < 1:
        raise ValueError("n_trials must be at least 1")
    if max_retries < 0:
        raise ValueError("max_retries must be >= 0")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    created_at = resolve_now(now)

    def find_existing(session: Session) -> CreatedJob | None:
        job = session.scalars(
            select(SearchJob).where(
                SearchJob.owner == owner, SearchJob.idempotency_key == idempotency_key
            )
        ).one_or_none()
        return None if job is None else CreatedJob(job_record(job), created=False)

    def insert(session: Session) -> CreatedJob:
        if max_active is not None:
            _check_active_quota(session, owner, max_active)
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
        announce_work(session, job.id)
        return CreatedJob(job_record(job), created=True)

    if idempotency_key is not None:
        existing = transact(sm, find_existing)
        if existing is not None:
            return existing
    try:
        return transact(sm, insert)
    except errors.AlreadyExists:
        # Lost a race with a concurrent request carrying the same key: return its job.
        if idempotency_key is not None:
            existing = transact(sm, find_existing)
            if existing is not None:
                return existing
        raise


def find_job(sm: SessionSource, job_id: str) -> JobRecord | None:
    """The job with that id, or None."""

    def work(session: Session) -> JobRecord | None:
        job = session.get(SearchJob, job_id)
        return None if job is None else job_record(job)

    return transact(sm, work)


def get_job(sm: SessionSource, job_id: str, *, owner: str | None = None) -> JobRecord:
    """The job with that id (and owner, when given); ``StudyNotFound`` otherwise."""

    def work(session: Session) -> JobRecord:
        job = session.get(SearchJob, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise errors.StudyNotFound()
        return job_record(job)

    return transact(sm, work)


def count_active_jobs(sm: SessionSource, owner: str) -> int:
    """How many of ``owner``'s jobs are active (queued or running): one query, for the
    per-principal quota of active studies checked at submit."""

    def work(session: Session) -> int:
        return int(
            session.scalar(
                select(func.count())
                .select_from(SearchJob)
                .where(SearchJob.owner == owner, SearchJob.state.in_(ACTIVE_JOB_STATES))
            )
            or 0
        )

    return transact(sm, work)


def list_jobs(
    sm: SessionSource,
    *,
    state: JobState | str | None = None,
    owner: str | None = None,
    id_prefix: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[JobRecord], int]:
    """One page of jobs, newest first, and the total matching the filters (``id_prefix``:
    ids that start with it, as ``docker`` and ``git`` take a short id)."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")

    def work(session: Session) -> tuple[list[JobRecord], int]:
        conditions = []
        if state is not None:
            conditions.append(SearchJob.state == JobState(state))
        if owner is not None:
            conditions.append(SearchJob.owner == owner)
        if id_prefix is not None:
            conditions.append(SearchJob.id.startswith(id_prefix, autoescape=True))
        total = session.scalar(select(func.count()).select_from(SearchJob).where(*conditions))
        jobs = session.scalars(
            select(SearchJob)
            .where(*conditions)
            .order_by(SearchJob.created_at.desc(), SearchJob.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return [job_record(job) for job in jobs], int(total or 0)

    return transact(sm, work)


def cancel_job(sm: SessionSource, job_id: str, *, now: datetime | None = None) -> JobState:
    """Stop a queued or running job from taking new slots. Leases already running finish
    normally and their results are recorded. Pending retries are dropped.

    Raises ``StudyNotFound`` for an unknown id, ``StudyNotActive`` if the job already ended.
    """
    at = resolve_now(now)

    def work(session: Session) -> JobState:
        job = lock_job(session, job_id)
        if job is None:
            raise errors.StudyNotFound()
        if not JobState(job.state).is_active:
            raise errors.StudyNotActive()
        job.state = JobState.CANCELLED
        job.finished_at = at
        _drop_pending_retries(session, job_id)
        return JobState.CANCELLED

    return transact(sm, work)


#: A failed job whose error is one of these failed for its budget or its luck, not for its
#: spec or data: it may be extended (:func:`extend_job`).
EXTENDABLE_ERRORS = frozenset({TIMED_OUT_ERROR, NONE_COMPLETED_ERROR})


def extend_job(
    sm: SessionSource,
    job_id: str,
    n_more: int,
    *,
    max_n_trials: int | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """Add ``n_more`` slots to a job: it ends once ``n_trials + n_more`` slots are finished.

    A job that ended (succeeded, cancelled, or failed for its timeout or with every trial
    pruned) becomes queued again (running while leases of it still run), its error and
    end cleared; idle workers are NOTIFYed. Slots a cancelled job never ran are claimable
    again too. A job that has started and has a timeout gets a new deadline, ``timeout_s``
    from ``now``. One transaction under the job's lock, so a concurrent claim or finish
    sees the old or the new count, never a mix.

    Raises ``StudyNotFound``; ``StudyNotExtendable`` for a job failed for any other reason
    (its spec, data or Optuna study is unusable); ``InvalidSpec`` (field ``n_trials``) when
    the total would pass ``max_n_trials``.
    """
    if n_more < 1:
        raise ValueError("n_more must be at least 1")
    at = resolve_now(now)

    def work(session: Session) -> JobRecord:
        job = lock_job(session, job_id)
        if job is None:
            raise errors.StudyNotFound()
        if job.state == JobState.FAILED and job.error not in EXTENDABLE_ERRORS:
            raise errors.StudyNotExtendable(
                f"the study failed ({job.error}): it cannot take more trials; fix what the "
                "error names and submit a new study"
            )
        total = job.n_trials + n_more
        if max_n_trials is not None and total > max_n_trials:
            msg = f"the study would have {total} trials, more than {max_n_trials}"
            raise errors.InvalidSpec([errors.FieldError("n_trials", msg)])
        job.n_trials = total
        if not JobState(job.state).is_active:
            job.state = JobState.RUNNING if job.n_running else JobState.QUEUED
            job.finished_at = None
            job.error = None
        if job.started_at is not None and job.timeout_s is not None:
            job.deadline_at = at + timedelta(seconds=min(job.timeout_s, MAX_DEADLINE_S))
        announce_work(session, job.id)
        return job_record(job)

    return transact(sm, work)


def fail_job(sm: SessionSource, job_id: str, reason: str, *, now: datetime | None = None) -> bool:
    """End a job that cannot run (its spec, data or Optuna study is unusable) as ``failed``
    with ``reason``; pending retries are dropped, running leases finish normally.

    Also marks an already-ended job failed when its Optuna study was deleted (its results
    are gone). Returns False when the job does not exist or was already failed.
    """
    at = resolve_now(now)

    def work(session: Session) -> bool:
        job = lock_job(session, job_id)
        if job is None or job.state == JobState.FAILED:
            return False
        job.state = JobState.FAILED
        job.error = reason[:2000]
        job.finished_at = job.finished_at or at
        _drop_pending_retries(session, job_id)
        return True

    return transact(sm, work)


def delete_job(sm: SessionSource, job_id: str) -> bool:
    """Delete a job row, its leases and its webhook claims (the caller removed its Optuna
    study first).

    Returns False when there was no such job. A worker still running one of its trials
    gets ``LeaseLost`` when it finishes (its result has nowhere to go).
    """

    def work(session: Session) -> bool:
        job = lock_job(session, job_id)
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
        session.execute(delete(WebhookEvent).where(WebhookEvent.job_id == job_id))
        session.delete(job)
        return True

    return transact(sm, work)


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
    at = resolve_now(now)

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
        job = lock_job(session, job_id)
        if job is None:
            return False
        was_active = JobState(job.state).is_active
        end_job_if_done(session, job, at)
        return was_active and not JobState(job.state).is_active

    ended = []
    for job_id in transact(sm, find):
        if transact(sm, partial(end, job_id=job_id)):
            ended.append(job_id)
    return ended


def _check_active_quota(session: Session, owner: str, limit: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        # Held to the end of this transaction: the owner's submits count and insert in turn.
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))
    active = session.scalar(
        select(func.count())
        .select_from(SearchJob)
        .where(SearchJob.owner == owner, SearchJob.state.in_(ACTIVE_JOB_STATES))
    )
    if (active or 0) >= limit:
        raise errors.QuotaExceeded(
            f"{owner} has {active} queued or running studies, the most "
            f"LSTM_HPO_MAX_ACTIVE_STUDIES allows ({limit}): let one end, or cancel one"
        )
