"""The worker loop: claim one trial slot -> run it -> tell the result -> finish the slot.

One process trains one trial at a time on one device. ``run_worker_processes`` starts N
such processes and restarts one that crashes hard (bounded).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar

import optuna
from optuna.study._tell import _tell_with_warning
from optuna.trial import TrialState

from service import queue
from service.artifacts import CheckpointStore, open_artifact_store
from service.data_checks import in_user_terms
from service.db import is_outage, is_sqlite, make_engine, make_session_factory
from service.errors import (
    DatabaseUnusable,
    JobCannotRun,
    LeaseLost,
    LstmHpoError,
    SingleHostOnly,
    TrialPreempted,
    trial_timeout_reason,
)
from service.logs import add_log_fields, configure_logging, log_context
from service.migrate import wait_for_schema
from service.reaper import enqueue_retry_copy
from service.search_space import STORED_SPEC_LIMITS, StudySpec, parse_spec
from service.states import ENQUEUED_ATTR, FAILURE_ATTR, PREEMPTED_ATTR, TrialOutcome
from service.studies import NOT_RUN_REASON, fail_waiting_trial, optuna_storage
from service.training.interrupts import PreemptNotice, TrialGuard
from service.training.objective import (
    NonFiniteMetric,
    TrialCheckpoints,
    build_pruner,
    build_sampler,
    objective_values,
    original_trial_number,
    run_trial,
    trial_seed,
)
from service.worker_storage import WorkerStorage

log = logging.getLogger("lstm_hpo.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """Everything a worker process needs; plain values so it pickles into a child process."""

    database_url: str
    data_roots: tuple[Path, ...] | None = None
    heartbeat_interval_s: float = 10.0
    poll_interval_s: float = 1.0
    torch_threads: int = 1
    accelerator: str = "auto"
    #: Stop after this many trials (None: run until stopped).
    max_trials: int | None = None
    #: Stop after this long without claimable work (None: wait forever).
    idle_exit_s: float | None = None
    #: How long to wait for the server to create the schema.
    schema_timeout_s: float = 300.0
    #: How long one database step is retried while the database is unreachable.
    db_retry_s: float = 600.0
    #: This worker's memory for one trial in GB (``LSTM_HPO_WORKER_MEMORY_GB``): a trial
    #: whose config is estimated to need more is pruned untrained. None: no check.
    worker_memory_gb: float | None = None
    #: Skip principals that already run this many trials (``LSTM_HPO_MAX_RUNNING_TRIALS``);
    #: None: no quota. Every worker should use the same value: the claim applies it.
    max_running_per_owner: int | None = None
    #: Where trials keep their per-epoch checkpoints: ``LSTM_HPO_ARTIFACTS_URL`` (s3://...)
    #: or, when it is None, ``<artifacts_data_dir>/artifacts``. Both None: no checkpoints.
    artifacts_url: str | None = None
    artifacts_data_dir: Path | None = None
    #: ``LSTM_HPO_PREEMPT_GRACE_S``: after SIGTERM / SIGUSR1, how long the running trial may
    #: go on towards its epoch's end before it stops at the next batch.
    preempt_grace_s: float = 20.0
    #: ``LSTM_HPO_TRIAL_KILL_GRACE_S``: how long past ``study.trial_timeout_s`` the
    #: supervisor waits for a trial to reach a step boundary before it kills the process.
    trial_kill_grace_s: float = 60.0
    #: What this process trains on, for the worker registry and ``/metrics`` (``gpu 0``,
    #: ``cpu``; ``ProcessPlan.device``).
    device: str | None = None
    #: ``LSTM_HPO_LOG_FORMAT``: ``text`` or ``json`` lines (``service.logs``).
    log_format: str = "text"


Outcome = Literal["complete", "pruned", "failed"]
#: What running one slot came to: its outcome, or ``preempted`` (the slot was requeued).
SlotResult = Outcome | Literal["preempted"]


_T = TypeVar("_T")

#: How many jobs' parsed spec and loaded study a worker keeps between trials.
JOB_CACHE_SIZE = 8

#: A worker process's libpq ``application_name`` is this prefix + its pid: how
#: ``pg_stat_activity`` (and the scaling bench and claim-race test) tell its connections.
WORKER_APP_PREFIX = "lstm-hpo-worker:"


@dataclass(frozen=True)
class _JobContext:
    """What a worker keeps per job between trials: the spec as claimed, validated once, and
    the Optuna study loaded once. The study's storage wrapper (Optuna's ``_CachedStorage``,
    the one ``study.optimize`` uses) keeps finished trials, which never change, and re-reads
    only unfinished and newer ones; a study loaded per trial read every trial on every ask.
    As with ``study.optimize`` in several processes, a trial that commits after a newer one
    already finished is missed by this cache (a window of milliseconds)."""

    raw_spec: dict[str, Any]
    spec: StudySpec
    study: _LeaseStudy


class _LeaseStudy(optuna.Study):
    """A study whose ``ask()`` runs exactly the trial the claimed slot names.

    A fresh slot (``pop_trial_id`` None) always creates a new trial. Optuna's ``ask()``
    would first look for a WAITING trial, syncing its trial cache, which re-reads every
    RUNNING trial of every worker (work that grows with the fleet: skipping it took a
    worker's CPU per trial at 64 workers from ~90 to ~50 ms), and it could take a retry's
    parameters. A retry slot pops the one WAITING trial the reaper enqueued for it (the
    claim hands over its id): never a fresh trial, never another retry's. Overrides
    ``Study._pop_waiting_trial_id`` (private; optuna is pinned to 5.x and
    tests/integration/test_worker_ask.py checks the behaviour).
    """

    #: The WAITING trial the next ``ask()`` must run; None for a new trial.
    pop_trial_id: int | None = None
    #: The job's spec enqueues configurations (``study.enqueue``) that may still wait: a
    #: fresh slot runs the first of them before the sampler proposes anything.
    enqueued_pending: bool = False

    def _pop_waiting_trial_id(self) -> int | None:
        trial_id = self.pop_trial_id
        if trial_id is None:
            return self._pop_enqueued() if self.enqueued_pending else None
        # Optuna's own pop reads the WAITING trials first; that read also registers them
        # in the cached storage, which later calls (set_trial_param) look them up in.
        self._storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.WAITING,))
        try:
            # WAITING -> RUNNING, atomically: False (or an error) when it is not WAITING.
            popped = self._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            popped = False
        if not popped:
            raise RetryTrialGone(trial_id)
        return trial_id

    def _pop_enqueued(self) -> int | None:
        """The first WAITING trial ``study.enqueue`` put in (by number: the spec's order),
        moved to RUNNING; None once none waits (remembered: only a submit enqueues). Retry
        copies never carry :data:`ENQUEUED_ATTR`, so a fresh slot never takes a retry's."""
        waiting = self._storage.get_all_trials(
            self._study_id, deepcopy=False, states=(TrialState.WAITING,)
        )
        for trial in sorted(waiting, key=lambda t: t.number):
            if trial.user_attrs.get(ENQUEUED_ATTR) is not True:
                continue
            try:  # WAITING -> RUNNING, atomically: False when another worker took it first
                if self._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # failed "not run" by the reaper's sweep meanwhile
        self.enqueued_pending = False
        return None


class RetryTrialGone(LstmHpoError):
    """The WAITING trial a retry slot names was no longer waiting (failed by the reaper's
    sweep after its study ended, or run by another process)."""

    def __init__(self, trial_id: int) -> None:
        super().__init__(f"the retry's Optuna trial (id {trial_id}) is no longer waiting")


class _Heartbeat(threading.Thread):
    """Keeps the current lease (and the worker's row) alive while a trial runs; notices
    when the reaper took the lease back.

    While the worker is idle it beats nothing: the idle loop beats its worker row itself
    between waits. Both use the process's one pooled connection for our tables, and
    Python's locks are not fair, so a thread that waits for it while the loop releases and
    re-takes it every second can starve past the pool's timeout.
    """

    def __init__(self, sessions: queue.SessionSource, worker_id: str, interval_s: float) -> None:
        super().__init__(name="lstm-hpo-heartbeat", daemon=True)
        self.sessions = sessions
        self.worker_id = worker_id
        self.interval_s = interval_s
        #: The running lease as (id, claimed_at): ids alone can repeat (SQLite reuses the
        #: largest row id after a study's leases are deleted).
        self.lease: tuple[int, datetime] | None = None
        self.lost: set[tuple[int, datetime]] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            lease = self.lease
            if lease is None:
                continue
            try:
                if queue.heartbeat(self.sessions, [lease[0]]):
                    self.lost.add(lease)
                queue.worker_heartbeat(self.sessions, self.worker_id)
            except LstmHpoError as err:  # database briefly away: beat again next period
                log.warning("heartbeat failed (%s); retrying in %.0fs", err, self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()


class TrialWatch:
    """What a worker process tells its supervisor about the trial it runs, in shared memory
    (``multiprocessing.Array``): lease id, Optuna trial id, start (``time.time()``) and
    ``study.trial_timeout_s``; all 0 when no time-limited trial runs. The supervisor kills
    a process whose trial is ``trial_kill_grace_s`` past its limit (hung inside a step,
    where the trial's own check never runs) and records the failure."""

    FIELDS = 4

    def __init__(self, array: Any) -> None:
        self.array = array

    def start(self, lease_id: int, trial_id: int, timeout_s: float) -> None:
        with self.array.get_lock():
            self.array[:] = [float(lease_id), float(trial_id), time.time(), timeout_s]

    def clear(self) -> None:
        with self.array.get_lock():
            self.array[:] = [0.0] * self.FIELDS

    def overdue(self, grace_s: float, now: float) -> tuple[int, int, float] | None:
        """``(lease_id, trial_id, timeout_s)`` when the trial is ``grace_s`` past its limit."""
        with self.array.get_lock():
            lease_id, trial_id, started, timeout_s = self.array[:]
        if timeout_s <= 0 or now < started + timeout_s + grace_s:
            return None
        return int(lease_id), int(trial_id), timeout_s


class Worker:
    """One worker process's state: its connections, its id and its stop flag."""

    def __init__(
        self, options: WorkerOptions, worker_id: str | None = None, watch: TrialWatch | None = None
    ) -> None:
        self.options = options
        self.watch = watch
        #: Set by SIGTERM / SIGUSR1 (:func:`worker_main`): the running trial checkpoints and
        #: gives its slot back; the loop then ends.
        self.preempt_notice: PreemptNotice | None = None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # One connection for our tables and one for Optuna's: two per worker process.
        engine = make_engine(options.database_url, pool_size=1, max_overflow=0)
        self.sessions = make_session_factory(engine)
        self.engine = engine
        self.storage: WorkerStorage | None = None
        self.stopping = False
        self._jobs: OrderedDict[str, _JobContext] = OrderedDict()
        self.checkpoints: CheckpointStore | None = None
        if options.artifacts_url is not None or options.artifacts_data_dir is not None:
            self.checkpoints = open_artifact_store(
                options.artifacts_url, options.artifacts_data_dir or Path(".")
            )

    def start(self) -> bool:
        """Wait for the schema (workers never run DDL) and register; False when a stop
        signal came while waiting."""
        if not wait_for_schema(
            self.engine,
            timeout_s=self.options.schema_timeout_s,
            stopping=lambda: self.stopping,
        ):
            return False
        check_single_host(self.sessions, self.options)
        storage = self._db(
            "connect to Optuna's storage",
            lambda: optuna_storage(
                self.options.database_url, pool_size=1, worker=True, storage_class=WorkerStorage
            ),
        )
        assert isinstance(storage, WorkerStorage)
        self.storage = storage
        self._db(
            "register",
            lambda: queue.register_worker(
                self.sessions,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                device=self.options.device,
            ),
        )
        return True

    def _db(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one database step, retrying while the database is unreachable.

        Bounded by ``options.db_retry_s``: past that the error propagates (the process
        exits, its supervisor restarts it, and the reaper retries its trial). Every step
        retried this way is idempotent or checked on retry (see ``_tell``).
        """
        deadline = time.monotonic() + self.options.db_retry_s
        delay = 0.5
        while True:
            try:
                return call()
            except Exception as err:
                if not is_outage(err) or time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "%s: database unavailable (%s); retrying in %.1fs",
                    what,
                    str(err).splitlines()[0][:200],
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)  # backoff: a restarting server needs seconds

    def run(self) -> int:
        """Claim and run trials until stopped; returns how many trials this worker ran."""
        if not self.start():
            return 0
        beat = _Heartbeat(self.sessions, self.worker_id, self.options.heartbeat_interval_s)
        beat.start()
        done = 0
        idle_since = last_beat = time.monotonic()
        try:
            while not self.stopping:
                if self.options.max_trials is not None and done >= self.options.max_trials:
                    break
                lease = self._claim()
                if lease is None:
                    now = time.monotonic()
                    idle_exit_s = self.options.idle_exit_s
                    if idle_exit_s is not None and now - idle_since >= idle_exit_s:
                        break
                    if now - last_beat >= self.options.heartbeat_interval_s:
                        self._db(
                            "heartbeat",
                            lambda: queue.worker_heartbeat(self.sessions, self.worker_id),
                        )
                        last_beat = now
                    # PostgreSQL: woken by the NOTIFY of a new job or retry; else a poll.
                    self._db("wait for work", self._wait_for_work)
                    continue
                beat.lease = (lease.id, lease.claimed_at)
                try:
                    with log_context(study_id=lease.job_id, worker_id=self.worker_id):
                        self.run_lease(lease, beat)
                finally:
                    beat.lease = None
                    beat.lost.clear()  # only the lease that just ended can be in it
                done += 1
                idle_since = last_beat = time.monotonic()
        finally:
            beat.stop()
        return done

    def _claim(self) -> queue.Lease | None:
        """The next slot, or None. An error that is not the database's (a bug, a row the
        claim cannot read) is logged and treated as an empty queue for one poll interval:
        it must not end the process, which serves every other study."""
        try:
            return self._db(
                "claim",
                lambda: queue.claim_trial_slot(
                    self.sessions,
                    self.worker_id,
                    max_running_per_owner=self.options.max_running_per_owner,
                ),
            )
        except Exception as err:
            if is_outage(err):
                raise
            log.exception("claim failed; trying again in %.1fs", self.options.poll_interval_s)
            time.sleep(self.options.poll_interval_s)
            return None

    def _wait_for_work(self) -> bool:
        wait_s = min(self.options.poll_interval_s, self.options.heartbeat_interval_s / 2)
        return queue.wait_for_work(self.sessions, wait_s)

    def run_lease(self, lease: queue.Lease, beat: _Heartbeat) -> SlotResult | None:
        """Run the trial of one claimed slot and record it. None when the result was rejected.

        Whatever the job's spec, data or Optuna state does, this returns (only a database
        outage past ``db_retry_s`` propagates): an error before a trial exists ends the job
        as ``failed`` with the cause (:meth:`_fail_job`); an error while training FAILs the
        trial with the reason; an error while recording is logged and the slot finished.
        """
        try:
            spec, study, trial = self._start_trial(lease)
        except Exception as err:
            if is_outage(err):
                raise
            if isinstance(err, RetryTrialGone):
                self._finish_slot(lease, "failed", err.message)
            else:
                self._fail_job(lease, err)
            return None
        if trial is None:
            return None
        try:
            return self._train_and_record(lease, beat, spec, study, trial)
        except Exception as err:  # recording failed (e.g. the study was deleted meanwhile)
            if is_outage(err):
                raise
            reason = (
                "its study was deleted while the trial ran"
                if isinstance(err, KeyError)  # Optuna: "Record does not exist."
                else f"could not record the result: {_failure_reason(err)}"
            )
            log.warning("trial %d of %s: %s", trial.number, lease.optuna_study_name, reason)
            self._finish_slot(lease, "failed", reason)
            return None

    def _start_trial(
        self, lease: queue.Lease
    ) -> tuple[StudySpec, optuna.Study, optuna.Trial | None]:
        """Load the job's study, build its sampler and pruner, ask and attach the trial."""
        spec, study = self._db("load the study", lambda: self._job_study(lease))
        # A new sampler and pruner per slot, as ever: the sampler seeded from the slot.
        study.sampler = build_sampler(spec, trial_seed(spec, lease.id))
        study.pruner = build_pruner(spec)
        study.pop_trial_id = lease.retry_trial_id
        # A fresh trial is attached to the lease in the transaction that creates it; a
        # popped one (a retry's, an enqueued configuration) is attached after the ask. A
        # trial whose ask() reply was lost stays RUNNING unattached: the reaper fails
        # such orphans after the grace period.
        assert self.storage is not None
        storage = self.storage
        storage.lease_id, storage.attached_trial_id = lease.id, None
        try:
            trial = self._db("ask", study.ask)
        except LeaseLost:  # cancelled or reaped since the claim: no trial was created
            return spec, study, None
        finally:
            storage.lease_id = None
        if trial._trial_id != storage.attached_trial_id:
            try:
                self._db(
                    "attach",
                    lambda: queue.attach_trial(
                        self.sessions,
                        lease.id,
                        optuna_trial_id=trial._trial_id,
                        trial_number=trial.number,
                    ),
                )
            except LeaseLost:
                # Cancelled or reaped between claim and ask: give the trial back as failed.
                self._tell(study, trial, TrialState.FAIL, None)
                return spec, study, None
        if lease.retry_of is not None:
            log.info(
                "trial %d of %s: retry of trial %s (attempt %d), same parameters",
                trial.number,
                lease.optuna_study_name,
                lease.retry_of_trial_number,
                lease.attempt,
            )
        return spec, study, trial

    def _train_and_record(
        self,
        lease: queue.Lease,
        beat: _Heartbeat,
        spec: StudySpec,
        study: optuna.Study,
        trial: optuna.Trial,
    ) -> SlotResult | None:
        add_log_fields(trial_number=trial.number)
        log.info("trial %d of %s: start", trial.number, lease.optuna_study_name)
        timeout_s = spec.study.trial_timeout_s
        guard = TrialGuard(notice=lambda: self.preempt_notice, timeout_s=timeout_s)
        if self.watch is not None and timeout_s is not None:
            self.watch.start(lease.id, trial._trial_id, timeout_s)
        try:
            return self._run_and_record(lease, beat, spec, study, trial, guard=guard)
        finally:
            if self.watch is not None:
                self.watch.clear()

    def _run_and_record(
        self,
        lease: queue.Lease,
        beat: _Heartbeat,
        spec: StudySpec,
        study: optuna.Study,
        trial: optuna.Trial,
        *,
        guard: TrialGuard,
    ) -> SlotResult | None:
        outcome: Outcome
        value: float | None = None
        values: list[float] | None = None
        reason: str | None = None
        checkpoints: TrialCheckpoints | None = None
        if self.checkpoints is not None:

            def check_owned() -> None:
                # A reaped trial stops at its next epoch end: its result would be rejected,
                # and its checkpoints must not overwrite those of the retry that replaced it.
                if (lease.id, lease.claimed_at) in beat.lost:
                    raise LeaseLost("the trial's lease was reaped; it stops")

            checkpoints = TrialCheckpoints(self.checkpoints, lease.job_id, check_owned)
        assert isinstance(self.storage, WorkerStorage)
        storage = self.storage
        try:
            # A database restart while the trial trains is waited out at its next report
            # (or pruner read), bounded by db_retry_s: it does not fail the trial.
            storage.outage_retry = self._db
            try:
                value = run_trial(
                    trial,
                    spec,
                    data_roots=self.options.data_roots,
                    accelerator=self.options.accelerator,
                    worker_memory_gb=self.options.worker_memory_gb,
                    checkpoints=checkpoints,
                    guard=guard,
                    on_configured=lambda: self._publish_setup(trial),
                )
            finally:
                storage.outage_retry = None
            values = objective_values(spec, value, trial)
            if all(map(math.isfinite, values)):
                outcome = "complete"
            else:
                outcome, reason = "failed", f"metric is {value}"
        except optuna.TrialPruned as pruned:
            outcome = "pruned"
            reason = str(pruned) or None
        except TrialPreempted as preempted:
            if (lease.id, lease.claimed_at) in beat.lost:
                return None
            return self._give_back_preempted(lease, study, trial, preempted)
        except Exception as err:  # any training error: record it, keep the worker alive
            outcome, reason = "failed", _failure_reason(err)
            user_path = getattr(spec.task, "path", None)
            if user_path is not None:  # users read it: not the server's directories
                reason = in_user_terms(reason, user_path, self.options.data_roots)
        if (lease.id, lease.claimed_at) in beat.lost:
            log.warning(
                "trial %d of %s: result rejected, the lease was reaped (%s)",
                trial.number,
                lease.optuna_study_name,
                outcome,
            )
            return None
        if reason is not None:
            self._db(
                "record the failure reason",
                lambda: trial.set_user_attr(FAILURE_ATTR, reason[:2000]),
            )
        state = TrialState[TrialOutcome(outcome).optuna_name]
        if not self._tell(study, trial, state, values):
            log.warning("trial %d: result rejected, the reaper failed it meanwhile", trial.number)
            return None
        if not self._finish_slot(lease, outcome, reason):
            log.warning("trial %d: slot was reaped before the result arrived", trial.number)
            return None
        if checkpoints is not None:
            self._drop_resume_checkpoint(lease, trial)
        log.info(
            "trial %d of %s: %s%s",
            trial.number,
            lease.optuna_study_name,
            outcome,
            f" value={value:.6g}" if outcome == "complete" and value is not None else "",
        )
        return outcome

    def _publish_setup(self, trial: optuna.Trial) -> None:
        """Store the trial's parameters and set-up attributes in one transaction, before
        it trains: from here the dashboard and other workers' samplers see them."""
        assert isinstance(self.storage, WorkerStorage)
        self.storage.publish_setup(trial._trial_id)

    def _give_back_preempted(
        self, lease: queue.Lease, study: optuna.Study, trial: optuna.Trial, err: TrialPreempted
    ) -> SlotResult | None:
        """Preemption is not failure: FAIL the trial with the reason (what the dashboard
        shows), enqueue its WAITING copy (same params; it resumes from the chain's last
        checkpoint), and requeue the slot at once without using a retry
        (:func:`queue.preempt_trial_slot`). The order is the reaper's, so a worker killed
        half-way is completed by it (see :mod:`service.reaper`)."""
        assert self.storage is not None
        storage = self.storage

        def mark() -> None:
            trial.set_user_attr(PREEMPTED_ATTR, err.signal_name)
            trial.set_user_attr(FAILURE_ATTR, err.message)

        self._db("mark the trial preempted", mark)
        if not self._tell(study, trial, TrialState.FAIL, None):
            return None  # the reaper took it meanwhile, and retries it
        lost = self._db("read the trial", lambda: storage.get_trial(trial._trial_id))
        copy_id = self._db(
            "enqueue the retry", lambda: enqueue_retry_copy(storage, study._study_id, lost)
        )
        try:
            requeued = self._db(
                "requeue the slot",
                lambda: queue.preempt_trial_slot(
                    self.sessions, lease.id, retry_trial_id=copy_id, reason=err.message
                ),
            )
        except LeaseLost:
            requeued = False
        if not requeued:  # the study ended or was cancelled meanwhile: nothing will run it
            self._db(
                "fail the unused retry",
                lambda: fail_waiting_trial(storage, copy_id, NOT_RUN_REASON),
            )
        log.info(
            "trial %d of %s: %s%s",
            trial.number,
            lease.optuna_study_name,
            err.message,
            "; its slot is requeued" if requeued else "; the study no longer needs it",
        )
        return "preempted"

    def _drop_resume_checkpoint(self, lease: queue.Lease, trial: optuna.Trial) -> None:
        """Remove the trial's ``last`` checkpoint once its result is recorded: nothing will
        resume it. Its ``best`` stays until the study ends (``study.keep_checkpoints``)."""
        assert self.checkpoints is not None
        try:
            number = original_trial_number(trial)
            self.checkpoints.remove(lease.job_id, [number], kinds=("last",))
        except Exception as err:  # a leftover is removed when the study ends
            log.warning("trial %d: could not remove its resume checkpoint: %s", trial.number, err)

    def _finish_slot(self, lease: queue.Lease, outcome: Outcome, reason: str | None) -> bool:
        """Finish the slot; False when it is no longer ours (reaped, cancelled, deleted)."""
        try:
            self._db(
                "finish the slot",
                lambda: queue.finish_trial_slot(
                    self.sessions, lease.id, outcome, reason, job_id=lease.job_id
                ),
            )
        except LeaseLost:
            return False
        return True

    def _fail_job(self, lease: queue.Lease, err: Exception) -> None:
        """The job itself cannot run (its spec no longer parses, its Optuna study is gone,
        its sampler cannot be built or asked): end it ``failed`` with the cause, give the
        slot back as failed, and go on with other jobs."""
        cause = err.message if isinstance(err, LstmHpoError) else _failure_reason(err)
        reason = f"{JobCannotRun.default_message()} {cause}"
        log.error(
            "study %s (job %s) failed: %s",
            lease.optuna_study_name,
            lease.job_id,
            reason,
            # Our own errors say why; anything else is unexpected: its traceback is the clue.
            exc_info=None if isinstance(err, LstmHpoError) else err,
        )
        self._jobs.pop(lease.job_id, None)
        self._db("fail the job", lambda: queue.fail_job(self.sessions, lease.job_id, reason))
        self._finish_slot(lease, "failed", reason)

    def _tell(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> bool:
        """Tell Optuna the result, retrying while the database is away; idempotent.

        True when the trial ends in ``state`` (told now, or by an earlier attempt whose
        reply was lost); False when something else finished it first (the reaper).
        """
        assert self.storage is not None
        storage = self.storage
        attempts = 0

        def tell() -> bool:
            nonlocal attempts
            attempts += 1
            # Only a retry reads first (a full trial load): the attempt before it may have
            # committed and lost its reply. A first attempt that finds the trial finished
            # (by the reaper) is refused by Optuna and reads it below.
            if attempts > 1:
                recorded = storage.get_trial(trial._trial_id).state
                if recorded.is_finished():
                    return recorded == state
            try:
                # Study.tell without the deep copy of the told trial that it returns (a
                # trial holding its config: ~1 ms of a worker's CPU per trial). Private,
                # as _pop_waiting_trial_id above (optuna is pinned to 5.x; the import
                # fails loudly should a release drop it).
                complete = state == TrialState.COMPLETE
                _tell_with_warning(
                    study=study,
                    trial=trial,
                    value_or_values=values if complete else None,
                    state=None if complete else state,  # as study.tell(trial, values)
                )
            except (RuntimeError, ValueError):
                # Optuna refuses to tell a finished trial: the reaper (or a lost earlier
                # reply) finished it. Ours only if it ended in the state we meant.
                return storage.get_trial(trial._trial_id).state == state
            return True

        return self._db("tell", tell)

    def _job_study(self, lease: queue.Lease) -> tuple[StudySpec, _LeaseStudy]:
        """The lease's validated spec and its Optuna study, kept per job (LRU) between trials."""
        assert self.storage is not None
        context = self._jobs.pop(lease.job_id, None)
        if context is None or context.raw_spec != lease.spec:
            study = _LeaseStudy(study_name=lease.optuna_study_name, storage=self.storage)
            spec = parse_spec(lease.spec, STORED_SPEC_LIMITS)
            study.enqueued_pending = bool(spec.study.enqueue)
            context = _JobContext(dict(lease.spec), spec, study)
        self._jobs[lease.job_id] = context
        while len(self._jobs) > JOB_CACHE_SIZE:
            self._jobs.popitem(last=False)
        return context.spec, context.study


#: Exit code of a worker process that must not be restarted (its configuration is wrong).
EXIT_REFUSED = 2


def check_single_host(sessions: queue.SessionSource, options: WorkerOptions) -> None:
    """Refuse a second worker host on SQLite (``SingleHostOnly``).

    A SQLite file is safe for many processes on one machine, not across machines (network
    file systems break its locking). Workers register with their hostname; one that has
    beaten recently from another host means this database is already shared.
    """
    if not is_sqlite(options.database_url):
        return
    recent = datetime.now(UTC) - timedelta(seconds=max(60.0, 3 * options.heartbeat_interval_s))
    here = socket.gethostname()
    others = {
        w.hostname for w in queue.list_workers(sessions, seen_since=recent) if w.hostname != here
    }
    if others:
        raise SingleHostOnly(
            f"SQLite is for one machine: workers on {', '.join(sorted(others))} already use "
            f"{options.database_url}. Point the server and every worker at PostgreSQL "
            "(LSTM_HPO_DATABASE_URL=postgresql+psycopg://...)."
        )


def _failure_reason(err: BaseException) -> str:
    if isinstance(err, NonFiniteMetric | LstmHpoError):  # written for people already
        return str(err)
    text = f"{type(err).__name__}: {err}".strip()
    if "out of memory" in text.lower():
        return f"out of memory: {text}"
    return text


# --------------------------------------------------------------------------------------
# Device planning: how many processes this machine runs, on which device, with how many
# torch threads. Pure functions (plus GPU discovery), so the rules are unit-tested.
# --------------------------------------------------------------------------------------

#: Accelerator names that mean "train on the one GPU this process sees".
_GPU_ACCELERATORS = frozenset({"auto", "gpu", "cuda"})
#: A GPU as ``CUDA_VISIBLE_DEVICES`` names it: an index, or a GPU / MIG UUID.
_GPU_ID = re.compile(r"^(?:\d+|(?:GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*)$")


@dataclass(frozen=True)
class ProcessPlan:
    """One worker process to start: its device and its share of the CPU."""

    slot: int
    #: The Lightning accelerator of its trials (always with ``devices=1``).
    accelerator: str
    #: torch intra-op threads; also its ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``.
    torch_threads: int
    #: ``CUDA_VISIBLE_DEVICES`` of the process: one GPU id, ``""`` (no GPU) or None (inherit).
    cuda_visible_devices: str | None = None

    @property
    def device(self) -> str:
        """``gpu <id>``, ``cpu`` or ``<accelerator>`` (inherited devices), for messages."""
        if self.cuda_visible_devices:
            return f"gpu {self.cuda_visible_devices}"
        return "cpu" if self.cuda_visible_devices == "" else self.accelerator


def parse_gpu_ids(text: str) -> list[str]:
    """GPU ids from ``0,1,2,3`` (or UUIDs); ValueError names the first bad one."""
    ids = [part.strip() for part in text.split(",")]
    for gpu in ids:
        if not gpu:
            raise ValueError(f"--devices {text!r}: empty GPU id (write e.g. 0,1,2,3)")
        if not _GPU_ID.match(gpu):
            raise ValueError(
                f"--devices {text!r}: {gpu!r} is not a GPU id; use cpu, all, auto, or GPU "
                "indices / UUIDs as CUDA_VISIBLE_DEVICES takes them (e.g. 0,1,2,3)"
            )
    duplicates = sorted({gpu for gpu in ids if ids.count(gpu) > 1})
    if duplicates:
        raise ValueError(
            f"--devices {text!r}: {', '.join(duplicates)} listed twice "
            "(for several processes per GPU use --processes)"
        )
    return ids


def detect_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this machine offers, without importing torch.

    ``CUDA_VISIBLE_DEVICES`` when it is set (``""`` or ``-1``: none; as CUDA does, the list
    ends at the first entry that is not an id), else the indices ``nvidia-smi`` lists (none
    when it is missing or fails).
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids: list[str] = []
        for part in visible.split(","):
            gpu = part.strip()
            if not _GPU_ID.match(gpu):
                break
            ids.append(gpu)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer: treat the machine as CPU-only
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def plan_worker_processes(
    devices: str | None,
    processes: int | None,
    cores: int,
    threads: int,
    *,
    accelerator: str = "auto",
    gpus: Sequence[str] = (),
) -> list[ProcessPlan]:
    """The worker processes to start on this machine.

    ``devices``:

    - GPU ids (``0,1,2,3`` or UUIDs, as ``CUDA_VISIBLE_DEVICES`` takes them): one process
      per GPU; each sees only its GPU (``CUDA_VISIBLE_DEVICES=<id>``) and trains with
      ``accelerator="gpu"``, ``devices=1``. More ``processes`` than GPUs share them
      round-robin; fewer is an error (a listed GPU would idle).
    - ``all``: every GPU in ``gpus`` (the detected ones); an error when there is none.
    - ``cpu``: no GPU (``CUDA_VISIBLE_DEVICES=""``, ``accelerator="cpu"``); ``processes``
      defaults to ``cores // threads`` and is cut to it when more would oversubscribe the
      cores (processes x threads <= cores; threads are cut to the cores).
    - None or ``auto``: ``all`` when ``gpus`` is not empty (with fewer ``processes`` than
      GPUs, the first ones), else as ``cpu`` but keeping ``accelerator`` and the inherited
      environment (``--processes N`` as it always was).

    ``processes=0`` plans nothing. Raises ValueError for bad input, saying what is wrong.
    """
    if cores < 1 or threads < 1:
        raise ValueError(f"cores ({cores}) and threads ({threads}) must be at least 1")
    if processes is not None and processes < 0:
        raise ValueError(f"--processes must be 0 or more, not {processes}")
    spec = "auto" if devices is None else devices.strip()
    mode = spec.lower()
    if mode in ("auto", "all"):
        if gpus and (mode == "all" or accelerator.lower() in _GPU_ACCELERATORS):
            ids = list(gpus)
            if processes is not None and 0 < processes < len(ids):
                if mode == "all":
                    raise ValueError(
                        f"--processes {processes} is fewer than the {len(ids)} GPUs of "
                        f"--devices all; list the GPUs to use (e.g. --devices "
                        f"{','.join(ids[: max(processes, 1)])})"
                    )
                ids = ids[:processes]
            return _gpu_plans(ids, processes, threads, accelerator)
        if mode == "all":
            raise ValueError("--devices all: no GPU found (nvidia-smi / CUDA_VISIBLE_DEVICES)")
        return _cpu_plans(processes, cores, threads, accelerator, hide_gpus=False)
    if mode == "cpu":
        if accelerator.lower() not in ("auto", "cpu"):
            raise ValueError(f"--devices cpu contradicts --accelerator {accelerator}")
        return _cpu_plans(processes, cores, threads, "cpu", hide_gpus=True)
    ids = parse_gpu_ids(spec)
    if processes is not None and 0 < processes < len(ids):
        raise ValueError(
            f"--processes {processes} is fewer than the {len(ids)} GPUs in --devices {spec}; "
            "list only the GPUs to use"
        )
    return _gpu_plans(ids, processes, threads, accelerator)


def _gpu_plans(
    ids: Sequence[str], processes: int | None, threads: int, accelerator: str
) -> list[ProcessPlan]:
    if accelerator.lower() not in _GPU_ACCELERATORS:
        raise ValueError(f"GPU devices contradict --accelerator {accelerator}")
    n = len(ids) if processes is None else processes
    # Round-robin: slot i on GPU i mod len(ids), so extra processes share GPUs evenly.
    return [
        ProcessPlan(slot, accelerator="gpu", torch_threads=threads, cuda_visible_devices=gpu)
        for slot, gpu in ((slot, ids[slot % len(ids)]) for slot in range(n))
    ]


def _cpu_plans(
    processes: int | None, cores: int, threads: int, accelerator: str, *, hide_gpus: bool
) -> list[ProcessPlan]:
    threads = min(threads, cores)
    fitted = max(1, cores // threads)
    n = fitted if processes is None else min(processes, fitted)
    return [
        ProcessPlan(
            slot=slot,
            accelerator=accelerator,
            torch_threads=threads,
            cuda_visible_devices="" if hide_gpus else None,
        )
        for slot in range(n)
    ]


def process_environment(plan: ProcessPlan | None, threads: int, pid: int) -> dict[str, str]:
    """The environment variables a worker process sets for itself, before torch is imported.

    Thread counts for torch's OpenMP / MKL pools (read once, when torch loads), the GPU it
    may see (``CUDA_DEVICE_ORDER=PCI_BUS_ID``: indices as ``nvidia-smi`` numbers them), and
    ``PGAPPNAME`` (libpq's ``application_name``): ``lstm-hpo-worker:<pid>`` in
    ``pg_stat_activity``, so an operator can count each process's connections.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PGAPPNAME": f"{WORKER_APP_PREFIX}{pid}",
    }
    if plan is not None and plan.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.cuda_visible_devices
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def configure_process(options: WorkerOptions) -> None:
    """Per-process set-up: logging and torch's thread count, without importing torch.

    A worker imports torch (seconds, hundreds of MB) only when it runs its first real trial
    (``service.training.objective``), which then applies ``OMP_NUM_THREADS``; a worker that
    runs only synthetic trials never loads it. Lightning is quietened by ``fit_config``.
    """
    configure_logging(
        options.log_format, text_format="%(asctime)s %(processName)s %(name)s: %(message)s"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the schema check's chatter
    os.environ.update(process_environment(None, options.torch_threads, os.getpid()))
    torch = sys.modules.get("torch")
    if torch is not None:  # already loaded (a worker run in-process): size its pool now
        torch.set_num_threads(options.torch_threads)
    # `kill -USR2 <pid>` prints every thread's stack to stderr: where a stuck worker waits.
    # (SIGUSR1 is Slurm's preemption notice: ``--signal=USR1@120``.)
    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, all_threads=True)


#: The signals that tell a worker to stop: SIGTERM (Kubernetes eviction, a spot notice,
#: ``docker stop``, a supervisor), SIGINT (Ctrl-C) and SIGUSR1 (Slurm ``--signal``).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)
#: A stop signal this soon after the first is the same notice delivered twice (to the
#: process group, and forwarded by the supervisor; Slurm signals every process of a
#: step), not the impatient second one that means "leave now".
SAME_NOTICE_S = 2.0
#: After the preemption grace, how long the supervisor gives a worker to FAIL its trial,
#: enqueue the retry and requeue the slot before its second signal (leave now), and as
#: long again before SIGKILL.
STOP_MARGIN_S = 8.0


def stop_deadline_s(preempt_grace_s: float) -> float:
    """Seconds from a stop signal until the supervisor has killed every worker process:
    the preemption grace, a margin to give the slot back, a second signal, a margin."""
    return preempt_grace_s + 2 * STOP_MARGIN_S


def worker_main(options: WorkerOptions, watch: TrialWatch | None = None) -> int:
    """Entry point of one worker process.

    A stop signal (:data:`STOP_SIGNALS`) is a preemption notice: the running trial goes on
    to the end of its epoch (at most ``options.preempt_grace_s``), gives its slot back
    requeued (``preempted``, not counted as a retry), and the process exits 0; an idle
    worker exits at once. A second signal (after :data:`SAME_NOTICE_S`) exits at once
    with status 1: the reaper then retries the trial from its last checkpoint.
    """
    configure_process(options)
    worker = Worker(options, watch=watch)

    def stop(signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        notice = worker.preempt_notice
        if notice is not None:
            if now < notice.received_at + SAME_NOTICE_S:
                return  # the same notice, delivered again
            raise SystemExit(1)  # leave now; the reaper retries the trial
        name = signal.Signals(signum).name
        worker.preempt_notice = PreemptNotice(name, now, now + options.preempt_grace_s)
        worker.stopping = True
        log.info(
            "%s: stopping; a running trial checkpoints and is requeued (within %.0fs)",
            name,
            options.preempt_grace_s,
        )

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        return worker.run()
    except (SingleHostOnly, DatabaseUnusable) as err:  # a restart would meet it again
        log.error("%s", err.message)
        raise SystemExit(EXIT_REFUSED) from None


def _child(
    options: WorkerOptions, plan: ProcessPlan | None = None, watch_array: Any = None
) -> None:
    """The child's target: this process's environment first, then the worker loop.

    Runs before anything in the child imports torch (``service.worker`` does not), so
    ``CUDA_VISIBLE_DEVICES`` and the thread counts are in place when a trial loads it.
    A forked child (:func:`_start_method`) first drops the supervisor's signal handlers,
    which would forward a stop to its siblings, for a fresh process's defaults.
    """
    for signum in STOP_SIGNALS:
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)
    if plan is not None:
        os.environ.update(process_environment(plan, plan.torch_threads, os.getpid()))
        options = replace(
            options,
            accelerator=plan.accelerator,
            torch_threads=plan.torch_threads,
            device=plan.device,
        )
    worker_main(options, None if watch_array is None else TrialWatch(watch_array))


def _start_method(main_thread_supervisor: bool) -> Literal["fork", "spawn"]:
    """``fork`` when the supervisor is the ``worker`` command on Linux with one thread and
    no torch loaded, else ``spawn``.

    A spawned child imports this module afresh: about 1.7 s of CPU each (SQLAlchemy,
    Optuna, pydantic), paid per process and per restart, 20 processes on a 2-core machine
    start in half a minute. A forked one inherits it. Forking is unsafe in a process with
    other threads (``serve`` runs this loop in a thread beside the server: a lock held by
    another thread stays held in the child) or with torch or CUDA initialised (PyTorch's
    multiprocessing notes), and macOS's system libraries do not support it (Python's own
    default there is spawn); the supervisor's database engine is disposed before (the
    ``worker`` command), so no connection is shared.
    """
    safe = (
        main_thread_supervisor
        and sys.platform == "linux"
        and threading.active_count() == 1
        and "torch" not in sys.modules
    )
    return "fork" if safe else "spawn"


def run_worker_processes(
    options: WorkerOptions,
    processes: int | Sequence[ProcessPlan],
    *,
    max_restarts: int = 20,
    install_signals: bool = True,
    stop_event: threading.Event | None = None,
) -> int:
    """Run worker processes; restart one that dies abnormally (bounded). Returns how many
    refused to start (:data:`EXIT_REFUSED`: a configuration a restart would meet again).

    ``processes``: a count (each process inherits the environment and uses ``options``), or
    the plans :func:`plan_worker_processes` made (device and threads per process).
    Starts them by ``fork`` where that is safe (:func:`_start_method`), else ``spawn``.

    Stopping: a stop signal (``install_signals``, the ``worker`` command) is forwarded to
    every child; ``stop_event`` (``serve``, which runs this in a thread) sends them SIGTERM.
    Each child checkpoints and requeues its trial and exits (:func:`worker_main`). A child
    still alive ``preempt_grace_s`` + :data:`STOP_MARGIN_S` later gets a second SIGTERM
    (leave now), and one alive a margin after that SIGKILL: this returns within
    :func:`stop_deadline_s`, and no worker outlives its supervisor.

    A child whose trial is ``trial_kill_grace_s`` past ``study.trial_timeout_s`` (hung
    inside a step) is killed, its trial FAILed with the time-limit reason and its slot
    finished (:func:`fail_hung_trial`), and it is restarted (not counted as a crash).
    """
    plans: list[ProcessPlan | None] = (
        [None] * processes if isinstance(processes, int) else list(processes)
    )
    ctx = (
        mp.get_context("fork")
        if _start_method(install_signals) == "fork"
        else mp.get_context("spawn")
    )
    children: dict[int, mp.process.BaseProcess] = {}
    watches = [TrialWatch(ctx.Array("d", TrialWatch.FIELDS)) for _ in plans]
    restarts = refused = 0
    stop_requested_at: float | None = None
    escalated = 0  # 1: second SIGTERM sent; 2: SIGKILL sent

    def start(slot: int) -> None:
        watches[slot].clear()
        proc = ctx.Process(
            target=_child,
            args=(options, plans[slot], watches[slot].array),
            name=f"worker-{slot}",
            daemon=False,
        )
        proc.start()
        children[slot] = proc

    def signal_children(signum: int) -> None:
        for proc in children.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested_at
        if stop_requested_at is None:
            stop_requested_at = time.monotonic()
        signal_children(signum)  # a repeat is the children's "leave now" (SAME_NOTICE_S)

    if install_signals:  # only the main thread may; `serve` runs this loop in a thread
        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)
    for slot in range(len(plans)):
        start(slot)
    margin = options.preempt_grace_s + STOP_MARGIN_S
    while children:
        time.sleep(0.5)
        now = time.monotonic()
        if stop_event is not None and stop_event.is_set() and stop_requested_at is None:
            stop_requested_at = now
            signal_children(signal.SIGTERM)
        if stop_requested_at is not None and escalated < 2:
            if escalated == 0 and now - stop_requested_at > margin:
                escalated = 1
                log.warning("workers still running %.0fs after the stop: leave now", margin)
                signal_children(signal.SIGTERM)
            elif escalated == 1 and now - stop_requested_at > margin + STOP_MARGIN_S:
                escalated = 2
                signal_children(signal.SIGKILL)
        hung = _kill_hung_children(options, children, watches) if stop_requested_at is None else ()
        for slot, proc in list(children.items()):
            if proc.is_alive():
                continue
            del children[slot]
            if stop_requested_at is not None or proc.exitcode == 0:
                continue
            if slot in hung:
                start(slot)  # its trial was failed; the process itself was healthy
                continue
            if proc.exitcode == EXIT_REFUSED:
                log.error("worker-%d refused to start (see above); not restarting it", slot)
                refused += 1
                continue
            if restarts >= max_restarts:
                log.error("worker-%d died (exit %s); restart budget spent", slot, proc.exitcode)
                continue
            restarts += 1  # bounded: a worker that always crashes must not spin forever
            log.warning("worker-%d died (exit %s); restarting", slot, proc.exitcode)
            time.sleep(min(2.0 * restarts, 30.0))
            start(slot)
    return refused


def _kill_hung_children(
    options: WorkerOptions,
    children: Mapping[int, mp.process.BaseProcess],
    watches: Sequence[TrialWatch],
) -> set[int]:
    """Kill each child whose trial is past its time limit plus the grace; returns their
    slots. The process is killed first, so no late ``tell`` can race the failure."""
    hung: set[int] = set()
    now = time.time()
    for slot, proc in children.items():
        overdue = watches[slot].overdue(options.trial_kill_grace_s, now)
        if overdue is None or not proc.is_alive() or proc.pid is None:
            continue
        lease_id, trial_id, timeout_s = overdue
        log.error(
            "worker-%d: its trial is %.0fs past trial_timeout_s (%g s) without reaching a "
            "step boundary; killing the process",
            slot,
            options.trial_kill_grace_s,
            timeout_s,
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        watches[slot].clear()
        hung.add(slot)
        try:
            fail_hung_trial(options.database_url, lease_id, trial_id, timeout_s)
        except Exception:  # the reaper retries a slot left running: still recorded
            log.exception("worker-%d: could not record the failure of its hung trial", slot)
    return hung


def fail_hung_trial(database_url: str, lease_id: int, trial_id: int, timeout_s: float) -> None:
    """Record a trial killed for hanging past ``study.trial_timeout_s``: FAIL the Optuna
    trial with the time-limit reason, then finish its slot failed (the worker's own order:
    Optuna first). Each step is skipped when something else finished it first."""
    reason = trial_timeout_reason(timeout_s)
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    storage = optuna_storage(database_url, pool_size=1, worker=True)
    try:
        try:
            storage.set_trial_user_attr(trial_id, FAILURE_ATTR, reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # told or reaped meanwhile
        with contextlib.suppress(LeaseLost):
            queue.finish_trial_slot(make_session_factory(engine), lease_id, "failed", reason)
    finally:
        engine.dispose()
        storage.remove_session()
