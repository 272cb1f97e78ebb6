"""One study never harms another: the dashboard cannot split a study's two records, a study
whose Optuna half is gone answers cleanly, DELETE removes both halves, and a worker survives
whatever one job's spec, Optuna state or metric does. Real server (uvicorn on loopback),
real worker loop, SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from service import queue, reaper, studies
from service.auth import LOCAL
from service.config import Settings
from service.search_space import SpecLimits, parse_spec
from service.states import FAILURE_ATTR, JobState
from service.worker import Worker, WorkerOptions
from tests.acceptance.conftest import CLI
from tests.servers import InProcessServer, serve_in_thread

DELETED = "its Optuna study was deleted"


def _spec(n_trials: int = 2, **study: Any) -> dict[str, Any]:
    return {
        "name": "iso",
        "task": {"kind": "synthetic"},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 3},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 2,
        },
        "study": {"n_trials": n_trials, "sampler": "random", "pruner": "none", "seed": 0} | study,
    }


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=db_url)) as s:
        yield s


def _submit(server: InProcessServer, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    response = server.http.post("/v1/studies", json=spec or _spec())
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _optuna_id(study: dict[str, Any]) -> int:
    return int(study["dashboard_url"].rsplit("/", 1)[1])


def _run_worker(db_url: str, **options: Any) -> int:
    worker = Worker(
        WorkerOptions(database_url=db_url, poll_interval_s=0.05, idle_exit_s=0.0, **options)
    )
    try:
        return worker.run()
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()


# ---------------------------------------------------------------------------------------
# The dashboard's own JSON routes


def test_dashboard_delete_removes_both_records_and_every_route_stays_clean(
    server: InProcessServer,
) -> None:
    doomed, kept = _submit(server), _submit(server)
    response = server.http.delete(f"/api/studies/{_optuna_id(doomed)}")  # the trash icon
    assert response.status_code == 204, response.text

    listed = server.http.get("/v1/studies")
    assert listed.status_code == 200
    assert [s["id"] for s in listed.json()["items"]] == [kept["id"]]
    for path in ("", "/trials", "/best"):
        assert server.http.get(f"/v1/studies/{doomed['id']}{path}").status_code == 404
    names = [s["study_name"] for s in server.http.get("/api/studies").json()["study_summaries"]]
    assert names == [kept["optuna_study_name"]]
    assert server.http.delete(f"/api/studies/{_optuna_id(doomed)}").status_code == 404
    reaper.reap_once(server.backend, grace_s=60)  # the reaper's round still works
    assert server.http.get(f"/v1/studies/{kept['id']}").json()["state"] == "queued"


def test_dashboard_create_rename_and_tell_are_refused_with_a_message(
    server: InProcessServer,
) -> None:
    study = _submit(server)
    refused = {
        "create": server.http.post(
            "/api/studies", json={"study_name": "by-hand", "directions": ["minimize"]}
        ),
        "rename": server.http.post(
            f"/api/studies/{_optuna_id(study)}/rename", json={"study_name": "renamed"}
        ),
        "tell": server.http.post("/api/trials/1/tell", json={"state": "Fail"}),
        "skip": server.http.post(f"/api/studies/{_optuna_id(study)}/1/skip"),
    }
    for what, response in refused.items():
        assert response.status_code == 403, (what, response.text)
        assert response.json()["reason"], what
    assert "POST /v1/studies" in refused["create"].json()["reason"]
    names = [s["study_name"] for s in server.http.get("/api/studies").json()["study_summaries"]]
    assert names == [study["optuna_study_name"]]  # nothing created, nothing renamed
    assert server.http.get(f"/v1/studies/{study['id']}").status_code == 200


def test_dashboard_requests_it_would_answer_with_a_500_get_a_4xx(server: InProcessServer) -> None:
    """A tester's 500s: ids past a SQL INTEGER (PostgreSQL: 32 bits), a preference write on
    a study that is not preferential, a note that is no JSON object, non-ASCII basic auth."""
    study = _submit(server)
    sid = _optuna_id(study)
    for path in (f"/api/studies/{2**31}", f"/csv/{2**63}", f"/api/studies/{sid}/{2**40}/note"):
        for method in ("GET", "DELETE", "PUT"):
            response = server.http.request(method, path, json={"version": 1, "body": "x"})
            assert response.status_code == 404, (method, path, response.text)
    preference = server.http.post(f"/api/studies/{sid}/preference", content=b"{}")
    assert preference.status_code == 403, preference.text
    assert "not preferential" in preference.json()["reason"]
    for body, headers in (
        (b"{}", {}),  # a form body: bottle's request.json is None
        (b"[1]", {"Content-Type": "application/json"}),
        (b"{", {"Content-Type": "application/json"}),
    ):
        note = server.http.put(f"/api/studies/{sid}/note", content=body, headers=headers)
        assert note.status_code == 400, (body, note.text)
        assert "JSON object" in note.json()["reason"]
    # A body that is no text was stored, and the study's page was a 500 from then on.
    for bad in ({"version": 1, "body": ["a"]}, {"version": 1, "body": 1}, {"version": "1"}):
        note = server.http.put(f"/api/studies/{sid}/note", json=bad)
        assert note.status_code == 400, (bad, note.text)
    assert server.http.get(f"/api/studies/{sid}").status_code == 200
    missing = server.http.put(f"/api/studies/{2**31 - 1}/note", json={"version": 1, "body": "x"})
    assert missing.status_code == 404, missing.text  # open mode's admin too
    assert server.http.get(f"/api/studies/{sid}?after=abc").status_code == 400
    saved = server.http.put(f"/api/studies/{sid}/note", json={"version": 1, "body": "kept"})
    assert saved.status_code == 204, saved.text  # the body read by the guard reaches the note
    detail = server.http.get(f"/api/studies/{sid}").json()
    assert detail["note"]["body"] == "kept", detail["note"]
    # A trial's note or artifact route names a trial of that study (was: a note for any
    # trial id, or one of another study, was stored in this study's record).
    other = _submit(server)
    theirs = server.backend.storage.create_new_trial(_optuna_id(other))
    mine = server.backend.storage.create_new_trial(sid)
    trial_note = {"version": 1, "body": "x"}
    for trial_id in (theirs, max(theirs, mine) + 1000):
        for method, path in (
            ("PUT", f"/api/studies/{sid}/{trial_id}/note"),
            ("POST", f"/api/artifacts/{sid}/{trial_id}"),
            ("GET", f"/artifacts/{sid}/{trial_id}/0123-abcd"),
        ):
            answer = server.http.request(method, path, json=trial_note)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["reason"] == f"trial_id={trial_id} is not found in study_id={sid}"
    assert server.http.put(f"/api/studies/{sid}/{mine}/note", json=trial_note).status_code == 204
    attrs = server.backend.storage.get_study_system_attrs(sid)
    assert any(f":{mine}:" in key for key in attrs)
    assert not any(f":{theirs}:" in key for key in attrs), attrs
    odd = server.http.get("/api/meta", headers={b"Authorization": b"Basic \xff\xff"})
    assert odd.status_code < 500, odd.text


def test_a_study_whose_optuna_record_was_deleted_elsewhere_is_failed_not_a_500(
    server: InProcessServer,
) -> None:
    gone, kept = _submit(server), _submit(server)
    server.backend.storage.delete_study(_optuna_id(gone))  # e.g. `optuna delete-study`

    listed = server.http.get("/v1/studies")
    assert listed.status_code == 200, listed.text
    shown = {s["id"]: s for s in listed.json()["items"]}
    assert shown[gone["id"]]["state"] == "failed" and DELETED in shown[gone["id"]]["error"]
    one = server.http.get(f"/v1/studies/{gone['id']}")
    assert one.status_code == 200 and one.json()["state"] == "failed"
    trials = server.http.get(f"/v1/studies/{gone['id']}/trials")
    assert trials.status_code == 200 and trials.json()["total"] == 0
    best = server.http.get(f"/v1/studies/{gone['id']}/best")
    assert best.status_code == 409 and DELETED in best.json()["detail"]
    reaper.reap_once(server.backend, grace_s=60)
    job = queue.get_job(server.backend.sessions, gone["id"])
    assert job.state is JobState.FAILED and job.error is not None and DELETED in job.error
    assert server.http.get(f"/v1/studies/{kept['id']}").json()["state"] == "queued"
    # Its row can still be removed.
    assert server.http.delete(f"/v1/studies/{gone['id']}").status_code == 204
    assert server.http.get(f"/v1/studies/{gone['id']}").status_code == 404


def _cli_delete(server: InProcessServer, study_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "delete", study_id, "--yes", "--server", server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_delete_over_rest_and_cli(server: InProcessServer, tmp_path: Path) -> None:
    first, second = _submit(server), _submit(server)
    assert server.http.delete(f"/v1/studies/{first['id']}").status_code == 204
    assert server.http.get(f"/v1/studies/{first['id']}").status_code == 404
    assert server.http.delete(f"/v1/studies/{first['id']}").status_code == 404
    assert server.http.delete("/v1/studies/no-such-study").status_code == 404

    unasked = subprocess.run(  # no terminal to ask and no --yes: nothing is deleted
        [*CLI, "delete", second["id"], "--server", server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert unasked.returncode == 2 and "--yes" in unasked.stderr
    assert server.http.get(f"/v1/studies/{second['id']}").status_code == 200
    result = _cli_delete(server, second["id"])
    assert result.returncode == 0, result.stderr
    assert "deleted" in result.stdout
    assert server.http.get("/v1/studies").json()["total"] == 0
    names = server.http.get("/api/studies").json()["study_summaries"]
    assert names == []
    again = _cli_delete(server, second["id"])
    assert again.returncode == 1 and "404" in again.stderr and "Traceback" not in again.stderr


# ---------------------------------------------------------------------------------------
# The worker survives what any one job does


def test_a_worker_survives_unrunnable_jobs_and_runs_the_others(migrated_db_url: str) -> None:
    backend = studies.open_backend(
        migrated_db_url,
        limits=SpecLimits(),
        base_url="http://t.invalid",
    )
    try:
        healthy, _ = studies.submit_study(backend, parse_spec(_spec(3)), principal=LOCAL)
        gone, _ = studies.submit_study(backend, parse_spec(_spec(3)), principal=LOCAL)
        backend.storage.delete_study(backend.storage.get_study_id_from_name(gone.optuna_study_name))
        # Rows no submit would write today (an older version's spec, a timeout no datetime
        # holds): the queue and the worker must survive them all the same.
        optuna.create_study(study_name="bad-spec-study", storage=backend.storage)
        bad_spec, _ = queue.create_job(
            backend.sessions,
            spec={"task": {"kind": "synthetic"}, "space": {"no_such_param": 1}},
            name="bad-spec",
            optuna_study_name="bad-spec-study",
            n_trials=3,
        )
        optuna.create_study(study_name="huge-timeout-study", storage=backend.storage)
        huge, _ = queue.create_job(
            backend.sessions,
            spec=_spec(2, timeout_s=1e12),
            name="huge",
            optuna_study_name="huge-timeout-study",
            n_trials=2,
            timeout_s=1e12,
        )

        _run_worker(migrated_db_url)

        def job(job_id: str) -> queue.JobRecord:
            return queue.get_job(backend.sessions, job_id)

        assert job(healthy.id).state is JobState.SUCCEEDED
        # Over the hard cap every server refuses at submit: the job fails, naming the
        # field; the claim of its slot itself no longer overflows (the queue clamps).
        failed = job(huge.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert "study.timeout_s" in failed.error, failed.error
        failed = job(bad_spec.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert "no_such_param" in failed.error, failed.error
        failed = job(gone.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert "deleted" in failed.error or "Record does not exist" in failed.error, failed.error
        # Each unrunnable job gave back the one slot it was tried on, and took no other.
        for bad in (bad_spec, gone, huge):
            assert len(queue.list_leases(backend.sessions, bad.id)) == 1
    finally:
        backend.sessions.kw["bind"].dispose()
        backend.storage.engine.dispose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("pruner", ["median", "hyperband", "successive_halving", "none"])
def test_a_nan_metric_fails_the_trial_whatever_the_pruner(sqlite_url: str, pruner: str) -> None:
    """shared/cases/nan-with-median-pruner.yaml: never PRUNED, always FAIL with the reason."""
    from service.migrate import upgrade_schema

    storage = studies.optuna_storage(sqlite_url)
    upgrade_schema(sqlite_url)
    backend = studies.open_backend(
        sqlite_url, limits=SpecLimits(), base_url="http://t.invalid", storage=storage
    )
    try:
        spec = _spec(12, pruner=pruner)
        spec["task"]["nan_when"] = {"num_layers": 3}
        spec["space"]["max_epochs"] = 4
        study, _ = studies.submit_study(backend, parse_spec(spec), principal=LOCAL)
        _run_worker(sqlite_url)
        trials = optuna.load_study(study_name=study.optuna_study_name, storage=storage).get_trials()
        nan = [t for t in trials if t.params["num_layers"] == 3]
        assert nan, "no trial hit nan_when; change the seed"
        for t in nan:
            assert t.state == TrialState.FAIL, (t.number, t.state, t.user_attrs)
            assert t.user_attrs[FAILURE_ATTR].startswith("metric is nan"), t.user_attrs
        assert len(trials) == 12
    finally:
        backend.sessions.kw["bind"].dispose()
        storage.engine.dispose()


def test_an_idle_worker_keeps_beating(migrated_db_url: str) -> None:
    """The idle loop beats the worker row itself between its waits (PostgreSQL: LISTEN on
    the process's one pooled connection), so no heartbeat waits on that connection."""
    sessions = studies.open_backend(
        migrated_db_url, limits=SpecLimits(), base_url="http://t.invalid"
    ).sessions
    worker = Worker(
        WorkerOptions(
            database_url=migrated_db_url,
            heartbeat_interval_s=0.2,
            poll_interval_s=0.1,
            idle_exit_s=3.0,
        )
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    beats = set()
    try:
        while thread.is_alive():
            rows = queue.list_workers(sessions)
            beats |= {row.heartbeat_at for row in rows if row.id == worker.worker_id}
            time.sleep(0.1)
    finally:
        thread.join(timeout=30)
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
        sessions.kw["bind"].dispose()
    assert len(beats) >= 5, sorted(beats)  # ~14 beats in 3 s of idling


def test_a_study_deleted_mid_trial_never_costs_the_next_study_its_result(
    sqlite_url: str,
) -> None:
    """SQLite reuses the largest row id once a deleted study's leases are gone: the next
    study's lease may get the same id, and its result must not be taken for the deleted
    trial's and rejected (it was, until the worker keyed lost leases by id and claim time)."""
    from service.migrate import upgrade_schema

    storage = studies.optuna_storage(sqlite_url)
    upgrade_schema(sqlite_url)
    backend = studies.open_backend(
        sqlite_url, limits=SpecLimits(), base_url="http://t.invalid", storage=storage
    )
    worker = Worker(
        WorkerOptions(
            database_url=sqlite_url,
            heartbeat_interval_s=0.1,
            poll_interval_s=0.05,
            idle_exit_s=1.5,
        )
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        doomed_spec = _spec(1)
        doomed_spec["task"]["sleep_s"] = 1.5
        doomed, _ = studies.submit_study(backend, parse_spec(doomed_spec), principal=LOCAL)
        thread.start()
        deadline = time.monotonic() + 30
        while not queue.list_leases(backend.sessions, doomed.id, state="running"):
            assert time.monotonic() < deadline, "the worker never claimed the trial"
            time.sleep(0.02)
        [first] = queue.list_leases(backend.sessions, doomed.id)
        time.sleep(0.4)  # a heartbeat or two notices the lease while it runs
        studies.delete_study(backend, doomed.id, principal=LOCAL)
        time.sleep(0.4)  # ... and finds it gone
        nxt, _ = studies.submit_study(backend, parse_spec(_spec(1)), principal=LOCAL)
        thread.join(timeout=60)
        [second] = queue.list_leases(backend.sessions, nxt.id)
        assert second.id == first.id  # the id was reused: the case this test is about
        job = queue.get_job(backend.sessions, nxt.id)
        assert job.state is JobState.SUCCEEDED and job.n_complete == 1, job
    finally:
        thread.join(timeout=60)
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
        backend.sessions.kw["bind"].dispose()
        storage.engine.dispose()
