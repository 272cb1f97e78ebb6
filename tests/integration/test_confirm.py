"""Confirm the winner (service.confirm) through a real server (uvicorn on loopback) and a
real worker loop on the synthetic task: a searched study -> POST .../confirm (202, a study
id every study route takes, n_trials = top_k x seeds) -> the worker runs the enqueued
(config, seed) pairs -> GET .../confirmation has each config's mean, sd and 95% interval
of the validation and test metric and the paired t-test, checked against the trials
themselves (and scipy) -> ``best`` of the original names the winner; 404 / 409 / 415 /
422; the CLI. SQLite only: the queue is the one every study uses (its contract tests run
on both backends), and a confirmation is an ordinary study to it."""

from __future__ import annotations

import json
import math
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from service import auth
from service.cli import app as cli_app
from service.client import Client
from service.config import Settings
from service.confirm import summarize
from service.search_space import parse_spec
from service.states import CONFIRMED_BY_PREFIX, JOB_ID_ATTR, TEST_METRICS_ATTR, TEST_VALUE_ATTR
from service.training.objective import run_trial
from service.worker import Worker, WorkerOptions
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle

PARENT: dict[str, Any] = {
    "name": "parent",
    "task": {"kind": "synthetic"},
    "space": {
        "num_layers": {"type": "int", "low": 1, "high": 3},
        "hidden_size": {"type": "categorical", "choices": [32, 64, 128]},
        "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
        "max_epochs": 1,
    },
    "study": {"n_trials": 6, "sampler": "random", "pruner": "none", "seed": 0},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("confirm")
    url = f"sqlite:///{tmp / 'lstm-hpo.db'}"
    with serve_in_thread(Settings(data_dir=tmp / "data", database_url=url)) as s:
        yield s


def _url(server: InProcessServer) -> str:
    return str(server.backend.sessions.kw["bind"].url)


def _worker(server: InProcessServer, idle_exit_s: float = 0.0) -> Worker:
    options = WorkerOptions(
        database_url=_url(server), poll_interval_s=0.05, idle_exit_s=idle_exit_s
    )
    return Worker(options)


def _run_worker(server: InProcessServer) -> None:
    run_worker_until_idle(_url(server))


def _finished_parent(server: InProcessServer, **study: Any) -> str:
    spec = PARENT | {"study": PARENT["study"] | study}
    created = server.http.post("/v1/studies", json=spec)
    assert created.status_code == 201, created.text
    _run_worker(server)
    return str(created.json()["id"])


def _trials(server: InProcessServer, study_id: str) -> list[dict[str, Any]]:
    got = server.http.get(f"/v1/studies/{study_id}/trials")
    assert got.status_code == 200, got.text
    items: list[dict[str, Any]] = got.json()["items"]
    return items


def _errors(response: Any) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    return [(e["loc"], e["msg"]) for e in response.json()["errors"]]


def test_confirm_runs_top_k_x_seeds_trials_and_best_names_the_winner(
    server: InProcessServer,
) -> None:
    http = server.http
    parent_id = _finished_parent(server)
    parent_best = http.get(f"/v1/studies/{parent_id}/best").json()
    assert parent_best["confirmation"] is None
    never = http.get(f"/v1/studies/{parent_id}/confirmation")
    assert never.status_code == 404 and never.json()["error"] == "ConfirmationNotFound"

    answer = http.post(f"/v1/studies/{parent_id}/confirm", json={"top_k": 3, "seeds": 4})
    assert answer.status_code == 202, answer.text
    study = answer.json()
    confirm_id = study["id"]
    assert answer.headers["location"] == f"/v1/studies/{confirm_id}"
    assert (study["n_trials"], study["state"], study["counts"]["waiting"]) == (12, "queued", 12)
    assert study["name"] == "parent-confirm" and study["notes"][0].startswith(
        f"confirms study {parent_id}: its top 3 config(s)"
    )
    assert study["spec"]["study"]["confirm_of"] == parent_id
    seeds = [1000, 1001, 1002, 1003]  # the parent trained with seed 0 only
    assert study["spec"]["space"]["seed"] == {"type": "categorical", "choices": seeds}
    # A study like any other: its own Optuna study (the dashboard lists it), every route.
    assert (
        http.get(f"/v1/studies/{confirm_id}").json()["optuna_study_name"]
        != (http.get(f"/v1/studies/{parent_id}").json()["optuna_study_name"])
    )
    queued = http.get(f"/v1/studies/{confirm_id}/confirmation").json()
    assert queued["verdict"] == "queued, 0 of 12 trials finished; so far: no confirmation " + (
        "trial has completed yet"
    )

    _run_worker(server)
    done = http.get(f"/v1/studies/{confirm_id}").json()
    assert done["state"] == "succeeded" and done["counts"]["complete"] == 12

    # What to expect, from the trials themselves: the parent's 3 best configs, each run
    # with every seed, the test value recorded on each trial.
    top3 = http.get(f"/v1/studies/{parent_id}/best", params={"k": 3}).json()
    parent_params = {t["number"]: t["params"] for t in _trials(server, parent_id)}
    storage = server.backend.storage
    optuna_trials = optuna.load_study(
        study_name=done["optuna_study_name"], storage=storage
    ).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in optuna_trials)
    by_config: dict[int, dict[int, tuple[float, float]]] = {b["trial_number"]: {} for b in top3}
    for trial in optuna_trials:
        params = dict(trial.params)
        seed = params.pop("seed")
        (number,) = [n for n in by_config if parent_params[n] == params]
        assert trial.value is not None
        by_config[number][seed] = (trial.value, trial.user_attrs[TEST_VALUE_ATTR])
    assert all(sorted(runs) == seeds for runs in by_config.values())

    result = http.get(f"/v1/studies/{confirm_id}/confirmation").json()
    assert (result["id"], result["confirms"], result["state"]) == (
        confirm_id,
        parent_id,
        "succeeded",
    )
    assert (result["top_k"], result["seeds"], result["metric"]) == (3, seeds, "value")
    assert "paired t-test" in result["method"]
    means = {n: statistics.fmean(v for v, _ in runs.values()) for n, runs in by_config.items()}
    ranked = sorted(means, key=lambda n: means[n])  # synthetic: minimize
    assert [c["trial_number"] for c in result["configs"]] == ranked
    for config in result["configs"]:
        runs = by_config[config["trial_number"]]
        assert config["params"] == parent_params[config["trial_number"]]
        assert config["missing_seeds"] == []
        for split, index in (("validation", 0), ("test", 1)):
            values = [runs[s][index] for s in seeds]
            expected = summarize(values)
            got = config[split]
            assert got["n"] == 4 and got["values"] == {str(s): runs[s][index] for s in seeds}
            assert got["mean"] == pytest.approx(statistics.fmean(values))
            assert got["sd"] == pytest.approx(statistics.stdev(values))
            assert (got["ci95_low"], got["ci95_high"]) == pytest.approx(
                (expected.ci95_low, expected.ci95_high)
            )
    best, runner = (by_config[n] for n in ranked[:2])
    comparison = result["comparison"]
    assert comparison["best_trial_number"] == ranked[0]
    assert comparison["runner_up_trial_number"] == ranked[1]
    assert comparison["margin"] == pytest.approx(means[ranked[1]] - means[ranked[0]])
    paired = comparison["validation"]
    assert (paired["split"], paired["n"], paired["df"]) == ("validation", 4, 3)
    diffs = [best[s][0] - runner[s][0] for s in seeds]
    assert paired["mean_difference"] == pytest.approx(statistics.fmean(diffs))
    stats = pytest.importorskip("scipy.stats")
    for split, index in (("validation", 0), ("test", 1)):
        expected_test = stats.ttest_rel(
            [best[s][index] for s in seeds], [runner[s][index] for s in seeds]
        )
        assert comparison[split]["p_value"] == pytest.approx(expected_test.pvalue, rel=1e-6)
    beyond = paired["p_value"] < 0.05
    assert comparison["better_beyond_noise"] is beyond
    assert ("beyond noise" if beyond else "within noise") in result["verdict"]

    # best on the original names the winner and by how much; each entry its rank.
    confirmed = http.get(f"/v1/studies/{parent_id}/best", params={"k": 3}).json()
    ranks = {b["trial_number"]: b["confirmation"]["rank"] for b in confirmed}
    assert ranks == {n: ranked.index(n) + 1 for n in ranked}
    view = confirmed[0]["confirmation"]
    assert (view["study_id"], view["winner_trial_number"]) == (confirm_id, ranked[0])
    assert view["runner_up_trial_number"] == ranked[1]
    assert view["margin"] == pytest.approx(comparison["margin"])
    assert view["p_value"] == pytest.approx(paired["p_value"])
    assert view["better_beyond_noise"] is beyond and view["verdict"] == result["verdict"]
    # The parent's confirmation route answers its newest confirmation's result.
    assert http.get(f"/v1/studies/{parent_id}/confirmation").json() == result
    # best on the confirmation itself: the same verdict, its trial's config's rank.
    own = http.get(f"/v1/studies/{confirm_id}/best").json()
    assert own["confirmation"]["study_id"] == confirm_id
    assert own["confirmation"]["rank"] in (1, 2, 3)
    # Every study route takes the confirmation's id.
    assert http.get(f"/v1/studies/{confirm_id}/trials.csv").status_code == 200
    assert http.get(f"/v1/studies/{confirm_id}/progress").status_code == 200
    assert http.post(f"/v1/studies/{confirm_id}/cancel").status_code == 409  # it ended
    assert http.delete(f"/v1/studies/{confirm_id}").status_code == 204
    # Deleted: best on the original no longer reports it.
    assert http.get(f"/v1/studies/{parent_id}/best").json()["confirmation"] is None


def test_refusals_name_the_reason(server: InProcessServer) -> None:
    http = server.http
    parent_id = _finished_parent(server)
    path = f"/v1/studies/{parent_id}/confirm"
    too_many = http.post(path, json={"top_k": 7, "seeds": 2})
    assert too_many.status_code == 409, too_many.text
    assert too_many.json()["detail"] == (
        f"study {parent_id} has 6 completed trial(s): confirming the top 7 needs 7"
    )
    assert _errors(http.post(path, json={"top_k": 0, "seeds": 21})) == [
        ("top_k", "must be within 1..20 (configs to confirm)"),
        ("seeds", "must be within 2..20 (a mean's interval and the paired test need 2)"),
    ]
    assert _errors(http.post(path, json={"seeds": 1, "n": 3})) == [
        ("n", "unknown field (top_k, seeds)"),
        ("seeds", "must be within 2..20 (a mean's interval and the paired test need 2)"),
    ]
    assert _errors(http.post(path, content=b'{"top_k": 2, "top_k": 3}'))[0][0] == "top_k"
    plain = http.post(path, content=b"top_k=3", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415, plain.text
    for body in ({}, {"top_k": 99}):  # a bad body too: the id is what is wrong first
        unknown = http.post("/v1/studies/no-such-study/confirm", json=body)
        assert unknown.status_code == 404, (body, unknown.text)
        assert unknown.json()["detail"] == "No study with that id."
    assert http.get("/v1/studies/no-such-study/confirmation").status_code == 404

    # top_k 1 (no body: seeds 5): the statistics, and no comparison.
    one = http.post(path, json={"top_k": 1})
    assert one.status_code == 202, one.text
    one_id = one.json()["id"]
    assert one.json()["n_trials"] == 5
    again = http.post(f"/v1/studies/{one_id}/confirm", json={})
    assert again.status_code == 409
    assert again.json()["detail"].startswith(f"study {one_id} is a confirmation (of study ")
    _run_worker(server)
    single = http.get(f"/v1/studies/{one_id}/confirmation").json()
    assert single["comparison"] is None and single["configs"][0]["validation"]["n"] == 5
    assert single["verdict"].endswith("no comparison: only one config was confirmed (top_k 1)")
    assert http.get(f"/v1/studies/{parent_id}/best").json()["confirmation"]["rank"] == 1

    # Only the service marks a study as a confirmation.
    forged = PARENT | {"study": PARENT["study"] | {"confirm_of": parent_id}}
    assert _errors(http.post("/v1/studies", json=forged)) == [
        ("study.confirm_of", "set by POST /v1/studies/{id}/confirm, not in a submitted spec")
    ]

    # Several objectives (an Optuna study with two directions): refused.
    other = http.post("/v1/studies", json=PARENT).json()
    storage = server.backend.storage
    storage.delete_study(storage.get_study_id_from_name(other["optuna_study_name"]))
    twin = optuna.create_study(
        storage=storage,
        study_name=other["optuna_study_name"],
        directions=["minimize", "minimize"],
    )
    twin.set_user_attr(JOB_ID_ATTR, other["id"])
    several = http.post(f"/v1/studies/{other['id']}/confirm", json={"top_k": 2})
    assert several.status_code == 409
    assert several.json()["detail"].startswith("confirm ranks one objective")
    http.delete(f"/v1/studies/{other['id']}")


def _cli(server: InProcessServer, *args: str) -> Any:
    return CliRunner().invoke(
        cli_app, [*args, "--server", server.url], env={"COLUMNS": "250", "LSTM_HPO_TOKEN": ""}
    )


def test_cli_confirm_waits_and_best_shows_the_confirmation(server: InProcessServer) -> None:
    parent_id = _finished_parent(server)
    queued = _cli(server, "confirm", parent_id, "--top-k", "2", "--seeds", "2")
    assert queued.exit_code == 0, queued.output
    first_id = queued.stdout.strip()
    assert "queued parent-confirm: 4 trials" in queued.stderr
    bad = _cli(server, "confirm", parent_id, "--seeds", "1")
    assert bad.exit_code == 2 and "seeds: must be within 2..20" in bad.stderr

    worker = _worker(server, idle_exit_s=60.0)  # stopped once the CLI has its answer
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    try:
        waited = _cli(
            server, "confirm", parent_id, "--top-k", "2", "--seeds", "3", "--wait", "--json"
        )
    finally:
        worker.stopping = True
        thread.join(timeout=60)
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
    assert waited.exit_code == 0, waited.output
    result = json.loads(waited.stdout)
    assert result["state"] == "succeeded" and result["seeds"] == [1000, 1001, 1002]
    assert [c["validation"]["n"] for c in result["configs"]] == [3, 3]
    assert result["comparison"]["validation"]["n"] == 3
    second_id = result["id"]
    assert server.http.get(f"/v1/studies/{first_id}").json()["state"] == "succeeded"

    # best of the original: the YAML on stdout, the newest confirmation's verdict on stderr.
    best = _cli(server, "best", parent_id)
    assert best.exit_code == 0, best.output
    assert best.stdout.startswith("task:")
    assert f"confirmation {second_id} (succeeded): " in " ".join(best.stderr.split())
    # best of the confirmation: its table.
    own = _cli(server, "best", second_id)
    assert own.exit_code == 0, own.output
    assert f"confirmation {second_id[:12]} of study {parent_id[:12]}" in own.stderr
    assert "val value" in own.stderr and "mean +- sd" in own.stderr
    assert " ".join(result["verdict"].split()[:5]) in " ".join(own.stderr.split())
    # The study's confirmed_by marks: one per confirmation.
    attrs = server.backend.storage.get_study_user_attrs(
        server.backend.storage.get_study_id_from_name(
            server.http.get(f"/v1/studies/{parent_id}").json()["optuna_study_name"]
        )
    )
    assert {k for k in attrs if k.startswith(CONFIRMED_BY_PREFIX)} == {
        CONFIRMED_BY_PREFIX + first_id,
        CONFIRMED_BY_PREFIX + second_id,
    }


def test_another_principals_study_is_not_found(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lstm-hpo.db'}"
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=url)) as s:
        alice = auth.create_token(s.backend.sessions, "alice")
        bob = auth.create_token(s.backend.sessions, "bob")
        with Client(s.url, token=alice) as client:
            study = client.submit(PARENT)
        for token in (bob, alice):
            got = s.http.post(
                f"/v1/studies/{study.id}/confirm",
                json={"top_k": 2},
                headers={"Authorization": f"Bearer {token}"},
            )
            if token == bob:
                assert got.status_code == 404, got.text
            else:  # alice's own: found, but nothing completed yet
                assert got.status_code == 409, got.text
                assert "has 0 completed trial(s)" in got.json()["detail"]
        assert s.http.post(f"/v1/studies/{study.id}/confirm").status_code == 401


def test_an_admins_confirmation_belongs_to_the_studys_owner(tmp_path: Path) -> None:
    """The confirmation is part of the owner's record: in their list and theirs to read
    (was: the admin's, invisible to the owner)."""
    url = f"sqlite:///{tmp_path / 'lstm-hpo.db'}"
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=url)) as s:
        alice = auth.create_token(s.backend.sessions, "alice")
        bob = auth.create_token(s.backend.sessions, "bob")
        admin = auth.create_token(s.backend.sessions, "root", admin=True)
        with Client(s.url, token=alice) as client:
            study = client.submit(PARENT)
        run_worker_until_idle(url)

        def as_(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        got = s.http.post(f"/v1/studies/{study.id}/confirm", json={"top_k": 2}, headers=as_(admin))
        assert got.status_code == 202, got.text
        confirmation = got.json()["id"]
        assert s.http.get(f"/v1/studies/{confirmation}", headers=as_(alice)).status_code == 200
        listed = s.http.get("/v1/studies", headers=as_(alice)).json()["items"]
        assert confirmation in {item["id"] for item in listed}
        assert s.http.get(f"/v1/studies/{confirmation}", headers=as_(bob)).status_code == 404


@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_confirmation_trial_scores_the_test_split() -> None:
    """The worker's objective on a task that trains (adding, tiny): a confirmation's trial
    records ``test_value``, an ordinary trial does not."""
    task = {"kind": "adding", "seq_len": 10, "n_train": 64, "n_val": 32, "n_test": 32}
    space = {"hidden_size": 8, "max_epochs": 1, "batch_size": 32}
    confirming = parse_spec(
        {
            "task": task,
            "space": space | {"seed": {"type": "categorical", "choices": [1000]}},
            "study": {"n_trials": 1, "sampler": "random", "pruner": "none", "confirm_of": "a1"},
        }
    )
    study = optuna.create_study()
    for spec, scored in ((confirming, True), (parse_spec({"task": task, "space": space}), False)):
        trial = study.ask()
        value = run_trial(trial, spec, accelerator="cpu")
        assert math.isfinite(value)
        test_value = trial.user_attrs.get(TEST_VALUE_ATTR)
        assert (isinstance(test_value, float) and math.isfinite(test_value)) is scored
        # Every test metric too (what a task reports beside the ranked one).
        metrics = trial.user_attrs.get(TEST_METRICS_ATTR)
        assert (metrics is not None and metrics["test_mse"] == test_value) is scored


def test_best_says_when_the_study_has_grown_since_its_confirmation(
    server: InProcessServer,
) -> None:
    """An extended study has configs its newest confirmation never chose from: ``best``
    still reports that confirmation, and its verdict says so."""
    parent_id = _finished_parent(server)
    asked = server.http.post(f"/v1/studies/{parent_id}/confirm", json={"top_k": 2, "seeds": 2})
    assert asked.status_code == 202, asked.text
    _run_worker(server)
    fresh = server.http.get(f"/v1/studies/{parent_id}/best").json()["confirmation"]
    assert "It chose from" not in fresh["verdict"]

    grown = server.http.post(f"/v1/studies/{parent_id}/extend", json={"n_trials": 2})
    assert grown.status_code == 200, grown.text
    _run_worker(server)

    stale = server.http.get(f"/v1/studies/{parent_id}/best").json()["confirmation"]
    assert stale["study_id"] == asked.json()["id"]
    assert stale["verdict"].startswith(fresh["verdict"])
    assert (
        "It chose from the study's first 6 finished trials; the study has 8 now"
        in (stale["verdict"])
    )


def test_best_confirmed_passes_over_a_newer_confirmation_that_was_cancelled(
    server: InProcessServer,
) -> None:
    parent_id = _finished_parent(server)
    first = server.http.post(f"/v1/studies/{parent_id}/confirm", json={"top_k": 2, "seeds": 2})
    assert first.status_code == 202, first.text
    _run_worker(server)
    second = server.http.post(f"/v1/studies/{parent_id}/confirm", json={"top_k": 3, "seeds": 2})
    assert second.status_code == 202, second.text
    waiting = server.http.get(f"/v1/studies/{parent_id}/best", params={"confirmed": "true"})
    assert server.http.post(f"/v1/studies/{second.json()['id']}/cancel").status_code == 200

    answer = server.http.get(f"/v1/studies/{parent_id}/best", params={"confirmed": "true"})

    # While the newer one waited, and once it was cancelled: the newest that succeeded.
    for got in (waiting, answer):
        assert got.status_code == 200, got.text
        assert got.json()["confirmation"]["study_id"] == first.json()["id"]
