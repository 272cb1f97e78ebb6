"""A task whose spec chooses the metric it is ranked by (``classify`` with ``task.metric:
val_loss``, minimised, where the kind's default is accuracy, maximised): every part of the
API that names or ranks by the metric follows the spec, not the task kind. A real server
(uvicorn on loopback) and a real worker train tiny LSTMs on the bundled JapaneseVowels, on
SQLite and PostgreSQL.

The fault this guards: the study summary took the metric from the kind, so a study ranked
by cross-entropy was listed as ``val_acc`` (maximize) with its WORST trial as "best", the
report's top table was upside down, and a multi-objective study's trials could not be
listed (its objectives hold ``val_loss``, not ``val_acc``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(name: str, **study: Any) -> dict[str, Any]:
    return {
        "name": name,
        "task": {"kind": "classify", "dataset": "japanese_vowels", "metric": "val_loss"},
        "space": {
            "num_layers": 1,
            "hidden_size": {"type": "int", "low": 4, "high": 16},
            "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "batch_size": 64,
            "max_epochs": 1,
        },
        "study": {"n_trials": 4, "sampler": "random", "pruner": "none", "seed": 5} | study,
    }


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=db_url)) as s:
        yield s


def test_a_study_ranked_by_cross_entropy_is_minimised_everywhere(
    server: InProcessServer, db_url: str
) -> None:
    http = server.http
    single = http.post("/v1/studies", json=_spec("ce-single"))
    multi = http.post("/v1/studies", json=_spec("ce-multi", objectives=["val_loss", "params"]))
    assert single.status_code == 201, single.text
    assert multi.status_code == 201, multi.text
    run_worker_until_idle(db_url)

    study_id = single.json()["id"]
    trials = http.get(f"/v1/studies/{study_id}/trials").json()["items"]
    done = [t for t in trials if t["state"] == "complete"]
    assert len(done) == 4
    values = sorted(t["value"] for t in done)
    assert values[0] < values[-1], "4 random configs differ in cross-entropy"
    lowest = min(done, key=lambda t: t["value"])

    study = http.get(f"/v1/studies/{study_id}").json()
    assert (study["metric"], study["direction"]) == ("val_loss", "minimize")
    assert (study["best_value"], study["best_trial_number"]) == (lowest["value"], lowest["number"])
    listed = {s["id"]: s for s in http.get("/v1/studies").json()["items"]}
    assert listed[study_id]["best_value"] == lowest["value"]
    assert listed[study_id]["metric"] == "val_loss"
    best = http.get(f"/v1/studies/{study_id}/best").json()
    assert best["value"] == lowest["value"] and best["trial_number"] == lowest["number"]

    report = http.get(f"/v1/studies/{study_id}/report")
    assert report.status_code == 200, report.text
    assert "classify / val_loss (minimize)" in report.text
    assert "lowest" in report.text and "highest" not in report.text

    # Several objectives, the spec's metric first: each trial's value is its cross-entropy.
    multi_id = multi.json()["id"]
    listed_trials = http.get(f"/v1/studies/{multi_id}/trials")
    assert listed_trials.status_code == 200, listed_trials.text
    for t in listed_trials.json()["items"]:
        if t["state"] == "complete":
            assert t["value"] == t["values"][0] and t["values"][1] > 0
    assert http.get(f"/v1/studies/{multi_id}").json()["metric"] == "val_loss"


def test_warm_start_needs_the_same_metric(server: InProcessServer) -> None:
    """Values in accuracy cannot seed a search ranked by cross-entropy (nothing is made)."""
    by_accuracy = _spec("by-accuracy")
    by_accuracy["task"]["metric"] = "val_acc"
    source = server.http.post("/v1/studies", json=by_accuracy).json()["id"]
    seeded = _spec("seeded", warm_start_from=[source])
    refused = server.http.post("/v1/studies", json=seeded)
    assert refused.status_code == 422, refused.text
    assert [(e["loc"], e["msg"]) for e in refused.json()["errors"]] == [
        (
            "study.warm_start_from.0",
            f"study {source} was ranked by val_acc, this one by val_loss: "
            "warm start needs the same metric",
        )
    ]
    assert server.http.get("/v1/studies").json()["total"] == 1
