"""Helpers for kill tests: real ``lstm-hpo serve --workers 0`` and ``lstm-hpo worker``
subprocesses, each in its own process group (so a test can ``kill -9`` just the workers,
just the server, or everything), bounded waits, and reads straight from the database.

Heartbeats are short (``HEARTBEAT_INTERVAL_S`` / ``HEARTBEAT_GRACE_S`` /
``REAPER_INTERVAL_S``) so that a dead worker's trial is reaped within seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, select

from service import queue
from service.db import make_engine, make_session_factory, session_scope
from service.models import LeaseState, SearchJob, TrialLease
from service.reaper import ORPHAN_REASON
from service.states import FAILURE_ATTR, RETRY_OF_ATTR
from service.studies import NOT_RUN_REASON, optuna_storage

CLI = str(Path(sys.executable).parent / "lstm-hpo")

HEARTBEAT_INTERVAL_S = 0.5
#: Ten missed beats: a trial training beside the other test process (pytest-xdist) on a
#: 2-core machine can go 3 s without a beat, and a live trial reaped fails its test.
HEARTBEAT_GRACE_S = 5.0
REAPER_INTERVAL_S = 0.5
#: Allowed lateness of the reaper on top of grace + one reaper interval (a loaded 2-core
#: machine: the reaper round itself, the poll of the test, process scheduling).
REAP_SLACK_S = 1.5

_T = TypeVar("_T")


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], _T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    context: Callable[[], str] | None = None,
) -> _T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after
    ``timeout_s`` with ``what`` and, if given, ``context()`` (e.g. the logs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{extra}")
        time.sleep(interval_s)


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in group ``pgid`` that are alive (zombies do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def worker_pid(worker_id: str) -> int:
    """The pid inside a worker id (``host:pid:suffix``, see ``service.worker.Worker``)."""
    return int(worker_id.rsplit(":", 2)[1])


def synthetic_spec(
    n_trials: int, *, sleep_s: float, name: str = "fault", max_epochs: int = 2, **task: Any
) -> dict[str, Any]:
    """A study of the ``synthetic`` task: each trial sleeps ``sleep_s`` in ``max_epochs`` steps."""
    return {
        "name": name,
        "task": {"kind": "synthetic", "sleep_s": sleep_s, **task},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "hidden_size": {"type": "int", "low": 8, "high": 256, "log": True},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": max_epochs,
        },
        "study": {"n_trials": n_trials, "sampler": "random", "pruner": "none", "seed": 0},
    }


# ---------------------------------------------------------------------------------------
# The database, read straight


@dataclass(frozen=True)
class LeaseRow:
    """One ``trial_leases`` row as the database holds it."""

    id: int
    job_id: str
    worker_id: str
    state: str
    attempt: int
    retry_of: int | None
    retry_pending: bool
    optuna_trial_id: int | None
    trial_number: int | None
    heartbeat_at: Any
    finished_at: Any
    failure_reason: str | None
    claimed_at: Any = None


class Database:
    """Read access to our tables and Optuna's (no caching: every call reads the database)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url, pool_size=2)
        self.sessions = make_session_factory(self.engine)
        self._storage: optuna.storages.RDBStorage | None = None

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """Optuna's storage, opened on first use (the server must have created the tables)."""
        if self._storage is None:
            self._storage = optuna_storage(self.url, pool_size=1, worker=True)
        return self._storage

    def close(self) -> None:
        """Release every connection."""
        if self._storage is not None:
            self._storage.engine.dispose()
        self.engine.dispose()

    def job(self, job_id: str) -> queue.JobRecord:
        """Our job row."""
        return queue.get_job(self.sessions, job_id)

    def jobs(self) -> list[queue.JobRecord]:
        """Every job row, oldest first."""
        with session_scope(self.sessions) as session:
            ids = session.scalars(select(SearchJob.id).order_by(SearchJob.created_at)).all()
        return [self.job(job_id) for job_id in ids]

    def leases(self, job_id: str | None = None) -> list[LeaseRow]:
        """Lease rows (of one job, or all), in claim order."""
        query = select(TrialLease).order_by(TrialLease.id)
        if job_id is not None:
            query = query.where(TrialLease.job_id == job_id)
        with session_scope(self.sessions) as session:
            return [
                LeaseRow(
                    id=lease.id,
                    job_id=lease.job_id,
                    worker_id=lease.worker_id,
                    state=lease.state,
                    attempt=lease.attempt,
                    retry_of=lease.retry_of,
                    retry_pending=lease.retry_pending,
                    optuna_trial_id=lease.optuna_trial_id,
                    trial_number=lease.trial_number,
                    heartbeat_at=lease.heartbeat_at,
                    finished_at=lease.finished_at,
                    failure_reason=lease.failure_reason,
                    claimed_at=lease.claimed_at,
                )
                for lease in session.scalars(query).all()
            ]

    def running_leases(self, job_id: str | None = None) -> list[LeaseRow]:
        """Leases still running, with an Optuna trial attached."""
        return [
            lease
            for lease in self.leases(job_id)
            if lease.state == LeaseState.RUNNING and lease.optuna_trial_id is not None
        ]

    def optuna_study_names(self) -> list[str]:
        """Names of every Optuna study in the database."""
        return [s.study_name for s in self.storage.get_all_studies()]

    def trials(self, study_name: str) -> list[FrozenTrial]:
        """The Optuna study's trials, by number, fresh from the database."""
        study_id = self.storage.get_study_id_from_name(study_name)
        return self.storage.get_all_trials(study_id, deepcopy=False)

    def trial(self, trial_id: int) -> FrozenTrial:
        """One Optuna trial by id."""
        return self.storage.get_trial(trial_id)

    def trial_states(self, study_name: str) -> Counter[str]:
        """How many of the study's trials are in each Optuna state (``COMPLETE``, ...)."""
        return Counter(t.state.name for t in self.trials(study_name))


def assert_study_finished_exactly(
    db: Database, job_id: str, *, ignore_numbers: frozenset[int] = frozenset()
) -> list[FrozenTrial]:
    """The invariants every test ends with, read from the database: the job succeeded with
    exactly ``n_trials`` finished slots and nothing running; in Optuna every trial number
    appears once, nothing is RUNNING or WAITING, and COMPLETE + PRUNED + FAIL-not-retried
    == ``n_trials``; every retry has its original's params. Returns the study's trials
    (without ``ignore_numbers``: trials a test added itself)."""
    job = db.job(job_id)
    assert job.state == "succeeded", job
    assert job.n_finished == job.n_trials and job.n_running == 0, job
    trials = [t for t in db.trials(job.optuna_study_name) if t.number not in ignore_numbers]
    numbers = [t.number for t in db.trials(job.optuna_study_name)]
    assert sorted(numbers) == list(range(len(numbers))), numbers  # each number once
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    by_number = {t.number: t for t in trials}
    retried = set()
    for t in trials:
        original = t.user_attrs.get(RETRY_OF_ATTR)
        if original is not None and failure_reason(t) != NOT_RUN_REASON:
            assert original not in retried, f"trial {original} retried twice"
            retried.add(original)
            lost = by_number[original]
            assert lost.state == TrialState.FAIL
            # What it ran, or (lost before it sampled) the params it was to run: a fresh
            # trial lost that early has none, and its retry samples its own.
            expected = lost.params or lost.system_attrs.get("fixed_params")
            if expected:
                assert t.params == expected, (t.number, original)
    # An orphan (ask() reply lost with the database, failed by the reaper's sweep) never
    # held a slot or trained: it is labelled, and not one of the n_trials.
    # A retry the study ended before running is labelled too, and never held a slot.
    orphans = {t.number for t in trials if failure_reason(t) in (ORPHAN_REASON, NOT_RUN_REASON)}
    finished = (
        states[TrialState.COMPLETE]
        + states[TrialState.PRUNED]
        + sum(1 for t in trials if t.state == TrialState.FAIL and t.number not in retried | orphans)
    )
    assert finished == job.n_trials, (finished, job.n_trials, states)
    assert states[TrialState.COMPLETE] == job.n_complete, (states, job)
    leases = db.leases(job_id)
    assert not [lease for lease in leases if lease.state == LeaseState.RUNNING]
    assert not [lease for lease in leases if lease.retry_pending]
    attached = [lease.trial_number for lease in leases if lease.trial_number is not None]
    assert len(attached) == len(set(attached)), attached  # one slot per Optuna trial
    lease_states = Counter(lease.state for lease in leases)
    assert lease_states[LeaseState.COMPLETE] == states[TrialState.COMPLETE], lease_states
    assert lease_states[LeaseState.PRUNED] == states[TrialState.PRUNED], lease_states
    return trials


def is_finite(value: float | None) -> bool:
    """A real, finite number."""
    return value is not None and math.isfinite(value)


def failure_reason(trial: FrozenTrial) -> str | None:
    """The failure reason the worker or the reaper recorded on an Optuna trial."""
    reason = trial.user_attrs.get(FAILURE_ATTR)
    return None if reason is None else str(reason)


# ---------------------------------------------------------------------------------------
# Processes


@dataclass
class Cluster:
    """One server and any number of worker groups on one database, all killable with -9."""

    tmp_path: Path
    database_url: str
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    worker_groups: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: More environment for every process started from now on (LSTM_HPO_PREEMPT_GRACE_S...).
    extra_env: dict[str, str] = field(default_factory=dict)
    _started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The server's base URL (the same across restarts)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: short heartbeats, one torch thread."""
        return (
            dict(os.environ)
            | {
                "LSTM_HPO_DATA_DIR": str(self.tmp_path / "data"),
                "LSTM_HPO_DATABASE_URL": self.database_url,
                "LSTM_HPO_PORT": str(self.port),
                "LSTM_HPO_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
                "LSTM_HPO_HEARTBEAT_GRACE_S": str(HEARTBEAT_GRACE_S),
                "LSTM_HPO_REAPER_INTERVAL_S": str(REAPER_INTERVAL_S),
                "LSTM_HPO_POLL_INTERVAL_S": "0.1",
                "LSTM_HPO_TORCH_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
            | self.extra_env
        )

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.tmp_path / log_name).open("ab") as out:
            process = subprocess.Popen(
                [CLI, *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill -9 exactly this part
            )
        self._started.append(process)
        return process

    def start_server(self, *, wait: bool = True, workers: int = 0) -> subprocess.Popen[bytes]:
        """``lstm-hpo serve --workers N`` (0: API + reaper only); waits for /v1/health."""
        args = ["serve", "--workers", str(workers)]
        if workers:
            args += ["--accelerator", "cpu"]
        self.server = self._spawn(args, "server.log")
        if wait:
            self.wait_for_server()
        return self.server

    def wait_for_server(self, timeout_s: float = 60) -> None:
        """Until the server answers /v1/health (fails if it exits)."""
        server = self.server
        assert server is not None

        def healthy() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"server exited {server.returncode}\n{self.logs()}")
            try:
                return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=timeout_s, what="the server", interval_s=0.1)

    def start_workers(self, processes: int) -> subprocess.Popen[bytes]:
        """``lstm-hpo worker --processes N``: a supervisor and N children, one group."""
        group = self._spawn(
            ["worker", "--processes", str(processes), "--accelerator", "cpu"], "workers.log"
        )
        self.worker_groups.append(group)
        return group

    def kill_server(self) -> None:
        """``kill -9`` the server's process group and reap it."""
        assert self.server is not None
        kill_group(self.server)

    def kill_workers(self, group: subprocess.Popen[bytes]) -> None:
        """``kill -9`` a worker group (supervisor and children) and wait until none lives."""
        kill_group(group)
        wait_until(
            lambda: not live_group_members(group.pid),
            timeout_s=10,
            what=f"worker group {group.pid} to die",
        )

    def kill_worker_process(self, pid: int) -> None:
        """``kill -9`` one worker process, which must belong to a group this cluster started."""
        pgid = os.getpgid(pid)
        assert pgid in {g.pid for g in self.worker_groups}, f"pid {pid} is not our worker"
        os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """``kill -9`` every process group this cluster started."""
        for process in self._started:
            kill_group(process)

    def logs(self, tail: int = 4000) -> str:
        """The last characters of the server's and the workers' logs."""
        out = []
        for name in ("server.log", "workers.log"):
            path = self.tmp_path / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def http(self) -> httpx.Client:
        """An HTTP client for the server."""
        return httpx.Client(base_url=self.url, timeout=10)

    def submit(self, spec: dict[str, Any]) -> str:
        """POST a spec; returns the new study's id."""
        with self.http() as http:
            response = http.post("/v1/studies", json=spec)
        assert response.status_code == 201, response.text
        study_id: str = response.json()["id"]
        return study_id


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group led by ``process`` (started with its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    """A :class:`Cluster` on an empty database (SQLite and PostgreSQL); nothing started.
    Every process group it started is killed afterwards, whatever happened."""
    c = Cluster(tmp_path, db_url)
    try:
        yield c
    finally:
        c.kill_all()


@pytest.fixture
def fault_db(cluster: Cluster) -> Iterator[Database]:
    """Read access to the cluster's database; connections closed before it is dropped."""
    database = Database(cluster.database_url)
    try:
        yield database
    finally:
        database.close()
