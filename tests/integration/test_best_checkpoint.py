"""``GET /v1/studies/{id}/best/checkpoint``: the best trial's best-epoch checkpoint, to
its owner only (another principal gets 404, as for a study that does not exist); 409
before a trial has completed, 404 when the best trial has no checkpoint. SQLite, in
process (trials and checkpoint files made by hand)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from service import auth
from service.api.app import create_app
from service.client import ApiError, Client
from service.config import Settings
from service.states import ORIGINAL_TRIAL_ATTR, RETRY_OF_ATTR

SPEC = {
    "name": "ckpt",
    "task": {"kind": "synthetic"},
    "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    "study": {"n_trials": 3, "direction": "minimize"},
}


def test_best_checkpoint_download(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url)
    app = create_app(settings)
    backend = app.state.backend
    alice = {"Authorization": f"Bearer {auth.create_token(backend.sessions, 'alice')}"}
    bob = {"Authorization": f"Bearer {auth.create_token(backend.sessions, 'bob')}"}
    with TestClient(app) as http:
        created = http.post("/v1/studies", json=SPEC, headers=alice)
        assert created.status_code == 201, created.text
        study_id, name = created.json()["id"], created.json()["optuna_study_name"]
        url = f"/v1/studies/{study_id}/best/checkpoint"
        assert http.get(url, headers=alice).status_code == 409  # nothing completed yet

        study = optuna.load_study(study_name=name, storage=backend.storage)
        dist: dict[str, BaseDistribution] = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
        for value, attrs in (
            (0.5, {}),
            (None, {}),
            (0.1, {RETRY_OF_ATTR: 1, ORIGINAL_TRIAL_ATTR: 1}),
        ):
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
                    value=value,
                    params={"lr": 0.01},
                    distributions=dist,
                    user_attrs=attrs,
                )
            )
        # The best is trial 2, a retry of 1: its checkpoint is its chain's (trial 1's key).
        assert http.get(url, headers=alice).status_code == 404  # none stored yet
        source = tmp_path / "best.ckpt"
        source.write_bytes(b"lightning checkpoint bytes" * 1000)
        backend.checkpoints.save(study_id, 1, "best", source)
        backend.checkpoints.save(study_id, 0, "best", tmp_path / "best.ckpt")

        got = http.get(url, headers=alice)
        assert got.status_code == 200
        assert got.content == source.read_bytes()
        assert got.headers["content-type"] == "application/octet-stream"
        assert f'filename="{study_id}-trial-2.ckpt"' in got.headers["content-disposition"]
        # Another principal's study looks exactly like one that does not exist.
        assert http.get(url, headers=bob).status_code == 404
        assert http.get("/v1/studies/nope/best/checkpoint", headers=alice).status_code == 404
        assert http.get(url).status_code == 401

        # What `lstm-hpo best ID --checkpoint FILE` calls.
        client = Client(token="unused")
        client._http = TestClient(app, headers=alice)
        client.best_checkpoint(study_id, tmp_path / "downloaded.ckpt")
        assert (tmp_path / "downloaded.ckpt").read_bytes() == source.read_bytes()
        client._http = TestClient(app, headers=bob)
        with pytest.raises(ApiError, match="404"):
            client.best_checkpoint(study_id, tmp_path / "other.ckpt")
        assert not (tmp_path / "other.ckpt").exists()
        # A destination that cannot be written: OSError, and no temporary file left.
        client._http = TestClient(app, headers=alice)
        with pytest.raises(IsADirectoryError):
            client.best_checkpoint(study_id, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []
    backend.sessions.kw["bind"].dispose()
