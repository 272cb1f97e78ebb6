"""Over real HTTP: POST /v1/studies/estimate answers the cost of a spec's most expensive
config without submitting it; with LSTM_HPO_WORKER_MEMORY_GB set, a space too large is a
422 at submit naming the fields to shrink, and ``on_too_large: prune`` is accepted, its
too-large trials pruned untrained by a worker with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.estimate import GB, estimate_space
from service.search_space import parse_spec
from service.worker import Worker, WorkerOptions
from tests.servers import InProcessServer, serve_in_thread

LIMIT_GB = 0.05  # 50 MB: SMALL fits, BIG does not
YAML = {"Content-Type": "application/yaml"}

SMALL: dict[str, Any] = {
    "task": {"kind": "adding", "seq_len": 20},
    "space": {"hidden_size": {"type": "int", "low": 4, "high": 16}, "batch_size": 8},
    "study": {"n_trials": 2},
}
BIG: dict[str, Any] = {
    "task": {"kind": "adding", "seq_len": 100},
    "space": {
        "num_layers": {"type": "int", "low": 1, "high": 3},
        "hidden_size": {"type": "categorical", "choices": [512, 16]},
        "batch_size": 64,
        "max_epochs": 1,
    },
    "study": {"n_trials": 2, "sampler": "random", "seed": 0},
}


@dataclass(frozen=True)
class Server:
    running: InProcessServer
    database_url: str

    def total(self) -> int:
        response = self.running.http.get("/v1/studies")
        assert response.status_code == 200, response.text
        total: int = response.json()["total"]
        return total


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), worker_memory_gb=LIMIT_GB)
    with serve_in_thread(settings) as running:
        yield Server(running, settings.resolved_database_url())


def test_estimate_answers_the_cost_without_submitting(server: Server) -> None:
    http = server.running.http
    before = server.total()
    response = http.post("/v1/studies/estimate", json=SMALL)
    assert response.status_code == 200, response.text
    body = response.json()
    worst = estimate_space(parse_spec(SMALL), None, LIMIT_GB)
    assert body["params"] == worst.cost.params > 0
    assert body["total_bytes"] == worst.cost.total_bytes
    assert body["activation_bytes"] == worst.cost.activation_bytes
    assert body["config"]["params"]["hidden_size"] == 16
    assert body["fits"] is True
    assert body["limit_bytes"] == int(LIMIT_GB * GB)
    # YAML is read as for POST /v1/studies.
    as_yaml = http.post("/v1/studies/estimate", content=yaml.safe_dump(SMALL), headers=YAML)
    assert as_yaml.status_code == 200, as_yaml.text
    assert as_yaml.json() == body
    assert server.total() == before  # nothing was submitted


def test_estimate_of_a_space_too_large_says_it_does_not_fit(server: Server) -> None:
    response = server.running.http.post("/v1/studies/estimate", json=BIG)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fits"] is False and body["total_bytes"] > body["limit_bytes"]
    params = body["config"]["params"]
    # The costliest choice, not the last one.
    assert (params["num_layers"], params["hidden_size"], params["batch_size"]) == (3, 512, 64)


def test_estimate_of_an_invalid_spec_is_a_422(server: Server) -> None:
    bad = {**SMALL, "space": {"hidden_size": {"type": "int", "low": 0, "high": 16}}}
    response = server.running.http.post("/v1/studies/estimate", json=bad)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == ["space.hidden_size.low"]


def test_estimate_of_a_missing_file_names_the_users_path_only(server: Server) -> None:
    spec = {"task": {"kind": "classify", "path": "missing.jsonl"}}
    response = server.running.http.post("/v1/studies/estimate", json=spec)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == "task.path" and "missing.jsonl" in error["msg"]
    assert "datasets" not in response.text  # the server's directories stay private


def test_the_route_is_in_the_openapi_schema(server: Server) -> None:
    paths = server.running.http.get("/openapi.json").json()["paths"]
    operation = paths["/v1/studies/estimate"]["post"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EstimatePublic"
    }


def test_a_space_too_large_is_refused_at_submit_naming_the_fields(server: Server) -> None:
    before = server.total()
    response = server.running.http.post("/v1/studies", json=BIG)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == "space"
    for field in ("space.hidden_size (512)", "space.num_layers (3)", "space.batch_size (64)"):
        assert field in error["msg"], error["msg"]
    assert "GB" in error["msg"] and "parameters" in error["msg"]
    assert server.total() == before


def test_on_too_large_prune_is_accepted_and_its_trials_pruned(
    server: Server, tmp_path: Path
) -> None:
    http = server.running.http
    spec = {**BIG, "study": {**BIG["study"], "on_too_large": "prune"}}
    response = http.post("/v1/studies", json=spec)
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]

    # A worker whose memory (1 MB) holds none of the space's configs: every trial is
    # pruned at once, untrained, with the reason.
    worker = Worker(
        WorkerOptions(
            database_url=server.database_url,
            poll_interval_s=0.05,
            idle_exit_s=0.0,
            accelerator="cpu",
            worker_memory_gb=0.001,
        )
    )
    try:
        assert worker.run() == 2
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()

    trials = http.get(f"/v1/studies/{study_id}/trials")
    assert trials.status_code == 200, trials.text
    items = trials.json()["items"]
    assert [t["state"] for t in items] == ["pruned", "pruned"]
    for trial in items:
        assert trial["failure_reason"].startswith("too large for a worker: ")
        assert trial["failure_reason"].endswith(" GB > 0.001 GB")
        assert trial["intermediate_values"] == {}  # never trained
    # The study ends with its trials all finished, and says why it has no result.
    finished = http.get(f"/v1/studies/{study_id}").json()
    assert (finished["n_finished"], finished["counts"]["pruned"]) == (2, 2)
    assert finished["state"] == "failed" and "pruned" in finished["error"]
