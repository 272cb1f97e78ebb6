"""Per-trial overhead of the service's worker path vs plain ``study.optimize``, same storage.

Both arms run ``--trials`` zero-cost trials against the same freshly migrated database
(our tables via ``service.migrate.upgrade_schema`` plus Optuna's tables), with the same
sampler (TPE by default, as ``service.training.objective.build_sampler`` builds it: plain
uses one for the run, the worker a new one per slot, seeded from the slot; ``--sampler
random`` leaves the service's own cost without the sampler's) and the same
parameters (the synthetic space below: ``num_layers``, ``hidden_size`` (log),
``dropout`` (only with two or more layers), ``lr`` (log)):

- **plain**: ``optuna.create_study(storage=RDBStorage(url))`` then
  ``study.optimize(objective, n_trials=N)`` with an objective that suggests those
  parameters and returns a constant.
- **worker**: a ``kind: synthetic`` study (``sleep_s: 0``, ``max_epochs: 1``,
  ``pruner: none``) with ``n_trials: N`` submitted through ``service.studies.submit_study``,
  then one in-process ``service.worker.Worker`` runs it to the end: for every slot it claims
  a lease, asks (the study is loaded on the job's first slot and kept), attaches the trial
  to the lease, runs the synthetic objective (samples the resolved config, stores it as a
  user attribute, reports one epoch, asks the pruner), tells, and finishes the slot.

Optuna logs at WARNING in both arms and the worker's own INFO lines are not configured, so
neither arm pays for log output.

Timed: ``study.optimize`` (plain) and ``Worker.run`` after ``Worker.start`` returned (the
worker's one-off start-up -- schema check, Optuna storage, registration -- is reported
apart as ``start ms``). ms/trial is the arm's wall time over N; the process's CPU time is
shown beside it (on PostgreSQL part of the work runs in the server, outside the process).
Repetitions alternate the order of the arms (AB, BA, AB, ...) so that drift in machine
load cancels; the summary is the median over repetitions, the ratio the median of the
per-repetition ratios (worker / plain) on the wall clock, the target's clock; the CPU ratio
beside it shows how much of a difference is machine noise (on SQLite all the work is in
the process, so CPU time is the steadier figure on a shared machine). Both arms are run
once untimed first (imports, caches). Every run is checked: N COMPLETE trials in Optuna,
the job succeeded with N finished slots, and both arms sampled the same parameter
distributions over the whole run.

    python bench/trial_overhead.py                      # SQLite and PostgreSQL, 200 trials
    python bench/trial_overhead.py --backend sqlite --trials 100 --repeats 3
    python bench/trial_overhead.py --backend sqlite --profile   # cProfile one worker run

PostgreSQL: ``--postgres-url`` (default ``$LSTM_HPO_TEST_POSTGRES_URL``) names a server
whose user may CREATE DATABASE; the run creates ``lstm_hpo_bench_<random>`` there and drops
it at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import optuna

from service import queue
from service.auth import LOCAL
from service.db import scratch_postgres_database
from service.migrate import upgrade_schema
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.studies import Backend, open_backend, submit_study
from service.worker import Worker, WorkerOptions

TARGET_RATIO = 1.5
POSTGRES_URL_ENV = "LSTM_HPO_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

BackendName: TypeAlias = Literal["sqlite", "postgres"]
Arm: TypeAlias = Literal["plain", "worker"]
Stamp: TypeAlias = tuple[float, float]  # (wall, cpu) seconds


def synthetic_spec(n_trials: int, seed: int, sampler: str = "tpe") -> dict[str, Any]:
    """The worker arm's study: no training, one reported epoch, ``sampler``, no pruning."""
    return {
        "name": "trial-overhead",
        "task": {"kind": "synthetic", "sleep_s": 0},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "hidden_size": {"type": "int", "low": 16, "high": 256, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
            "max_epochs": 1,
        },
        "study": {
            "n_trials": n_trials,
            "sampler": sampler,
            "pruner": "none",
            "seed": seed,
            "max_retries": 0,
        },
    }


def plain_objective(trial: optuna.Trial) -> float:
    """The plain arm: the synthetic spec's parameters in ``sample_config``'s order, no work."""
    num_layers = trial.suggest_int("num_layers", 1, 4)
    trial.suggest_int("hidden_size", 16, 256, log=True)
    if num_layers > 1:  # as sample_config: no inter-layer dropout with one layer
        trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("lr", 1.0e-4, 1.0e-1, log=True)
    return 0.0


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class ArmResult:
    """One timed run of one arm."""

    arm: Arm
    n_trials: int
    wall_s: float
    cpu_s: float
    start_s: float = 0.0  # worker arm: Worker.start (not in wall_s)
    distributions: frozenset[tuple[str, str]] = frozenset()

    @property
    def wall_ms(self) -> float:
        return 1000.0 * self.wall_s / self.n_trials

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.cpu_s / self.n_trials


def _distributions(trials: Sequence[optuna.trial.FrozenTrial]) -> frozenset[tuple[str, str]]:
    return frozenset((name, repr(d)) for t in trials for name, d in t.distributions.items())


def _check_complete(arm: Arm, trials: Sequence[optuna.trial.FrozenTrial], n_trials: int) -> None:
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(trials) != n_trials or len(complete) != n_trials:
        raise RuntimeError(
            f"{arm} arm: expected {n_trials} COMPLETE trials, got {len(complete)} of {len(trials)}"
        )


def run_plain(url: str, n_trials: int, seed: int, sampler: str = "tpe") -> ArmResult:
    """``study.optimize`` on a new study in ``url``; only ``optimize`` is timed."""
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=f"plain-{uuid.uuid4().hex[:8]}",
            direction="minimize",
            sampler=(
                optuna.samplers.TPESampler(seed=seed)
                if sampler == "tpe"
                else optuna.samplers.RandomSampler(seed=seed)
            ),
        )
        begin = _stamp()
        study.optimize(plain_objective, n_trials=n_trials)
        end = _stamp()
        trials = study.get_trials(deepcopy=False)
        _check_complete("plain", trials, n_trials)
    finally:
        storage.engine.dispose()
    return ArmResult(
        "plain",
        n_trials,
        end[0] - begin[0],
        end[1] - begin[1],
        distributions=_distributions(trials),
    )


class _TimedWorker(Worker):
    """A :class:`Worker` that notes when its one-off start-up ended."""

    started: Stamp | None = None

    def start(self) -> bool:
        started = super().start()
        self.started = _stamp()
        return started


def _dispose_backend(backend: Backend) -> None:
    bind = backend.sessions.kw.get("bind")
    if bind is not None:
        bind.dispose()
    if isinstance(backend.storage, optuna.storages.RDBStorage):
        backend.storage.engine.dispose()


def run_worker(
    url: str,
    n_trials: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
    sampler: str = "tpe",
) -> ArmResult:
    """Submit a synthetic study and let one in-process worker run every slot of it."""
    # Two connections: Optuna's storage checks its schema version on two at once.
    backend = open_backend(url, limits=DEFAULT_LIMITS, base_url="http://bench.invalid", pool_size=2)
    try:
        study, _ = submit_study(
            backend, parse_spec(synthetic_spec(n_trials, seed, sampler)), principal=LOCAL
        )
        worker = _TimedWorker(
            WorkerOptions(
                database_url=url,
                heartbeat_interval_s=3600.0,  # no heartbeat inside the timed window
                poll_interval_s=0.01,
                max_trials=n_trials,
                idle_exit_s=0.0,  # an empty queue before N trials is an error, below
                schema_timeout_s=30.0,
            )
        )
        try:
            begin = _stamp()
            if profiler is not None:
                profiler.enable()
            done = worker.run()
            if profiler is not None:
                profiler.disable()
            end = _stamp()
        finally:
            worker.engine.dispose()
            if worker.storage is not None:
                worker.storage.engine.dispose()
        started = worker.started
        assert started is not None
        job = queue.get_job(backend.sessions, study.id)
        if done != n_trials or job.state != queue.JobState.SUCCEEDED or job.n_finished != n_trials:
            raise RuntimeError(
                f"worker arm: ran {done} slots, job {job.state} with "
                f"{job.n_finished}/{n_trials} finished"
            )
        trials = backend.storage.get_all_trials(
            backend.storage.get_study_id_from_name(study.optuna_study_name), deepcopy=False
        )
        _check_complete("worker", trials, n_trials)
    finally:
        _dispose_backend(backend)
    return ArmResult(
        "worker",
        n_trials,
        end[0] - started[0],
        end[1] - started[1],
        start_s=started[0] - begin[0],
        distributions=_distributions(trials),
    )


@contextmanager
def fresh_database(backend: BackendName, postgres_url: str) -> Iterator[str]:
    """A new database with our tables migrated and Optuna's created; removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="lstm-hpo-bench-") as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            _create_schema(url)
            yield url
        return
    with scratch_postgres_database(postgres_url, prefix="lstm_hpo_bench") as url:
        _create_schema(url)
        yield url


def _create_schema(url: str) -> None:
    upgrade_schema(url)
    optuna.storages.RDBStorage(url).engine.dispose()  # creates Optuna's tables


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class BackendSummary:
    """The medians over repetitions for one backend."""

    backend: BackendName
    n_trials: int
    plain_ms: float
    worker_ms: float
    plain_cpu_ms: float
    worker_cpu_ms: float
    start_ms: float
    ratio: float
    cpu_ratio: float


def run_backend(
    backend: BackendName, args: argparse.Namespace
) -> tuple[list[tuple[ArmResult, ArmResult]], BackendSummary]:
    """Warm up, then ``--repeats`` interleaved (plain, worker) pairs on a fresh database."""
    rows: list[tuple[ArmResult, ArmResult]] = []
    with fresh_database(backend, args.postgres_url) as url:
        warm_plain = run_plain(url, args.warmup, seed=0, sampler=args.sampler)
        warm_worker = run_worker(url, args.warmup, seed=0, sampler=args.sampler)
        sampled = {"plain": set(warm_plain.distributions), "worker": set(warm_worker.distributions)}
        for rep in range(args.repeats):
            seed = rep + 1
            if rep % 2 == 0:
                plain = run_plain(url, args.trials, seed, args.sampler)
                worker = run_worker(url, args.trials, seed, sampler=args.sampler)
            else:
                worker = run_worker(url, args.trials, seed, sampler=args.sampler)
                plain = run_plain(url, args.trials, seed, args.sampler)
            rows.append((plain, worker))
            sampled["plain"] |= plain.distributions
            sampled["worker"] |= worker.distributions
            print(
                f"  {backend} rep {rep + 1}: plain {plain.wall_ms:.2f} ms/trial, "
                f"worker {worker.wall_ms:.2f} ms/trial ({worker.wall_ms / plain.wall_ms:.2f}x)",
                file=sys.stderr,
                flush=True,
            )
        if sampled["plain"] != sampled["worker"]:
            raise RuntimeError(
                "the arms sampled different parameters: "
                f"{sorted(sampled['plain'] ^ sampled['worker'])}"
            )
        if args.profile:
            profiler = cProfile.Profile()
            run_worker(url, args.trials, seed=0, profiler=profiler, sampler=args.sampler)
            print(f"\ncProfile of one worker run on {backend} (top 40 by cumulative time):")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    summary = BackendSummary(
        backend=backend,
        n_trials=args.trials,
        plain_ms=_median([p.wall_ms for p, _ in rows]),
        worker_ms=_median([w.wall_ms for _, w in rows]),
        plain_cpu_ms=_median([p.cpu_ms for p, _ in rows]),
        worker_cpu_ms=_median([w.cpu_ms for _, w in rows]),
        start_ms=_median([1000.0 * w.start_s for _, w in rows]),
        ratio=_median([w.wall_ms / p.wall_ms for p, w in rows]),
        cpu_ratio=_median([w.cpu_ms / p.cpu_ms for p, w in rows]),
    )
    return rows, summary


def _print_table(
    results: Sequence[tuple[list[tuple[ArmResult, ArmResult]], BackendSummary]],
) -> None:
    print()
    print(f"{'backend':<9} {'rep':>6} | {'wall ms/trial':^26} | {'CPU ms/trial':^17} | start ms")
    print(
        f"{'':<9} {'':>6} | {'plain':>8} {'worker':>8} {'ratio':>7} | {'plain':>8} {'worker':>8} |"
    )
    for rows, summary in results:
        for rep, (plain, worker) in enumerate(rows, start=1):
            print(
                f"{summary.backend:<9} {rep:>6} | {plain.wall_ms:>8.2f} {worker.wall_ms:>8.2f} "
                f"{worker.wall_ms / plain.wall_ms:>6.2f}x | {plain.cpu_ms:>8.2f} "
                f"{worker.cpu_ms:>8.2f} | {1000.0 * worker.start_s:>8.1f}"
            )
        print(
            f"{summary.backend:<9} {'median':>6} | {summary.plain_ms:>8.2f} "
            f"{summary.worker_ms:>8.2f} {summary.ratio:>6.2f}x | {summary.plain_cpu_ms:>8.2f} "
            f"{summary.worker_cpu_ms:>8.2f} | {summary.start_ms:>8.1f}"
        )
    print()
    print(
        "| backend | trials | repeats | plain ms/trial | worker ms/trial | ratio "
        "| CPU ratio | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for rows, summary in results:
        verdict = "met" if summary.ratio <= TARGET_RATIO else "MISSED"
        print(
            f"| {summary.backend} | {summary.n_trials} | {len(rows)} | {summary.plain_ms:.1f} "
            f"| {summary.worker_ms:.1f} | {summary.ratio:.2f}x | {summary.cpu_ratio:.2f}x "
            f"| <= {TARGET_RATIO}x {verdict} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit status 1 when a ratio misses the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--trials", type=int, default=200, help="trials per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm")
    parser.add_argument("--warmup", type=int, default=20, help="trials of the untimed first run")
    parser.add_argument(
        "--sampler",
        choices=("tpe", "random"),
        default="tpe",
        help="both arms' sampler (random: no sampling cost, the service's own cost alone)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL,
        help=f"server URL (default: ${POSTGRES_URL_ENV} or {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile one worker run (untimed)"
    )
    args = parser.parse_args(argv)
    if args.trials < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--trials, --repeats and --warmup must be at least 1")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    backends: list[BackendName] = (
        ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    )
    results = [run_backend(backend, args) for backend in backends]
    _print_table(results)
    torch_loaded = any(name in sys.modules for name in ("torch", "lightning"))
    print(f"\ntorch/lightning imported by the worker path: {'yes' if torch_loaded else 'no'}")
    missed = [s.backend for _, s in results if s.ratio > TARGET_RATIO]
    for _, s in results:
        print(
            f"{s.backend}: worker overhead {s.worker_ms - s.plain_ms:+.2f} ms/trial "
            f"(difference of the medians); ratio {s.ratio:.2f}x, target <= {TARGET_RATIO}x"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
