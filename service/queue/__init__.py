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
(``sql/claim.sql``, ``sql/finish.sql``): the server releases the job row's lock when the
statement ends, never after another client round trip, so many workers do not queue
behind a lock holder that waits for a CPU. On SQLite the engine opens every transaction
with ``BEGIN IMMEDIATE`` (:func:`service.db.make_engine`), which serialises writers; there
claim and finish are ORM transactions with the same semantics (the contract tests run on
both).

Fair share: when several principals (job owners) have claimable work, consecutive claims
alternate between them (fewest running leases first, then the oldest last claim), then
between the chosen principal's studies (fewest running, least recently claimed, oldest).
``claim_trial_slot(..., max_running_per_owner=n)`` skips a principal that has ``n``
running leases; its work waits while others are served. One rule, written once per
backend: :func:`service.queue._sqlite.pick_job` and ``sql/claim.sql``.

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

Preemption (the worker was told to stop: SIGTERM, SIGUSR1) uses the same path from the
worker's side: it FAILs its trial, enqueues the WAITING copy, and
:func:`preempt_trial_slot` requeues the slot at once (no heartbeat grace) as ``preempted``;
the claim that takes it over keeps its ``attempt``, so preemptions never use up
``study.max_retries``.

Extending a job (:func:`extend_job`) raises ``n_trials`` under the job's lock, so the
claim's ``n_running + n_finished < n_trials`` sees the new total at once; an ended job
becomes queued again, with a fresh deadline when it has a timeout.

Functions take a ``sessionmaker`` (or an ``Engine``) and plain values and return frozen
dataclasses, never ORM rows. Pass ``now`` (timezone-aware) to control time in tests.

Layout: this module is the one public interface (callers write ``from service import
queue``). What differs per backend (claim, finish, the idle wait) is a
:class:`~service.queue._backend.Backend`, chosen once per engine: ``_sqlite.py`` (ORM
transactions) and ``_postgres.py`` (the named SQL in ``sql/``). Written once for both:
``jobs.py``, ``leases.py``, ``workers.py`` (the registry), ``listen.py`` (NOTIFY / LISTEN),
``_rules.py`` (the job lock and when a job ends), ``_plumbing.py`` (transactions) and
``_records.py`` (the records returned).
"""

from __future__ import annotations

from service.queue._records import (
    ALL_FAILED_ERROR,
    MAX_DEADLINE_S,
    NONE_COMPLETED_ERROR,
    REAPED_REASON,
    TIMED_OUT_ERROR,
    CreatedJob,
    FinishOutcome,
    JobCounts,
    JobRecord,
    Lease,
    LeaseRecord,
    SessionSource,
    StaleCandidate,
    StaleLease,
    WorkerRecord,
)
from service.queue.jobs import (
    cancel_job,
    count_active_jobs,
    create_job,
    delete_job,
    end_expired_jobs,
    extend_job,
    fail_job,
    find_job,
    get_job,
    list_jobs,
)
from service.queue.leases import (
    attach_trial,
    attach_trial_on,
    claim_trial_slot,
    finish_trial_slot,
    heartbeat,
    list_leases,
    preempt_trial_slot,
    reap_stale_lease,
    stale_leases,
    wait_for_work,
)
from service.queue.listen import WORK_CHANNEL
from service.queue.workers import list_workers, register_worker, worker_heartbeat
from service.states import JobState, LeaseState

__all__ = [
    "ALL_FAILED_ERROR",
    "MAX_DEADLINE_S",
    "NONE_COMPLETED_ERROR",
    "REAPED_REASON",
    "TIMED_OUT_ERROR",
    "WORK_CHANNEL",
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
    "attach_trial_on",
    "cancel_job",
    "claim_trial_slot",
    "count_active_jobs",
    "create_job",
    "delete_job",
    "end_expired_jobs",
    "extend_job",
    "fail_job",
    "find_job",
    "finish_trial_slot",
    "get_job",
    "heartbeat",
    "list_jobs",
    "list_leases",
    "list_workers",
    "preempt_trial_slot",
    "reap_stale_lease",
    "register_worker",
    "stale_leases",
    "wait_for_work",
    "worker_heartbeat",
]
