"""The rules every transaction that changes a job's counters shares, on both backends: the
job row is locked first, and a job ends when its slots are all finished or its timeout
passed with nothing running (``sql/finish.sql`` is the same rule as one statement)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import SearchJob, TrialLease
from service.queue._records import ALL_FAILED_ERROR, NONE_COMPLETED_ERROR, TIMED_OUT_ERROR
from service.states import JobState, LeaseState


def lock_job(session: Session, job_id: str) -> SearchJob | None:
    """The job row, locked for the rest of the transaction (None when there is none)."""
    # Row lock on PostgreSQL: concurrent claim / finish / reap / cancel of one job take
    # turns, so the counters stay exact (a no-op on SQLite, where BEGIN IMMEDIATE serialises).
    return session.scalars(
        select(SearchJob).where(SearchJob.id == job_id).with_for_update()
    ).one_or_none()


def is_past_deadline(job: SearchJob, now: datetime) -> bool:
    """Whether the job's timeout has passed at ``now``."""
    return job.deadline_at is not None and job.deadline_at <= now


def end_job_if_done(session: Session, job: SearchJob, now: datetime) -> None:
    """End an active job whose slots are all finished, or whose timeout passed with nothing
    running: succeeded when any trial completed, else failed. Caller holds the job lock."""
    if not JobState(job.state).is_active:
        return
    all_finished = job.n_finished >= job.n_trials
    timed_out = is_past_deadline(job, now) and job.n_running == 0
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


def next_attempt(attempt: int, state: str) -> int:
    """The ``attempt`` of the lease that takes over a pending retry of a lease in ``state``:
    one more, except after a preemption, which uses up no retry (``sql/claim.sql`` says the
    same in SQL)."""
    return attempt if state == LeaseState.PREEMPTED else attempt + 1
