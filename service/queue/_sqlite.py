"""The SQLite backend: claim and finish as ORM transactions.

The engine opens every transaction with ``BEGIN IMMEDIATE`` (:func:`service.db.make_engine`),
which serialises writers: a claim reads the claimable jobs and takes one slot with no other
writer in between. The same transactions are correct on PostgreSQL too (they lock the job
row first), which is why the PostgreSQL backend falls back to :func:`finish` to tell a
retried call from a lost lease.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from service import errors
from service.models import SearchJob, TrialLease
from service.queue._plumbing import transact
from service.queue._records import MAX_DEADLINE_S, Lease, SessionSource
from service.queue._rules import end_job_if_done, lock_job, next_attempt
from service.states import ACTIVE_JOB_STATES, JobState, LeaseState


def claimable_jobs(at: datetime) -> Select[SearchJob]:
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


#: Sorts before any real time: a principal that never claimed goes first.
_NEVER = datetime.min.replace(tzinfo=UTC)


def pick_job(session: Session, at: datetime, max_running_per_owner: int | None) -> SearchJob | None:
    """The job the next claim serves (fair share; ``sql/claim.sql`` is the same rule).

    Among the principals (owners) with a claimable job and fewer than
    ``max_running_per_owner`` running leases: the one with the fewest running leases, then
    the one whose last claim (over all its jobs) is oldest, never first, then the one
    whose oldest claimable job waited longest. Of that principal's jobs: the first in
    :func:`claimable_jobs` order (fewest running, least recently claimed, oldest).
    """
    candidates = session.execute(
        claimable_jobs(at).with_only_columns(
            SearchJob.id, SearchJob.owner, SearchJob.created_at, maintain_column_froms=True
        )
    ).all()
    if not candidates:
        return None
    first_job: dict[str, str] = {}
    waiting_since: dict[str, datetime] = {}
    for job_id, owner, created_at in candidates:
        first_job.setdefault(owner, job_id)
        waiting_since[owner] = min(waiting_since.get(owner, created_at), created_at)
    owners = list(first_job)
    # Every running lease counts, a cancelled job's included (it still holds a device).
    running: dict[str, int] = {
        owner: count
        for owner, count in session.execute(
            select(SearchJob.owner, func.count())
            .select_from(TrialLease)
            .join(SearchJob, SearchJob.id == TrialLease.job_id)
            .where(TrialLease.state == LeaseState.RUNNING, SearchJob.owner.in_(owners))
            .group_by(SearchJob.owner)
        ).all()
    }
    last_claimed: dict[str, datetime | None] = {
        owner: last
        for owner, last in session.execute(
            select(SearchJob.owner, func.max(SearchJob.last_claimed_at))
            .where(SearchJob.owner.in_(owners))
            .group_by(SearchJob.owner)
        ).all()
    }
    eligible = [
        owner
        for owner in owners
        if max_running_per_owner is None or running.get(owner, 0) < max_running_per_owner
    ]
    if not eligible:
        return None
    chosen = min(
        eligible,
        key=lambda owner: (
            running.get(owner, 0),
            last_claimed.get(owner) or _NEVER,
            waiting_since[owner],
            owner,
        ),
    )
    return session.get(SearchJob, first_job[chosen])


class SqliteBackend:
    """Claim and finish as ORM transactions (serialised by ``BEGIN IMMEDIATE``)."""

    name = "sqlite"

    def claim(
        self,
        sm: SessionSource,
        worker_id: str,
        *,
        at: datetime,
        max_running_per_owner: int | None = None,
    ) -> Lease | None:
        """The claim rule of :func:`service.queue.claim_trial_slot`, as one transaction."""

        def work(session: Session) -> Lease | None:
            job = pick_job(session, at, max_running_per_owner)
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
                attempt=0 if retried is None else next_attempt(retried.attempt, retried.state),
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

        return transact(sm, work)

    def finish(
        self,
        sm: SessionSource,
        lease_id: int,
        *,
        job_id: str | None,
        state: LeaseState,
        failure_reason: str | None,
        at: datetime,
    ) -> JobState:
        """The finish rule of :func:`service.queue.finish_trial_slot`, as one transaction."""
        return finish(
            sm, lease_id, job_id=job_id, state=state, failure_reason=failure_reason, at=at
        )

    def wait_for_work(self, engine: Engine, timeout_s: float) -> bool:
        """No notifications on SQLite: sleep ``timeout_s`` and say nothing woke us."""
        time.sleep(timeout_s)
        return False


def finish(
    sm: SessionSource,
    lease_id: int,
    *,
    job_id: str | None,
    state: LeaseState,
    failure_reason: str | None,
    at: datetime,
) -> JobState:
    """Record a running lease's outcome and count its slot finished (one ORM transaction).

    Locks the job row, then the lease row; ``LeaseLost`` unless the lease still runs (or
    already holds this very outcome: a retried call whose first attempt committed).
    """

    def work(session: Session) -> JobState:
        lease_job_id = job_id
        if lease_job_id is None:
            lease_job_id = session.scalar(
                select(TrialLease.job_id).where(TrialLease.id == lease_id)
            )
            if lease_job_id is None:
                raise errors.LeaseLost()
        job = lock_job(session, lease_job_id)
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
        end_job_if_done(session, job, at)
        return JobState(job.state)

    return transact(sm, work)
