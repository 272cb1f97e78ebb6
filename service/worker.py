"""The worker loop: claim one trial slot -> run it -> tell the result -> finish the slot.

One process trains one trial at a time on one device. ``run_worker_processes`` starts N
such processes and restarts one that crashes hard (bounded).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import optuna
from optuna.trial import TrialState

from service import queue
from service.db import make_engine, make_session_factory
from service.errors import LeaseLost, LstmHpoError
from service.migrate import wait_for_schema
from service.search_space import parse_spec
from service.studies import optuna_storage
from service.training.objective import (
    FAILURE_ATTR,
    build_pruner,
    build_sampler,
    run_trial,
    trial_seed,
)

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


Outcome = Literal["complete", "pruned", "failed"]


class _Heartbeat(threading.Thread):
    """Keeps the current lease alive; notices when the reaper took it back."""

    def __init__(self, sessions: queue.SessionSource, worker_id: str, interval_s: float) -> None:
        super().__init__(name="lstm-hpo-heartbeat", daemon=True)
        self.sessions = sessions
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.lease_id: int | None = None
        self.lost: set[int] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                lease = self.lease_id
                if lease is not None:
                    self.lost |= queue.heartbeat(self.sessions, [lease])
                queue.worker_heartbeat(self.sessions, self.worker_id)
            except LstmHpoError as err:  # database briefly away: beat again next period
                log.warning("heartbeat failed (%s); retrying in %.0fs", err, self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()


class Worker:
    """One worker process's state: its connections, its id and its stop flag."""

    def __init__(self, options: WorkerOptions, worker_id: str | None = None) -> None:
        self.options = options
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # One connection for our tables and one for Optuna's: two per worker process.
        engine = make_engine(options.database_url, pool_size=1, max_overflow=0)
        self.sessions = make_session_factory(engine)
        self.engine = engine
        self.storage: optuna.storages.RDBStorage | None = None
        self.stopping = False

    def start(self) -> None:
        """Wait for the schema (workers never run DDL) and register."""
        wait_for_schema(self.engine, timeout_s=self.options.schema_timeout_s)
        self.storage = optuna_storage(self.options.database_url, pool_size=1)
        queue.register_worker(
            self.sessions,
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
        )

    def run(self) -> int:
        """Claim and run trials until stopped; returns how many trials this worker ran."""
        self.start()
        beat = _Heartbeat(self.sessions, self.worker_id, self.options.heartbeat_interval_s)
        beat.start()
        done = 0
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                if self.options.max_trials is not None and done >= self.options.max_trials:
                    break
                lease = queue.claim_trial_slot(self.sessions, self.worker_id)
                if lease is None:
                    idle = time.monotonic() - idle_since
                    if self.options.idle_exit_s is not None and idle >= self.options.idle_exit_s:
                        break
                    time.sleep(self.options.poll_interval_s)
                    continue
                beat.lease_id = lease.id
                try:
                    self.run_lease(lease, beat)
                finally:
                    beat.lease_id = None
                done += 1
                idle_since = time.monotonic()
        finally:
            beat.stop()
        return done

    def run_lease(self, lease: queue.Lease, beat: _Heartbeat) -> Outcome | None:
        """Run the trial of one claimed slot and record it. None when the result was rejected."""
        assert self.storage is not None
        spec = parse_spec(lease.spec)
        study = optuna.load_study(
            study_name=lease.optuna_study_name,
            storage=self.storage,
            sampler=build_sampler(spec, trial_seed(spec, lease.id)),
            pruner=build_pruner(spec),
        )
        trial = study.ask()
        try:
            queue.attach_trial(
                self.sessions,
                lease.id,
                optuna_trial_id=trial._trial_id,
                trial_number=trial.number,
            )
        except LeaseLost:
            # Cancelled or reaped between claim and ask: give the trial back as failed.
            study.tell(trial, state=TrialState.FAIL)
            return None
        log.info("trial %d of %s: start", trial.number, lease.optuna_study_name)
        outcome: Outcome
        value: float | None = None
        reason: str | None = None
        try:
            value = run_trial(
                trial,
                spec,
                data_roots=self.options.data_roots,
                accelerator=self.options.accelerator,
            )
            if math.isfinite(value):
                outcome = "complete"
            else:
                outcome, reason = "failed", f"the metric is {value} (diverged)"
        except optuna.TrialPruned as pruned:
            outcome = "pruned"
            reason = str(pruned) or None
        except Exception as err:  # any training error: record it, keep the worker alive
            outcome, reason = "failed", _failure_reason(err)
        if lease.id in beat.lost:
            log.warning(
                "trial %d of %s: result rejected, the lease was reaped (%s)",
                trial.number,
                lease.optuna_study_name,
                outcome,
            )
            return None
        try:
            if reason is not None:
                trial.set_user_attr(FAILURE_ATTR, reason[:2000])
            if outcome == "complete":
                study.tell(trial, value)
            else:
                state = TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL
                study.tell(trial, state=state)
        except (RuntimeError, ValueError) as err:
            # Optuna refuses to update a finished trial: the reaper failed it meanwhile.
            log.warning("trial %d: result rejected by Optuna (%s)", trial.number, err)
            return None
        try:
            queue.finish_trial_slot(self.sessions, lease.id, outcome, reason)
        except LeaseLost:
            log.warning("trial %d: slot was reaped before the result arrived", trial.number)
            return None
        log.info(
            "trial %d of %s: %s%s",
            trial.number,
            lease.optuna_study_name,
            outcome,
            f" value={value:.6g}" if outcome == "complete" and value is not None else "",
        )
        return outcome


def _failure_reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    if "out of memory" in text.lower():
        return f"out of memory: {text}"
    return text


def configure_process(options: WorkerOptions) -> None:
    """Per-process set-up: logging, torch threads, quiet Lightning."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import torch

    from service.training.fit import silence_lightning

    torch.set_num_threads(options.torch_threads)
    silence_lightning()


def worker_main(options: WorkerOptions) -> int:
    """Entry point of one worker process. SIGTERM/SIGINT: finish the current trial, then exit."""
    configure_process(options)
    worker = Worker(options)

    def stop(signum: int, frame: FrameType | None) -> None:
        if worker.stopping:  # second signal: leave now; the reaper retries the trial
            raise SystemExit(1)
        log.info("stopping after the current trial (signal %d)", signum)
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return worker.run()


def _child(options: WorkerOptions) -> None:
    worker_main(options)


def run_worker_processes(
    options: WorkerOptions,
    processes: int,
    *,
    max_restarts: int = 20,
    install_signals: bool = True,
) -> None:
    """Run ``processes`` worker processes; restart one that dies abnormally (bounded).

    Uses the ``spawn`` start method: CUDA and forked torch state do not mix.
    """
    ctx = mp.get_context("spawn")
    children: dict[int, mp.process.BaseProcess] = {}
    restarts = 0
    stopping = False

    def start(slot: int) -> None:
        proc = ctx.Process(target=_child, args=(options,), name=f"worker-{slot}", daemon=False)
        proc.start()
        children[slot] = proc

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    if install_signals:  # only the main thread may; `serve` runs this loop in a thread
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    for slot in range(processes):
        start(slot)
    while children:
        time.sleep(0.5)
        for slot, proc in list(children.items()):
            if proc.is_alive():
                continue
            del children[slot]
            if stopping or proc.exitcode == 0:
                continue
            if restarts >= max_restarts:
                log.error("worker-%d died (exit %s); restart budget spent", slot, proc.exitcode)
                continue
            restarts += 1  # bounded: a worker that always crashes must not spin forever
            log.warning("worker-%d died (exit %s); restarting", slot, proc.exitcode)
            time.sleep(min(2.0 * restarts, 30.0))
            start(slot)
