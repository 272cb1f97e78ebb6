"""The product path over real HTTP: submit -> workers train -> best -> retrain -> dashboard."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.client import Client
from service.search_space import load_config_file
from tests.acceptance.conftest import LiveServer, start_server

TINY_ADDING = """
name: tiny-adding
task: {kind: adding, seq_len: 10, n_train: 256, n_val: 64, n_test: 64}
space:
  num_layers: {type: int, low: 1, high: 2}
  hidden_size: {type: int, low: 4, high: 16}
  init: {type: categorical, choices: [pytorch_default, orthogonal]}
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  batch_size: 64
  max_epochs: 2
study: {n_trials: 4, sampler: random, pruner: none, seed: 1}
"""


def _synthetic(n_trials: int, sleep_s: float = 0.0, **task: Any) -> dict[str, Any]:
    return {
        "name": "synthetic-accept",
        "task": {"kind": "synthetic", "sleep_s": sleep_s, **task},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 4},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 3,
        },
        "study": {"n_trials": n_trials, "pruner": "none", "seed": 0},
    }


def test_submit_train_best_retrain_and_dashboard(live_server: LiveServer) -> None:
    http = httpx.Client(base_url=live_server.url, timeout=30)
    response = http.post(
        "/v1/studies", content=TINY_ADDING, headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["state"] == "queued" and created["name"] == "tiny-adding"
    assert created["dashboard_url"].startswith(live_server.url + "/dashboard/studies/")
    study_id = created["id"]

    with Client(live_server.url) as client:
        study = client.wait(study_id, timeout_s=240, poll_s=0.5)
    assert study.state == "succeeded", live_server.log.read_text()[-3000:]
    assert study.n_finished == 4
    assert study.counts.complete + study.counts.pruned + study.counts.failed == 4
    assert study.counts.running == 0 and study.best_value is not None

    trials = http.get(f"/v1/studies/{study_id}/trials").json()
    assert trials["total"] == 4
    assert sorted(t["number"] for t in trials["items"]) == [0, 1, 2, 3]
    for t in trials["items"]:
        if t["state"] == "complete":
            assert len(t["intermediate_values"]) == 2 and t["duration_s"] > 0
            assert set(t["params"]) >= {"num_layers", "hidden_size", "init", "lr"}

    best = http.get(f"/v1/studies/{study_id}/best").json()
    assert best["value"] == study.best_value
    assert best["config"]["task"]["kind"] == "adding"
    top = http.get(f"/v1/studies/{study_id}/best", params={"k": 3}).json()
    assert top[0] == best and [b["value"] for b in top] == sorted(b["value"] for b in top)

    # `lstm-hpo best -o` then `lstm-hpo train` on the file, as it is.
    best_file = live_server.data_dir.parent / "best.yaml"
    result = live_server.cli("best", study_id, "-o", str(best_file))
    assert result.returncode == 0, result.stderr
    config = load_config_file(best_file)
    assert config.model_dump(mode="json", exclude_none=True) == best["config"]
    yaml_text = http.get(f"/v1/studies/{study_id}/best", params={"format": "yaml"}).text
    assert yaml.safe_load(yaml_text) == best["config"]
    out_dir = live_server.data_dir.parent / "retrain"
    trained = live_server.cli("train", str(best_file), "--out", str(out_dir), "--json")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["metric"] == "val_mse" and summary["value"] is not None
    assert (out_dir / "best.ckpt").exists()

    # The dashboard (mounted at the root) shows the study the REST API created.
    dashboard = http.get("/api/studies").json()
    names = [s["study_name"] for s in dashboard["study_summaries"]]
    assert study.optuna_study_name in names
    assert http.get("/dashboard").status_code == 200


def test_invalid_spec_is_422_naming_the_field_and_creates_nothing(
    live_server: LiveServer,
) -> None:
    http = httpx.Client(base_url=live_server.url, timeout=30)
    bad = _synthetic(3)
    bad["space"]["dropout"] = {"type": "float", "low": 0.0, "high": 0.95}
    response = http.post("/v1/studies", json=bad)
    assert response.status_code == 422
    body = response.json()
    assert {"loc": "space.dropout.high", "msg": "must be <= 0.9"} in body["errors"]
    response = http.post(
        "/v1/studies", content="task: [", headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 422 and "not valid YAML" in response.json()["detail"]
    response = http.post("/v1/studies", content=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]
    assert http.get("/v1/studies").json()["total"] == 0
    assert http.get("/api/studies").json()["study_summaries"] == []
    # The CLI shows the same messages and exits 2.
    spec_file = live_server.data_dir.parent / "bad.json"
    spec_file.write_text(json.dumps(bad))
    result = live_server.cli("submit", str(spec_file))
    assert result.returncode == 2 and "space.dropout.high: must be <= 0.9" in result.stderr


def test_best_is_409_until_a_trial_completes_then_cancel_stops_claims(
    live_server: LiveServer,
) -> None:
    with Client(live_server.url) as client:
        study = client.submit(_synthetic(50, sleep_s=1.5))
        response = httpx.get(f"{live_server.url}/v1/studies/{study.id}/best")
        assert response.status_code == 409
        assert "no completed trial" in response.json()["detail"]
        cancelled = client.cancel(study.id)
        assert cancelled.state == "cancelled"
        time.sleep(2.5)  # trials already running finish and are recorded
        after = client.get(study.id)
        assert after.state == "cancelled" and after.n_finished < 50
        time.sleep(2.0)
        assert client.get(study.id).n_finished == after.n_finished  # nothing new claimed
        response = httpx.post(f"{live_server.url}/v1/studies/{study.id}/cancel")
        assert response.status_code == 409
        assert httpx.get(f"{live_server.url}/v1/studies/nope").status_code == 404


def test_idempotency_key_returns_the_same_study(live_server: LiveServer) -> None:
    http = httpx.Client(base_url=live_server.url, timeout=30)
    spec = _synthetic(2)
    first = http.post("/v1/studies", json=spec, headers={"Idempotency-Key": "abc"})
    second = http.post("/v1/studies", json=spec, headers={"Idempotency-Key": "abc"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    other = dict(spec, name="different")
    clash = http.post("/v1/studies", json=other, headers={"Idempotency-Key": "abc"})
    assert clash.status_code == 409
    assert http.get("/v1/studies").json()["total"] == 1


def test_failing_trials_record_their_reason_and_the_worker_carries_on(
    live_server: LiveServer,
) -> None:
    spec = _synthetic(6, fail_when={"num_layers": 1}, nan_when={"num_layers": 2})
    spec["space"]["num_layers"] = {"type": "categorical", "choices": [1, 2, 3]}
    spec["study"]["sampler"] = "grid"
    spec["space"]["lr"] = {"type": "float", "low": 0.001, "high": 0.002, "step": 0.001}
    with Client(live_server.url) as client:
        study = client.submit(spec)
        done = client.wait(study.id, timeout_s=120, poll_s=0.3)
        assert done.state == "succeeded" and done.n_finished == 6
        trials = client.trials(study.id).items
    by_layers: dict[int, list[Any]] = {}
    for t in trials:
        by_layers.setdefault(t.params["num_layers"], []).append(t)
    # Two workers asking at once may get the same grid point, so not every value is
    # certain to be sampled; each one that was behaves as configured.
    assert set(by_layers) & {1, 2}, by_layers
    assert all(t.state == "failed" for t in by_layers.get(1, []))
    assert all("SyntheticFailure" in (t.failure_reason or "") for t in by_layers.get(1, []))
    for t in by_layers.get(2, []):
        assert t.state == "failed" and "nan" in (t.failure_reason or "")
    assert all(t.state == "complete" for t in by_layers.get(3, []))
    if 3 in by_layers:
        assert done.best_value is not None  # NaN never wins


def test_sigterm_to_serve_stops_its_local_workers(tmp_path: Path, sqlite_url: str) -> None:
    """`docker stop` / systemd send SIGTERM to the server process only: its local worker
    processes must not outlive it (they finish or abandon their trial, then exit)."""
    from tests.fault.conftest import live_group_members

    server = start_server(tmp_path, sqlite_url, workers=2)
    pgid = os.getpgid(server.process.pid)
    try:
        assert len(live_group_members(pgid)) >= 3  # serve + 2 workers (+ the tracker)
        os.kill(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while live_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_group_members(pgid), live_group_members(pgid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
