"""Scale-out: trials/s of N worker processes sharing one study on PostgreSQL, against the ideal.

For each worker count (``--workers 1,4,16,64``) the script creates a scratch database
(``lstm_hpo_bench_<random>``, dropped at the end), creates the schema as the server does
(Optuna's tables, then ours; workers run no DDL), starts N real worker processes (the
spawn target ``run_worker_processes`` uses, ``service.worker._child``, with a
``--devices cpu`` plan: the real ``Worker`` loop), and waits until every one has
registered and sits idle. Only then is one study submitted: the ``synthetic`` task with
``sleep_s: 1`` (one epoch, random sampler, no pruner; each trial is one second of
"training" plus the service's own work), ``N x --trials-per-worker`` trials.

Measured window: from the first claim to the last finish (``trial_leases.claimed_at`` /
``finished_at``), so worker start-up (imports, connecting) is not in it. Reported:

- trials/s = trials / window, against the ideal N / sleep_s, and the efficiency (ratio);
  also the per-worker cycle efficiency: sleep_s / (mean slot + mean gap), the rate of a
  long study, without this run's first round (pickup) and last (running out of slots);
- pickup: how long after the first claim the last worker made its first claim (an idle
  worker is woken by the submit's NOTIFY, else looks for work every
  ``--poll-interval-s``; this is part of the window);
- CPU: the machine's busy share for 2 s before the submit (idle workers polling, and any
  other load on the machine) and over the run (every worker, PostgreSQL and this script
  share its cores); and the CPU time per trial of the worker processes and of their
  PostgreSQL backends (from /proc: PostgreSQL must run on this machine for that figure),
  and the CPU ceiling: the efficiency those cores allow at that cost (cores / CPU per
  trial, against the ideal), which no queue can beat on this machine;
- where the time goes: the mean seconds a lease ran (claim -> finish: ask, the sleep, tell,
  finish the slot) and between a worker's finish and its next claim, and how many worker
  connections were waiting for a row lock (peak / mean over the samples) together with
  the statements they were waiting in (printed per run);
- peak connections: the most connections to the database held by worker processes at
  once (``pg_stat_activity`` sampled every 50 ms; each worker process names its
  connections ``lstm-hpo-worker:<pid>``), and the most any one process held.

Targets (issue 4): >= 90% of ideal at 16 workers, >= 80% at 64; <= 2 connections per worker.
Every run is checked: the study succeeded with exactly its trials finished and every worker
process exited 0 after SIGTERM (one still running 60 s later has its stacks dumped with
SIGUSR1, is killed and counted). Exit status 1 when a target was missed.

    python bench/scaling.py                     # 1,4,16,64 on $LSTM_HPO_TEST_POSTGRES_URL
    python bench/scaling.py --workers 16 --trials-per-worker 10
    python bench/scaling.py --scratch-cluster   # own PostgreSQL, sized for 64 workers

PostgreSQL: ``--postgres-url`` (default ``$LSTM_HPO_TEST_POSTGRES_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) names a server whose user may
CREATE DATABASE. N workers need 2N connections: a worker count the server has no room for
is skipped with a message. ``--scratch-cluster`` instead runs a throwaway PostgreSQL
(``initdb`` + ``pg_ctl``, as the ``postgres`` user when run as root, on a free port, default
settings but ``max_connections`` sized to the largest count) and removes it afterwards.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from service import queue
from service.auth import LOCAL
from service.db import scratch_postgres_database, session_scope
from service.migrate import upgrade_schema
from service.models import TrialLease, Worker
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.studies import Backend, open_backend, optuna_storage, submit_study
from service.worker import WORKER_APP_PREFIX, ProcessPlan, WorkerOptions, _child

POSTGRES_URL_ENV = "LSTM_HPO_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Efficiency targets by worker count (issue 4); counts in between get the lower one.
TARGETS = {16: 0.90, 64: 0.80}
MAX_CONNECTIONS_PER_WORKER = 2
#: Connections this script holds besides the workers' (admin, backend, sampler) + slack.
OWN_CONNECTIONS = 8


def spec(n_trials: int, sleep_s: float) -> dict[str, Any]:
    """The benchmark's study: ``synthetic`` with ``sleep_s``, one epoch, random, no pruner."""
    return {
        "name": "scaling",
        "task": {"kind": "synthetic", "sleep_s": sleep_s},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "hidden_size": {"type": "int", "low": 8, "high": 256, "log": True},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 1,
        },
        "study": {
            "n_trials": n_trials,
            "sampler": "random",
            "pruner": "none",
            "seed": 0,
            "max_retries": 0,
        },
    }


# --------------------------------------------------------------------------------------
# PostgreSQL: a scratch database (and optionally a scratch cluster)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise SystemExit(f"--scratch-cluster needs PostgreSQL's {name} on PATH")
    return found


@contextmanager
def scratch_cluster(max_connections: int) -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port (trust auth); its server URL."""
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="lstm-hpo-bench-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections={max_connections}"
    )
    try:
        subprocess.run(
            [
                *as_postgres,
                *(_pg_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"),
                *("-E", "UTF8", "--no-instructions"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *as_postgres,
                *(_pg_binary("pg_ctl"), "-D", str(data), "-l", str(root / "log")),
                *("-w", "-t", "60", "-o", options, "start"),
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, _pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def connection_headroom(server: URL) -> int:
    """How many more connections the server accepts (non-superuser slots)."""
    admin = create_engine(server, poolclass=NullPool)
    try:
        with admin.connect() as connection:
            limit = int(connection.exec_driver_sql("SHOW max_connections").scalar_one())
            reserved = int(
                connection.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one()
            )
            used = int(
                connection.exec_driver_sql("SELECT count(*) FROM pg_stat_activity").scalar_one()
            )
    finally:
        admin.dispose()
    return limit - reserved - used


@contextmanager
def scratch_database(server: URL) -> Iterator[str]:
    """A fresh database with the server's schema (Optuna's tables, then ours); dropped after."""
    with scratch_postgres_database(server, prefix="lstm_hpo_bench") as url:
        optuna_storage(url).engine.dispose()
        upgrade_schema(url)
        yield url


class ConnectionSampler(threading.Thread):
    """Samples the workers' connections to one database from ``pg_stat_activity``."""

    def __init__(self, database_url: str, interval_s: float = 0.05) -> None:
        super().__init__(name="pg-connection-sampler", daemon=True)
        url = make_url(database_url)
        self.database = url.database
        self.engine = create_engine(
            url, poolclass=NullPool, connect_args={"application_name": "lstm-hpo-bench"}
        )
        self.interval_s = interval_s
        self.peak_per_worker: Counter[str] = Counter()
        self.peak_total = 0
        #: Per sample: how many worker connections were waiting for a lock (a row lock).
        self.lock_waiters: list[int] = []
        #: What the lock waiters were running (the first 80 characters of the statement).
        self.waiting_statements: Counter[str] = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        query = text(
            "SELECT application_name, count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') "
            "FROM pg_stat_activity WHERE datname = :db AND application_name LIKE :prefix "
            "GROUP BY application_name"
        )
        with self.engine.connect() as connection:
            while not self._stop_event.is_set():
                rows = connection.execute(
                    query, {"db": self.database, "prefix": WORKER_APP_PREFIX + "%"}
                ).all()
                connection.rollback()  # pg_stat_activity is a per-transaction snapshot
                for name, count, _ in rows:
                    self.peak_per_worker[name] = max(self.peak_per_worker[name], count)
                self.peak_total = max(self.peak_total, sum(count for _, count, _ in rows))
                self.lock_waiters.append(sum(waiting for _, _, waiting in rows))
                if any(waiting for _, _, waiting in rows):
                    statements = connection.execute(
                        text(
                            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 80) "
                            "FROM pg_stat_activity WHERE datname = :db "
                            "AND application_name LIKE :prefix AND wait_event_type = 'Lock'"
                        ),
                        {"db": self.database, "prefix": WORKER_APP_PREFIX + "%"},
                    ).scalars()
                    self.waiting_statements.update(statements)
                    connection.rollback()
                self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        self.engine.dispose()


# --------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class Result:
    """One worker count's measurement."""

    workers: int
    trials: int
    window_s: float
    pickup_s: float
    startup_s: float
    cpu_busy: float
    #: The machine's busy share for 2 s before the submit (idle workers + anything else).
    background_busy: float
    #: CPU seconds over the run: the worker processes, and their PostgreSQL backends.
    worker_cpu_s: float
    pg_cpu_s: float
    #: Mean seconds a lease ran (claim -> finish: ask, the sleep, tell, finish) and mean
    #: seconds between a worker's finish and its next claim.
    slot_s: float
    gap_s: float
    lock_waiters_peak: int
    lock_waiters_mean: float
    peak_connections: int
    #: Worker processes still running 60 s after SIGTERM (killed; their stacks are logged).
    stuck_on_exit: int
    #: The statements lock waiters were seen running most often, with their sample counts.
    waiting_statements: tuple[tuple[str, int], ...]
    max_connections_per_worker: int
    sleep_s: float

    @property
    def trials_per_s(self) -> float:
        return self.trials / self.window_s

    @property
    def ideal_per_s(self) -> float:
        return self.workers / self.sleep_s

    @property
    def efficiency(self) -> float:
        return self.trials_per_s / self.ideal_per_s

    @property
    def cycle_efficiency(self) -> float:
        """sleep_s / a worker's mean cycle (slot + gap): the rate of a long study, without
        this run's first round (pickup) and last round (workers running out of slots)."""
        return self.sleep_s / (self.slot_s + self.gap_s)

    def cpu_ceiling(self, cores: int) -> float:
        """The most trials/s this machine's cores allow at the measured CPU cost per trial
        (worker + PostgreSQL), as a share of the ideal: no queue can do better here."""
        cpu_per_trial = (self.worker_cpu_s + self.pg_cpu_s) / self.trials
        return min(1.0, cores / cpu_per_trial / self.ideal_per_s) if cpu_per_trial else 1.0

    @property
    def target(self) -> float | None:
        above = [t for n, t in sorted(TARGETS.items()) if self.workers >= n]
        return above[-1] if above else None


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already in user
    return total - idle, total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) each live process of ``pids`` has used."""
    used = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone (or on another machine: a remote PostgreSQL)
        fields = stat[stat.rindex(")") + 2 :].split()
        used[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return used


def _backend_pids(sampler: ConnectionSampler) -> list[int]:
    """PostgreSQL server processes serving the workers' connections."""
    with sampler.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                "AND application_name LIKE :prefix"
            ),
            {"db": sampler.database, "prefix": WORKER_APP_PREFIX + "%"},
        ).all()
    return [int(pid) for (pid,) in rows]


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def _registered(backend: Backend) -> int:
    with session_scope(backend.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(Worker)) or 0)


def run_workers(url: str, n: int, args: argparse.Namespace) -> Result:
    """Start n workers, wait until all are idle, run one study, measure, stop them."""
    backend = open_backend(url, limits=DEFAULT_LIMITS, base_url="http://bench")
    options = WorkerOptions(database_url=url, poll_interval_s=args.poll_interval_s)
    ctx = multiprocessing.get_context("spawn")  # as run_worker_processes
    processes = [
        ctx.Process(
            target=_child,
            args=(options, ProcessPlan(slot, "cpu", torch_threads=1, cuda_visible_devices="")),
            name=f"worker-{slot}",
        )
        for slot in range(n)
    ]
    sampler = ConnectionSampler(url)
    t0 = time.monotonic()
    try:
        for process in processes:
            process.start()

        def all_idle() -> bool:
            dead = [p.name for p in processes if p.exitcode is not None]
            if dead:
                raise SystemExit(f"worker processes exited during start-up: {dead}")
            return _registered(backend) == n

        _wait_until(all_idle, 300, f"{n} workers to register")
        startup_s = time.monotonic() - t0
        sampler.start()
        n_trials = n * args.trials_per_worker
        worker_pids = [p.pid for p in processes if p.pid is not None]
        before = _cpu_ticks()
        time.sleep(2.0)
        busy0, total0 = _cpu_ticks()
        background_busy = (busy0 - before[0]) / max(total0 - before[1], 1)
        workers_cpu0 = _process_cpu_s(worker_pids)
        backends_cpu0 = _process_cpu_s(_backend_pids(sampler))
        study, _ = submit_study(backend, parse_spec(spec(n_trials, args.sleep_s)), principal=LOCAL)

        def ended() -> bool:
            if any(p.exitcode is not None for p in processes):
                raise SystemExit("a worker process died during the run")
            return queue.get_job(backend.sessions, study.id).state in ("succeeded", "failed")

        _wait_until(ended, 60 + 10 * args.trials_per_worker * args.sleep_s, "the study")
        busy1, total1 = _cpu_ticks()
        worker_cpu_s = _cpu_delta(workers_cpu0, _process_cpu_s(worker_pids))
        pg_cpu_s = _cpu_delta(backends_cpu0, _process_cpu_s(_backend_pids(sampler)))
    finally:
        sampler.stop()
        for process in processes:  # SIGTERM: each finishes its trial (none left) and exits
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        stuck = []
        deadline = time.monotonic() + 60
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive() and process.pid is not None:
                stuck.append(process.pid)
                os.kill(process.pid, signal.SIGUSR1)  # its stacks to stderr, then kill it
                time.sleep(2)
                process.kill()
                process.join()
    job = queue.get_job(backend.sessions, study.id)
    if (job.state, job.n_finished, job.n_running) != ("succeeded", n_trials, 0):
        raise SystemExit(f"the study did not end with exactly {n_trials} trials: {job}")
    if stuck:
        print(f"{n} workers: {len(stuck)} did not stop within 60 s of SIGTERM: {stuck}")
    crashed = [p.exitcode for p in processes if p.exitcode != 0 and p.pid not in stuck]
    if crashed:
        raise SystemExit(f"worker processes exited abnormally: {crashed}")
    with session_scope(backend.sessions) as session:
        leases = session.execute(
            select(TrialLease.worker_id, TrialLease.claimed_at, TrialLease.finished_at)
            .where(TrialLease.job_id == study.id)
            .order_by(TrialLease.worker_id, TrialLease.claimed_at)
        ).all()
    first = min(claimed for _, claimed, _ in leases)
    last = max(finished for _, _, finished in leases if finished is not None)
    slots, gaps, first_claims = [], [], []
    previous: tuple[str, datetime] | None = None  # (worker, its last finish)
    for worker, claimed, finished in leases:
        assert finished is not None  # the job succeeded: every lease finished
        slots.append((finished - claimed).total_seconds())
        if previous is not None and previous[0] == worker:
            gaps.append((claimed - previous[1]).total_seconds())
        else:
            first_claims.append(claimed)
        previous = (worker, finished)
    waiters = sampler.lock_waiters or [0]
    return Result(
        workers=n,
        trials=n_trials,
        window_s=(last - first).total_seconds(),
        pickup_s=(max(first_claims) - first).total_seconds(),
        slot_s=sum(slots) / len(slots),
        gap_s=sum(gaps) / len(gaps) if gaps else 0.0,
        lock_waiters_peak=max(waiters),
        lock_waiters_mean=sum(waiters) / len(waiters),
        startup_s=startup_s,
        cpu_busy=(busy1 - busy0) / max(total1 - total0, 1),
        background_busy=background_busy,
        worker_cpu_s=worker_cpu_s,
        pg_cpu_s=pg_cpu_s,
        peak_connections=sampler.peak_total,
        stuck_on_exit=len(stuck),
        waiting_statements=tuple(sampler.waiting_statements.most_common(3)),
        max_connections_per_worker=max(sampler.peak_per_worker.values(), default=0),
        sleep_s=args.sleep_s,
    )


# --------------------------------------------------------------------------------------
# Report


def table(results: Sequence[Result], cores: int) -> str:
    """The Markdown table BENCHMARKS.md records."""
    lines = [
        "| workers | trials | window s | trials/s | ideal | efficiency | target "
        "| per-worker cycle | pickup s "
        "| slot s | gap s | lock waiters peak / mean "
        f"| CPU busy ({cores} cores): before / run | CPU ms/trial worker + PG "
        "| CPU ceiling "
        "| peak connections "
        "| per worker (max) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        target = "-"
        if r.target is not None:
            met = "met" if r.efficiency >= r.target else "**missed**"
            target = f">= {r.target:.0%} {met}"
        per_worker = f"{r.peak_connections / r.workers:.2f} ({r.max_connections_per_worker})"
        lines.append(
            f"| {r.workers} | {r.trials} | {r.window_s:.2f} | {r.trials_per_s:.2f} "
            f"| {r.ideal_per_s:.0f} | {r.efficiency:.1%} | {target} | {r.cycle_efficiency:.1%} "
            f"| {r.pickup_s:.2f} "
            f"| {r.slot_s:.3f} | {r.gap_s:.3f} "
            f"| {r.lock_waiters_peak} / {r.lock_waiters_mean:.1f} "
            f"| {r.background_busy:.0%} / {r.cpu_busy:.0%} "
            f"| {1000 * r.worker_cpu_s / r.trials:.1f} + "
            f"{1000 * r.pg_cpu_s / r.trials:.1f} | {r.cpu_ceiling(cores):.0%} "
            f"| {r.peak_connections} | {per_worker} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when a target was missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--workers",
        default="1,4,16,64",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated worker process counts",
    )
    parser.add_argument(
        "--trials-per-worker",
        type=int,
        default=30,
        help="trials per worker (the study has N times as many); the first rounds run in "
        "lockstep (every worker woken by one submit, every trial 1 s), so short runs "
        "measure that burst more than the sustained rate",
    )
    parser.add_argument("--sleep-s", type=float, default=1.0, help="seconds per trial")
    parser.add_argument(
        "--poll-interval-s",
        type=float,
        default=WorkerOptions.poll_interval_s,
        help="an idle worker's poll period (LSTM_HPO_POLL_INTERVAL_S; default as the service)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL),
        help=f"server URL (default ${POSTGRES_URL_ENV} or {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--scratch-cluster",
        action="store_true",
        help="run a throwaway PostgreSQL sized for the largest worker count instead",
    )
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"synthetic sleep_s={args.sleep_s}, {args.trials_per_worker} trials per worker, "
        f"poll {args.poll_interval_s}s, {cores} cores; python {sys.version.split()[0]}",
        flush=True,
    )
    results: list[Result] = []
    with _server(args) as server_url:
        server = make_url(server_url)
        for n in args.workers:
            need = MAX_CONNECTIONS_PER_WORKER * n + OWN_CONNECTIONS
            room = connection_headroom(server)
            if room < need:
                print(
                    f"{n} workers: skipped; they need {need} connections and the server has "
                    f"room for {room} (raise max_connections, or use --scratch-cluster)",
                    flush=True,
                )
                continue
            with scratch_database(server) as url:
                result = run_workers(url, n, args)
            results.append(result)
            print(
                f"{n} workers: {result.trials_per_s:.2f} trials/s of {result.ideal_per_s:.0f} "
                f"({result.efficiency:.1%}); start-up {result.startup_s:.1f}s (not timed); "
                f"peak {result.peak_connections} connections",
                flush=True,
            )
            for statement, count in result.waiting_statements:
                print(f"    waited for a lock ({count} samples): {statement}", flush=True)
    print()
    print(table(results, cores or 1))
    missed = [r for r in results if r.target is not None and r.efficiency < r.target]
    too_many = [r for r in results if r.max_connections_per_worker > MAX_CONNECTIONS_PER_WORKER]
    stuck = [r for r in results if r.stuck_on_exit]
    return 1 if missed or too_many or stuck else 0


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[str]:
    if not args.scratch_cluster:
        yield args.postgres_url
        return
    # Room for the largest run, this script, and the 3 slots PostgreSQL reserves.
    max_connections = MAX_CONNECTIONS_PER_WORKER * max(args.workers) + 4 * OWN_CONNECTIONS
    with scratch_cluster(max(100, max_connections)) as url:
        yield url


if __name__ == "__main__":
    sys.exit(main())
