"""Large studies: what the API, the dashboard and a worker cost at 100 and 10,000 finished
trials in one study (issue 13, "Large studies").

For each database (``--database-url``, repeatable: ``sqlite`` is a scratch file, a
PostgreSQL URL names a server on which a scratch database ``lstm_hpo_bench_<random>`` is
made and dropped) a real ``lstm-hpo serve`` (no local workers) runs on it, and for each
size N (``--sizes 100,10000``):

1. a ``synthetic`` study is submitted over REST (``sleep_s: 0``, one epoch, random
   sampler, no pruner, ``--worker-trials`` slots), and N finished trials are inserted into
   its Optuna study through Optuna (``Study.add_trials`` of ``optuna.trial.create_trial``
   trials). They are made the way a worker makes them: each config is sampled and run by
   the service's own synthetic objective (``service.training.objective.run_trial``: the
   ``config`` and ``params`` user attributes, ``--epochs`` intermediate values), then
   ~70% are COMPLETE, ~20% PRUNED (a shorter curve, no value, a ``failure_reason``) and
   ~10% FAIL (a ``failure_reason``), with start and end times an hour of trials apart;
2. each route is timed from this process over HTTP, one request at a time, after two
   untimed ones: ``GET /v1/studies/{id}``, ``/best``, ``/best?k=10``,
   ``/trials?limit=100`` (first page, a page deep in the list, and ``state=pruned``),
   ``/progress``, ``/report``, and the JSON the dashboard's study page loads
   (optuna-dashboard's ``GET /api/studies/{optuna_id}``: its first answer, which reads
   every trial, is reported apart as ``cold``). ``--requests`` requests per route, or as
   many as ``--seconds`` allow (at least 5); p50 and p99 (nearest rank) in ms;
3. one real worker process (``multiprocessing`` spawn, the ``service.worker.Worker``
   loop) runs the study's ``--worker-trials`` slots. Its first slot (which loads the
   study: Optuna's cached storage reads every trial once) is reported apart; the
   figures per trial are over the others: wall time and service CPU (the worker process,
   plus on PostgreSQL its server backends, from /proc: PostgreSQL must run on this
   machine for that share);
4. the same with ``sampler: tpe`` for ``--tpe-trials`` slots: TPE reads every finished
   trial at each ask, which is the sampler's cost and grows with N by design; reported
   apart, not held to the target.

Targets: p99 <= 50 ms for the study and ``/best``, <= 100 ms for ``/trials?limit=100``,
the dashboard's study JSON answers (200), and a worker's cost per trial (wall and CPU,
random sampler) grows by less than 2x from the smallest size to the largest. Exit status
1 when one is missed.

    python -m bench.large_study                        # SQLite + PostgreSQL, 100 and 10,000
    python -m bench.large_study --database-url sqlite --sizes 100,1000
    python -m bench.large_study --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Writes ``bench/results/large_study/results.json`` (``--out``) and the server logs there.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import optuna
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness import Machine, exit_on_sigterm, positive_int, running_server, to_jsonable
from service.db import is_sqlite, scratch_postgres_database
from service.search_space import parse_spec
from service.states import FAILURE_ATTR
from service.studies import optuna_storage
from service.training.objective import run_trial
from service.worker import WORKER_APP_PREFIX, Worker, WorkerOptions

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL_ENV = "LSTM_HPO_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: p99 targets in ms by route label (issue 13).
P99_TARGETS_MS = {"study": 50.0, "best": 50.0, "trials?limit=100": 100.0}
#: A worker's cost per trial may grow by less than this from the smallest size to the largest.
WORKER_GROWTH_TARGET = 2.0
#: Share of inserted trials by state (the rest FAIL).
COMPLETE_SHARE, PRUNED_SHARE = 0.7, 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Trials inserted per transaction (:func:`insert_trials`).
INSERT_BATCH = 500


def study_spec(n_trials: int, sampler: str, epochs: int = 1) -> dict[str, Any]:
    """The benchmark's study: ``synthetic`` (no training, ``sleep_s: 0``), no pruner."""
    return {
        "name": f"large-{sampler}",
        "task": {"kind": "synthetic", "sleep_s": 0},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "hidden_size": {"type": "int", "low": 16, "high": 256, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
            "max_epochs": epochs,
        },
        "study": {
            "n_trials": n_trials,
            "sampler": sampler,
            "pruner": "none",
            "seed": 0,
            "max_retries": 0,
        },
    }


# --------------------------------------------------------------------------------------
# N finished trials, made as a worker makes them, inserted through Optuna


def make_trials(n: int, epochs: int, seed: int = 0) -> list[FrozenTrial]:
    """``n`` finished trials of the benchmark's space, as workers record them: params and
    distributions as ``sample_config`` suggests them, the user attributes and intermediate
    values the synthetic objective writes; COMPLETE / PRUNED / FAIL mixed."""
    spec = parse_spec(study_spec(1, "random", epochs))
    scratch = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=seed), pruner=optuna.pruners.NopPruner()
    )
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, 0, 0, 0)
    out = []
    for i in range(n):
        trial = scratch.ask()
        final = run_trial(trial, spec)
        ran = scratch._storage.get_trial(trial._trial_id)
        scratch.tell(trial, final)  # ends it: the next ask() finds no WAITING trial to sync
        curve = dict(ran.intermediate_values)
        attrs = dict(ran.user_attrs)
        draw = rng.random()
        value: float | None = final
        if draw < COMPLETE_SHARE:
            state = TrialState.COMPLETE
        elif draw < COMPLETE_SHARE + PRUNED_SHARE:
            state, value = TrialState.PRUNED, None
            stop = rng.randrange(max(epochs - 1, 1))
            curve = {step: v for step, v in curve.items() if step <= stop}
            attrs[FAILURE_ATTR] = f"pruned at epoch {stop}"
        else:
            state, value = TrialState.FAIL, None
            stop = rng.randrange(epochs)
            curve = {step: v for step, v in curve.items() if step < stop}
            attrs[FAILURE_ATTR] = "RuntimeError: CUDA out of memory (synthetic)"
        frozen = optuna.trial.create_trial(
            state=state,
            value=value,
            params=ran.params,
            distributions=ran.distributions,
            user_attrs=attrs,
            intermediate_values=curve,
        )
        # An hour's trials spread over the study's life, a few to 60 seconds each.
        frozen.datetime_start = start + timedelta(seconds=3.6 * i)
        frozen.datetime_complete = frozen.datetime_start + timedelta(seconds=rng.uniform(3, 60))
        out.append(frozen)
    return out


def insert_trials(url: str, study_name: str, trials: Sequence[FrozenTrial]) -> float:
    """Add ``trials`` to Optuna study ``study_name`` through Optuna; returns seconds taken.

    Optuna's own trial-creation code writes every row (``RDBStorage._get_prepared_new_trial``,
    what ``Study.add_trials`` runs for each trial), ``INSERT_BATCH`` trials per transaction
    instead of one: the same rows (checked against ``add_trials`` when this was written),
    a third less time, and 10,000 trials are minutes either way. The connection does not
    wait for its commits to reach the disk (PostgreSQL's ``synchronous_commit = off``;
    SQLite in WAL mode with ``synchronous = NORMAL`` does not anyway): a scratch database.
    """
    if is_sqlite(url):
        storage = optuna_storage(url)
    else:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={
                "poolclass": NullPool,
                "connect_args": {"options": "-c synchronous_commit=off"},
            },
        )
    began = time.perf_counter()
    try:
        study_id = storage.get_study_id_from_name(study_name)
        for i in range(0, len(trials), INSERT_BATCH):
            with _create_scoped_session(storage.scoped_session) as session:
                for trial in trials[i : i + INSERT_BATCH]:
                    storage._get_prepared_new_trial(study_id, trial, session)
    finally:
        storage.engine.dispose()
    return time.perf_counter() - began


# --------------------------------------------------------------------------------------
# Timing routes


@dataclass
class Timing:
    """One route's latencies (ms), one request at a time."""

    path: str
    samples_ms: list[float]
    status: int
    bytes: int
    cold_ms: float | None = None

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (p99 of fewer than 100 samples is their maximum)."""
        ordered = sorted(self.samples_ms)
        return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "n": self.n,
            "p50_ms": round(self.p50, 2),
            "p99_ms": round(self.p99, 2),
            "max_ms": round(max(self.samples_ms), 2),
            "cold_ms": None if self.cold_ms is None else round(self.cold_ms, 2),
            "status": self.status,
            "bytes": self.bytes,
        }


def time_route(
    http: httpx.Client, path: str, *, requests: int, seconds: float, untimed: int = 2
) -> Timing:
    """``requests`` GETs of ``path`` (fewer when ``seconds`` run out, but at least 5) after
    ``untimed`` ones; the first untimed answer's time is kept as ``cold_ms``."""
    cold: float | None = None
    status, size = 0, 0
    for i in range(untimed):
        began = time.perf_counter()
        response = http.get(path)
        if i == 0:
            cold = 1000 * (time.perf_counter() - began)
        status, size = response.status_code, len(response.content)
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    while len(samples) < requests and (len(samples) < 5 or time.monotonic() < deadline):
        began = time.perf_counter()
        response = http.get(path)
        samples.append(1000 * (time.perf_counter() - began))
        status, size = response.status_code, len(response.content)
        if status != 200:
            break
    return Timing(path, samples, status, size, cold)


def measure_routes(
    http: httpx.Client, study_id: str, optuna_id: int, n: int, args: argparse.Namespace
) -> dict[str, Timing]:
    """Every route of a study with ``n`` inserted trials, timed."""
    base = f"/v1/studies/{study_id}"
    deep = max(n - 100, 0)
    routes = {
        "study": base,
        "best": f"{base}/best",
        "best?k=10": f"{base}/best?k=10",
        "trials?limit=100": f"{base}/trials?limit=100",
        f"trials?limit=100&offset={deep}": f"{base}/trials?limit=100&offset={deep}",
        "trials?state=pruned&limit=100": f"{base}/trials?state=pruned&limit=100",
        "progress": f"{base}/progress",
        "dashboard /api/studies/{id}": f"/api/studies/{optuna_id}",
    }
    out = {}
    for label, path in routes.items():
        out[label] = time_route(http, path, requests=args.requests, seconds=args.seconds)
        _log(f"    {label:<32} {_fmt_timing(out[label])}")
    if args.report:
        # One request, timed as it is (the report draws every figure afresh: minutes).
        out["report"] = time_route(http, f"{base}/report", requests=1, seconds=0, untimed=0)
        _log(f"    {'report':<32} {_fmt_timing(out['report'])}")
    return out


def _fmt_timing(t: Timing) -> str:
    cold = f", cold {t.cold_ms:.0f}" if t.cold_ms is not None else ""
    return f"p50 {t.p50:8.1f}  p99 {t.p99:8.1f} ms (n={t.n}{cold}, {t.bytes:,} B, {t.status})"


# --------------------------------------------------------------------------------------
# A worker's cost per trial: one real worker process


@dataclass
class WorkerRun:
    """One worker process running one study's slots."""

    sampler: str
    trials: int
    #: Worker.start (schema check, storage, registration) to the end of the first slot:
    #: the first slot loads the study (every trial, once).
    first_slot_s: float
    #: Over the slots after the first.
    wall_ms: float
    worker_cpu_ms: float
    database_cpu_ms: float | None
    per_slot_ms: list[float] = field(default_factory=list)

    @property
    def service_cpu_ms(self) -> float:
        return self.worker_cpu_ms + (self.database_cpu_ms or 0.0)


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _worker_child(url: str, n_trials: int, pipe: Connection) -> None:
    """The spawned worker process: the real ``Worker`` loop, stamped after every slot. It
    stops after its first slot and at the end until the parent has read its database
    backends' CPU time (``pipe``)."""
    os.environ["PGAPPNAME"] = f"{WORKER_APP_PREFIX}{os.getpid()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    stamps: list[tuple[float, float]] = []

    class StampedWorker(Worker):
        def start(self) -> bool:
            started = super().start()
            stamps.append(_stamp())
            return started

        def run_lease(self, lease: Any, beat: Any) -> Any:
            result = super().run_lease(lease, beat)
            stamps.append(_stamp())
            if len(stamps) == 2:  # the first slot: let the parent read the backends' CPU
                pipe.send("first")
                pipe.recv()
                stamps[-1] = _stamp()
            return result

    worker = StampedWorker(
        WorkerOptions(
            database_url=url,
            heartbeat_interval_s=3600.0,  # no heartbeat inside the timed window
            poll_interval_s=0.05,
            max_trials=n_trials,
            idle_exit_s=5.0,
            schema_timeout_s=300.0,
        )
    )
    done = worker.run()
    pipe.send(("done", done, stamps))
    pipe.recv()


def _process_cpu_s(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def _backend_pids(url: str, worker_pid: int) -> list[int] | None:
    """The PostgreSQL server processes of the worker's connections (None on SQLite)."""
    if is_sqlite(url):
        return None
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": f"{WORKER_APP_PREFIX}{worker_pid}"},
            ).all()
    finally:
        engine.dispose()
    return [int(pid) for (pid,) in rows]


def run_worker(url: str, n_trials: int, sampler: str) -> WorkerRun:
    """One spawned worker process runs ``n_trials`` slots (the only claimable ones)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_worker_child, args=(url, n_trials, theirs), daemon=True)
    process.start()
    try:
        if not ours.poll(300):
            raise RuntimeError("the worker process did not finish its first slot in 300 s")
        assert ours.recv() == "first" and process.pid is not None
        backends = _backend_pids(url, process.pid)
        before = _process_cpu_s(backends) if backends is not None else None
        ours.send("go")
        if not ours.poll(1800):
            raise RuntimeError("the worker process did not finish in 1800 s")
        _, done, stamps = ours.recv()
        after = _process_cpu_s(backends) if backends is not None else None
        ours.send("exit")
        process.join(60)
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    if done != n_trials or len(stamps) != n_trials + 1:
        raise RuntimeError(f"the worker ran {done} slots, not {n_trials}")
    rest = n_trials - 1
    (w_start, _), (w1, c1), (wn, cn) = stamps[0], stamps[1], stamps[-1]
    database = None if before is None or after is None else 1000 * (after - before) / rest
    return WorkerRun(
        sampler=sampler,
        trials=n_trials,
        first_slot_s=w1 - w_start,
        wall_ms=1000 * (wn - w1) / rest,
        worker_cpu_ms=1000 * (cn - c1) / rest,
        database_cpu_ms=database,
        per_slot_ms=[1000 * (b[0] - a[0]) for a, b in pairwise(stamps[1:])],
    )


# --------------------------------------------------------------------------------------
# One database


@dataclass
class SizeResult:
    """Everything measured at one size on one database."""

    n: int
    insert_s: float
    routes: dict[str, Timing]
    worker: WorkerRun
    tpe: WorkerRun | None


@dataclass
class DatabaseResult:
    database: str
    sizes: list[SizeResult]


@contextmanager
def scratch_database(url: str) -> Iterator[tuple[str, str]]:
    """(kind, URL) of a new empty database: ``sqlite`` a file, else on that PostgreSQL."""
    if url == "sqlite":
        with tempfile.TemporaryDirectory(prefix="lstm-hpo-large-") as folder:
            yield "sqlite", f"sqlite:///{Path(folder) / 'lstm-hpo.db'}"
        return
    with scratch_postgres_database(url, prefix="lstm_hpo_bench") as scratch:
        yield "postgres", scratch


def _submit(http: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/studies", json=spec)
    response.raise_for_status()
    study: dict[str, Any] = response.json()
    return study


def _check_study(http: httpx.Client, study_id: str, n_inserted: int, slots: int) -> None:
    """The study succeeded with its slots run, and shows every inserted trial."""
    study = http.get(f"/v1/studies/{study_id}").json()
    counts = study["counts"]
    total = sum(counts.values())
    if study["state"] != "succeeded" or study["n_finished"] != slots:
        raise RuntimeError(f"study {study_id}: {study['state']}, {study['n_finished']} finished")
    if total != n_inserted + slots:
        raise RuntimeError(f"study {study_id}: {total} trials, not {n_inserted + slots}")


def run_database(url: str, args: argparse.Namespace, made: dict[int, list[FrozenTrial]]) -> Any:
    """Every size on one scratch database behind one server."""
    with scratch_database(url) as (kind, database_url):
        _log(f"{kind}: {database_url.split('@')[-1]}")
        log = args.out / "serve.log"  # gitignored, as the other benches'
        data_dir = Path(tempfile.mkdtemp(prefix="lstm-hpo-large-data-"))
        with running_server(data_dir, 0, log=log, database_url=database_url) as server:
            http = httpx.Client(base_url=server.base_url, timeout=3600)
            sizes = []
            try:
                for n in args.sizes:
                    sizes.append(_one_size(http, database_url, n, made[n], args))
            finally:
                http.close()
        return DatabaseResult(kind, sizes)


def _one_size(
    http: httpx.Client,
    url: str,
    n: int,
    trials: list[FrozenTrial],
    args: argparse.Namespace,
) -> SizeResult:
    _log(f"  N = {n:,}")
    study = _submit(http, study_spec(args.worker_trials, "random"))
    insert_s = insert_trials(url, study["optuna_study_name"], trials)
    _log(f"    inserted {n:,} trials in {insert_s:.1f} s")
    optuna_id = int(study["dashboard_url"].rstrip("/").rsplit("/", 1)[1])
    routes = measure_routes(http, study["id"], optuna_id, n, args)
    worker = run_worker(url, args.worker_trials, "random")
    _check_study(http, study["id"], n, args.worker_trials)
    _log(f"    worker (random): {_fmt_worker(worker)}")
    tpe = None
    if args.tpe_trials:
        tpe_study = _submit(http, study_spec(args.tpe_trials, "tpe"))
        insert_trials(url, tpe_study["optuna_study_name"], trials)
        tpe = run_worker(url, args.tpe_trials, "tpe")
        _check_study(http, tpe_study["id"], n, args.tpe_trials)
        _log(f"    worker (tpe):    {_fmt_worker(tpe)}")
    return SizeResult(n, insert_s, routes, worker, tpe)


def _fmt_worker(w: WorkerRun) -> str:
    db = f" + database {w.database_cpu_ms:.1f}" if w.database_cpu_ms is not None else ""
    return (
        f"{w.wall_ms:.1f} ms/trial wall, CPU {w.worker_cpu_ms:.1f}{db} ms/trial, "
        f"first slot {w.first_slot_s:.2f} s ({w.trials} slots)"
    )


# --------------------------------------------------------------------------------------
# Report


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "-"


def table(results: Sequence[DatabaseResult]) -> tuple[str, list[str]]:
    """The Markdown tables (the smallest and largest sizes side by side) and what missed."""
    lines: list[str] = []
    missed: list[str] = []
    for db in results:
        small, large = db.sizes[0], db.sizes[-1]
        lines += [
            "",
            f"{db.database}: N = {small.n:,} vs {large.n:,} finished trials "
            f"(inserted in {small.insert_s:.1f} s / {large.insert_s:.1f} s)",
            "",
            f"| route | p50 ms N={small.n:,} | p99 ms N={small.n:,} | p50 ms N={large.n:,} "
            f"| p99 ms N={large.n:,} | p99 ratio | target (p99) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for label, big in large.routes.items():
            little = small.routes.get(label) or small.routes.get(_deep_label(label, small.n))
            if little is None:
                continue
            target = P99_TARGETS_MS.get(label)
            verdict = "-"
            if target is not None:
                ok = all(s.routes[label].p99 <= target for s in db.sizes)
                verdict = f"<= {target:.0f} {'met' if ok else 'MISSED'}"
                if not ok:
                    missed.append(f"{db.database} {label}")
            if label.startswith("dashboard"):
                ok = all(s.routes[label].status == 200 for s in db.sizes)
                verdict = f"answers: {'yes' if ok else 'NO'} (cold {big.cold_ms:.0f} ms)"
                if not ok:
                    missed.append(f"{db.database} {label}")
            shown = "trials?limit=100&offset=N-100" if "offset" in label else label
            lines.append(
                f"| {shown} | {little.p50:.1f} | {little.p99:.1f} | {big.p50:.1f} | {big.p99:.1f} "
                f"| {_ratio(little.p99, big.p99)} | {verdict} |"
            )
        lines += [
            "",
            f"| worker, per trial | N={small.n:,} | N={large.n:,} | ratio | target |",
            "|---|---:|---:|---:|---|",
        ]
        rows = [
            ("wall ms (random)", small.worker.wall_ms, large.worker.wall_ms, True),
            (
                "service CPU ms (random)",
                small.worker.service_cpu_ms,
                large.worker.service_cpu_ms,
                True,
            ),
            (
                "  of which worker process",
                small.worker.worker_cpu_ms,
                large.worker.worker_cpu_ms,
                False,
            ),
        ]
        if small.worker.database_cpu_ms is not None and large.worker.database_cpu_ms is not None:
            rows.append(
                (
                    "  of which PostgreSQL",
                    small.worker.database_cpu_ms,
                    large.worker.database_cpu_ms,
                    False,
                )
            )
        rows.append(
            (
                "first slot s (loads the study)",
                small.worker.first_slot_s,
                large.worker.first_slot_s,
                False,
            )
        )
        if small.tpe is not None and large.tpe is not None:
            rows.append(
                (
                    "wall ms (tpe: the sampler's own cost)",
                    small.tpe.wall_ms,
                    large.tpe.wall_ms,
                    False,
                )
            )
            rows.append(
                ("service CPU ms (tpe)", small.tpe.service_cpu_ms, large.tpe.service_cpu_ms, False)
            )
        for name, a, b, judged in rows:
            verdict = "-"
            if judged:
                ok = b < WORKER_GROWTH_TARGET * a
                verdict = f"< {WORKER_GROWTH_TARGET:.0f}x {'met' if ok else 'MISSED'}"
                if not ok:
                    missed.append(f"{db.database} worker {name}")
            lines.append(f"| {name} | {a:.1f} | {b:.1f} | {_ratio(a, b)} | {verdict} |")
    return "\n".join(lines), missed


def _deep_label(label: str, n: int) -> str:
    if label.startswith("trials?limit=100&offset="):
        return f"trials?limit=100&offset={max(n - 100, 0)}"
    return label


def _write(
    args: argparse.Namespace,
    machine: Machine,
    began: float,
    results: Sequence[DatabaseResult],
    missed: list[str],
) -> Path:
    """``results.json`` under ``--out``: the machine, the command and every figure."""
    document = {
        "machine": to_jsonable(machine),
        "command": " ".join(sys.argv),
        "seconds": round(time.monotonic() - began, 1),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "databases": [
            {
                "database": db.database,
                "sizes": [
                    {
                        "n": s.n,
                        "insert_s": round(s.insert_s, 2),
                        "routes": {label: t.summary() for label, t in s.routes.items()},
                        "worker": to_jsonable(s.worker),
                        "tpe": to_jsonable(s.tpe),
                    }
                    for s in db.sizes
                ],
            }
            for db in results
        ],
        "missed": missed,
    }
    path: Path = args.out / "results.json"
    path.write_text(json.dumps(document, indent=2))
    return path


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sizes(text_: str) -> list[int]:
    sizes = sorted({positive_int(part) for part in text_.split(",") if part.strip()})
    if not sizes:
        raise argparse.ArgumentTypeError("name at least one size")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON; 1 when a target was missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        action="append",
        help="sqlite (a scratch file) or a PostgreSQL server URL (a scratch database is "
        f"made there); repeatable (default: sqlite and ${POSTGRES_URL_ENV} or "
        f"{DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument("--sizes", type=_sizes, default=[100, 10_000], help="default 100,10000")
    parser.add_argument(
        "--epochs", type=positive_int, default=10, help="curve of each inserted trial"
    )
    parser.add_argument("--requests", type=positive_int, default=200, help="timed GETs per route")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per route")
    parser.add_argument(
        "--worker-trials", type=positive_int, default=40, help="slots run by the worker"
    )
    parser.add_argument(
        "--tpe-trials", type=int, default=5, help="slots of the TPE study (0: none)"
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not time /report (one request: 20 minutes at 10,000 trials here)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/large_study")
    args = parser.parse_args(argv)
    if args.worker_trials < 2:
        parser.error("--worker-trials must be at least 2 (the first slot is reported apart)")
    if args.tpe_trials == 1 or args.tpe_trials < 0:
        parser.error("--tpe-trials must be 0 or at least 2")
    urls = args.database_url or ["sqlite", os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL]
    args.out.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    machine = Machine.describe()
    began = time.monotonic()
    made = {}
    for n in args.sizes:
        t0 = time.monotonic()
        made[n] = make_trials(n, args.epochs)
        _log(f"made {n:,} trials in {time.monotonic() - t0:.1f} s")
    results: list[DatabaseResult] = []
    for url in urls:  # each database's results are written as soon as it is done
        results.append(run_database(url, args, made))
        _write(args, machine, began, results, table(results)[1])
    text_, missed = table(results)
    print(
        f"\nMachine: {machine.cores} cores ({machine.cpu}), Python {machine.python}, "
        f"commit {machine.commit}, {machine.date}; load average {os.getloadavg()[0]:.1f}"
    )
    print(text_)
    print(f"\ntargets: {'all met' if not missed else 'MISSED: ' + ', '.join(missed)}")
    _log(f"wrote {_write(args, machine, began, results, missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
