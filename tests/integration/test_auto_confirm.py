"""``study.confirm``: the server confirms a study's winner by itself once it has succeeded
(service.auto_confirm), through a real server (uvicorn on loopback) on SQLite and
PostgreSQL and real worker loops on the synthetic task:

- a succeeded study gets exactly one confirmation (top_k x seeds trials), even when a
  second server looks too or the record of it is lost (the idempotency key), and never
  again once the user deleted it, until it is extended; ``best`` then names the
  confirmation's winner;
- a study that cannot be confirmed (fewer distinct configs than top_k) gets a note why;
- a cancelled study, and one without ``study.confirm``, get none;
- the spec field: ``true`` for the defaults, 422 naming the field for what cannot run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from service.auto_confirm import AUTO_CONFIRM_ATTR, AutoConfirmer
from service.cli import app as cli_app
from service.config import Settings
from service.search_space import SpecLimits, parse_spec
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle

SPEC: dict[str, Any] = {
    "name": "auto",
    "task": {"kind": "synthetic"},
    "space": {
        "num_layers": {"type": "int", "low": 1, "high": 3},
        "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
        "max_epochs": 1,
    },
    "study": {
        "n_trials": 5,
        "sampler": "random",
        "pruner": "none",
        "seed": 0,
        "confirm": {"top_k": 2, "seeds": 3},
    },
}


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[InProcessServer]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, notify_interval_s=0.1)
    with serve_in_thread(settings) as s:
        yield s


def _submit(server: InProcessServer, **study: Any) -> str:
    spec = SPEC | {"study": SPEC["study"] | study}
    created = server.http.post("/v1/studies", json=spec)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _confirmations_of(server: InProcessServer, study_id: str) -> list[dict[str, Any]]:
    page = server.http.get("/v1/studies", params={"limit": 500}).json()
    return [
        s
        for s in page["items"]
        if (server.http.get(f"/v1/studies/{s['id']}").json()["spec"]["study"]["confirm_of"])
        == study_id
    ]


def _wait_for(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.1)
    return found


def _url(server: InProcessServer) -> str:
    return str(server.backend.sessions.kw["bind"].url.render_as_string(hide_password=False))


def test_a_succeeded_study_is_confirmed_once_and_best_names_the_winner(
    server: InProcessServer,
) -> None:
    parent = _submit(server)
    run_worker_until_idle(_url(server))
    assert server.http.get(f"/v1/studies/{parent}").json()["state"] == "succeeded"

    (confirmation,) = _wait_for(lambda: _confirmations_of(server, parent), "confirmation")

    assert confirmation["n_trials"] == 2 * 3 and confirmation["name"] == "auto-confirm"
    notes = server.http.get(f"/v1/studies/{parent}").json()["notes"]
    assert notes == [
        f"study.confirm: confirmation {confirmation['id']} of its 5 trials (top 2 x 3 seeds); "
        "lstm-hpo best ID --confirmed gives its winner's config once it has run"
    ]
    spec = server.http.get(f"/v1/studies/{confirmation['id']}").json()["spec"]
    assert spec["study"]["confirm"] is None  # a confirmation is not confirmed again
    # Another server looking, with this one's record of it lost: the same study, not a second.
    storage = server.backend.storage
    optuna_id = storage.get_study_id_from_name(
        server.http.get(f"/v1/studies/{parent}").json()["optuna_study_name"]
    )
    assert storage.get_study_system_attrs(optuna_id)[AUTO_CONFIRM_ATTR] == {
        "n_trials": 5,
        "confirmation": confirmation["id"],
    }
    assert AutoConfirmer(server.backend, interval_s=1).scan_once() == []
    storage.set_study_system_attr(optuna_id, AUTO_CONFIRM_ATTR, None)
    assert AutoConfirmer(server.backend, interval_s=1).scan_once() == [confirmation["id"]]
    assert len(_confirmations_of(server, parent)) == 1
    assert server.http.get(f"/v1/studies/{parent}").json()["notes"] == notes  # said once

    # Its winner is known once it has run; a confirmation is not extended (its trials are
    # its configs x seeds).
    early = server.http.get(f"/v1/studies/{parent}/best", params={"confirmed": "true"})
    if early.status_code != 200:  # the worker may have run it already
        assert early.status_code == 409 and early.json()["error"] == "ConfirmationNotReady"
    more = server.http.post(f"/v1/studies/{confirmation['id']}/extend", json={"n_trials": 2})
    assert more.status_code == 409 and "is a confirmation" in more.text

    run_worker_until_idle(_url(server))

    best = server.http.get(f"/v1/studies/{parent}/best").json()
    assert best["confirmation"]["study_id"] == confirmation["id"]
    assert best["confirmation"]["state"] == "succeeded"
    result = server.http.get(f"/v1/studies/{parent}/confirmation").json()
    assert [c["validation"]["n"] for c in result["configs"]] == [3, 3]
    # The confirmed winner's config, from the parent and from the confirmation alike.
    winner = next(c for c in result["configs"] if c["rank"] == 1)
    confirmed = server.http.get(f"/v1/studies/{parent}/best", params={"confirmed": "true"})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["trial_number"] == winner["trial_number"]
    assert confirmed.json()["confirmation"]["rank"] == 1
    # Asked of the confirmation itself: its trial numbers are not the answer's; refused.
    itself = server.http.get(f"/v1/studies/{confirmation['id']}/best", params={"confirmed": "true"})
    assert itself.status_code == 409 and f"lstm-hpo best {parent} --confirmed" in itself.text
    trial = server.http.get(f"/v1/studies/{parent}/trials").json()["items"]
    params = next(t["params"] for t in trial if t["number"] == winner["trial_number"])
    as_yaml = server.http.get(
        f"/v1/studies/{parent}/best", params={"confirmed": "true", "format": "yaml"}
    )
    config = yaml.safe_load(as_yaml.text)
    assert config["params"]["lr"] == pytest.approx(params["lr"])
    assert config["params"]["num_layers"] == params["num_layers"]
    listed = server.http.get(f"/v1/studies/{parent}/best", params={"confirmed": "true", "k": 2})
    assert listed.status_code == 200 and listed.json() == [confirmed.json()]  # one winner
    cli = CliRunner().invoke(cli_app, ["best", parent[:8], "--server", server.url])
    assert cli.exit_code == 0, cli.output
    if best["trial_number"] != winner["trial_number"]:  # the search's best is not the winner
        assert f"lstm-hpo best {parent[:12]} --confirmed gives it" in " ".join(cli.stderr.split())
    cli = CliRunner().invoke(cli_app, ["best", parent[:8], "--confirmed", "--server", server.url])
    assert cli.exit_code == 0, cli.output
    assert yaml.safe_load(cli.stdout) == config
    # Deleted by its user: the server does not make it again.
    assert server.http.delete(f"/v1/studies/{confirmation['id']}").status_code == 204
    assert AutoConfirmer(server.backend, interval_s=1).scan_once() == []
    assert _confirmations_of(server, parent) == []
    # Extended, and succeeded again: its top configs may have changed, so once more.
    extended = server.http.post(f"/v1/studies/{parent}/extend", json={"n_trials": 2})
    assert extended.status_code == 200, extended.text
    run_worker_until_idle(_url(server))
    (again,) = _wait_for(lambda: _confirmations_of(server, parent), "second confirmation")
    assert again["id"] != confirmation["id"]


def test_a_study_that_cannot_be_confirmed_gets_a_note_why(server: InProcessServer) -> None:
    # Every trial trains the same config: one distinct config, top_k 2.
    spec = SPEC | {"space": {"num_layers": 2, "max_epochs": 1}}
    spec = spec | {"study": SPEC["study"] | {"n_trials": 3}}
    created = server.http.post("/v1/studies", json=spec)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    run_worker_until_idle(_url(server))

    def note() -> list[str]:
        notes = server.http.get(f"/v1/studies/{study_id}").json()["notes"] or []
        return [n for n in notes if n.startswith("study.confirm: not run:")]

    (said,) = _wait_for(note, "note")

    assert "1 distinct configs" in said and "top 2 needs 2" in said, said
    assert _confirmations_of(server, study_id) == []
    assert AutoConfirmer(server.backend, interval_s=1).scan_once() == []
    assert len(note()) == 1  # said once


def test_a_cancelled_study_and_one_without_confirm_get_none(server: InProcessServer) -> None:
    cancelled = _submit(server)
    assert server.http.post(f"/v1/studies/{cancelled}/cancel").status_code == 200
    plain = _submit(server, confirm=None)
    run_worker_until_idle(_url(server))
    assert server.http.get(f"/v1/studies/{plain}").json()["state"] == "succeeded"

    assert AutoConfirmer(server.backend, interval_s=1).scan_once() == []
    assert _confirmations_of(server, cancelled) == _confirmations_of(server, plain) == []


@pytest.mark.parametrize(
    ("confirm", "study", "loc", "says"),
    [
        ({"top_k": 0}, {}, "study.confirm.top_k", "must be >= 1"),
        ({"seeds": 1}, {}, "study.confirm.seeds", "must be >= 2"),
        ({"top_k": 6}, {}, "study.confirm.top_k", "more than the study's n_trials (5)"),
        ({"top_k": 20, "seeds": 20}, {"n_trials": 50}, "study.confirm.seeds", "MAX_TRIALS"),
        ({"seed": 3}, {}, "study.confirm.seed", "unknown field"),
        ("yes", {}, "study.confirm", ""),
        (
            True,
            {"objectives": ["value", "params"], "pruner": "none"},
            "study.confirm",
            "ranks one objective",
        ),
    ],
    ids=["top-k-0", "one-seed", "top-k-past-n-trials", "past-max-trials", "unknown", "str",
         "multi-objective"],
)  # fmt: skip
def test_a_confirm_that_cannot_run_is_refused_naming_the_field(
    confirm: Any, study: dict[str, Any], loc: str, says: str
) -> None:
    from service.errors import InvalidSpec

    spec = SPEC | {"study": SPEC["study"] | study | {"confirm": confirm}}

    with pytest.raises(InvalidSpec) as raised:
        parse_spec(spec, SpecLimits(max_trials=100))

    assert any(e.loc.startswith(loc) and says in e.msg for e in raised.value.errors), (
        raised.value.errors
    )


def test_confirm_true_means_the_defaults_and_false_none() -> None:
    on = parse_spec(SPEC | {"study": SPEC["study"] | {"confirm": True}})
    off = parse_spec(SPEC | {"study": SPEC["study"] | {"confirm": False}})

    assert on.study.confirm is not None
    assert (on.study.confirm.top_k, on.study.confirm.seeds) == (3, 5)
    assert off.study.confirm is None


def test_never_confirmed_is_404_for_best_confirmed(server: InProcessServer) -> None:
    plain = _submit(server, confirm=None)
    run_worker_until_idle(_url(server))

    got = server.http.get(f"/v1/studies/{plain}/best", params={"confirmed": "true"})

    assert got.status_code == 404 and got.json()["error"] == "ConfirmationNotFound"


def test_a_full_quota_makes_the_confirmation_wait_with_a_note(db_url: str, tmp_path: Path) -> None:
    """Over its owner's quota of active studies, the confirmation waits (a note says so;
    no Optuna study is made and dropped at each look) and is queued once a slot frees."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        notify_interval_s=3600,  # the test looks itself
        max_active_studies_per_principal=1,
    )
    with serve_in_thread(settings) as server:
        parent = _submit(server)
        run_worker_until_idle(_url(server))
        blocker = _submit(server, confirm=None)  # queued: the one active study allowed
        confirmer = AutoConfirmer(server.backend, interval_s=1)
        studies_before = len(server.backend.storage.get_all_studies())

        assert confirmer.scan_once() == [] and confirmer.scan_once() == []

        assert len(server.backend.storage.get_all_studies()) == studies_before
        notes = server.http.get(f"/v1/studies/{parent}").json()["notes"]
        assert len(notes) == 1 and notes[0].startswith("study.confirm: waits for a free slot")
        assert server.http.post(f"/v1/studies/{blocker}/cancel").status_code == 200
        (queued,) = confirmer.scan_once()
        notes = server.http.get(f"/v1/studies/{parent}").json()["notes"]
        assert len(notes) == 1 and notes[0].startswith(f"study.confirm: confirmation {queued}")


def test_a_webhook_the_server_no_longer_allows_does_not_stop_the_confirmation(
    db_url: str, tmp_path: Path
) -> None:
    """The allow-list changed since the submit: the confirmation runs without the
    study's webhook, and its note says so."""
    hook = "http://127.0.0.1:9/"  # nothing listens: its POSTs fail, which is not tested here
    allowing = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        notify_interval_s=3600,
        webhook_allow=(hook,),
    )
    with serve_in_thread(allowing) as first:
        parent = _submit(first, notify={"url": hook + "done", "on": ["finished"]})
        run_worker_until_idle(_url(first))
    not_allowing = allowing.model_copy(update={"webhook_allow": ()})
    with serve_in_thread(not_allowing) as second:  # its confirmer looks as it starts
        (confirmation,) = _wait_for(lambda: _confirmations_of(second, parent), "confirmation")
        queued = confirmation["id"]

        spec = second.http.get(f"/v1/studies/{queued}").json()["spec"]
        assert spec["study"]["notify"] is None
        (note,) = second.http.get(f"/v1/studies/{parent}").json()["notes"]
        assert f"confirmation {queued}" in note and "without the study's webhook" in note
