"""The PostgreSQL backend: claim and finish as ONE autocommitted statement each, kept as
named SQL in ``sql/claim.sql`` and ``sql/finish.sql`` (loaded once, at import).

One statement, committed as it ends: the server releases the job row's lock when the
statement ends, never after another client round trip, so many workers do not queue
behind a lock holder that waits for a CPU. Idle workers ``LISTEN`` (:mod:`.listen`).
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Any

from sqlalchemy import JSON, Connection, Engine, Integer, Row, String, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TextualSelect

from service.queue import _sqlite
from service.queue._plumbing import one_statement, transact
from service.queue._records import (
    ALL_FAILED_ERROR,
    MAX_DEADLINE_S,
    NONE_COMPLETED_ERROR,
    TIMED_OUT_ERROR,
    Lease,
    SessionSource,
)
from service.queue.listen import listen_for_work
from service.states import JobState, LeaseState

#: PostgreSQL: longest a claim waits for a job row that a concurrent transaction holds.
CLAIM_LOCK_WAIT_MS = 5000


def load_sql(name: str) -> str:
    """The text of ``sql/<name>`` shipped with this package."""
    return (resources.files(__package__) / "sql" / name).read_text(encoding="utf-8")


CLAIM = text(load_sql("claim.sql")).columns(
    id=Integer,
    job_id=String,
    optuna_study_name=String,
    spec=JSON,
    attempt=Integer,
    retry_of=Integer,
    retry_of_trial_number=Integer,
    retry_trial_id=Integer,
)
LOCK_CLAIMABLE = text(load_sql("lock_claimable.sql"))
FINISH: TextualSelect = text(load_sql("finish.sql")).columns(state=String)


class PostgresBackend:
    """Claim and finish as one statement each (``sql/claim.sql``, ``sql/finish.sql``)."""

    name = "postgresql"

    def claim(
        self,
        sm: SessionSource,
        worker_id: str,
        *,
        at: datetime,
        max_running_per_owner: int | None = None,
    ) -> Lease | None:
        """The claim rule of :func:`service.queue.claim_trial_slot`: ``claim.sql``."""
        params = {
            "queued": JobState.QUEUED.value,
            "running": JobState.RUNNING.value,
            "lease_running": LeaseState.RUNNING.value,
            "lease_preempted": LeaseState.PREEMPTED.value,
            "now": at,
            "worker_id": worker_id,
            "max_deadline_s": MAX_DEADLINE_S,
            "max_running_per_owner": max_running_per_owner,
        }

        def claim(connection: Connection) -> Row[Any] | None:
            return connection.execute(CLAIM, params).first()

        def wait_and_claim(session: Session) -> Row[Any] | None:
            # Every candidate row may be locked by a concurrent claim or finish (for well
            # under a millisecond), or (with a quota) claimed since the snapshot: wait for
            # the claimable rows rather than report an empty queue, then claim with fresh
            # counts (lock_claimable.sql). The wait is bounded so a stuck transaction
            # elsewhere surfaces as DatabaseUnavailable.
            session.execute(text(f"SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT_MS}ms'"))
            session.execute(LOCK_CLAIMABLE, params)
            return session.execute(CLAIM, params).first()

        if max_running_per_owner is not None:
            # A quota counts the principal's running leases across all its studies; the
            # one-statement claim reads them from its snapshot, so claims racing on two of
            # its studies could both pass (4 of 3). Locking every claimable row first
            # serialises claims while a quota is set: exact, at the cost of parallel claims
            # (each takes about a millisecond; trials take seconds to hours).
            row = transact(sm, wait_and_claim)
        else:
            row = one_statement(sm, claim) or transact(sm, wait_and_claim)
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
        """The finish rule of :func:`service.queue.finish_trial_slot`: ``finish.sql``."""
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

        def work(connection: Connection) -> str | None:
            job_state = connection.scalar(FINISH, params)
            return None if job_state is None else str(job_state)

        job_state = one_statement(sm, work)
        if job_state is not None:
            return JobState(job_state)
        # The lease no longer runs (or is not this job's). The ORM transaction, correct on
        # PostgreSQL too, tells a retried call whose first attempt committed (the job's
        # state) from a lost lease (LeaseLost).
        return _sqlite.finish(
            sm, lease_id, job_id=job_id, state=state, failure_reason=failure_reason, at=at
        )

    def wait_for_work(self, engine: Engine, timeout_s: float) -> bool:
        """``LISTEN`` for a new job or a queued retry, at most ``timeout_s``."""
        return listen_for_work(engine, timeout_s)
