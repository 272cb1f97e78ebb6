"""Over real HTTP: a study whose data every trial would fail on is a 422 at submit, naming
``task.path`` and the line or byte, and no study is created."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from service.config import Settings
from tests.servers import serve_in_thread
from tests.unit.test_data_checks import CASES, write_case_data
from tests.workers import run_worker_until_idle

YAML = {"Content-Type": "application/yaml"}


@dataclass(frozen=True)
class Server:
    http: httpx.Client
    datasets: Path
    database_url: str

    def total(self) -> int:
        response = self.http.get("/v1/studies")
        assert response.status_code == 200, response.text
        total: int = response.json()["total"]
        return total


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real app (SQLite, no workers) served by uvicorn in a thread on a loopback port."""
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings(data_dir=data_dir, data_roots=[])
    with serve_in_thread(settings) as running:
        yield Server(running.http, data_dir / "datasets", settings.resolved_database_url())


@pytest.mark.parametrize("name", list(CASES))
def test_shared_case_is_refused_at_submit(server: Server, name: str) -> None:
    case = CASES[name]
    write_case_data(case, server.datasets)
    before = server.total()
    response = server.http.post("/v1/studies", content=yaml.safe_dump(case.spec), headers=YAML)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [e["loc"] for e in body["errors"]] == ["task.path"]
    message = body["errors"][0]["msg"]
    for fragment in case.says:
        assert fragment in message, message
    assert str(server.datasets) not in response.text  # the server's directories stay private
    assert server.total() == before  # no study was created


def test_cp1252_text_is_accepted_with_its_encoding(server: Server) -> None:
    case = CASES["cp1252"]
    write_case_data(case, server.datasets)
    spec = {**case.spec, "task": {**case.spec["task"], "encoding": "cp1252"}}
    before = server.total()
    response = server.http.post("/v1/studies", json=spec)
    assert response.status_code == 201, response.text
    assert server.total() == before + 1


def _submit_forecast(server: Server, name: str, csv_text: str) -> httpx.Response:
    """Write ``csv_text`` as datasets/``name`` and submit a one-trial forecast study of its
    ``load`` column; the 201."""
    (server.datasets / name).write_text(csv_text, encoding="utf-8")
    spec = {
        "task": {"kind": "forecast", "path": name, "column": "load", "lookback": 4},
        "study": {"n_trials": 1},
    }
    response = server.http.post("/v1/studies", json=spec)
    assert response.status_code == 201, response.text
    return response


def test_missing_values_are_dropped_and_the_study_says_which_lines(server: Server) -> None:
    """Empty or NA cells in a forecast series are read as gaps and dropped (not an error),
    but not silently: the 201's notes, kept on the study, name the lines."""
    rows = "".join(f"{i},{'NA' if i in (7, 30) else 100 + i}\n" for i in range(60))
    response = _submit_forecast(server, "gaps.csv", "month,load\n" + rows)
    expected = "task.path: gaps.csv: 2 rows with no value in column 'load' dropped (lines 9, 32)"
    [note] = response.json()["notes"]
    assert note.startswith(expected), note
    assert str(server.datasets) not in note  # the path as the user wrote it
    stored = server.http.get(f"/v1/studies/{response.json()['id']}").json()
    assert stored["notes"] == [note]


def test_log_transform_of_a_series_with_a_zero_is_refused_naming_the_field(
    server: Server,
) -> None:
    """log(0) would fail every trial: a 422 at task.transform naming the point; nothing kept."""
    rows = "".join(f"{i},{0 if i == 9 else 100 + i}\n" for i in range(60))
    (server.datasets / "zero.csv").write_text("month,load\n" + rows, encoding="utf-8")
    task = {"kind": "forecast", "path": "zero.csv", "column": "load", "lookback": 4}
    before = server.total()

    response = server.http.post("/v1/studies", json={"task": {**task, "transform": "log"}})

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == "task.transform", error
    assert error["msg"].startswith(
        "forecast: zero.csv line 11: column 'load' is '0': `transform: log`"
    )
    assert server.total() == before
    assert server.http.post("/v1/studies", json={"task": task}).status_code == 201


def test_data_spoilt_after_submit_fail_the_trial_naming_the_file_as_the_user_did(
    server: Server,
) -> None:
    """Data that pass at submit and change before a trial reads them fail that trial with
    the reason; the reason names the file as the spec did, not the server's directory."""
    rows = "".join(f"{i},{100 + i}\n" for i in range(60))
    response = _submit_forecast(server, "later.csv", "month,load\n" + rows)
    (server.datasets / "later.csv").write_text("month,demand\n" + rows, encoding="utf-8")

    run_worker_until_idle(server.database_url, data_roots=(server.datasets,))

    [trial] = server.http.get(f"/v1/studies/{response.json()['id']}/trials").json()["items"]
    assert trial["state"] == "failed", trial
    assert "later.csv: no column 'load'" in trial["failure_reason"], trial
    assert str(server.datasets) not in trial["failure_reason"], trial
