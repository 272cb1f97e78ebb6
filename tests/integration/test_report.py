"""The report, the trials as CSV and progress, over a real server (uvicorn on loopback,
SQLite) with real workers running synthetic trials (no model is trained):

- ``GET /v1/studies/{id}/report``: every section, everything the user wrote escaped (a
  study name cannot hold ``<script>``, it is refused at submit; a failure reason can, as
  an error quoting a cell of the user's data does: the test writes one where a worker
  records it), notes
  instead of figures for a study with no trial;
- ``GET /v1/studies/{id}/trials.csv`` and ``?format=csv`` on the trials list;
- ``GET /v1/studies/{id}/progress`` and ``lstm-hpo status`` on a study with a trial
  training now; ``lstm-hpo watch --once``, and ``watch`` ending with code 0 on Ctrl-C;
- ``lstm-hpo report ID -o DIR``: the page, its PNGs and trials.csv;
- 404 for an unknown id and for another principal's study.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text as text_sql
from typer.testing import CliRunner

from service import auth
from service.cli import app as cli_app
from service.client import Client
from service.config import Settings
from service.db import make_engine
from service.errors import InvalidSpec
from service.states import FAILURE_ATTR
from tests.acceptance.conftest import CLI
from tests.servers import InProcessServer, serve_in_thread
from tests.workers import run_worker_until_idle

EVIL = "<script>alert('pwned')</script>"
#: A grid of 3 x 3 points, each run once; num_layers 1 fails: 3 failures, 6 complete.
GRID_SPEC: dict[str, Any] = {
    "name": "report-grid",
    "task": {"kind": "synthetic", "fail_when": {"num_layers": 1}},
    "space": {
        "num_layers": {"type": "int", "low": 1, "high": 3},
        "lr": {"type": "categorical", "choices": [0.001, 0.003, 0.01]},
        "max_epochs": 3,
    },
    "study": {"n_trials": 9, "sampler": "grid", "pruner": "none", "seed": 0},
}
SECTIONS = (
    "summary",
    "optimization_history",
    "intermediate_values",
    "parallel_coordinate",
    "slice",
    "param_importances",
    "top",
    "failures",
    "best-config",
)


@dataclass(frozen=True)
class Setup:
    server: InProcessServer
    database_url: str
    alice: str
    bob: str
    done_id: str  # the grid study, finished
    empty_id: str  # queued, no trial yet

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.alice}"}

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.server.http.get(path, params=params, headers=self.headers())


def _run_worker(database_url: str) -> threading.Thread:
    thread = threading.Thread(
        target=run_worker_until_idle, args=(database_url, 1.0), name="worker", daemon=True
    )
    thread.start()
    return thread


def _append_to_failure_reasons(database_url: str, text: str) -> None:
    """``text`` added to every recorded failure reason, where the worker recorded it (an
    Optuna user attribute, JSON): spec values are all checked at submit, so user-written
    text reaches a reason only from the data (a DataError quotes the cell it refused)."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            rows = connection.execute(
                text_sql(
                    "SELECT trial_user_attribute_id, value_json FROM trial_user_attributes"
                    " WHERE key = :key"
                ),
                {"key": FAILURE_ATTR},
            ).all()
            assert rows, "no failure reason was recorded"
            for row_id, value_json in rows:
                connection.execute(
                    text_sql(
                        "UPDATE trial_user_attributes SET value_json = :value"
                        " WHERE trial_user_attribute_id = :id"
                    ),
                    {"value": json.dumps(json.loads(value_json) + text), "id": row_id},
                )
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp / 'lstm-hpo.db'}"
    with serve_in_thread(Settings(data_dir=tmp / "data", database_url=url)) as server:
        alice = auth.create_token(server.backend.sessions, "alice")
        bob = auth.create_token(server.backend.sessions, "bob")
        with Client(server.url, token=alice) as client:
            with pytest.raises(InvalidSpec, match="name"):
                client.submit(GRID_SPEC | {"name": EVIL})
            done = client.submit(GRID_SPEC)
            _run_worker(url).join(timeout=60)
            assert client.get(done.id).state == "succeeded"
            _append_to_failure_reasons(url, f" (a data cell: {EVIL})")
            empty_spec = GRID_SPEC | {"name": "empty", "study": {"n_trials": 2, "timeout_s": 600}}
            empty = client.submit(empty_spec)
        yield Setup(server, url, alice, bob, done.id, empty.id)


def test_report_page_has_every_section_and_escapes_what_users_wrote(setup: Setup) -> None:
    got = setup.get(f"/v1/studies/{setup.done_id}/report")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in got.headers["content-security-policy"]
    page = got.text
    assert "<script" not in page
    escaped = "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;"
    assert page.count(escaped) >= 2  # the failures' cause and reason
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    # Five figures, each an embedded PNG (6 completed trials: Optuna draws them all).
    assert page.count('src="data:image/png;base64,') == 5
    assert "synthetic failure for" in page  # the failures' cause
    assert page.count("<tr><td>SyntheticFailure: synthetic failure for") == 1  # 1 cause
    assert "num_layers" in page and "lstm-hpo train best.yaml" in page  # the best config
    top_3 = setup.get(f"/v1/studies/{setup.done_id}/report", top_k=3).text
    assert "Top 3 trials" in top_3 and top_3.count('<td class="num">3</td>') >= 1


def test_report_of_a_study_without_trials_is_notes(setup: Setup) -> None:
    got = setup.get(f"/v1/studies/{setup.empty_id}/report")
    assert got.status_code == 200, got.text
    assert "data:image/png" not in got.text
    assert got.text.count("No completed trial yet.") >= 4
    progress = setup.get(f"/v1/studies/{setup.empty_id}/progress").json()
    assert progress["state"] == "queued" and progress["running"] == []
    assert progress["eta_s"] is None and progress["timeout_left_s"] == 600
    rows = list(csv.reader(io.StringIO(setup.get(f"/v1/studies/{setup.empty_id}/trials.csv").text)))
    assert rows == [
        [
            "number",
            "state",
            "value",
            "started_at",
            "finished_at",
            "duration_s",
            "epochs",
            "failure_reason",
        ]
    ]


def test_trials_as_csv(setup: Setup) -> None:
    got = setup.get(f"/v1/studies/{setup.done_id}/trials.csv")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
    assert f'filename="{setup.done_id}-trials.csv"' in got.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(got.text)))
    assert [int(r["number"]) for r in rows] == list(range(9))
    assert {r["state"] for r in rows} == {"complete", "failed"}
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(failed) == 3 and all(r["params_num_layers"] == "1" for r in failed)
    assert all("synthetic failure for" in r["failure_reason"] for r in failed)
    complete = [r for r in rows if r["state"] == "complete"]
    assert all(float(r["value"]) > 0 and r["epochs"] == "3" for r in complete)
    assert all(float(r["duration_s"]) >= 0 and r["started_at"].endswith("+00:00") for r in rows)
    assert set(rows[0]) >= {"params_lr", "params_num_layers"}

    page = setup.get(f"/v1/studies/{setup.done_id}/trials", format="csv", limit=2, offset=1)
    assert page.status_code == 200 and page.headers["x-total-count"] == "9"
    assert [r["number"] for r in csv.DictReader(io.StringIO(page.text))] == ["1", "2"]
    failed_only = setup.get(f"/v1/studies/{setup.done_id}/trials", format="csv", state="failed")
    assert len(list(csv.DictReader(io.StringIO(failed_only.text)))) == 3
    as_json = setup.get(f"/v1/studies/{setup.done_id}/trials", limit=2).json()
    assert as_json["total"] == 9 and len(as_json["items"]) == 2  # the default is unchanged
    with Client(setup.server.url, token=setup.alice) as client:
        assert client.trials_csv(setup.done_id) == got.text
        assert '<section id="top">' in client.report(setup.done_id, top_k=2)


def test_unknown_and_other_principals_studies_are_404(setup: Setup) -> None:
    for path in ("report", "trials.csv", "progress", "trials?format=csv"):
        for study_id, token in (("no-such-study", setup.alice), (setup.done_id, setup.bob)):
            got = setup.server.http.get(
                f"/v1/studies/{study_id}/{path}", headers=setup.headers(token)
            )
            assert got.status_code == 404, (path, got.text)
            assert got.json()["detail"] == "No study with that id."
        assert setup.server.http.get(f"/v1/studies/{setup.done_id}/{path}").status_code == 401


def _cli(setup: Setup, *args: str) -> Any:
    result = CliRunner().invoke(
        cli_app,
        [*args, "--server", setup.server.url, "--token", setup.alice],
        env={"COLUMNS": "250"},
    )
    return result


def test_cli_report_writes_the_page_its_figures_and_the_csv(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli(setup, "report", setup.done_id, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.html", "trials.csv", *(f"{s}.png" for s in SECTIONS[1:6])]
    )
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f'<section id="{s}">' in page for s in SECTIONS)
    assert len((out / "trials.csv").read_text(encoding="utf-8").splitlines()) == 10
    missing = _cli(setup, "report", "no-such-study", "-o", str(tmp_path / "none"))
    assert missing.exit_code == 1 and not (tmp_path / "none").exists()


def test_progress_status_and_watch_on_a_running_study(setup: Setup) -> None:
    """A study whose trials take 3 s (3 epochs of 1 s): progress, status and the report
    while its second trial trains show a running trial, its epoch, the ETA and the
    timeout left. What may have moved on by the next call (which trial runs, its epoch)
    is checked only in the one answer that was waited for."""
    spec = {
        "name": "slow",
        "task": {"kind": "synthetic", "sleep_s": 3.0},
        "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 3},
        "study": {"n_trials": 3, "sampler": "random", "pruner": "none", "timeout_s": 3600},
    }
    with Client(setup.server.url, token=setup.alice) as client:
        slow = client.submit(spec)
        worker = _run_worker(setup.database_url)
        try:
            deadline = time.monotonic() + 30
            while True:  # one trial finished, and the next has reported an epoch
                progress = client.progress(slow.id)
                if progress.n_finished >= 1 and any(r.epoch >= 1 for r in progress.running):
                    break
                assert time.monotonic() < deadline, progress
                time.sleep(0.1)
            (running,) = progress.running
            assert running.max_epochs == 3 and running.last_value is not None
            assert progress.eta_s is not None and progress.mean_trial_s is not None
            assert 0 < progress.eta_s < 60 and "not started" in progress.eta_basis
            assert progress.timeout_s == 3600 and 3500 < (progress.timeout_left_s or 0) < 3600

            # Its trial has 2 s left: the calls that need a running trial come first.
            status = _cli(setup, "status", slow.id, "--no-watch")
            assert status.exit_code == 0, status.output
            assert "running trials" in status.output and "/3 " in status.output
            assert "ETA ~" in status.output and "timeout:" in status.output
            live = setup.get(f"/v1/studies/{slow.id}/report")  # works while it runs
            assert live.status_code == 200 and "still running" in live.text
            assert "running: trial" in live.text
            as_json = _cli(setup, "status", slow.id, "--json")
            assert '"progress": {' in as_json.output and '"n_finished"' in as_json.output

            watched = _cli(setup, "watch", "--once")
            assert watched.exit_code == 0, watched.output
            for study_id in (setup.done_id, setup.empty_id, slow.id):
                assert study_id[:12] in watched.output  # the short id every command takes
        finally:
            client.cancel(slow.id)
            worker.join(timeout=30)


def test_watch_ends_with_code_0_on_ctrl_c(setup: Setup) -> None:
    # Started as from a terminal: a suite run in the background of a non-interactive shell
    # inherits SIGINT ignored, and a child that inherits that never gets KeyboardInterrupt.
    # A handler of our own is reset to the default in the child at exec.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watch = subprocess.Popen(
            [*CLI, "watch", "--interval", "0.2", "--server", setup.server.url],
            env=os.environ | {"LSTM_HPO_TOKEN": setup.alice, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()  # a table was printed: the loop runs
        while "studies" not in first:
            first = watch.stdout.readline()
            assert first, watch.stderr.read() if watch.stderr else ""
        watch.send_signal(signal.SIGINT)
        # communicate, not wait: the pipe is drained while the watch exits (a table every
        # 0.2 s could fill it).
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if watch.poll() is None:
            watch.kill()
