"""Over real HTTP: a study whose data every trial would fail on is a 422 at submit, naming
``task.path`` and the line or byte, and no study is created."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from service.api.app import create_app
from service.config import Settings
from tests.acceptance.conftest import free_port
from tests.unit.test_data_checks import CASES, write_case_data

YAML = {"Content-Type": "application/yaml"}


@dataclass(frozen=True)
class Server:
    http: httpx.Client
    datasets: Path

    def total(self) -> int:
        response = self.http.get("/v1/studies")
        assert response.status_code == 200, response.text
        total: int = response.json()["total"]
        return total


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real app (SQLite, no workers) served by uvicorn in a thread on a loopback port."""
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'lstm-hpo.db'}",
        data_roots=[],
        port=free_port(),
    )
    app = create_app(settings)
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    backend = app.state.backend
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=30) as http:
            yield Server(http, data_dir / "datasets")
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"
        backend.sessions.kw["bind"].dispose()
        backend.storage.engine.dispose()


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
