"""The queue's contract, on SQLite AND PostgreSQL: exact slot accounting, one owner per
running lease, reaping and retries, fairness, cancellation, idempotency, and real
multi-process concurrency. Every assertion reads the database back."""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import db, errors, queue
from service.db import make_engine, make_session_factory, session_scope
from service.migrate import upgrade_schema
from service.models import JobState, LeaseState, SearchJob, TrialLease

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
GRACE_S = 60.0


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _job(
    sm: sessionmaker[Session],
    n_trials: int,
    *,
    name: str = "job",
    max_retries: int = 0,
    timeout_s: float | None = None,
    now: datetime = T0,
) -> queue.JobRecord:
    job, created = queue.create_job(
        sm,
        spec={"task": {"kind": "adding"}, "name": name},
        name=name,
        optuna_study_name=f"{name}-study",
        n_trials=n_trials,
        max_retries=max_retries,
        timeout_s=timeout_s,
        now=now,
    )
    assert created
    return job


def _job_row(sm: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with session_scope(sm) as session:
        job = session.get(SearchJob, job_id)
        assert job is not None
        return {c.name: getattr(job, c.key) for c in SearchJob.__table__.columns}


def _lease_rows(sm: sessionmaker[Session], job_id: str) -> list[dict[str, Any]]:
    with session_scope(sm) as session:
        leases = session.scalars(
            select(TrialLease).where(TrialLease.job_id == job_id).order_by(TrialLease.id)
        ).all()
        return [
            {c.name: getattr(lease, c.key) for c in TrialLease.__table__.columns}
            for lease in leases
        ]


def _claim_all(
    sm: sessionmaker[Session], worker: str = "w1", now: datetime = T0
) -> list[queue.Lease]:
    leases = []
    while (lease := queue.claim_trial_slot(sm, worker, now=now)) is not None:
        leases.append(lease)
        assert len(leases) <= 1000, "claims never stop"
    return leases


# ---------------------------------------------------------------------------------------
# Single-process semantics


def test_claims_stop_at_n_trials_and_finishing_all_succeeds(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 5)
    assert job.state is JobState.QUEUED and job.started_at is None

    leases = _claim_all(session_factory, now=_at(1))

    assert len(leases) == 5
    assert len({lease.id for lease in leases}) == 5
    assert all(lease.job_id == job.id and lease.attempt == 0 for lease in leases)
    assert leases[0].spec == job.spec and leases[0].optuna_study_name == "job-study"
    row = _job_row(session_factory, job.id)
    assert row["state"] == JobState.RUNNING
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (5, 0, 0)
    assert row["started_at"] == _at(1) and row["last_claimed_at"] == _at(1)
    assert [r["state"] for r in _lease_rows(session_factory, job.id)] == ["running"] * 5

    states = [
        queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(2))
        for lease in leases
    ]

    assert states == [JobState.RUNNING] * 4 + [JobState.SUCCEEDED]
    row = _job_row(session_factory, job.id)
    assert row["state"] == JobState.SUCCEEDED and row["error"] is None
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (0, 5, 5)
    assert row["finished_at"] == _at(2)
    assert {r["state"] for r in _lease_rows(session_factory, job.id)} == {"complete"}
    assert queue.claim_trial_slot(session_factory, "w1", now=_at(3)) is None
    assert len(_lease_rows(session_factory, job.id)) == 5


def test_returned_times_are_aware_utc(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 1)
    lease = queue.claim_trial_slot(session_factory, "w1")
    assert lease is not None
    record = queue.get_job(session_factory, job.id)
    for value in (record.created_at, record.started_at, lease.claimed_at):
        assert value is not None and value.utcoffset() == timedelta(0)


def test_only_failures_end_the_job_failed(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 3)
    leases = _claim_all(session_factory)
    for lease in leases:
        queue.finish_trial_slot(session_factory, lease.id, "failed", "CUDA out of memory")

    row = _job_row(session_factory, job.id)
    assert row["state"] == JobState.FAILED
    assert row["error"] == "every trial failed; see the trials' failure reasons"
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (0, 3, 0)
    rows = _lease_rows(session_factory, job.id)
    assert {(r["state"], r["failure_reason"]) for r in rows} == {("failed", "CUDA out of memory")}


def test_pruned_and_failed_without_a_completed_trial_ends_failed(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2)
    first, second = _claim_all(session_factory)
    queue.finish_trial_slot(session_factory, first.id, "pruned")
    assert queue.finish_trial_slot(session_factory, second.id, "failed", "nan loss") is (
        JobState.FAILED
    )
    assert _job_row(session_factory, job.id)["error"] == queue.NONE_COMPLETED_ERROR


def test_one_completed_trial_among_failures_succeeds(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 3)
    leases = _claim_all(session_factory)
    queue.finish_trial_slot(session_factory, leases[0].id, "failed", "boom")
    queue.finish_trial_slot(session_factory, leases[1].id, "pruned")
    assert queue.finish_trial_slot(session_factory, leases[2].id, LeaseState.COMPLETE) is (
        JobState.SUCCEEDED
    )
    row = _job_row(session_factory, job.id)
    assert (row["n_finished"], row["n_complete"], row["error"]) == (3, 1, None)


def test_finishing_twice_or_an_unknown_lease_raises_lease_lost(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2)
    lease = queue.claim_trial_slot(session_factory, "w1")
    assert lease is not None
    queue.finish_trial_slot(session_factory, lease.id, "complete")
    before = _job_row(session_factory, job.id)
    with pytest.raises(errors.LeaseLost):
        queue.finish_trial_slot(session_factory, lease.id, "failed", "late")
    with pytest.raises(errors.LeaseLost):
        queue.finish_trial_slot(session_factory, 999_999, "complete")
    with pytest.raises(ValueError, match="outcome"):
        queue.finish_trial_slot(session_factory, lease.id, "reaped")  # type: ignore[arg-type]
    assert _job_row(session_factory, job.id) == before
    assert _lease_rows(session_factory, job.id)[0]["state"] == "complete"


def test_cancel_stops_new_claims_and_running_leases_still_record(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 5)
    first = queue.claim_trial_slot(session_factory, "w1", now=_at(1))
    second = queue.claim_trial_slot(session_factory, "w2", now=_at(1))
    assert first is not None and second is not None

    assert queue.cancel_job(session_factory, job.id, now=_at(2)) is JobState.CANCELLED

    assert queue.claim_trial_slot(session_factory, "w3", now=_at(3)) is None
    assert queue.finish_trial_slot(session_factory, first.id, "complete", now=_at(4)) is (
        JobState.CANCELLED
    )
    assert queue.finish_trial_slot(session_factory, second.id, "failed", "x", now=_at(4)) is (
        JobState.CANCELLED
    )
    row = _job_row(session_factory, job.id)
    assert row["state"] == JobState.CANCELLED and row["finished_at"] == _at(2)
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (0, 2, 1)
    assert [r["state"] for r in _lease_rows(session_factory, job.id)] == ["complete", "failed"]

    with pytest.raises(errors.StudyNotActive):
        queue.cancel_job(session_factory, job.id)
    with pytest.raises(errors.StudyNotFound):
        queue.cancel_job(session_factory, "0" * 32)
    assert _job_row(session_factory, job.id)["finished_at"] == _at(2)


def test_cancel_a_queued_job_and_an_ended_one(session_factory: sessionmaker[Session]) -> None:
    queued = _job(session_factory, 2, name="queued")
    assert queue.cancel_job(session_factory, queued.id) is JobState.CANCELLED
    assert _lease_rows(session_factory, queued.id) == []

    done = _job(session_factory, 1, name="done")
    lease = queue.claim_trial_slot(session_factory, "w1")
    assert lease is not None
    queue.finish_trial_slot(session_factory, lease.id, "complete")
    with pytest.raises(errors.StudyNotActive):
        queue.cancel_job(session_factory, done.id)
    assert _job_row(session_factory, done.id)["state"] == JobState.SUCCEEDED


# ---------------------------------------------------------------------------------------
# Heartbeats, reaping, retries


def _reap(
    sm: sessionmaker[Session], now: datetime, *, retry_trial_id: int | None = None
) -> list[queue.StaleLease]:
    """The queue's part of one reaper round (``service.reaper`` adds Optuna around it):
    every stale lease reaped, with ``retry_trial_id`` as the WAITING trial enqueued for it."""
    cutoff = now - timedelta(seconds=GRACE_S)
    reaped = [
        stale
        for candidate in queue.stale_leases(sm, cutoff=cutoff, now=now)
        if (
            stale := queue.reap_stale_lease(
                sm, candidate.id, cutoff=cutoff, retry_trial_id=retry_trial_id, now=now
            )
        )
    ]
    queue.end_expired_jobs(sm, now=now)
    return reaped


def test_a_lost_trial_is_retried_only_with_the_trial_to_run(
    session_factory: sessionmaker[Session],
) -> None:
    """A lease that attached an Optuna trial is retried only when the reaper enqueued the
    copy first: the slot never becomes claimable with nothing (or a fresh trial) to run."""
    job = _job(session_factory, 1, max_retries=3)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None
    queue.attach_trial(session_factory, lease.id, optuna_trial_id=5, trial_number=0)
    cutoff = _at(61) - timedelta(seconds=GRACE_S)
    [candidate] = queue.stale_leases(session_factory, cutoff=cutoff, now=_at(61))
    assert candidate.retry_expected and candidate.optuna_trial_id == 5
    stale = queue.reap_stale_lease(session_factory, lease.id, cutoff=cutoff, now=_at(61))
    assert stale is not None and not stale.retry and stale.job_state is JobState.FAILED
    assert _job_row(session_factory, job.id)["n_finished"] == 1
    assert queue.claim_trial_slot(session_factory, "w2", now=_at(62)) is None


def test_fail_job_ends_it_with_the_reason_and_drops_its_retries(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 3, max_retries=2)
    other = _job(session_factory, 1, name="other", now=_at(1))  # claimed second
    dead = queue.claim_trial_slot(session_factory, "w1", now=T0)
    running = queue.claim_trial_slot(session_factory, "w2", now=T0)
    assert dead is not None and running is not None and running.job_id == other.id
    assert queue.heartbeat(session_factory, [running.id], _at(60)) == set()
    [stale] = _reap(session_factory, _at(61))
    assert stale.retry

    assert queue.fail_job(session_factory, job.id, "its spec no longer parses", now=_at(62))
    assert not queue.fail_job(session_factory, job.id, "again", now=_at(63))  # idempotent
    row = _job_row(session_factory, job.id)
    assert (row["state"], row["error"], row["finished_at"]) == (
        "failed",
        "its spec no longer parses",
        _at(62),
    )
    assert not any(r["retry_pending"] for r in _lease_rows(session_factory, job.id))
    assert queue.claim_trial_slot(session_factory, "w3", now=_at(63)) is None
    # The other job's running lease is untouched and finishes normally.
    assert queue.finish_trial_slot(session_factory, running.id, "complete", now=_at(64)) is (
        JobState.SUCCEEDED
    )


def test_delete_job_removes_the_row_and_its_leases(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2, max_retries=1)
    dead = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert dead is not None and dead.job_id == job.id
    [stale] = _reap(session_factory, _at(61))
    retry = queue.claim_trial_slot(session_factory, "w2", now=_at(62))
    assert stale.retry and retry is not None and retry.retry_of == dead.id
    kept = _job(session_factory, 1, name="kept", now=_at(62))

    assert queue.delete_job(session_factory, job.id)
    assert not queue.delete_job(session_factory, job.id)
    assert queue.find_job(session_factory, job.id) is None
    assert _lease_rows(session_factory, job.id) == []
    with pytest.raises(errors.LeaseLost):  # the retry's worker finds its slot gone
        queue.finish_trial_slot(session_factory, retry.id, "complete", now=_at(63))
    assert queue.find_job(session_factory, kept.id) is not None


def test_a_huge_timeout_never_overflows_the_deadline(
    session_factory: sessionmaker[Session],
) -> None:
    """A job row whose timeout no datetime can hold (written before submit-time bounds, or
    by hand) is claimable, with its deadline clamped to ~100 years; others are unharmed."""
    huge = _job(session_factory, 1, name="huge", timeout_s=1e300)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None and lease.job_id == huge.id
    deadline = _job_row(session_factory, huge.id)["deadline_at"]
    assert deadline == T0 + timedelta(seconds=queue.MAX_DEADLINE_S)
    other = _job(session_factory, 1, name="other")
    assert queue.claim_trial_slot(session_factory, "w2", now=_at(1)) is not None
    assert _job_row(session_factory, other.id)["state"] == "running"


def test_reaper_takes_only_stale_leases(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 3, max_retries=1)
    silent, alive, late = (
        queue.claim_trial_slot(session_factory, f"w{i}", now=T0) for i in range(3)
    )
    assert silent is not None and alive is not None and late is not None
    assert queue.heartbeat(session_factory, [alive.id], _at(50)) == set()
    # Exactly at the edge of the grace period is not stale yet.
    assert queue.heartbeat(session_factory, [late.id], _at(1)) == set()

    stale = _reap(session_factory, _at(61))

    assert [s.id for s in stale] == [silent.id]
    assert stale[0].worker_id == "w0" and stale[0].retry and stale[0].job_state is JobState.RUNNING
    rows = {r["id"]: r for r in _lease_rows(session_factory, job.id)}
    assert rows[silent.id]["state"] == "reaped"
    assert rows[silent.id]["failure_reason"] == "worker stopped heartbeating"
    assert rows[silent.id]["finished_at"] == _at(61)
    assert rows[alive.id]["state"] == rows[late.id]["state"] == "running"
    assert rows[alive.id]["heartbeat_at"] == _at(50)
    row = _job_row(session_factory, job.id)
    assert (row["n_running"], row["n_finished"]) == (2, 0)

    # The reaped lease is reported gone to its (late) worker; the others are fine.
    assert queue.heartbeat(session_factory, [silent.id, alive.id, 424242], _at(62)) == {
        silent.id,
        424242,
    }
    # A second pass finds nothing new.
    assert _reap(session_factory, _at(61)) == []


def test_finish_after_reaping_raises_lease_lost_and_changes_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2, max_retries=0)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None
    queue.attach_trial(session_factory, lease.id, optuna_trial_id=7, trial_number=0)
    [stale] = _reap(session_factory, _at(100))
    assert not stale.retry and (stale.optuna_trial_id, stale.trial_number) == (7, 0)
    job_before, leases_before = (
        _job_row(session_factory, job.id),
        _lease_rows(session_factory, job.id),
    )

    with pytest.raises(errors.LeaseLost):
        queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(101))
    with pytest.raises(errors.LeaseLost):
        queue.attach_trial(session_factory, lease.id, optuna_trial_id=8, trial_number=1)

    assert _job_row(session_factory, job.id) == job_before
    assert _lease_rows(session_factory, job.id) == leases_before
    assert job_before["n_complete"] == 0 and leases_before[0]["state"] == "reaped"


def test_reaped_slot_is_retried_up_to_max_retries_then_counts_failed(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 1, max_retries=2)
    leases: list[queue.Lease] = []
    for attempt in range(3):
        now = _at(attempt * 100)
        lease = queue.claim_trial_slot(session_factory, f"w{attempt}", now=now)
        assert lease is not None
        assert queue.claim_trial_slot(session_factory, "other", now=now) is None  # one slot
        queue.attach_trial(
            session_factory, lease.id, optuna_trial_id=10 + attempt, trial_number=attempt
        )
        assert lease.attempt == attempt
        assert lease.retry_of == (leases[-1].id if leases else None)
        assert lease.retry_of_trial_number == (attempt - 1 if attempt else None)
        assert lease.retry_trial_id == (100 + attempt - 1 if attempt else None)
        leases.append(lease)

        # The reaper enqueued trial 100 + attempt in Optuna: the retry must run it.
        [stale] = _reap(session_factory, _at(attempt * 100 + 61), retry_trial_id=100 + attempt)

        assert stale.id == lease.id and stale.attempt == attempt
        assert (stale.optuna_trial_id, stale.trial_number) == (10 + attempt, attempt)
        row = _job_row(session_factory, job.id)
        if attempt < 2:
            assert stale.retry and stale.job_state is JobState.RUNNING
            assert (row["state"], row["n_running"], row["n_finished"]) == ("running", 0, 0)
        else:
            assert not stale.retry and stale.job_state is JobState.FAILED
            assert (row["state"], row["n_running"], row["n_finished"]) == ("failed", 0, 1)

    assert queue.claim_trial_slot(session_factory, "w9", now=_at(500)) is None
    rows = _lease_rows(session_factory, job.id)
    assert [(r["state"], r["attempt"], r["retry_of"], r["retry_pending"]) for r in rows] == [
        ("reaped", 0, None, False),
        ("reaped", 1, leases[0].id, False),
        ("reaped", 2, leases[1].id, False),
    ]


def test_retried_slot_can_complete_and_fresh_slots_are_not_retries(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2, max_retries=1)
    dead = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert dead is not None
    [stale] = _reap(session_factory, _at(61))
    assert stale.retry and stale.optuna_trial_id is None  # died before attaching a trial

    retry = queue.claim_trial_slot(session_factory, "w2", now=_at(62))
    fresh = queue.claim_trial_slot(session_factory, "w3", now=_at(62))
    assert retry is not None and fresh is not None
    assert (retry.attempt, retry.retry_of) == (1, dead.id)
    assert (fresh.attempt, fresh.retry_of) == (0, None)
    assert queue.claim_trial_slot(session_factory, "w4", now=_at(62)) is None

    queue.finish_trial_slot(session_factory, retry.id, "complete", now=_at(70))
    assert queue.finish_trial_slot(session_factory, fresh.id, "complete", now=_at(70)) is (
        JobState.SUCCEEDED
    )
    row = _job_row(session_factory, job.id)
    assert (row["n_finished"], row["n_complete"], row["n_running"]) == (2, 2, 0)
    assert len(_lease_rows(session_factory, job.id)) == 3


def test_preempted_slots_are_requeued_at_once_and_never_use_a_retry(
    session_factory: sessionmaker[Session],
) -> None:
    """Three preemptions of one trial with max_retries 1, then a reap (counted), then a
    completion: the job succeeds with exactly its one slot."""
    job = _job(session_factory, 1, max_retries=1)
    previous: queue.Lease | None = None
    for n in range(3):
        lease = queue.claim_trial_slot(session_factory, f"w{n}", now=_at(n * 10))
        assert lease is not None and lease.attempt == 0
        assert lease.retry_of == (previous.id if previous else None)
        assert lease.retry_trial_id == (200 + n - 1 if n else None)
        queue.attach_trial(session_factory, lease.id, optuna_trial_id=10 + n, trial_number=n)
        # No heartbeat grace: the slot is claimable the moment it is given back.
        assert queue.preempt_trial_slot(
            session_factory,
            lease.id,
            retry_trial_id=200 + n,
            reason="preempted (SIGTERM)",
            now=_at(n * 10 + 1),
        )
        row = _job_row(session_factory, job.id)
        assert (row["n_running"], row["n_finished"]) == (0, 0)
        with pytest.raises(errors.LeaseLost):  # a late result never lands
            queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(n * 10 + 2))
        previous = lease
    reaped = queue.claim_trial_slot(session_factory, "w3", now=_at(40))
    assert reaped is not None and reaped.attempt == 0 and reaped.retry_trial_id == 202
    [stale] = _reap(session_factory, _at(40 + GRACE_S + 1), retry_trial_id=300)
    assert stale.retry  # attempt 0 < max_retries 1: a kill still uses a retry ...
    last = queue.claim_trial_slot(session_factory, "w4", now=_at(200))
    assert last is not None and last.attempt == 1  # ... and this one counts it
    assert queue.finish_trial_slot(session_factory, last.id, "complete", now=_at(210)) is (
        JobState.SUCCEEDED
    )
    rows = _lease_rows(session_factory, job.id)
    assert [(r["state"], r["attempt"]) for r in rows] == [
        ("preempted", 0),
        ("preempted", 0),
        ("preempted", 0),
        ("reaped", 0),
        ("complete", 1),
    ]
    assert rows[0]["failure_reason"] == "preempted (SIGTERM)"


def test_a_preempted_slot_of_an_ended_job_counts_finished(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 1, max_retries=1, timeout_s=5)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None
    queue.attach_trial(session_factory, lease.id, optuna_trial_id=1, trial_number=0)
    # Past its timeout nothing new starts: the slot is not requeued and the job ends.
    assert not queue.preempt_trial_slot(
        session_factory, lease.id, retry_trial_id=9, reason="preempted", now=_at(10)
    )
    row = _job_row(session_factory, job.id)
    assert (row["state"], row["n_running"], row["n_finished"]) == ("failed", 0, 1)
    with pytest.raises(errors.LeaseLost):
        queue.preempt_trial_slot(session_factory, lease.id, retry_trial_id=9, reason="again")


def test_no_retry_for_a_cancelled_job(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 2, max_retries=3)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None
    queue.cancel_job(session_factory, job.id, now=_at(1))
    [stale] = _reap(session_factory, _at(61))
    assert not stale.retry and stale.job_state is JobState.CANCELLED
    row = _job_row(session_factory, job.id)
    assert (row["state"], row["n_running"], row["n_finished"]) == ("cancelled", 0, 1)


# ---------------------------------------------------------------------------------------
# Timeouts


def test_timeout_stops_claims_and_the_job_ends_when_running_leases_finish(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 10, timeout_s=10.0)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None
    assert _job_row(session_factory, job.id)["deadline_at"] == _at(10)
    assert queue.claim_trial_slot(session_factory, "w2", now=_at(9)) is not None
    assert queue.claim_trial_slot(session_factory, "w3", now=_at(10)) is None
    assert queue.end_expired_jobs(session_factory, now=_at(11)) == []  # two still running

    leases = queue.list_leases(session_factory, job.id, state=LeaseState.RUNNING)
    assert queue.finish_trial_slot(session_factory, leases[0].id, "complete", now=_at(12)) is (
        JobState.RUNNING
    )
    assert queue.finish_trial_slot(session_factory, leases[1].id, "failed", "x", now=_at(13)) is (
        JobState.SUCCEEDED
    )
    row = _job_row(session_factory, job.id)
    assert (row["n_finished"], row["n_complete"], row["finished_at"]) == (2, 1, _at(13))


def test_idle_timed_out_jobs_are_ended_by_the_reaper(
    session_factory: sessionmaker[Session],
) -> None:
    done = _job(session_factory, 5, name="done", timeout_s=10.0)
    lease = queue.claim_trial_slot(session_factory, "w1", now=T0)
    assert lease is not None and lease.job_id == done.id
    queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(1))
    nothing = _job(session_factory, 5, name="nothing", timeout_s=10.0)
    lease = queue.claim_trial_slot(session_factory, "w1", now=_at(2))
    assert lease is not None and lease.job_id == nothing.id
    queue.finish_trial_slot(session_factory, lease.id, "failed", "x", now=_at(3))
    untimed = _job(session_factory, 5, name="untimed")

    assert queue.end_expired_jobs(session_factory, now=_at(9)) == []
    assert _reap(session_factory, _at(20)) == []

    assert _job_row(session_factory, done.id)["state"] == JobState.SUCCEEDED
    failed = _job_row(session_factory, nothing.id)
    assert failed["state"] == JobState.FAILED and failed["error"] == queue.TIMED_OUT_ERROR
    assert failed["finished_at"] == _at(20)
    assert _job_row(session_factory, untimed.id)["state"] == JobState.QUEUED


# ---------------------------------------------------------------------------------------
# Fairness, idempotency, reads


def test_two_jobs_are_served_fairly(session_factory: sessionmaker[Session]) -> None:
    first = _job(session_factory, 4, name="first", now=T0)
    second = _job(session_factory, 4, name="second", now=_at(1))

    held = [queue.claim_trial_slot(session_factory, "w", now=_at(10 + i)) for i in range(4)]
    assert [lease.job_id for lease in held if lease] == [first.id, second.id] * 2

    # Finishing each slot at once keeps n_running equal: least recently claimed goes next.
    order = []
    for i in range(4):
        lease = queue.claim_trial_slot(session_factory, "w", now=_at(20 + i))
        assert lease is not None
        order.append(lease.job_id)
        queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(20 + i))
    assert order == [first.id, second.id] * 2
    assert queue.claim_trial_slot(session_factory, "w", now=_at(30)) is None


def test_idempotency_key_returns_the_same_job(session_factory: sessionmaker[Session]) -> None:
    kwargs: dict[str, Any] = {
        "spec": {"a": 1},
        "name": "n",
        "n_trials": 3,
        "idempotency_key": "key-1",
    }
    job, created = queue.create_job(session_factory, optuna_study_name="s1", **kwargs)
    again = queue.create_job(session_factory, optuna_study_name="s2", **kwargs)
    other_owner = queue.create_job(
        session_factory, optuna_study_name="s3", **{**kwargs, "owner": "alice"}
    )

    assert created and not again.created and again.job == job
    assert again.job.optuna_study_name == "s1"
    assert other_owner.created and other_owner.job.id != job.id
    with session_scope(session_factory) as session:
        assert session.scalar(text("SELECT count(*) FROM search_jobs")) == 2

    unkeyed = [
        queue.create_job(session_factory, spec={}, name="n", optuna_study_name=f"u{i}", n_trials=1)
        for i in range(2)
    ]
    assert all(c.created for c in unkeyed) and unkeyed[0].job.id != unkeyed[1].job.id
    with pytest.raises(errors.AlreadyExists):
        queue.create_job(session_factory, spec={}, name="n", optuna_study_name="u0", n_trials=1)
    with pytest.raises(errors.AlreadyExists):
        queue.create_job(
            session_factory, spec={}, name="n", optuna_study_name="u9", n_trials=1, job_id=job.id
        )
    with session_scope(session_factory) as session:
        assert session.scalar(text("SELECT count(*) FROM search_jobs")) == 4


def test_get_and_list_jobs(session_factory: sessionmaker[Session]) -> None:
    jobs = [
        queue.create_job(
            session_factory,
            spec={"i": i},
            name=f"j{i}",
            owner="alice" if i % 2 else "bob",
            optuna_study_name=f"s{i}",
            n_trials=1,
            now=_at(i),
        ).job
        for i in range(5)
    ]
    queue.cancel_job(session_factory, jobs[1].id)

    page, total = queue.list_jobs(session_factory, limit=2, offset=1)
    assert total == 5 and [j.name for j in page] == ["j3", "j2"]
    alice, total = queue.list_jobs(session_factory, owner="alice")
    assert total == 2 and [j.name for j in alice] == ["j3", "j1"]
    cancelled, total = queue.list_jobs(session_factory, state="cancelled")
    assert total == 1 and cancelled[0].id == jobs[1].id
    queued, total = queue.list_jobs(session_factory, state=JobState.QUEUED, owner="bob")
    assert total == 3 and {j.name for j in queued} == {"j0", "j2", "j4"}

    assert queue.get_job(session_factory, jobs[0].id).spec == {"i": 0}
    assert queue.get_job(session_factory, jobs[1].id, owner="alice").state is JobState.CANCELLED
    with pytest.raises(errors.StudyNotFound):
        queue.get_job(session_factory, jobs[1].id, owner="bob")
    with pytest.raises(errors.StudyNotFound):
        queue.get_job(session_factory, "f" * 32)
    assert queue.find_job(session_factory, "f" * 32) is None
    assert queue.get_job(session_factory, jobs[0].id).counts == queue.JobCounts(1, 0, 0, 0)


def test_workers_register_and_heartbeat(session_factory: sessionmaker[Session]) -> None:
    worker = queue.register_worker(
        session_factory, worker_id="host:1", hostname="host", pid=1, now=T0
    )
    assert (worker.id, worker.hostname, worker.pid, worker.heartbeat_at) == (
        "host:1",
        "host",
        1,
        T0,
    )
    queue.register_worker(session_factory, worker_id="host:2", hostname="host", pid=2, now=T0)
    assert queue.worker_heartbeat(session_factory, "host:1", _at(30))
    assert not queue.worker_heartbeat(session_factory, "nobody", _at(30))
    # Registering again (a restarted process with the same id) refreshes the row.
    queue.register_worker(session_factory, worker_id="host:2", hostname="host", pid=22, now=_at(40))

    assert [w.id for w in queue.list_workers(session_factory)] == ["host:1", "host:2"]
    recent = queue.list_workers(session_factory, seen_since=_at(35))
    assert [(w.id, w.pid, w.started_at) for w in recent] == [("host:2", 22, _at(40))]


def test_deleting_a_job_cascades_to_its_leases(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 2)
    _claim_all(session_factory)
    with session_scope(session_factory) as session:
        session.execute(text("DELETE FROM search_jobs WHERE id = :id"), {"id": job.id})
    with session_scope(session_factory) as session:
        assert session.scalar(text("SELECT count(*) FROM trial_leases")) == 0


# ---------------------------------------------------------------------------------------
# The database boundary


def test_unmigrated_database_raises_schema_not_ready(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(errors.SchemaNotReady):
            queue.claim_trial_slot(make_session_factory(engine), "w1")
    finally:
        engine.dispose()


def test_sqlite_engine_pragmas(sqlite_url: str, tmp_path: Any) -> None:
    nested = f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}"
    for url in (sqlite_url, nested):
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
                assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        finally:
            engine.dispose()
    assert (tmp_path / "a" / "b" / "x.db").is_file()


def test_sqlite_lock_held_too_long_is_database_unavailable(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_schema(sqlite_url)
    holder = make_engine(sqlite_url)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    waiter = make_engine(sqlite_url)
    try:
        with holder.begin():  # BEGIN IMMEDIATE: holds the write lock
            started = time.monotonic()
            with pytest.raises(errors.DatabaseUnavailable) as caught:
                queue.claim_trial_slot(make_session_factory(waiter), "w1")
            assert time.monotonic() - started < 5
        assert caught.value.retryable and "locked" in caught.value.message
    finally:
        holder.dispose()
        waiter.dispose()


def test_unreachable_postgres_is_database_unavailable_without_the_password() -> None:
    engine = make_engine("postgresql+psycopg://someone:s3cr3t-pw@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(errors.DatabaseUnavailable) as caught:
            queue.get_job(make_session_factory(engine), "x")
    finally:
        engine.dispose()
    assert "s3cr3t-pw" not in str(caught.value)


def test_database_refuses_counters_that_break_the_slot_invariant(
    session_factory: sessionmaker[Session],
) -> None:
    job = _job(session_factory, 2)
    for assignment in ("n_running = 3", "n_running = 1, n_finished = 2", "n_complete = 1"):
        # A CHECK violation is a bug, not a conflict: it is not turned into AlreadyExists.
        with pytest.raises(IntegrityError), session_scope(session_factory) as session:
            session.execute(
                text(f"UPDATE search_jobs SET {assignment} WHERE id = :id"), {"id": job.id}
            )
    row = _job_row(session_factory, job.id)
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (0, 0, 0)


def test_session_scope_rolls_back_on_error(session_factory: sessionmaker[Session]) -> None:
    job = _job(session_factory, 1)
    with pytest.raises(RuntimeError), session_scope(session_factory) as session:
        row = session.get(SearchJob, job.id)
        assert row is not None
        row.name = "changed"
        session.flush()
        raise RuntimeError("boom")
    assert _job_row(session_factory, job.id)["name"] == "job"


# ---------------------------------------------------------------------------------------
# Real processes


def _worker_loop(url: str, worker_id: str, pause_s: float, start: Any, results: Any) -> None:
    """One worker process: claim -> (pretend to train) -> finish, until nothing is left."""
    try:
        engine = make_engine(url)
        sm = make_session_factory(engine)
        claimed: list[tuple[int, str]] = []
        start.wait(timeout=60)  # start together, so the claims really overlap
        while (lease := queue.claim_trial_slot(sm, worker_id)) is not None:
            time.sleep(pause_s)  # never inside a transaction
            queue.finish_trial_slot(sm, lease.id, "complete")
            claimed.append((lease.id, lease.job_id))
        engine.dispose()
        results.put((worker_id, claimed, None))
    except BaseException:
        results.put((worker_id, [], traceback.format_exc()))


def _run_workers(url: str, n_workers: int, pause_s: float) -> dict[str, list[tuple[int, str]]]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n_workers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_worker_loop, args=(url, f"proc-{i}", pause_s, start, results))
        for i in range(n_workers)
    ]
    for process in processes:
        process.start()
    collected = {}
    try:
        for _ in processes:
            worker_id, claimed, error = results.get(timeout=60)
            assert error is None, f"{worker_id} raised:\n{error}"
            collected[worker_id] = claimed
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * n_workers
    return collected


def test_four_processes_share_one_job_exactly(
    migrated_db_url: str, session_factory: sessionmaker[Session]
) -> None:
    job = _job(session_factory, 40, now=datetime.now(UTC))

    claimed = _run_workers(migrated_db_url, n_workers=4, pause_s=0.01)

    all_claims = [lease_id for per_worker in claimed.values() for lease_id, _ in per_worker]
    assert len(all_claims) == len(set(all_claims)) == 40
    assert sum(1 for per_worker in claimed.values() if per_worker) >= 2, claimed
    row = _job_row(session_factory, job.id)
    assert row["state"] == JobState.SUCCEEDED
    assert (row["n_running"], row["n_finished"], row["n_complete"]) == (0, 40, 40)
    rows = _lease_rows(session_factory, job.id)
    assert len(rows) == 40 and {r["state"] for r in rows} == {"complete"}
    owner_of = {lease_id: worker for worker, per in claimed.items() for lease_id, _ in per}
    assert all(owner_of[r["id"]] == r["worker_id"] for r in rows)


def test_four_processes_share_two_jobs_exactly(
    migrated_db_url: str, session_factory: sessionmaker[Session]
) -> None:
    small = _job(session_factory, 7, name="small", now=datetime.now(UTC))
    large = _job(session_factory, 23, name="large", now=datetime.now(UTC))

    claimed = _run_workers(migrated_db_url, n_workers=4, pause_s=0.005)

    per_job: dict[str, int] = {}
    for per_worker in claimed.values():
        for _, job_id in per_worker:
            per_job[job_id] = per_job.get(job_id, 0) + 1
    assert per_job == {small.id: 7, large.id: 23}
    for job, n in ((small, 7), (large, 23)):
        row = _job_row(session_factory, job.id)
        assert (row["state"], row["n_running"], row["n_finished"]) == ("succeeded", 0, n)
        assert len(_lease_rows(session_factory, job.id)) == n


def test_wait_for_work_wakes_on_a_new_job(session_factory: sessionmaker[Session]) -> None:
    """PostgreSQL: an idle worker's wait ends with the NOTIFY of a submit (True), well
    before its timeout; with nothing announced it times out (False). SQLite only sleeps."""
    postgresql = session_factory.kw["bind"].dialect.name == "postgresql"
    assert queue.wait_for_work(session_factory, 0.05) is False
    if not postgresql:
        return
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(queue.wait_for_work(session_factory, 60)))
    waiter.start()
    # The waiter holds the pool's other connection; submit once it listens.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _listening(session_factory):
        time.sleep(0.01)
    _job(session_factory, 1)
    waiter.join(timeout=60)
    assert woken == [True]


def _listening(sm: sessionmaker[Session]) -> bool:
    with session_scope(sm) as session:
        return bool(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    f" AND query = 'LISTEN {queue.WORK_CHANNEL}'"
                )
            )
        )


@pytest.mark.postgres
def test_a_lost_listen_connection_is_database_unavailable_and_replaced(postgres_url: str) -> None:
    """An idle worker's LISTEN connection dies (server restart, network): the wait raises
    DatabaseUnavailable, which the worker retries, and the next wait gets a new connection
    that is woken as before."""
    upgrade_schema(postgres_url)
    engine = make_engine(postgres_url, pool_size=1)
    sm = make_session_factory(engine)
    admin = make_engine(postgres_url, pool_size=1)
    try:
        errors_seen: list[BaseException] = []

        def wait() -> None:
            try:
                queue.wait_for_work(sm, 60)
            except BaseException as error:  # the test inspects it
                errors_seen.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _listening(make_session_factory(admin)):
            time.sleep(0.01)
        with admin.connect() as connection:
            killed = (
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query = :listen"
                    ),
                    {"listen": f"LISTEN {queue.WORK_CHANNEL}"},
                )
                .scalars()
                .all()
            )
        assert killed == [True]
        waiter.join(timeout=60)
        assert len(errors_seen) == 1
        assert isinstance(errors_seen[0], errors.DatabaseUnavailable)

        woken: list[bool] = []
        waiter = threading.Thread(target=lambda: woken.append(queue.wait_for_work(sm, 60)))
        waiter.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _listening(make_session_factory(admin)):
            time.sleep(0.01)
        _job(make_session_factory(admin), 1)
        waiter.join(timeout=60)
        assert woken == [True]
    finally:
        engine.dispose()
        admin.dispose()


# ---------------------------------------------------------------------------------------
# Fair share between principals, quotas


def _owned_job(
    sm: sessionmaker[Session], owner: str, name: str, n_trials: int, now: datetime
) -> queue.JobRecord:
    job, created = queue.create_job(
        sm,
        spec={"task": {"kind": "adding"}, "name": name},
        name=name,
        owner=owner,
        optuna_study_name=f"{name}-study",
        n_trials=n_trials,
        now=now,
    )
    assert created
    return job


def test_claims_alternate_between_principals_then_their_studies(
    session_factory: sessionmaker[Session],
) -> None:
    """Alice has three studies and Bob one: claims alternate Alice, Bob, Alice, ... (not
    three for Alice per one for Bob), and Alice's turns go round her studies."""
    a1, a2, a3 = (_owned_job(session_factory, "alice", f"a{i}", 10, _at(i)) for i in (1, 2, 3))
    b1 = _owned_job(session_factory, "bob", "b1", 10, _at(4))

    held = [queue.claim_trial_slot(session_factory, "w", now=_at(10 + i)) for i in range(8)]

    assert [lease.job_id for lease in held if lease] == [
        a1.id,  # nobody has claimed yet: Alice's study has waited longest
        b1.id,  # then the principal with fewer running trials
        a2.id,  # as many running: the one whose last claim is older; her next study
        b1.id,
        a3.id,
        b1.id,
        a1.id,
        b1.id,
    ]

    # Finishing each slot at once (running counts stay equal): still alternating, and
    # Alice's turns go round her studies by today's rule: fewest running (a1 holds two),
    # then least recently claimed.
    owner_of = {a1.id: "alice", a2.id: "alice", a3.id: "alice", b1.id: "bob"}
    order = []
    for i in range(6):
        lease = queue.claim_trial_slot(session_factory, "w", now=_at(30 + i))
        assert lease is not None
        order.append(lease.job_id)
        queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(30 + i))
    assert [owner_of[job_id] for job_id in order] == ["alice", "bob"] * 3
    assert order[0::2] == [a2.id, a3.id, a2.id]


def test_a_principals_last_claim_counts_its_ended_studies(
    session_factory: sessionmaker[Session],
) -> None:
    """A stream of one-trial studies does not starve another principal's long study: each
    new study of Alice's has never been claimed, but Alice has."""
    long = _owned_job(session_factory, "bob", "long", 10, T0)
    order = []
    for i in range(3):
        short = _owned_job(session_factory, "alice", f"short{i}", 1, _at(10 * i + 1))
        for step in (2, 3):
            lease = queue.claim_trial_slot(session_factory, "w", now=_at(10 * i + step))
            assert lease is not None
            order.append(lease.job_id)
            queue.finish_trial_slot(session_factory, lease.id, "complete", now=_at(10 * i + step))
        assert queue.get_job(session_factory, short.id).state is JobState.SUCCEEDED
        assert order[-2:] == [long.id, short.id]
    assert len(order) == 6


def test_a_principal_at_its_quota_of_running_trials_is_skipped(
    session_factory: sessionmaker[Session],
) -> None:
    a1 = _owned_job(session_factory, "alice", "a1", 5, _at(1))
    a2 = _owned_job(session_factory, "alice", "a2", 5, _at(2))
    b1 = _owned_job(session_factory, "bob", "b1", 5, _at(3))

    def claim(seconds: float) -> queue.Lease | None:
        return queue.claim_trial_slot(
            session_factory, "w", max_running_per_owner=2, now=_at(seconds)
        )

    held = [claim(10 + i) for i in range(4)]
    assert [lease.job_id for lease in held if lease] == [a1.id, b1.id, a2.id, b1.id]
    assert claim(20) is None  # both at 2 running: their work waits
    # The quota is the claim's argument: without it, the same queue serves.
    extra = queue.claim_trial_slot(session_factory, "w", now=_at(21))
    assert extra is not None and extra.job_id == a1.id

    # Alice is at 3, Bob at 2: one of Alice's trials ends, she is still at the quota.
    first_a1 = held[0]
    assert first_a1 is not None
    queue.finish_trial_slot(session_factory, first_a1.id, "complete", now=_at(22))
    assert claim(23) is None
    queue.finish_trial_slot(session_factory, extra.id, "complete", now=_at(24))
    lease = claim(25)
    assert lease is not None and lease.job_id == a1.id  # Alice at 1; Bob still at 2
    assert claim(26) is None

    # A cancelled study's running trial still counts: cancelling frees nothing until it ends.
    queue.cancel_job(session_factory, a2.id, now=_at(27))
    a2_lease = held[2]
    assert a2_lease is not None
    assert claim(28) is None
    queue.finish_trial_slot(session_factory, a2_lease.id, "complete", now=_at(29))
    lease = claim(30)
    assert lease is not None and lease.job_id == a1.id
    with pytest.raises(ValueError, match="max_running_per_owner"):
        queue.claim_trial_slot(session_factory, "w", max_running_per_owner=0)


def test_claims_racing_for_one_principal_keep_its_quota(migrated_db_url: str) -> None:
    """Idle workers woken together (a NOTIFY wakes them all at once) and one principal's
    study: however the claims interleave, that principal gets no more than its quota."""
    engine = make_engine(migrated_db_url, pool_size=8)
    sm = make_session_factory(engine)
    try:
        alice = [_owned_job(sm, "alice", f"a{i}", 50, _at(i)) for i in range(2)]
        start = threading.Barrier(8)
        claimed: list[queue.Lease | None] = []

        def claim() -> None:
            start.wait(timeout=30)
            claimed.append(queue.claim_trial_slot(sm, "w", max_running_per_owner=3))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(claimed) == 8
        leases = [lease for lease in claimed if lease is not None]
        assert len(leases) == 3
        assert {lease.job_id for lease in leases} <= {job.id for job in alice}
        assert sum(queue.get_job(sm, job.id).n_running for job in alice) == 3
    finally:
        engine.dispose()


def test_count_active_jobs_counts_queued_and_running(
    session_factory: sessionmaker[Session],
) -> None:
    done = _owned_job(session_factory, "alice", "done", 1, _at(1))
    running = _owned_job(session_factory, "alice", "running", 2, _at(2))
    first = queue.claim_trial_slot(session_factory, "w", now=_at(3))
    second = queue.claim_trial_slot(session_factory, "w", now=_at(4))
    assert first is not None and first.job_id == done.id
    assert second is not None and second.job_id == running.id
    queue.finish_trial_slot(session_factory, first.id, "complete", now=_at(5))
    queued = _owned_job(session_factory, "alice", "queued", 2, _at(6))
    cancelled = _owned_job(session_factory, "alice", "cancelled", 2, _at(7))
    queue.cancel_job(session_factory, cancelled.id)
    _owned_job(session_factory, "bob", "bobs", 1, _at(8))

    states = {job.name: job.state for job in queue.list_jobs(session_factory, owner="alice")[0]}
    assert states == {
        "done": JobState.SUCCEEDED,
        "running": JobState.RUNNING,
        "queued": JobState.QUEUED,
        "cancelled": JobState.CANCELLED,
    }
    assert queued.state is JobState.QUEUED
    assert queue.count_active_jobs(session_factory, "alice") == 2
    assert queue.count_active_jobs(session_factory, "bob") == 1
    assert queue.count_active_jobs(session_factory, "carol") == 0
