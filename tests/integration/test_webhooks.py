"""study.notify end to end: a real server (uvicorn on loopback) POSTs study summaries to a
real HTTP receiver (http.server on a loopback port) while a real worker loop runs the
synthetic task; the allow-list is checked at submit, a 503 is retried, and a restarted
server does not send again. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import func, select

from service import queue, studies
from service.config import Settings
from service.db import make_engine, make_session_factory
from service.migrate import upgrade_schema
from service.models import WebhookEvent
from service.notify import NOTIFIED_ATTR, Notifier
from service.search_space import SpecLimits
from service.worker import Worker, WorkerOptions
from tests.servers import InProcessServer, serve_in_thread


@dataclass
class Receiver:
    """What the webhook receiver got: (headers, lower-cased, with the request path as
    ``:path`` and the status it answered as ``:status``; body) per POST, in arrival order."""

    url: str
    posts: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    #: Answer 503 to this many POSTs first (the sender must retry them).
    fail_first: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> list[dict[str, Any]]:
        """One body per event answered 2xx (a retried POST counted once)."""
        with self.lock:
            by_id = {b["event_id"]: b for h, b in self.posts if h[":status"] == "204"}
        return list(by_id.values())

    def wait_for(self, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.delivered()) < count:
            assert time.monotonic() < deadline, f"only {self.delivered()} arrived"
            time.sleep(0.05)
        return self.delivered()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with state.lock:
                status = 503 if state.fail_first > 0 else 204
                state.fail_first -= 1
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.posts.append((headers | {":path": self.path, ":status": str(status)}, body))
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, name="receiver", daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{http.server_address[1]}/hooks"
    try:
        yield state
    finally:
        http.shutdown()
        http.server_close()


def _spec(n_trials: int, notify: dict[str, Any], **task: Any) -> dict[str, Any]:
    return {
        "name": "hooked",
        "task": {"kind": "synthetic", **task},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 3},
            "hidden_size": {"type": "int", "low": 16, "high": 256, "log": True},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "max_epochs": 2,
        },
        "study": {
            "n_trials": n_trials,
            "sampler": "random",
            "pruner": "none",
            "seed": 1,
            "notify": notify,
        },
    }


def _run_worker(db_url: str) -> int:
    worker = Worker(WorkerOptions(database_url=db_url, poll_interval_s=0.05, idle_exit_s=0.0))
    try:
        return worker.run()
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()


def _settings(tmp_path: Path, db_url: str, receiver: Receiver) -> Settings:
    """A server that allows the receiver's webhooks and looks for events every 0.1 s."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        webhook_allow=(receiver.url,),
        notify_interval_s=0.1,
    )


def _refused_loc(server: InProcessServer, spec: dict[str, Any]) -> list[str]:
    response = server.http.post("/v1/studies", json=spec)
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["errors"]]


def test_webhooks_tell_new_bests_and_ends_once(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, db_url, receiver)
    receiver.fail_first = 1
    with serve_in_thread(settings) as server:
        # Refused at the door, naming the field: outside the allow-list, other schemes.
        port = receiver.url.split(":")[2].split("/")[0]
        for url in (
            f"http://127.0.0.1:{port}/other",
            f"http://127.0.0.1:{int(port) + 1}/hooks",
            f"https://127.0.0.1:{port}/hooks",
            "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd",
        ):
            assert _refused_loc(server, _spec(2, {"url": url})) == ["study.notify.url"], url

        everything = {"url": f"{receiver.url}/run-1", "on": ["finished", "failed", "new_best"]}
        good = server.http.post("/v1/studies", json=_spec(4, everything)).json()
        # Every configuration fails: the default events are finished and failed.
        bad = server.http.post(
            "/v1/studies", json=_spec(2, {"url": receiver.url}, fail_when={"max_epochs": 2})
        ).json()
        quiet = server.http.post(
            "/v1/studies", json=_spec(1, {"url": receiver.url, "on": ["failed"]})
        ).json()
        assert _run_worker(db_url) == 7

        final = server.http.get(f"/v1/studies/{good['id']}").json()
        trials = server.http.get(f"/v1/studies/{good['id']}/trials").json()["items"]
        # Waited for by what must come, not by a count: good's bests alone can make up any
        # count before bad's end is sent (a look takes longer under load).
        ends = {(good["id"], "finished"), (bad["id"], "failed")}

        def arrived(delivered: list[dict[str, Any]]) -> bool:
            told = {(b["study"]["id"], b["event"]) for b in delivered}
            newest_best = any(
                b["event"] == "new_best"
                and b["study"]["best_trial_number"] == final["best_trial_number"]
                for b in delivered
            )
            # The POST answered 503 is sent again after the sender's backoff (1 s).
            with receiver.lock:
                retried = len({b["event_id"] for _h, b in receiver.posts}) == len(delivered)
            return ends <= told and newest_best and retried

        deadline = time.monotonic() + 60
        while not arrived(delivered := receiver.delivered()):
            assert time.monotonic() < deadline, (delivered, receiver.posts)
            time.sleep(0.05)
        time.sleep(0.5)  # five more looks: nothing else may come
        delivered = receiver.delivered()

    events = sorted((b["study"]["id"], b["event"]) for b in delivered)
    assert (quiet["id"], "finished") not in events  # not in its `on`
    assert events.count((good["id"], "finished")) == 1
    assert events.count((bad["id"], "failed")) == 1
    assert {e for e in events if e[0] != good["id"]} == {(bad["id"], "failed")}
    finished = next(b for b in delivered if b["event"] == "finished")
    summary = finished["study"]
    assert summary["state"] == "succeeded"
    assert (summary["n_trials"], summary["n_finished"], summary["name"]) == (4, 4, "hooked")
    assert summary["best_value"] == final["best_value"]
    assert summary["best_trial_number"] == final["best_trial_number"]
    best_trial = next(t for t in trials if t["number"] == final["best_trial_number"])
    assert summary["best_params"] == best_trial["params"]
    assert summary["url"] == f"{server.url}/v1/studies/{good['id']}"
    assert summary["dashboard_url"] == final["dashboard_url"]
    assert "spec" not in summary

    bests = sorted(
        (b for b in delivered if b["event"] == "new_best"),
        key=lambda b: b["study"]["best_trial_number"],
    )
    values = [b["study"]["best_value"] for b in bests]
    assert values == sorted(values, reverse=True)  # minimised: each beats the one before
    for body in bests:
        number = body["study"]["best_trial_number"]
        trial = next(t for t in trials if t["number"] == number)
        assert (body["study"]["best_params"], body["study"]["best_value"]) == (
            trial["params"],
            trial["value"],
        )
        assert body["event_id"] == f"{good['id']}:new_best:{number}"

    failed = next(b for b in delivered if b["event"] == "failed")["study"]
    assert (failed["state"], failed["best_value"], failed["best_params"]) == ("failed", None, None)
    assert failed["error"]

    # The first POST was answered 503 and sent again; every other POST once.
    ids = [headers["x-lstm-hpo-event-id"] for headers, _body in receiver.posts]
    assert ids == [body["event_id"] for _headers, body in receiver.posts]
    assert len(ids) == len(set(ids)) + 1
    assert ids.count(ids[0]) == 2
    assert all(h["content-type"] == "application/json" for h, _b in receiver.posts)
    assert all(h["user-agent"].startswith("lstm-hpo/") for h, _b in receiver.posts)
    assert {h["host"] for h, _b in receiver.posts} == {receiver.url.split("/")[2]}
    paths = {b["study"]["id"]: h[":path"] for h, b in receiver.posts}
    assert paths == {good["id"]: "/hooks/run-1", bad["id"]: "/hooks"}

    # A restarted server knows what was told: nothing is sent again.
    count = len(receiver.posts)
    with serve_in_thread(settings):
        time.sleep(1.0)
    assert len(receiver.posts) == count


def test_no_allow_list_refuses_every_webhook(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url)
    with serve_in_thread(settings) as server:
        response = server.http.post(
            "/v1/studies", json=_spec(2, {"url": "https://hooks.example.com/x"})
        )
        assert response.status_code == 422
        (error,) = response.json()["errors"]
        assert error["loc"] == "study.notify.url"
        assert "LSTM_HPO_WEBHOOK_ALLOW" in error["msg"]


def test_a_study_confirm_confirmation_tells_the_webhook_its_winner(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """study.confirm keeps the study's webhook (end events only): the confirmation's
    ``finished`` names the study it confirms, its winner and verdict, and where the
    winner's config is; the search's own ``finished`` carries no confirmation."""
    settings = _settings(tmp_path, db_url, receiver)
    spec = _spec(4, {"url": receiver.url, "on": ["finished", "new_best"]})
    spec["study"]["confirm"] = {"top_k": 2, "seeds": 2}
    with serve_in_thread(settings) as server:
        parent = server.http.post("/v1/studies", json=spec).json()["id"]
        _run_worker(db_url)  # the search
        deadline = time.monotonic() + 30
        while not (notes := server.http.get(f"/v1/studies/{parent}").json()["notes"]):
            assert time.monotonic() < deadline, "no confirmation queued"
            time.sleep(0.05)
        assert _run_worker(db_url) == 4  # the confirmation: 2 configs x 2 seeds

        ended = [
            b
            for b in receiver.wait_for(1, timeout_s=30)
            if b["event"] == "finished" and b["study"]["id"] != parent
        ]
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline, receiver.delivered()
            time.sleep(0.05)
            ended = [
                b
                for b in receiver.delivered()
                if b["event"] == "finished" and b["study"]["id"] != parent
            ]
        result = server.http.get(f"/v1/studies/{parent}/confirmation").json()

    (told,) = ended
    winner = next(c for c in result["configs"] if c["rank"] == 1)
    assert told["study"]["id"] in notes[0]
    assert told["study"]["confirmation"] == {
        "confirms": parent,
        "winner_trial_number": winner["trial_number"],
        "verdict": result["verdict"],
        "best_url": f"{server.url}/v1/studies/{parent}/best?confirmed=true",
    }
    by_study = [b for b in receiver.delivered() if b["study"]["id"] == told["study"]["id"]]
    assert [b["event"] for b in by_study] == ["finished"]  # no new_best from its pairs
    searched = [b for b in receiver.delivered() if b["study"]["id"] == parent]
    assert {b["event"] for b in searched} >= {"finished"}
    assert all(b["study"]["confirmation"] is None for b in searched)


def _events_of(receiver: Receiver, study_id: str, event: str) -> list[str]:
    return sorted(
        b["event_id"]
        for b in receiver.delivered()
        if b["study"]["id"] == study_id and b["event"] == event
    )


def _wait_until(check: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_extended_study_tells_its_new_end(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """Extending an ended study makes a new end (was: never told, nor its new bests: the
    study counted as done for good), with its own event_id; deleting the study deletes
    its claims."""
    settings = _settings(tmp_path, db_url, receiver)
    with serve_in_thread(settings) as server:
        study = server.http.post(
            "/v1/studies", json=_spec(2, {"url": receiver.url, "on": ["finished", "new_best"]})
        ).json()["id"]
        assert _run_worker(db_url) == 2
        _wait_until(lambda: _events_of(receiver, study, "finished"))
        extended = server.http.post(f"/v1/studies/{study}/extend", json={"n_trials": 2})
        assert extended.status_code == 200, extended.text
        assert _run_worker(db_url) == 2
        _wait_until(lambda: len(_events_of(receiver, study, "finished")) == 2)
        time.sleep(0.5)  # five more looks: nothing else may come

        assert _events_of(receiver, study, "finished") == [
            f"{study}:finished:2",
            f"{study}:finished:4",
        ]
        last = next(b for b in receiver.delivered() if b["event_id"] == f"{study}:finished:4")
        assert (last["study"]["n_trials"], last["study"]["n_finished"]) == (4, 4)
        final = server.http.get(f"/v1/studies/{study}").json()
        bests = _events_of(receiver, study, "new_best")
        assert f"{study}:new_best:{final['best_trial_number']}" in bests
        ids = [b["event_id"] for _h, b in receiver.posts]
        assert len(ids) == len(set(ids))

        assert server.http.delete(f"/v1/studies/{study}").status_code == 204
        with server.backend.sessions() as session:
            assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0


def test_servers_sharing_a_database_claim_each_event_once(tmp_path: Path, db_url: str) -> None:
    """The claim is one INSERT on a primary key: of many notifiers (each its own engine,
    as separate servers have) racing for one event, exactly one may send it."""
    upgrade_schema(db_url)
    engine = make_engine(db_url)
    job, _ = queue.create_job(
        make_session_factory(engine), spec={}, name="x", optuna_study_name="x", n_trials=1
    )
    engine.dispose()
    engines = [make_engine(db_url) for _ in range(6)]  # one per server
    notifiers = [
        Notifier(
            studies.Backend(
                sessions=make_session_factory(e),
                storage=optuna.storages.InMemoryStorage(),  # a claim reads no Optuna record
                limits=SpecLimits(),
                base_url="http://127.0.0.1",
            ),
            allow=(),
            interval_s=1.0,
        )
        for e in engines
    ]
    start = threading.Barrier(len(notifiers))
    won: list[bool] = []

    def claim(notifier: Notifier) -> None:
        start.wait()
        won.append(notifier._claim(job.id, f"{job.id}:finished:1"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in notifiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for e in engines:
        e.dispose()

    assert sorted(won) == [False] * (len(notifiers) - 1) + [True]


def _notified(db_url: str, optuna_id: int) -> dict[str, Any]:
    storage = optuna.storages.RDBStorage(db_url)
    try:
        return dict(storage.get_study_system_attrs(optuna_id).get(NOTIFIED_ATTR) or {})
    finally:
        storage.engine.dispose()


def test_an_end_told_by_a_server_before_the_upgrade_is_not_told_again(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    """A record as servers before 2026-12-02 wrote it ("ended": true, no n_trials): an
    ended study's end counts as told, whatever n_trials it ended at (it may have been
    extended before), and its next end, after an extension, is told."""
    settings = _settings(tmp_path, db_url, receiver)
    with serve_in_thread(settings) as server:
        study = server.http.post("/v1/studies", json=_spec(2, {"url": receiver.url})).json()
        extended = server.http.post(f"/v1/studies/{study['id']}/extend", json={"n_trials": 1})
        assert extended.status_code == 200, extended.text
    assert _run_worker(db_url) == 3  # no server: nothing is told yet
    storage = optuna.storages.RDBStorage(db_url)
    optuna_id = storage.get_study_id_from_name(study["optuna_study_name"])
    storage.set_study_system_attr(optuna_id, NOTIFIED_ATTR, {"best_trial": None, "ended": True})
    storage.engine.dispose()

    with serve_in_thread(settings) as server:
        # The first look takes the old record's end as told, and rewrites the record with
        # the n_trials it is for: an end after an extension is then a new one, whenever
        # the next look comes (was: a look only after the extended study ended took the
        # old record as telling that end too, and never sent it).
        _wait_until(lambda: _notified(db_url, optuna_id).get("ended_for") == 3)
        assert receiver.posts == []
        extended = server.http.post(f"/v1/studies/{study['id']}/extend", json={"n_trials": 1})
        assert extended.status_code == 200, extended.text
        assert _run_worker(db_url) == 1
        _wait_until(lambda: _events_of(receiver, study["id"], "finished"))
        time.sleep(0.5)

    assert [b["event_id"] for _h, b in receiver.posts] == [f"{study['id']}:finished:4"]
