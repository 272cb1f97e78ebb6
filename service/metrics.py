"""Prometheus metrics (``GET /metrics``, :mod:`service.api.routes.metrics`).

Two kinds, told apart by where they come from:

- **From the database, at scrape time** (:class:`DatabaseCollector`): studies by state,
  trials by outcome and task, trial durations, claimable slots, running trials, live
  workers. Servers and workers are separate processes on any number of machines; the
  database is the one truth they share, so a few aggregate queries per scrape are right
  however many of them run, and every server answers the same numbers (aggregate them
  with ``max``, not ``sum``). They are gauges of the rows that exist: deleting a study
  lowers them (use ``delta``/``deriv``, not ``rate``, for throughput).
- **This process's counters** (sum them over servers): the reaper's rounds and reaps,
  webhook deliveries, and the API's request latency by route template
  (:func:`request_histogram`).

Names (all ``lstm_hpo_*``; :data:`DATABASE_METRICS` and the counters below list them):
``deploy/grafana/lstm-hpo.json`` uses exactly these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, case, cast, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import session_scope
from service.models import SearchJob, TrialLease, Worker
from service.states import ACTIVE_JOB_STATES, JobState, LeaseState

log = logging.getLogger("lstm_hpo.metrics")

# No ``*_created`` series: they double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX: Final = "lstm_hpo"
#: Trial duration buckets, seconds: a synthetic trial takes a second, a language model hours.
DURATION_BUCKETS_S: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
#: Lease outcomes whose duration is a trial's (reaped, cancelled and preempted slots did
#: not run to an end).
_TIMED_OUTCOMES: Final = (LeaseState.COMPLETE, LeaseState.PRUNED, LeaseState.FAILED)

#: The database-derived metric families: name -> (type, help).
DATABASE_METRICS: Final[dict[str, tuple[str, str]]] = {
    f"{PREFIX}_database_up": (
        "gauge",
        "1 when this scrape could read the database, else 0 (and no other database metric).",
    ),
    f"{PREFIX}_studies": ("gauge", "Studies by state."),
    f"{PREFIX}_trials_finished": (
        "gauge",
        "Trial slots that ended, by task kind and outcome "
        "(complete, pruned, failed, reaped, cancelled, ...).",
    ),
    f"{PREFIX}_trials_running": ("gauge", "Trials running now, by task kind."),
    f"{PREFIX}_trial_duration_seconds": (
        "histogram",
        "Wall time from claim to result of trials that completed, were pruned or failed, "
        "by task kind.",
    ),
    f"{PREFIX}_queue_claimable_slots": (
        "gauge",
        "Trial slots a worker could claim now: the unstarted slots of queued and running "
        "studies within their timeout.",
    ),
    f"{PREFIX}_workers_live": (
        "gauge",
        "Worker processes that heartbeated within the grace period, by host and device "
        "(gpu 0, cpu, ...).",
    ),
}

# --------------------------------------------------------------------------------------
# This process's counters (created unregistered: each app's registry adds them)

REAPER_ROUNDS = Counter(
    f"{PREFIX}_reaper_rounds",
    "Reaper rounds this server ran, by outcome (ok, error).",
    ["outcome"],
    registry=None,
)
REAPED_TRIALS = Counter(
    f"{PREFIX}_reaper_reaped_trials",
    "Trials this server's reaper took back from workers that stopped heartbeating.",
    registry=None,
)
ORPHANS_FAILED = Counter(
    f"{PREFIX}_reaper_orphans_failed",
    "Optuna trials no worker owned that this server's reaper failed.",
    registry=None,
)
WEBHOOK_DELIVERIES = Counter(
    f"{PREFIX}_webhook_deliveries",
    "Webhook POSTs this server made, by outcome (sent, retried, failed).",
    ["outcome"],
    registry=None,
)
PROCESS_COUNTERS: Final = (REAPER_ROUNDS, REAPED_TRIALS, ORPHANS_FAILED, WEBHOOK_DELIVERIES)
REQUEST_DURATION: Final = f"{PREFIX}_http_request_duration_seconds"


def request_histogram() -> Histogram:
    """A new (unregistered) histogram of API latency, seconds, by method, route template
    (``/v1/studies/{job_id}``: bounded, never the raw path) and status code."""
    return Histogram(
        REQUEST_DURATION,
        "HTTP request latency by method, route template and status code.",
        ["method", "route", "status"],
        registry=None,
    )


# --------------------------------------------------------------------------------------
# The database at scrape time


@dataclass
class Snapshot:
    """What one scrape read from the database."""

    studies: dict[str, int] = field(default_factory=dict)
    #: (task, lease state) -> count
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    #: task -> (cumulative bucket counts, count, sum of seconds)
    durations: dict[str, tuple[list[int], int, float]] = field(default_factory=dict)
    claimable_slots: int = 0
    workers: dict[tuple[str, str], int] = field(default_factory=dict)


def _task_kind() -> ColumnElement[str]:
    """A job's task kind from its stored spec (SQLite json_extract, PostgreSQL #>>)."""
    return func.coalesce(SearchJob.spec[("task", "kind")].as_string(), "unknown")


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds, per dialect (both columns are UTC timestamps)."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", end - start), Float)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def read_snapshot(
    sessions: sessionmaker[Session], *, live_within_s: float, now: datetime | None = None
) -> Snapshot:
    """Six aggregate queries in one short transaction; the database's errors propagate
    (translated by :func:`service.db.session_scope`).

    ``live_within_s``: a worker that heartbeated within this many seconds is live.
    """
    at = now or datetime.now(UTC)
    snap = Snapshot()
    with session_scope(sessions) as session:
        for state, n in session.execute(
            select(SearchJob.state, func.count()).group_by(SearchJob.state)
        ):
            snap.studies[state] = n
        # Per job first (an index scan of trial_leases), then the task kind once per job:
        # grouping by the extracted kind in a subquery column works on both dialects.
        jobs = select(SearchJob.id, _task_kind().label("task")).subquery()
        per_job = (
            select(TrialLease.job_id, TrialLease.state, func.count().label("n"))
            .group_by(TrialLease.job_id, TrialLease.state)
            .subquery()
        )
        for task, state, n in session.execute(
            select(jobs.c.task, per_job.c.state, func.sum(per_job.c.n))
            .join(jobs, jobs.c.id == per_job.c.job_id)
            .group_by(jobs.c.task, per_job.c.state)
        ):
            if state == LeaseState.RUNNING:
                snap.running[task] = int(n)
            else:
                snap.finished[(task, state)] = int(n)
        snap.durations = _durations(session, jobs)
        snap.claimable_slots = int(
            session.scalar(
                select(
                    func.coalesce(
                        func.sum(SearchJob.n_trials - SearchJob.n_running - SearchJob.n_finished),
                        0,
                    )
                ).where(
                    SearchJob.state.in_(ACTIVE_JOB_STATES),
                    or_(SearchJob.deadline_at.is_(None), SearchJob.deadline_at > at),
                )
            )
            or 0
        )
        cutoff = at - timedelta(seconds=live_within_s)
        for host, device, n in session.execute(
            select(Worker.hostname, Worker.device, func.count())
            .where(Worker.heartbeat_at >= cutoff)
            .group_by(Worker.hostname, Worker.device)
        ):
            snap.workers[(host, device or "unknown")] = n
    return snap


def _durations(session: Session, jobs: Any) -> dict[str, tuple[list[int], int, float]]:
    seconds = _seconds(session, TrialLease.claimed_at, TrialLease.finished_at).label("s")
    timed = (
        select(TrialLease.job_id, seconds)
        .where(TrialLease.state.in_(_TIMED_OUTCOMES), TrialLease.finished_at.is_not(None))
        .subquery()
    )
    buckets = [
        func.sum(case((timed.c.s <= bound, 1), else_=0)).label(f"le{i}")
        for i, bound in enumerate(DURATION_BUCKETS_S)
    ]
    per_job = (
        select(
            timed.c.job_id,
            func.count().label("n"),
            func.sum(timed.c.s).label("total"),
            *buckets,
        )
        .group_by(timed.c.job_id)
        .subquery()
    )
    bucket_columns = [func.sum(per_job.c[f"le{i}"]) for i in range(len(DURATION_BUCKETS_S))]
    rows = session.execute(
        select(jobs.c.task, func.sum(per_job.c.n), func.sum(per_job.c.total), *bucket_columns)
        .join(jobs, jobs.c.id == per_job.c.job_id)
        .group_by(jobs.c.task)
    )
    out: dict[str, tuple[list[int], int, float]] = {}
    for task, n, total, *counts in rows:
        out[task] = ([int(c or 0) for c in counts], int(n or 0), float(total or 0.0))
    return out


class DatabaseCollector(Collector):
    """The :data:`DATABASE_METRICS`, read from the database on each scrape.

    A database that cannot be read gives ``lstm_hpo_database_up 0`` and nothing else of
    it: a scrape never fails because of it (the process metrics still come)."""

    def __init__(self, sessions: sessionmaker[Session], *, live_within_s: float) -> None:
        self.sessions = sessions
        self.live_within_s = live_within_s

    def describe(self) -> Iterable[Metric]:
        # Names only (no query at registration): lets the registry catch a collision.
        for name, (kind, doc) in DATABASE_METRICS.items():
            family = HistogramMetricFamily if kind == "histogram" else GaugeMetricFamily
            yield family(name, doc)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_database_up", DATABASE_METRICS[f"{PREFIX}_database_up"][1]
        )
        try:
            snap = read_snapshot(self.sessions, live_within_s=self.live_within_s)
        except Exception as err:  # the scrape answers; the outage shows as database_up 0
            log.warning("metrics: cannot read the database: %s", str(err).splitlines()[0])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._families(snap)

    def _families(self, snap: Snapshot) -> Iterator[Metric]:
        def doc(name: str) -> str:
            return DATABASE_METRICS[f"{PREFIX}_{name}"][1]

        studies = GaugeMetricFamily(f"{PREFIX}_studies", doc("studies"), labels=["state"])
        for job_state in JobState:  # every state, zeros too: a panel never shows "no data"
            studies.add_metric([job_state.value], snap.studies.get(job_state.value, 0))
        yield studies

        finished = GaugeMetricFamily(
            f"{PREFIX}_trials_finished", doc("trials_finished"), labels=["task", "state"]
        )
        for (task, state), n in sorted(snap.finished.items()):
            finished.add_metric([task, state], n)
        yield finished

        running = GaugeMetricFamily(
            f"{PREFIX}_trials_running", doc("trials_running"), labels=["task"]
        )
        for task, n in sorted(snap.running.items()):
            running.add_metric([task], n)
        yield running

        durations = HistogramMetricFamily(
            f"{PREFIX}_trial_duration_seconds", doc("trial_duration_seconds"), labels=["task"]
        )
        for task, (counts, n, total) in sorted(snap.durations.items()):
            buckets = [(str(float(b)), c) for b, c in zip(DURATION_BUCKETS_S, counts, strict=True)]
            durations.add_metric([task], [*buckets, ("+Inf", n)], total)
        yield durations

        slots = GaugeMetricFamily(f"{PREFIX}_queue_claimable_slots", doc("queue_claimable_slots"))
        slots.add_metric([], snap.claimable_slots)
        yield slots

        workers = GaugeMetricFamily(
            f"{PREFIX}_workers_live", doc("workers_live"), labels=["host", "device"]
        )
        for (host, device), n in sorted(snap.workers.items()):
            workers.add_metric([host, device], n)
        yield workers


def app_collectors(
    sessions: sessionmaker[Session], *, live_within_s: float, requests: Histogram | None = None
) -> list[Collector]:
    """What one app's ``/metrics`` exposes: the database collector, this process's
    counters, the request histogram (when given) and the standard ``process_*`` metrics."""
    collectors: list[Collector] = [
        DatabaseCollector(sessions, live_within_s=live_within_s),
        *PROCESS_COUNTERS,
        ProcessCollector(registry=None),
    ]
    if requests is not None:
        collectors.append(requests)
    return collectors


def build_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry of ``collectors`` (one per app: apps in one process never collide)."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def exported_metric_names(collectors: Iterable[Collector]) -> set[str]:
    """Every series name ``collectors`` can expose (a counter's ``_total``, a histogram's
    ``_bucket``, ``_sum`` and ``_count``), from their descriptions: no scrape, no database."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for collector in collectors:
        describe = getattr(collector, "describe", None)
        families = describe() if describe is not None else collector.collect()
        for family in families:
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names
