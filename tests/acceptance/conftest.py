"""A real server: `lstm-hpo serve` in a subprocess on a free loopback port, real workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CLI = [str(Path(sys.executable).parent / "lstm-hpo")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    env: dict[str, str]
    log: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `lstm-hpo ARGS` against this server."""
        return subprocess.run(
            [*CLI, *args],
            env=self.env | {"LSTM_HPO_SERVER": self.url},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def start_server(tmp_path: Path, database_url: str, *, workers: int = 2) -> LiveServer:
    port = free_port()
    data_dir = tmp_path / "data"
    env = dict(os.environ) | {
        "LSTM_HPO_DATA_DIR": str(data_dir),
        "LSTM_HPO_DATABASE_URL": database_url,
        "LSTM_HPO_PORT": str(port),
        "LSTM_HPO_HEARTBEAT_INTERVAL_S": "1",
        "LSTM_HPO_POLL_INTERVAL_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "serve", "--workers", str(workers), "--accelerator", "cpu"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return LiveServer(url, process, data_dir, env, log)


def stop_server(server: LiveServer) -> None:
    """SIGTERM the whole process group (server + workers); SIGKILL if it lingers."""
    pgid = os.getpgid(server.process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        server.process.wait()
    # Workers outlive the server by at most their current trial.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def live_server(tmp_path: Path, db_url: str) -> Iterator[LiveServer]:
    """`lstm-hpo serve --workers 2` on SQLite and on PostgreSQL."""
    server = start_server(tmp_path, db_url)
    try:
        yield server
    finally:
        stop_server(server)
