"""The Python client (service.client: Client and AsyncClient) against a real server
(uvicorn on loopback) and a real worker loop on the synthetic task: submit from a dict,
YAML text, a Path, a path string and a JSON file; list, get, wait (its progress lines and
its timeout), trials, best (one, the top k, a Pareto front), trials.csv, report, progress,
extend, confirm, cancel and delete; the server's errors as exceptions (422 field errors,
404, 409); a request that the backoff carries until a server comes up late; a submit sent
twice that makes one study. SQLite only: the client sees HTTP, not the database."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from service.api.app import create_app
from service.client import (
    ApiError,
    AsyncClient,
    Client,
    InvalidRequest,
    ServerUnreachable,
    WaitTimeout,
    _advance,
    _Done,
    _Request,
)
from service.config import Settings
from service.errors import InvalidSpec
from service.schemas import BestPublic
from service.states import JobState
from tests.acceptance.conftest import free_port
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle

#: The synthetic task: no training, a value per config at once.
SPACE: dict[str, Any] = {"num_layers": {"type": "int", "low": 1, "high": 4}, "max_epochs": 1}
SPACE["lr"] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


def _spec(n_trials: int, name: str = "client", **study: Any) -> dict[str, Any]:
    settings = {"n_trials": n_trials, "sampler": "random", "pruner": "none", "seed": 0}
    return {"name": name, "task": {"kind": "synthetic"}, "space": SPACE, "study": settings | study}


def _settings(tmp: Path) -> Settings:
    return Settings(data_dir=tmp / "data", database_url=f"sqlite:///{tmp / 'lstm-hpo.db'}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with serve_in_thread(_settings(tmp_path_factory.mktemp("client"))) as s:
        yield s


def _run_worker(server: InProcessServer) -> None:
    run_worker_until_idle(str(server.backend.sessions.kw["bind"].url))


def test_submit_watch_decide_and_continue(
    server: InProcessServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(server.url) as client:
        study = client.submit(_spec(3))
        assert (study.state, study.n_trials) == (JobState.QUEUED, 3)
        # Before any trial (its figures take seconds once there are trials to plot).
        assert "<html" in client.report(study.id, top_k=2)

        # Every form of spec; these are not run: one cancelled, the others deleted.
        text = yaml.safe_dump(_spec(2, name="from-yaml"))
        as_yaml = tmp_path / "spec.yaml"
        as_yaml.write_text(yaml.safe_dump(_spec(2, name="from-path")))
        as_json = tmp_path / "spec.json"
        as_json.write_text(json.dumps(_spec(2, name="from-json")))
        others = [
            client.submit(text),
            client.submit(as_yaml),
            client.submit(str(as_json)),  # one line ending in .json: a file
        ]
        assert [o.name for o in others] == ["from-yaml", "from-path", "from-json"]
        listed = client.list(state="queued", limit=100)
        assert {s.id for s in listed.items} == {study.id} | {o.id for o in others}
        assert [s.id for s in client.studies(limit=2).items] == [others[2].id, others[1].id]
        assert client.get(others[0].id).spec == others[0].spec

        with pytest.raises(WaitTimeout, match=r"still queued after 0\.2 s \(0/2") as late:
            client.wait(others[0].id, timeout_s=0.2, poll_s=0.05)
        assert isinstance(late.value, TimeoutError)
        assert client.cancel(others[0].id).state == JobState.CANCELLED
        with pytest.raises(ApiError) as again:
            client.cancel(others[0].id)
        assert (again.value.status_code, again.value.error) == (409, "StudyNotActive")
        assert again.value.detail == "The study is no longer queued or running."
        for other in others[1:]:
            client.delete(other.id)
        with pytest.raises(ApiError) as gone:
            client.get(others[1].id)
        assert (gone.value.status_code, gone.value.error) == (404, "StudyNotFound")
        assert gone.value.detail == "No study with that id." and gone.value.errors == []
        with pytest.raises(ApiError) as early:
            client.best(study.id)
        assert (early.value.status_code, early.value.error) == (409, "NoCompletedTrials")

        capsys.readouterr()
        worker = threading.Thread(target=_run_worker, args=(server,))
        worker.start()
        done = client.wait(study.id, progress=True, poll_s=0.05, timeout_s=60)
        worker.join(timeout=60)
        assert (done.state, done.n_finished) == (JobState.SUCCEEDED, 3)
        lines = capsys.readouterr().err.splitlines()
        assert lines and len(lines) == len(set(lines))  # one line per change
        assert lines[-1].startswith("client succeeded: 3/3 finished (3 complete, 0 pruned")
        assert f"best={done.best_value:.6g}" in lines[-1]

        trials = client.trials(study.id, state="complete")
        assert trials.total == 3 and [t.number for t in trials.items] == [0, 1, 2]
        best = client.best(study.id)
        assert isinstance(best, BestPublic) and best.value == done.best_value
        top = client.best(study.id, 3)
        assert [b.value for b in top] == sorted(t.value for t in trials.items if t.value)
        assert top[0] == best and client.best(study.id, 1) == [best]
        assert client.top(study.id, 2) == top[:2]
        assert client.pareto_front(study.id) == [best]  # one objective: the best alone
        assert "task:" in client.best_yaml(study.id)
        assert len(client.trials_csv(study.id).splitlines()) == 4
        assert client.progress(study.id).n_finished == 3

        extended = client.extend(study.id, 1)
        assert (extended.state, extended.n_trials) == (JobState.QUEUED, 4)
        confirming = client.confirm(study.id, top_k=2, seeds=2)
        assert confirming.id != study.id and confirming.n_trials == 4
        _run_worker(server)
        assert client.get(study.id).n_finished == 4
        confirmation = client.confirmation(confirming.id)
        assert (confirmation.confirms, confirmation.top_k) == (study.id, 2)
        assert len(confirmation.configs) == 2
        for finished in (study.id, confirming.id, others[0].id):
            client.delete(finished)


def test_the_servers_errors_are_exceptions_with_its_words(server: InProcessServer) -> None:
    with Client(server.url) as client:
        bad = _spec(0) | {"space": SPACE | {"dropout": {"type": "float", "low": 0.9}}}
        with pytest.raises(InvalidSpec) as refused:  # what callers always caught
            client.submit(bad)
        err = refused.value
        assert isinstance(err, InvalidRequest) and isinstance(err, ApiError)
        assert (err.status_code, err.error) == (422, "InvalidSpec")
        locs = {e.loc for e in err.errors}
        assert "study.n_trials" in locs and any(loc.startswith("space.dropout") for loc in locs)
        assert all(str(e) in err.detail for e in err.errors)
        with pytest.raises(ApiError) as unknown:  # the study is looked up first: 404
            client.extend("no-such-study", 0)
        assert unknown.value.status_code == 404
        with pytest.raises(FileNotFoundError):
            client.submit("no/such/spec.yaml")
        assert client.list().total == 0  # nothing was made
        study = client.submit(_spec(2))
        with pytest.raises(InvalidRequest) as zero:
            client.extend(study.id, 0)
        assert [(e.loc, e.msg) for e in zero.value.errors] == [("n_trials", "must be >= 1")]
        with pytest.raises(InvalidRequest, match="top_k"):
            client.confirm(study.id, top_k=0)
        client.delete(study.id)  # the server is the module's: leave nothing behind


def test_a_url_that_is_not_the_api_or_an_id_that_is_not_one_is_a_clean_error(
    server: InProcessServer, tmp_path: Path
) -> None:
    """A tester's tracebacks: JSONDecodeError from the dashboard's page at --server
    .../dashboard (and a report that saved that page), ValidationError for "ID/trials"
    (the server decodes %2F), and a checkpoint that could not be written left a .part."""
    with Client(server.url) as client:
        study = client.submit(_spec(1))
        for not_an_id in (study.id + "/trials", study.id + "?x=1"):
            with pytest.raises(ApiError, match="is not a study id") as caught:
                client.get(not_an_id)
            assert (caught.value.status_code, caught.value.error) == (404, "StudyNotFound")
        with pytest.raises(ApiError) as busy:  # no trial yet: the server's 409, not ours
            client.best_checkpoint(study.id, tmp_path / "a-directory-not-made" / "x.ckpt")
        assert busy.value.status_code == 409
        client.delete(study.id)
    with Client(server.url + "/dashboard") as wrong:
        for call in (
            wrong.list,
            lambda: wrong.get(study.id),
            lambda: wrong.report(study.id),
            lambda: wrong.trials_csv(study.id),
            lambda: wrong.submit(_spec(1)),
        ):
            with pytest.raises(ApiError) as caught:
                call()
            assert "not lstm-hpo's API" in str(caught.value), caught.value
            assert "<html" not in str(caught.value).lower()
    with Client(server.url) as client:
        assert client.list().total == 0  # nothing was made through the wrong URL


def test_a_pareto_front(server: InProcessServer) -> None:
    with Client(server.url) as client:
        study = client.submit(_spec(5, name="pareto", objectives=["value", "params"]))
        _run_worker(server)
        front = client.pareto_front(study.id)
        assert front and all(b.values is not None for b in front)
        assert [b.value for b in front] == sorted(b.value for b in front)
        # best: the front's best task metric; with k, at most k of the front.
        assert client.best(study.id) == front[0]
        assert client.best(study.id, 1) == front[:1]
        client.delete(study.id)


def test_a_submit_sent_twice_makes_one_study(server: InProcessServer) -> None:
    """The answer to the first send is lost (dropped here): the client sends the same
    request again, with the key it made for this call, and the server makes no second
    study."""
    with Client(server.url) as client:
        program = client._api.submit(_spec(2, name="resent"), None)
        request = next(program)
        assert isinstance(request, _Request) and request.headers
        first, second = client._send(request), client._send(request)
        assert isinstance(first, httpx.Response) and isinstance(second, httpx.Response)
        assert (first.status_code, second.status_code) == (201, 200)
        result = _advance(program, second)
        assert isinstance(result, _Done) and result.value.id == first.json()["id"]
        assert client.list().total == 1
        assert client.submit(_spec(2, name="resent")).id != result.value.id  # a new call
        for study in client.list().items:
            client.delete(study.id)


def test_the_backoff_carries_a_request_until_the_server_is_up(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(_settings(tmp_path))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    with Client(url, retries=0) as impatient, pytest.raises(ServerUnreachable) as down:
        impatient.health()
    assert down.value.status_code == 0 and isinstance(down.value, ApiError)

    def serve_late() -> None:
        time.sleep(0.7)  # the client's first attempts are refused
        server.run()

    thread = threading.Thread(target=serve_late, name="uvicorn-late", daemon=True)
    began = time.monotonic()
    thread.start()
    try:
        with Client(url) as client:
            study = client.submit(_spec(2, name="late"))  # retried: it has its key
            assert time.monotonic() - began >= 0.7
            assert [s.id for s in client.list().items] == [study.id]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.backend.sessions.kw["bind"].dispose()
        app.state.backend.storage.engine.dispose()


def test_the_async_twin(server: InProcessServer) -> None:
    async def loop() -> None:
        async with AsyncClient(server.url) as client:
            one, two = await asyncio.gather(
                client.submit(_spec(2, name="async-a")), client.submit(yaml.safe_dump(_spec(1)))
            )
            assert (await client.get(one.id)).name == "async-a"
            assert (await client.list(state="queued")).total == 2
            await asyncio.to_thread(_run_worker, server)
            done = await client.wait(one.id, poll_s=0.05, timeout_s=30)
            assert (done.state, done.n_finished) == (JobState.SUCCEEDED, 2)
            best, top = await asyncio.gather(client.best(one.id), client.best(one.id, 2))
            assert top[0] == best and len(top) == 2
            assert (await client.trials(one.id)).total == 2
            await client.delete(two.id)
            with pytest.raises(ApiError) as gone:
                await client.get(two.id)
            assert gone.value.status_code == 404
            await client.delete(one.id)

    asyncio.run(loop())
