"""Several objectives and constraints, end to end: a real server (uvicorn on loopback) and
a real worker loop on the synthetic task, on SQLite and PostgreSQL.

``study.objectives: [value, params]`` makes an Optuna multi-objective study whose ``best``
is the Pareto front (each config with its values); ``study.constraints`` marks the
configurations that break a bound infeasible (an Optuna constraint) and prunes them
untrained; the dashboard's axes carry each objective's name and unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from service.config import Settings
from service.states import FAILURE_ATTR
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle as _run_worker

SPACE: dict[str, Any] = {
    "num_layers": {"type": "int", "low": 1, "high": 3},
    "hidden_size": {"type": "categorical", "choices": [16, 64, 256]},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "max_epochs": 2,
}
#: The synthetic task's "params" are hidden_size**2 * num_layers * 4.
BOUND = 64**2 * 3 * 4


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=db_url)) as s:
        yield s


def _spec(**study: Any) -> dict[str, Any]:
    return {
        "name": "pareto",
        "task": {"kind": "synthetic"},
        "space": SPACE,
        "study": {"n_trials": 12, "sampler": "random", "seed": 3} | study,
    }


def test_pareto_front_constraints_and_metric_names(server: InProcessServer, db_url: str) -> None:
    spec = _spec(objectives=["value", "params"], constraints={"params": f"<= {BOUND}"})
    created = server.http.post("/v1/studies", json=spec)
    assert created.status_code == 201, created.text
    study = created.json()
    assert study["objectives"] == ["value", "params"]
    assert study["spec"]["study"]["pruner"] == "none"  # the default pruner ranks one objective
    _run_worker(db_url)

    optuna_study = optuna.load_study(
        study_name=study["optuna_study_name"], storage=server.backend.storage
    )
    assert optuna_study.metric_names == [
        "value (synthetic objective)",
        "params (trainable parameters)",
    ]
    trials = optuna_study.get_trials()
    assert len(trials) == 12
    infeasible = [t for t in trials if t.params["hidden_size"] == 256]
    assert infeasible, "seed 3 samples hidden_size 256 at least once"
    for t in trials:
        params = t.params["hidden_size"] ** 2 * t.params["num_layers"] * 4
        assert t.user_attrs["params"] == params
        assert t.constraints == {"params": params - BOUND}
        if params > BOUND:  # infeasible: pruned untrained, with the reason
            assert t.state == TrialState.PRUNED
            assert "infeasible (study.constraints): params" in t.user_attrs[FAILURE_ATTR]
        else:
            assert t.state == TrialState.COMPLETE and t.values[1] == params

    # best: the Pareto front, each with its values, best metric first; as YAML, one
    # document per config headed by its values.
    front = server.http.get(f"/v1/studies/{study['id']}/best").json()
    assert isinstance(front, list) and front
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for b in front:
        value, params = b["values"]["value"], b["values"]["params"]
        assert b["value"] == value
        assert not any(  # nothing feasible dominates it
            t.values[0] <= value and t.values[1] <= params and t.values != [value, params]
            for t in complete
        )
    assert [b["value"] for b in front] == sorted(b["value"] for b in front)
    yaml_text = server.http.get(f"/v1/studies/{study['id']}/best?format=yaml").text
    assert yaml_text.count("# trial ") == len(front) and "params=" in yaml_text
    trials_api = server.http.get(f"/v1/studies/{study['id']}/trials").json()["items"]
    done = [t for t in trials_api if t["state"] == "complete"]
    assert all(t["values"][0] == t["value"] for t in done)


def test_single_objective_studies_are_unchanged_but_named(
    server: InProcessServer, db_url: str
) -> None:
    created = server.http.post("/v1/studies", json=_spec(n_trials=3)).json()
    _run_worker(db_url)
    best = server.http.get(f"/v1/studies/{created['id']}/best").json()
    assert isinstance(best, dict) and best.get("values") is None
    storage = server.backend.storage
    study = optuna.load_study(study_name=created["optuna_study_name"], storage=storage)
    assert study.metric_names == ["value (synthetic objective)"]
    assert created["objectives"] is None


def test_bad_objectives_and_constraints_name_the_field(server: InProcessServer) -> None:
    cases = {
        "study.pruner": _spec(objectives=["value", "params"], pruner="median"),
        "study.objectives": _spec(objectives=["params", "latency_ms"]),
        "study.objectives.1": _spec(objectives=["value", "flops"]),
        "study.sampler": _spec(objectives=["value", "params"], sampler="cmaes"),
        "study.constraints.params": _spec(constraints={"params": "< 10"}),
    }
    for field, spec in cases.items():
        response = server.http.post("/v1/studies", json=spec)
        assert response.status_code == 422, (field, response.text)
        assert field in [e["loc"] for e in response.json()["errors"]], (field, response.text)
    assert server.http.get("/v1/studies").json()["total"] == 0
