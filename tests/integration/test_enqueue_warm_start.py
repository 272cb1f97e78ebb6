"""``study.enqueue`` and ``study.warm_start_from`` at submit: enqueued configurations are
validated against the space (422 naming ``study.enqueue.<i>.<param>``) and wait in the
Optuna study, marked, until a fresh slot runs them (the worker's side is tested with it);
a warm start copies an earlier study's COMPLETE trials into the new study's sampler
history, marked, never run, never counted, never the best. Real server (uvicorn on
loopback), real worker loop, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from service import auth, queue, reaper, studies
from service.client import ApiError, Client
from service.config import Settings
from service.states import (
    ENQUEUE_INDEX_ATTR,
    ENQUEUED_ATTR,
    FAILURE_ATTR,
    NOTES_ATTR,
    WARM_START_FROM_ATTR,
    WARM_START_TRIAL_ATTR,
    JobState,
)
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle as _run_worker

SPACE: dict[str, Any] = {
    "num_layers": {"type": "int", "low": 1, "high": 3},
    "hidden_size": {"type": "categorical", "choices": [32, 64, 128]},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "momentum": {"type": "float", "low": 0.0, "high": 0.9},
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "max_epochs": 2,
}


def _spec(n_trials: int = 4, space: dict[str, Any] | None = None, **study: Any) -> dict[str, Any]:
    return {
        "name": "seeded",
        "task": {"kind": "synthetic"},
        "space": space or SPACE,
        "study": {"n_trials": n_trials, "sampler": "tpe", "pruner": "none", "seed": 0} | study,
    }


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=db_url)) as s:
        yield s


def _optuna_trials(server: InProcessServer, study_name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=server.backend.storage).get_trials()


def _errors(response: Any) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    return [(e["loc"], e["msg"]) for e in response.json()["errors"]]


def test_enqueued_configurations_wait_marked_and_bad_ones_are_refused(
    server: InProcessServer,
) -> None:
    enqueue = [
        {"num_layers": 2, "hidden_size": 128.0, "optimizer": "sgd", "momentum": 0.9, "lr": 1},
        {"lr": 0.01},
    ]
    created = server.http.post("/v1/studies", json=_spec(4, enqueue=enqueue))
    assert created.status_code == 201, created.text
    study = created.json()
    assert study["counts"]["waiting"] == 2 and study["n_finished"] == 0
    assert study["spec"]["study"]["enqueue"][0]["hidden_size"] == 128  # typed as stored
    trials = _optuna_trials(server, study["optuna_study_name"])
    assert [t.state for t in trials] == [TrialState.WAITING] * 2
    for i, trial in enumerate(trials):
        assert trial.user_attrs == {ENQUEUED_ATTR: True, ENQUEUE_INDEX_ATTR: i}
    assert trials[0].system_attrs["fixed_params"] == {
        "num_layers": 2,
        "hidden_size": 128,
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 1.0,
    }
    assert trials[1].system_attrs["fixed_params"] == {"lr": 0.01}

    bad = [
        {"num_layers": 2},
        {"hidden_size": 100, "dropout": 0.1, "no_such": 1},
        {"optimizer": "adam", "momentum": 0.5},
        {},
    ]
    errors = _errors(server.http.post("/v1/studies", json=_spec(4, enqueue=bad)))
    locs = dict(errors)
    assert locs["study.enqueue.1.hidden_size"].startswith("must be one of the space's choices")
    assert locs["study.enqueue.1.dropout"].startswith("not searched in this space")
    assert locs["study.enqueue.1.no_such"].startswith("unknown parameter")
    assert locs["study.enqueue.2.momentum"].startswith("only used with optimizer: sgd | rmsprop")
    assert locs["study.enqueue.3"].startswith("empty")
    assert not any(loc.startswith("study.enqueue.0") for loc in locs)
    fixed = _errors(server.http.post("/v1/studies", json=_spec(4, enqueue=[{"max_epochs": 3}])))
    assert fixed == [("study.enqueue.0.max_epochs", "fixed in the space (to 2): leave it out")]
    too_many = _errors(server.http.post("/v1/studies", json=_spec(1, enqueue=[{"lr": 0.1}] * 2)))
    assert too_many[0][0] == "study.enqueue" and "more than study.n_trials (1)" in too_many[0][1]
    assert server.http.get("/v1/studies").json()["total"] == 1  # nothing else was created


def test_a_worker_runs_the_enqueued_configurations_first_then_samples(
    server: InProcessServer, db_url: str
) -> None:
    enqueue = [
        {"num_layers": 3, "hidden_size": 32, "optimizer": "sgd", "momentum": 0.5, "lr": 0.5},
        {"lr": 0.01},
    ]
    client = Client(server.url)
    study = client.submit(_spec(4, enqueue=enqueue))
    _run_worker(db_url)
    assert client.get(study.id).state == JobState.SUCCEEDED
    trials = _optuna_trials(server, study.optuna_study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # exactly n_trials, none left
    assert trials[0].params == enqueue[0]  # in the spec's order, with exactly its values
    assert trials[1].params["lr"] == 0.01 and trials[1].user_attrs[ENQUEUE_INDEX_ATTR] == 1
    assert [ENQUEUED_ATTR in t.user_attrs for t in trials] == [True, True, False, False]


def test_enqueued_configurations_a_study_ends_without_are_failed_as_not_run(
    server: InProcessServer,
) -> None:
    backend = server.backend
    client = Client(server.url)
    cancelled = client.submit(_spec(3, enqueue=[{"lr": 0.1}]))
    client.cancel(cancelled.id)
    ended = client.submit(_spec(3, enqueue=[{"lr": 0.2}]))
    queue.fail_job(backend.sessions, ended.id, "test: ended")  # WAITING left to the reaper
    reaper.sweep_unowned_trials(backend, grace_s=60)
    for study in (cancelled, ended):
        (trial,) = _optuna_trials(server, study.optuna_study_name)
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[FAILURE_ATTR] == studies.NOT_RUN_ENQUEUED_REASON


def test_warm_start_seeds_the_sampler_but_counts_nothing(
    server: InProcessServer, db_url: str
) -> None:
    client = Client(server.url)
    source = client.submit(_spec(5))
    _run_worker(db_url)
    assert client.get(source.id).state is JobState.SUCCEEDED
    source_trials = _optuna_trials(server, source.optuna_study_name)

    # Another space over the same task: num_layers narrowed, hidden_size fixed, dropout new.
    space = SPACE | {
        "num_layers": {"type": "int", "low": 1, "high": 2},
        "hidden_size": 64,
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    }
    study = client.submit(_spec(3, space, warm_start_from=[source.id]))
    assert (study.n_finished, study.best_value, study.best_trial_number) == (0, None, None)
    assert study.counts.complete == 0
    assert study.notes is not None
    assert f"study {source.id}: 5 completed trial(s) added to the sampler's history" in study.notes
    assert (
        f"study {source.id}: parameter hidden_size dropped from 5 trial(s): this space does "
        "not search it" in study.notes
    )
    n_three = sum(t.params["num_layers"] == 3 for t in source_trials)
    if n_three:
        assert (
            f"study {source.id}: parameter num_layers dropped from {n_three} trial(s): its value "
            "lies outside this space" in study.notes
        )
    assert client.trials(study.id).total == 0
    with pytest.raises(ApiError, match="409"):
        client.best(study.id)
    copies = _optuna_trials(server, study.optuna_study_name)
    assert len(copies) == 5 and all(t.state == TrialState.COMPLETE for t in copies)
    by_number = {t.number: t for t in source_trials}
    for copy in copies:
        original = by_number[copy.user_attrs[WARM_START_TRIAL_ATTR]]
        assert copy.user_attrs[WARM_START_FROM_ATTR] == source.id
        assert copy.value == original.value
        kept = {k: v for k, v in original.params.items() if k != "hidden_size"}
        if kept["num_layers"] == 3:
            del kept["num_layers"]
        assert copy.params == kept
    attrs = optuna.load_study(
        study_name=study.optuna_study_name, storage=server.backend.storage
    ).user_attrs
    assert attrs[NOTES_ATTR] == study.notes

    _run_worker(db_url)
    done = client.get(study.id)
    assert (done.state, done.n_finished, done.counts.complete) == (JobState.SUCCEEDED, 3, 3)
    own = client.trials(study.id)
    assert own.total == 3 and {t.number for t in own.items} == {5, 6, 7}
    assert done.best_trial_number in {5, 6, 7}
    assert client.best(study.id).trial_number == done.best_trial_number
    assert len(_optuna_trials(server, study.optuna_study_name)) == 8  # nothing ran twice
    # A study warm-started from this one gets its own trials only, not the copies.
    third = client.submit(_spec(2, warm_start_from=[study.id]))
    assert third.notes is not None
    assert f"study {study.id}: 3 completed trial(s) added to the sampler's history" in third.notes


def test_warm_start_refusals(server: InProcessServer) -> None:
    sessions = server.backend.sessions
    alice = Client(server.url, token=auth.create_token(sessions, "alice"))
    bob = Client(server.url, token=auth.create_token(sessions, "bob"))
    mine = alice.submit(_spec(2))
    theirs = bob.submit(_spec(2))
    adding = alice.submit(
        {"task": {"kind": "adding"}, "space": {"max_epochs": 1}, "study": {"n_trials": 1}}
    )
    maximised = alice.submit(_spec(2, direction="maximize"))
    headers = {"Authorization": alice._http.headers["Authorization"]}
    ids = [mine.id, theirs.id, "no-such-study", adding.id, maximised.id, mine.id]
    errors = _errors(
        server.http.post("/v1/studies", json=_spec(2, warm_start_from=ids), headers=headers)
    )
    assert errors == [("study.warm_start_from.5", "repeats study.warm_start_from.0")]
    errors = _errors(
        server.http.post("/v1/studies", json=_spec(2, warm_start_from=ids[:5]), headers=headers)
    )
    assert errors == [
        ("study.warm_start_from.1", f"no study {theirs.id} (or not yours)"),
        ("study.warm_start_from.2", "no study no-such-study (or not yours)"),
        (
            "study.warm_start_from.3",
            f"study {adding.id} ran task kind adding, this one is synthetic: warm start "
            "needs the same task",
        ),
        (
            "study.warm_start_from.4",
            f"study {maximised.id} was to maximize, this one is to minimize",
        ),
    ]
    assert alice.studies().total == 3  # nothing was created (bob's is not listed)
    empty = alice.submit(_spec(2, warm_start_from=[mine.id]))
    assert empty.notes == [f"study {mine.id}: no completed trial to warm-start from"]
    grid = _spec(2, {"num_layers": {"type": "int", "low": 1, "high": 3}}, sampler="grid")
    grid["study"]["warm_start_from"] = [mine.id]
    errors = _errors(server.http.post("/v1/studies", json=grid, headers=headers))
    assert errors[0][0] == "study.warm_start_from" and "sampler grid" in errors[0][1]
