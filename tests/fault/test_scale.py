"""The claim race (issue 4, test 3): 32 worker processes, one study of 200 trials, PostgreSQL.

Real worker processes: the spawn target ``run_worker_processes`` starts
(``service.worker._child`` with a ``--devices cpu`` plan), each running the real
``Worker`` loop. The test plays the server's part first (Optuna's tables, then ours, as
``lstm-hpo serve`` does; workers run no DDL), starts all 32 workers, waits until every one
has registered (so all of them race for the first slots), then submits one ``synthetic``
study (``sleep_s: 0``: the claims are the whole workload) and stops the workers with
SIGTERM (their polite stop) once it has ended.

Checked: exactly 200 finished slots and 200 COMPLETE Optuna trials numbered 0..199 once
each (no overshoot, nothing RUNNING or WAITING, ``n_running`` 0); one lease per trial; every
process exited 0 and never imported torch; and no process held more than 2 database
connections (sampled from ``pg_stat_activity``, where each worker process names its
connections ``lstm-hpo-worker:<pid>``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from service import queue
from service.auth import LOCAL
from service.db import session_scope
from service.migrate import upgrade_schema
from service.models import TrialLease, Worker
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.studies import open_backend, optuna_storage, submit_study
from service.worker import WORKER_APP_PREFIX, ProcessPlan, WorkerOptions, _child

pytestmark = pytest.mark.postgres

N_WORKERS = 32
N_TRIALS = 200
MAX_CONNECTIONS_PER_WORKER = 2


def _worker_process(options: WorkerOptions, plan: ProcessPlan, report_dir: str) -> None:
    """One worker process, as ``run_worker_processes`` starts it; then a report of what it
    imported (written only after a clean return)."""
    _child(options, plan)
    report = {"pid": os.getpid(), "torch": "torch" in sys.modules}
    (Path(report_dir) / f"{os.getpid()}.json").write_text(json.dumps(report))


class ConnectionSampler(threading.Thread):
    """Samples ``pg_stat_activity`` of one database: connections per worker process."""

    def __init__(self, database_url: str, interval_s: float = 0.05) -> None:
        super().__init__(name="pg-connection-sampler", daemon=True)
        url = make_url(database_url)
        self.database = url.database
        self.engine = create_engine(
            url, poolclass=NullPool, connect_args={"application_name": "lstm-hpo-test-sampler"}
        )
        self.interval_s = interval_s
        self.peak_per_worker: Counter[str] = Counter()
        self.peak_total = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        query = text(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = :db AND application_name LIKE :prefix GROUP BY application_name"
        )
        with self.engine.connect() as connection:
            while not self._stop_event.is_set():
                rows = connection.execute(
                    query, {"db": self.database, "prefix": WORKER_APP_PREFIX + "%"}
                ).all()
                connection.rollback()  # a fresh snapshot of pg_stat_activity next time
                for name, count in rows:
                    self.peak_per_worker[name] = max(self.peak_per_worker[name], count)
                self.peak_total = max(self.peak_total, sum(count for _, count in rows))
                self.samples += 1
                self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        self.engine.dispose()


def _wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def test_claim_race_32_workers_one_study_exactly_200_trials(
    postgres_url: str, tmp_path: Path
) -> None:
    # The server's part: Optuna's tables, then ours. Workers never run DDL.
    optuna_storage(postgres_url).engine.dispose()
    upgrade_schema(postgres_url)
    backend = open_backend(postgres_url, limits=DEFAULT_LIMITS, base_url="http://test")
    sampler = ConnectionSampler(postgres_url)
    ctx = multiprocessing.get_context("spawn")  # as run_worker_processes
    options = WorkerOptions(
        database_url=postgres_url, poll_interval_s=0.1, heartbeat_interval_s=2.0
    )
    processes = [
        ctx.Process(
            target=_worker_process,
            args=(
                options,
                ProcessPlan(slot, accelerator="cpu", torch_threads=1, cuda_visible_devices=""),
                str(tmp_path),
            ),
            name=f"worker-{slot}",
        )
        for slot in range(N_WORKERS)
    ]
    t0 = time.monotonic()
    try:
        sampler.start()
        for process in processes:
            process.start()

        def registered() -> int:
            with session_scope(backend.sessions) as session:
                return len(session.scalars(select(Worker.id)).all())

        def check_alive() -> bool:
            dead = [p.name for p in processes if p.exitcode is not None]
            assert not dead, f"worker processes exited early: {dead}"
            return registered() == N_WORKERS

        _wait_until(check_alive, 120, f"{N_WORKERS} workers to register")
        t_ready = time.monotonic()

        spec = {
            "name": "claim-race",
            "task": {"kind": "synthetic", "sleep_s": 0},
            "space": {
                "num_layers": {"type": "int", "low": 1, "high": 4},
                "hidden_size": {"type": "int", "low": 8, "high": 256, "log": True},
                "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                "max_epochs": 1,
            },
            "study": {"n_trials": N_TRIALS, "sampler": "random", "pruner": "none", "seed": 0},
        }
        study, _ = submit_study(backend, parse_spec(spec), principal=LOCAL)
        job_id = study.id

        def ended() -> bool:
            assert all(p.exitcode is None for p in processes), "a worker died mid-study"
            return queue.get_job(backend.sessions, job_id).state in ("succeeded", "failed")

        _wait_until(ended, 120, "the study to end")
        t_done = time.monotonic()
    finally:
        for process in processes:  # SIGTERM: the polite stop (finish the trial, then exit)
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        sampler.stop()
    print(
        f"\n{N_WORKERS} workers started and registered in {t_ready - t0:.1f}s; "
        f"{N_TRIALS} trials in {t_done - t_ready:.1f}s; peak worker connections "
        f"{sampler.peak_total} ({sampler.samples} samples)"
    )

    # 0 crashed processes, none of which ever imported torch.
    assert [p.exitcode for p in processes] == [0] * N_WORKERS
    reports = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert len(reports) == N_WORKERS
    assert not [r for r in reports if r["torch"]], "a synthetic-only worker imported torch"

    # Exactly N_TRIALS finished: our counters...
    job = queue.get_job(backend.sessions, job_id)
    assert job.state == "succeeded", job
    assert (job.n_trials, job.n_finished, job.n_complete, job.n_running) == (
        N_TRIALS,
        N_TRIALS,
        N_TRIALS,
        0,
    ), job
    # ... Optuna's trials: every number 0..N-1 once, all COMPLETE (no overshoot) ...
    storage = optuna_storage(postgres_url, pool_size=1, worker=True)
    try:
        trials = storage.get_all_trials(storage.get_study_id_from_name(job.optuna_study_name))
    finally:
        storage.engine.dispose()
    assert len(trials) == N_TRIALS
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: N_TRIALS}
    # ... and one lease per trial, each finished by the worker that claimed it.
    with session_scope(backend.sessions) as session:
        leases = session.scalars(select(TrialLease).where(TrialLease.job_id == job_id)).all()
        rows = [(lease.state, lease.trial_number, lease.worker_id) for lease in leases]
    assert len(rows) == N_TRIALS
    assert {state for state, _, _ in rows} == {"complete"}
    assert sorted(-1 if n is None else n for _, n, _ in rows) == list(range(N_TRIALS))
    per_worker = Counter(worker for _, _, worker in rows)
    print(f"trials per worker: {sorted(per_worker.values(), reverse=True)}")
    assert len(per_worker) > 1, per_worker  # it was a race

    # At most 2 connections per worker process, and every process was seen.
    worker_pids = {str(p.pid) for p in processes}
    seen = {name.removeprefix(WORKER_APP_PREFIX) for name in sampler.peak_per_worker}
    assert seen == worker_pids, (seen ^ worker_pids, sampler.samples)
    over = {n: c for n, c in sampler.peak_per_worker.items() if c > MAX_CONNECTIONS_PER_WORKER}
    assert not over, over
