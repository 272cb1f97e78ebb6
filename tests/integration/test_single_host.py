"""SQLite is for one machine: a second worker host is refused with a message naming PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service import queue
from service.db import make_engine, make_session_factory
from service.errors import SingleHostOnly
from service.migrate import upgrade_schema
from service.worker import WorkerOptions, check_single_host

CLI = str(Path(sys.executable).parent / "lstm-hpo")


def test_second_host_on_sqlite_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    upgrade_schema(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    options = WorkerOptions(database_url=sqlite_url)
    check_single_host(sessions, options)  # nobody else: fine
    queue.register_worker(sessions, worker_id="gpu-box:1", hostname="gpu-box", pid=1)
    with pytest.raises(SingleHostOnly, match=r"workers on gpu-box .*PostgreSQL"):
        check_single_host(sessions, options)

    result = subprocess.run(
        [CLI, "worker", "--processes", "1", "--database-url", sqlite_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LSTM_HPO_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "SQLite is for one machine" in result.stderr and "PostgreSQL" in result.stderr


def test_many_hosts_on_postgres_are_fine(postgres_url: str) -> None:
    upgrade_schema(postgres_url)
    sessions = make_session_factory(make_engine(postgres_url))
    queue.register_worker(sessions, worker_id="gpu-box:1", hostname="gpu-box", pid=1)
    check_single_host(sessions, WorkerOptions(database_url=postgres_url))


def test_local_processes_on_sqlite_are_fine(sqlite_url: str) -> None:
    upgrade_schema(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    queue.register_worker(sessions, worker_id="me:1", hostname=socket.gethostname(), pid=1)
    check_single_host(sessions, WorkerOptions(database_url=sqlite_url))
