"""``POST /v1/studies/{id}/extend`` (and ``Client.extend``, ``lstm-hpo extend``): more trials
for a succeeded, cancelled, timed-out or running study, in the same Optuna study, ending
with exactly the new total of finished trials; a failed study, another principal's, an
unknown id and a bad ``n_trials`` are refused. Real server (uvicorn on loopback), real
worker loop, SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from service import auth, queue
from service.client import ApiError, Client
from service.config import Settings
from service.errors import InvalidSpec
from service.states import JobState
from tests.acceptance.conftest import CLI
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle as _run_worker


def _spec(n_trials: int = 3, **study: Any) -> dict[str, Any]:
    return {
        "name": "extend",
        "task": {"kind": "synthetic"},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 3},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 2,
        },
        "study": {"n_trials": n_trials, "sampler": "tpe", "pruner": "none", "seed": 0} | study,
    }


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, max_trials=50)
    with serve_in_thread(settings) as s:
        yield s


def _optuna_trials(server: InProcessServer, study_name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=server.backend.storage).get_trials()


def test_extend_a_succeeded_then_a_cancelled_study(server: InProcessServer, db_url: str) -> None:
    client = Client(server.url)
    done = client.submit(_spec(3))
    cancelled = client.submit(_spec(4))
    client.cancel(cancelled.id)  # before any trial ran
    _run_worker(db_url)
    first = client.get(done.id)
    assert (first.state, first.n_finished) == (JobState.SUCCEEDED, 3)

    extended = client.extend(done.id, 2)
    assert (extended.state, extended.n_trials, extended.n_finished) == (JobState.QUEUED, 5, 3)
    assert extended.finished_at is None and extended.error is None
    again = client.extend(cancelled.id, 1)  # its 4 slots never ran: 5 to go
    assert (again.state, again.n_trials) == (JobState.QUEUED, 5)
    _run_worker(db_url)

    for study_id, total in ((done.id, 5), (cancelled.id, 5)):
        study = client.get(study_id)
        assert (study.state, study.n_trials, study.n_finished) == (JobState.SUCCEEDED, total, total)
        # One Optuna study all along: the sampler saw every earlier trial.
        trials = _optuna_trials(server, study.optuna_study_name)
        assert [t.number for t in trials] == list(range(total))
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert len(queue.list_leases(server.backend.sessions, study_id)) == total


def test_extend_a_running_study_and_one_that_timed_out(
    server: InProcessServer, db_url: str
) -> None:
    client = Client(server.url)
    sessions = server.backend.sessions
    running = client.submit(_spec(2))
    lease = queue.claim_trial_slot(sessions, "w-test")
    assert lease is not None and lease.job_id == running.id
    extended = client.extend(running.id, 3)
    assert (extended.state, extended.n_trials) == (JobState.RUNNING, 5)
    queue.finish_trial_slot(sessions, lease.id, "failed", "test")

    # A study whose deadline passed before any trial completed failed for its budget,
    # not its spec: extending it counts timeout_s afresh from now.
    timed = client.submit(_spec(3, timeout_s=60))
    long_ago = datetime.now(UTC) - timedelta(seconds=600)
    old = queue.claim_trial_slot(sessions, "w-test", now=long_ago)
    if old is not None and old.job_id != timed.id:  # the running study's slot came first
        queue.finish_trial_slot(sessions, old.id, "failed", "test", now=long_ago)
        old = queue.claim_trial_slot(sessions, "w-test", now=long_ago)
    assert old is not None and old.job_id == timed.id
    queue.finish_trial_slot(sessions, old.id, "failed", "test", now=long_ago)
    queue.end_expired_jobs(sessions)
    failed = queue.get_job(sessions, timed.id)
    assert failed.state is JobState.FAILED and failed.error == queue.TIMED_OUT_ERROR
    before = datetime.now(UTC)
    revived = client.extend(timed.id, 1)
    assert (revived.state, revived.n_trials, revived.error) == (JobState.QUEUED, 4, None)
    deadline = queue.get_job(sessions, timed.id).deadline_at
    assert deadline is not None
    assert (
        before + timedelta(seconds=59) <= deadline.astimezone(UTC) <= before + timedelta(seconds=70)
    )

    _run_worker(db_url)
    for study_id, total in ((running.id, 5), (timed.id, 4)):
        study = client.get(study_id)
        assert (study.state, study.n_finished) == (JobState.SUCCEEDED, total), study


def test_extend_refusals(server: InProcessServer, db_url: str, tmp_path: Path) -> None:
    sessions = server.backend.sessions
    alice = Client(server.url, token=auth.create_token(sessions, "alice"))
    bob = Client(server.url, token=auth.create_token(sessions, "bob"))
    study = alice.submit(_spec(3))
    url = f"/v1/studies/{study.id}/extend"
    headers = {"Authorization": alice._http.headers["Authorization"]}

    def post(body: Any, **kwargs: Any) -> Any:
        return server.http.post(url, json=body, headers=headers, **kwargs)

    for body, loc, msg in (
        ({"n_trials": 0}, "n_trials", "must be >= 1"),
        # "5" is 5, as a spec's n_trials reads it; "1e3" is not a whole number there either.
        ({"n_trials": "1e3"}, "n_trials", "must be a whole number"),
        ({"n_trials": True}, "n_trials", "must be a whole number"),
        ({"n_trials": 2.5}, "n_trials", "must be a whole number"),
        ({}, "n_trials", "required"),
        ({"n_trials": 1, "n_trails": 1}, "n_trails", "unknown field"),
        ([20], "", "the body must be a JSON object"),
        # max_trials is 50 on this server: 3 + 48 is one too many.
        ({"n_trials": 48}, "n_trials", "must be <= 47: the study has 3 trials"),
    ):
        response = post(body)
        assert response.status_code == 422, (body, response.text)
        errors = response.json()["errors"]
        assert any(e["loc"] == loc and e["msg"].startswith(msg) for e in errors), (body, errors)
    form = server.http.post(
        url,
        content="n_trials=2",
        headers=headers | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415, form.text
    unparsed = server.http.post(url, content="{", headers=headers)
    assert unparsed.status_code == 422 and "not valid JSON" in unparsed.text, unparsed.text
    assert "YAML" not in unparsed.text  # extend takes JSON only (was: "send YAML with ...")
    assert post({"n_trials": 47}).status_code == 200  # exactly the limit

    with pytest.raises(ApiError, match="404"):
        bob.extend(study.id, 1)  # another principal's study looks like none at all
    with pytest.raises(ApiError, match="404"):
        alice.extend("no-such-study", 1)
    with pytest.raises(InvalidSpec, match="n_trials") as full:
        alice.extend(study.id, 1)  # now at 50
    # Not "must be <= 0": what to do instead.
    assert "has its most trials already (50 of 50" in str(full.value)
    assert "warm_start_from" in str(full.value)

    grid = _spec(2, sampler="grid")
    grid["space"] = {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 2}
    on_grid = alice.submit(grid)
    with pytest.raises(
        InvalidSpec, match="must be <= 1: the study has 2 trials and may have at most 3"
    ):
        alice.extend(on_grid.id, 2)

    broken = alice.submit(_spec(3))
    queue.fail_job(sessions, broken.id, "data: line 3: not a number")
    with pytest.raises(ApiError, match="409") as refused:
        alice.extend(broken.id, 1)
    assert "data: line 3: not a number" in str(refused.value)
    assert queue.get_job(sessions, broken.id).n_trials == 3
    assert queue.get_job(sessions, study.id).n_trials == 50

    # The command line: `lstm-hpo extend ID --n-trials N`.
    other = alice.submit(_spec(3))
    token = str(headers["Authorization"]).removeprefix("Bearer ")
    result = subprocess.run(
        [*CLI, "extend", other.id, "--n-trials", "2", "--server", server.url, "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{other.id}: queued, 0/5 trials" in result.stdout
    refused_cli = subprocess.run(
        [*CLI, "extend", broken.id, "-n", "2", "--server", server.url, "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused_cli.returncode == 1 and "cannot take more trials" in refused_cli.stderr
