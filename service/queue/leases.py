"""Trial slots: claim, attach a trial, heartbeat, finish, reap; and the idle worker's wait.

Claim, finish and the wait differ per backend (:mod:`._backend`); the rest is one
transaction written once for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.orm import Session

from service import errors
from service.models import SearchJob, TrialLease
from service.queue._backend import backend_for
from service.queue._plumbing import engine_of, one_statement, resolve_now, transact
from service.queue._records import (
    REAPED_REASON,
    FinishOutcome,
    Lease,
    LeaseRecord,
    SessionSource,
    StaleCandidate,
    StaleLease,
    lease_record,
)
from service.queue._rules import end_job_if_done, is_past_deadline, lock_job
from service.queue.listen import announce_work
from service.states import JobState, LeaseState


def claim_trial_slot(
    sm: SessionSource,
    worker_id: str,
    *,
    max_running_per_owner: int | None = None,
    now: datetime | None = None,
) -> Lease | None:
    """Claim one trial slot for ``worker_id``, or return None when nothing is claimable.

    Picks an active job with a free slot (``n_running + n_finished < n_trials``) whose
    timeout has not passed, fairly across principals (job owners), then across the
    principal's jobs. Principal: fewest running leases first, then the one whose last
    claim is oldest (never-claimed first), then the one whose oldest claimable job waited
    longest. Job: fewest running slots first, then the one claimed longest ago
    (never-claimed first), then the oldest. So when several principals have work,
    consecutive claims alternate between them, and within one between its studies.

    ``max_running_per_owner``: a principal with that many running leases (on any of its
    jobs) is skipped; its work waits while others are served. On PostgreSQL claims that
    race for one principal see each other's commits (see ``sql/claim.sql``).

    A pending retry of a reaped lease of that job is taken over first (see the package
    docstring). Sets the job running (and its ``started_at`` / deadline) on its first
    claim.
    """
    if max_running_per_owner is not None and max_running_per_owner < 1:
        raise ValueError("max_running_per_owner must be at least 1")
    at = resolve_now(now)
    return backend_for(sm).claim(sm, worker_id, at=at, max_running_per_owner=max_running_per_owner)


#: One conditional UPDATE: it takes the lease row's lock and checks that it is still running
#: in the same statement (a reaped or finished lease matches no row).
_LEASES = cast(Table, TrialLease.__table__)
_ATTACH = (
    update(_LEASES)
    .where(_LEASES.c.id == bindparam("lease_id"), _LEASES.c.state == LeaseState.RUNNING)
    .values(optuna_trial_id=bindparam("trial_id"), trial_number=bindparam("number"))
    .returning(_LEASES.c.id)
)


def attach_trial(
    sm: SessionSource, lease_id: int, *, optuna_trial_id: int, trial_number: int
) -> None:
    """Record which Optuna trial runs in this slot. ``LeaseLost`` if it is no longer running."""

    def work(connection: Connection) -> None:
        attach_trial_on(
            connection, lease_id, optuna_trial_id=optuna_trial_id, trial_number=trial_number
        )

    one_statement(sm, work)


def attach_trial_on(
    connection: Connection, lease_id: int, *, optuna_trial_id: int, trial_number: int
) -> None:
    """:func:`attach_trial` as part of the caller's transaction on ``connection``: the
    worker's Optuna storage creates a trial and attaches it in one
    (``WorkerStorage.lease_id``, on SQLite). ``LeaseLost`` if the lease is no longer running."""
    params = {"lease_id": lease_id, "trial_id": optuna_trial_id, "number": trial_number}
    if connection.execute(_ATTACH, params).first() is None:
        raise errors.LeaseLost()


def heartbeat(sm: SessionSource, lease_ids: Iterable[int], now: datetime | None = None) -> set[int]:
    """Mark the worker's running leases alive (one UPDATE). Returns the ids that are no
    longer running (reaped, finished or unknown): the worker should abandon those trials."""
    ids = set(lease_ids)
    if not ids:
        return set()
    at = resolve_now(now)

    def work(connection: Connection) -> set[int]:
        alive = connection.scalars(
            update(_LEASES)
            .where(_LEASES.c.id.in_(ids), _LEASES.c.state == LeaseState.RUNNING)
            .values(heartbeat_at=at)
            .returning(_LEASES.c.id)
        ).all()
        return ids - set(alive)

    return one_statement(sm, work)


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
    at = resolve_now(now)
    return backend_for(sm).finish(
        sm, lease_id, job_id=job_id, state=state, failure_reason=failure_reason, at=at
    )


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
    at = resolve_now(now)

    def reap(session: Session) -> StaleLease | None:
        job_id = session.scalar(select(TrialLease.job_id).where(TrialLease.id == lease_id))
        if job_id is None:
            return None
        job = lock_job(session, job_id)
        lease = session.get(TrialLease, lease_id, with_for_update=True)
        if job is None or lease is None:
            return None
        if lease.state != LeaseState.RUNNING or lease.heartbeat_at >= cutoff:
            return None  # finished or heartbeated since we looked
        retry = _give_back(
            session,
            job,
            lease,
            state=LeaseState.REAPED,
            reason=REAPED_REASON,
            retry_trial_id=retry_trial_id,
            may_retry=_retry_allowed(job, lease, at),
            at=at,
        )
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

    return transact(sm, reap)


def preempt_trial_slot(
    sm: SessionSource,
    lease_id: int,
    *,
    retry_trial_id: int | None,
    reason: str,
    now: datetime | None = None,
) -> bool:
    """Give back a running lease whose worker was preempted (SIGTERM / SIGUSR1), in one
    short transaction; returns True when the slot was requeued.

    The lease becomes ``preempted`` and its job's ``n_running`` drops. While the job is
    active and not past its timeout the slot is requeued at once (``retry_pending`` with
    ``retry_trial_id``, the WAITING copy the caller enqueued BEFORE this call, and a
    NOTIFY to idle workers, in one commit), and the claim that takes it over keeps the
    lease's ``attempt``: a preemption never uses up ``study.max_retries``. Otherwise the
    slot counts as finished-failed (the caller then fails ``retry_trial_id``).

    Raises ``LeaseLost`` when the lease is no longer running (reaped, cancelled, deleted).
    """
    at = resolve_now(now)

    def preempt(session: Session) -> bool:
        job_id = session.scalar(select(TrialLease.job_id).where(TrialLease.id == lease_id))
        job = None if job_id is None else lock_job(session, job_id)
        lease = session.get(TrialLease, lease_id, with_for_update=True)
        if job is None or lease is None or lease.state != LeaseState.RUNNING:
            raise errors.LeaseLost()
        return _give_back(
            session,
            job,
            lease,
            state=LeaseState.PREEMPTED,
            reason=reason[:2000],
            retry_trial_id=retry_trial_id,
            # No attempt limit: the claim keeps a preempted lease's attempt.
            may_retry=JobState(job.state).is_active and not is_past_deadline(job, at),
            at=at,
        )

    return transact(sm, preempt)


def _give_back(
    session: Session,
    job: SearchJob,
    lease: TrialLease,
    *,
    state: LeaseState,
    reason: str,
    retry_trial_id: int | None,
    may_retry: bool,
    at: datetime,
) -> bool:
    """End a running lease (reaped or preempted; both rows locked by the caller) and either
    requeue its slot, with the trial to run and a NOTIFY in the same commit, or count it
    finished. Requeued only when ``may_retry`` and there is something to run: the WAITING
    copy ``retry_trial_id``, or no Optuna trial at all (lost between claim and ask)."""
    lease.state = state
    lease.finished_at = at
    lease.failure_reason = reason
    job.n_running -= 1
    requeue = may_retry and (lease.optuna_trial_id is None or retry_trial_id is not None)
    if requeue:
        lease.retry_pending = True
        lease.retry_trial_id = retry_trial_id
        announce_work(session, job.id)
    else:
        job.n_finished += 1
    end_job_if_done(session, job, at)
    return requeue


def _retry_allowed(job: SearchJob, lease: TrialLease, at: datetime) -> bool:
    return (
        JobState(job.state).is_active
        and not is_past_deadline(job, at)
        and lease.attempt < job.max_retries
    )


def stale_leases(
    sm: SessionSource, *, cutoff: datetime, now: datetime | None = None
) -> list[StaleCandidate]:
    """Running leases whose last heartbeat is older than ``cutoff``; a read, nothing changes.

    The reaper settles their Optuna trials before :func:`reap_stale_lease` takes any back.
    """
    at = resolve_now(now)

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

    return transact(sm, work)


def list_leases(
    sm: SessionSource, job_id: str, *, state: LeaseState | str | None = None
) -> list[LeaseRecord]:
    """The job's leases in claim order (optionally only those in ``state``)."""

    def work(session: Session) -> list[LeaseRecord]:
        query = select(TrialLease).where(TrialLease.job_id == job_id).order_by(TrialLease.id)
        if state is not None:
            query = query.where(TrialLease.state == LeaseState(state))
        return [lease_record(lease) for lease in session.scalars(query).all()]

    return transact(sm, work)


def wait_for_work(sm: SessionSource, timeout_s: float) -> bool:
    """Block an idle worker until a slot may have become claimable, at most ``timeout_s``.

    PostgreSQL: LISTEN on ``WORK_CHANNEL`` on one of the caller's pooled connections (no
    extra connection) and return True as soon as a job is created or a retry is queued:
    idle workers start a new study within milliseconds instead of a poll interval, without
    polling faster. An announcement sent between the caller's empty claim and its LISTEN
    is missed; the timeout is the fallback. SQLite: sleeps ``timeout_s``; returns False.
    """
    return backend_for(sm).wait_for_work(engine_of(sm), timeout_s)
