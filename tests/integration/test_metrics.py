"""GET /metrics after real studies ran: the database-derived numbers match the studies (on
SQLite and PostgreSQL), every server on one database answers the same, request latency
is labelled by route template, and LSTM_HPO_METRICS decides who may scrape. Real server
(uvicorn on loopback), real worker loop, synthetic task (trains nothing)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from service import auth
from service.config import Settings
from service.metrics import DURATION_BUCKETS_S, DatabaseCollector
from service.worker import Worker, WorkerOptions
from tests.servers import InProcessServer, serve_in_thread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _spec(n_trials: int, **task: Any) -> dict[str, Any]:
    return {
        "name": "metrics",
        "task": {"kind": "synthetic", **task},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 3},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 2,
        },
        "study": {"n_trials": n_trials, "sampler": "random", "pruner": "none", "seed": 0},
    }


def _submit(server: InProcessServer, spec: dict[str, Any]) -> str:
    response = server.http.post("/v1/studies", json=spec)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def _run_worker(db_url: str) -> int:
    worker = Worker(
        WorkerOptions(database_url=db_url, poll_interval_s=0.05, idle_exit_s=0.0, device="gpu 3")
    )
    try:
        return worker.run()
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()


def _scrape(http: httpx.Client, **headers: str) -> Samples:
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_match_the_studies_on_every_server(tmp_path: Path, db_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, metrics="public")
    with serve_in_thread(settings) as server:
        _submit(server, _spec(4))
        # Every configuration fails: the study fails with 2 failed trials.
        _submit(server, _spec(2, fail_when={"max_epochs": 2}))
        assert _run_worker(db_url) == 6
        _submit(server, _spec(3))  # queued: 3 claimable slots
        cancelled = _submit(server, _spec(5))
        assert server.http.post(f"/v1/studies/{cancelled}/cancel").status_code == 200
        samples = _scrape(server.http)

        assert _value(samples, "lstm_hpo_database_up") == 1
        studies = {
            state: _value(samples, "lstm_hpo_studies", state=state)
            for state in ("queued", "running", "succeeded", "failed", "cancelled")
        }
        assert studies == {"queued": 1, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 1}
        finished = {
            dict(labels)["state"]: value
            for (name, labels), value in samples.items()
            if name == "lstm_hpo_trials_finished"
        }
        assert finished == {"complete": 4, "failed": 2}
        assert all(
            dict(labels)["task"] == "synthetic" for _n, labels in samples if "task" in dict(labels)
        )
        assert not [key for key in samples if key[0] == "lstm_hpo_trials_running"]
        assert _value(samples, "lstm_hpo_queue_claimable_slots") == 3
        live = "lstm_hpo_workers_live"
        assert _value(samples, live, host=socket.gethostname(), device="gpu 3") == 1

        histogram = "lstm_hpo_trial_duration_seconds"
        assert _value(samples, f"{histogram}_count", task="synthetic") == 6
        buckets = [
            _value(samples, f"{histogram}_bucket", task="synthetic", le=str(float(b)))
            for b in DURATION_BUCKETS_S
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == _value(samples, f"{histogram}_bucket", task="synthetic", le="+Inf")
        assert buckets[-1] == 6  # synthetic trials take well under a day
        assert 0 < _value(samples, f"{histogram}_sum", task="synthetic") < 6 * 60

        # Latency by route template, never the raw path.
        requests = "lstm_hpo_http_request_duration_seconds_count"
        assert _value(samples, requests, method="POST", route="/v1/studies", status="201") == 4
        routes = {dict(labels)["route"] for name, labels in samples if name == requests}
        (cancel_route,) = [r for r in routes if r.endswith("/cancel")]
        assert re.fullmatch(r"/v1/studies/\{\w+\}/cancel", cancel_route)
        assert _value(samples, requests, method="POST", route=cancel_route, status="200") == 1
        assert not any(cancelled in route for route in routes)
        assert _value(samples, "lstm_hpo_reaper_rounds_total", outcome="ok") >= 1

        if db_url.startswith("sqlite"):  # a second server on the same database agrees
            with serve_in_thread(settings) as other:
                again = _scrape(other.http)
            for key, value in samples.items():
                if key[0].startswith(("lstm_hpo_studies", "lstm_hpo_trial", "lstm_hpo_queue")):
                    assert again[key] == value, key


def test_who_may_scrape(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url)
    assert settings.metrics == "admin"
    with serve_in_thread(settings) as server:
        assert server.http.get("/metrics").status_code == 200  # open mode: no token exists
        admin = auth.create_token(server.backend.sessions, "ops", admin=True)
        alice = auth.create_token(server.backend.sessions, "alice")
        assert server.http.get("/metrics").status_code == 401
        refused = server.http.get("/metrics", headers={"Authorization": f"Bearer {alice}"})
        assert refused.status_code == 403
        assert refused.json()["error"] == "Forbidden"
        _scrape(server.http, Authorization=f"Bearer {admin}")
        # OpenMetrics when the scraper asks for it.
        om = server.http.get(
            "/metrics",
            headers={"Authorization": f"Bearer {admin}", "Accept": "application/openmetrics-text"},
        )
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        assert "/metrics" not in server.http.get("/openapi.json").json()["paths"]
    with serve_in_thread(settings.model_copy(update={"metrics": "public"})) as server:
        _scrape(server.http)  # tokens exist, none needed
    with serve_in_thread(settings.model_copy(update={"metrics": "off"})) as server:
        off = server.http.get("/metrics")
        assert off.status_code == 404
        assert off.json()["error"] == "NotFound"


def test_an_unreadable_database_is_database_up_0_not_a_failed_scrape(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    collector = DatabaseCollector(sessionmaker(bind=engine), live_within_s=60)
    families = list(collector.collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [
        ("lstm_hpo_database_up", [0.0])
    ]
    engine.dispose()


@pytest.mark.parametrize("path", ["/v1/studies/x/trials?state=complete", "/v1/nope/deeper"])
def test_unmatched_and_parameterised_paths_keep_the_route_label_bounded(
    tmp_path: Path, sqlite_url: str, path: str
) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, metrics="public")
    with serve_in_thread(settings) as server:
        server.http.get(path)
        server.http.get("/dashboard")
        routes = {
            dict(labels)["route"]
            for name, labels in _scrape(server.http)
            if name == "lstm_hpo_http_request_duration_seconds_count"
        }
    if "trials" in path:
        assert routes - {"dashboard"} == {r for r in routes if r.endswith("}/trials")}
    else:
        assert routes - {"dashboard"} == {"unmatched"}
    assert "dashboard" in routes
    assert len(routes) == 2
