"""Careless input to the CLI ends in one ``error:`` line and a usage exit, never a Python
traceback or minutes of retries: a spec that is not UTF-8, a server URL that cannot work,
a database URL that cannot, a port out of range. Real subprocesses, a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client import server_url
from service.config import check_database_url
from service.errors import InvalidServerUrl
from tests.acceptance.conftest import CLI, LiveServer, start_server, stop_server


def _run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output


@pytest.fixture
def server(tmp_path: Path, sqlite_url: str) -> Iterator[LiveServer]:
    live = start_server(tmp_path, sqlite_url, workers=0)
    try:
        yield live
    finally:
        stop_server(live)


def test_client_commands_refuse_what_cannot_work(server: LiveServer, tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name: x\n")
    # Was a UnicodeDecodeError traceback; the server names the byte, as `train` does.
    _refused(server.cli("submit", str(binary)), 2, "not UTF-8")
    _refused(server.cli("submit", str(tmp_path / "missing.yaml")), 2, "cannot read")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # was a hang: read to check, then read again by the client
    for not_a_file in (tmp_path, fifo):
        _refused(server.cli("submit", str(not_a_file), timeout=60), 2, "not a regular file")
    port = server.url.rsplit(":", 1)[1]
    # Every client command builds its client in one place (cli._client): one each here.
    for bad, needle, command in (
        ("http://[::1", "not a valid URL", ("status",)),  # was httpx.InvalidURL's traceback
        (f"127.0.0.1:{port}", f"did you mean http://127.0.0.1:{port}?", ("watch", "--once")),
        ("ftp://127.0.0.1", "needs http:// or https://", ("submit", str(binary))),
        ("http://127.0.0.1:99999", "port 99999 is not in 1-65535", ("status",)),
        # httpx sent these as Basic auth in place of the token, and showed the password.
        (f"http://me:s3cret@127.0.0.1:{port}", "no user or password in it", ("status",)),
        ("http://a..b:1", "'a..b' is not a host name", ("status",)),  # was a UnicodeError
    ):
        result = server.cli(*command, "--server", bad)  # the last two were 5 retries
        _refused(result, 2, "--server", needle)
        assert "attempt" not in result.stderr, result.stderr  # no retry was made
        assert "s3cret" not in result.stderr, result.stderr
    # The base URL as a user pastes it, with the API's /v1 (forms: test_server_url_forms).
    listed = server.cli("status", "--server", server.url + "/v1/")
    assert listed.returncode == 0, listed.stderr


def test_server_url_forms() -> None:
    assert server_url(" http://h:8000/v1/ ") == "http://h:8000"
    assert server_url("HTTPS://Example.org/prefix/V1") == "https://example.org/prefix"
    assert server_url("http://lstm_hpo:8000") == "http://lstm_hpo:8000"  # a Compose service
    assert server_url("http://[::1]:8000") == "http://[::1]:8000"
    for bad in (
        "",
        "localhost:8000",
        "http://",
        "http:///v1",
        "file:///tmp/x",
        "http://h:0",
        "http://a b:8000",
        "http://-h-:8000",
        "http://" + "a" * 64 + ":8000",
        "http://u:pw@h:8000",
    ):
        with pytest.raises(InvalidServerUrl):
            server_url(bad)
    with pytest.raises(ValueError, match="http://localhost:8000"):  # also a ValueError
        server_url("localhost:8000")
    with pytest.raises(InvalidServerUrl) as unparsable:
        server_url("http://u:s3cret@[::1")
    assert "u:***@" in str(unparsable.value) and "s3cret" not in str(unparsable.value)
    with pytest.raises(InvalidServerUrl, match=r"needs http:// or https:// and a host$"):
        server_url("http:/h:8000")  # no "did you mean http://http:/h:8000"


def test_database_and_port_settings_are_refused_by_name(tmp_path: Path) -> None:
    env = dict(os.environ) | {"LSTM_HPO_DATA_DIR": str(tmp_path / "data")}
    for url, needle, command in (
        ("garbage", "not a database URL", ("migrate",)),
        (
            "mysql://u:pw@127.0.0.1:1/x",
            "'mysql': lstm-hpo runs on SQLite or PostgreSQL",
            ("token", "list"),
        ),
        (
            "postgresql+pg8000://u:pw@127.0.0.1:1/x",
            "driver 'postgresql+pg8000' cannot be loaded",
            ("worker", "-p", "1"),
        ),
    ):
        result = _run(*command, env=env | {"LSTM_HPO_DATABASE_URL": url})
        _refused(result, 2, f"LSTM_HPO_DATABASE_URL: {needle}")
        assert "pw" not in result.stderr  # pydantic's own text showed the input
    _refused(_run("migrate", "--database-url", "garbage", env=env), 2, "--database-url: not a")
    with pytest.raises(ValueError, match="'connect_timeout' is given more than once"):
        check_database_url("postgresql+psycopg://u@h/x?connect_timeout=2&connect_timeout=3")
    with pytest.raises(ValueError, match="in-memory"):  # SQLite's URI form of the same
        check_database_url("sqlite:///file:x?mode=memory&uri=true")
    check_database_url(f"sqlite:///file:{tmp_path / 'x.db'}?uri=true")  # a file URI is fine
    (tmp_path / "folder").mkdir()
    for url, needle in (
        ("sqlite://", "in-memory SQLite database is private to each process"),
        ("sqlite:///:memory:", "in-memory SQLite database is private to each process"),
        ("sqlite:///~/x.db", "~ is not expanded"),
        (f"sqlite:///{tmp_path / 'folder'}", "is a directory"),
    ):  # were "schema is current" on a database gone at exit, a traceback, 300 s waits
        _refused(_run("migrate", "--database-url", url, env=env), 2, needle)
    # Well-formed but unusable: the cause in one line (were SQLAlchemy's tracebacks).
    unreachable = "postgresql+psycopg://nobody:pw@127.0.0.1:1/x"
    for command in (("migrate",), ("token", "list"), ("serve", "--workers", "0")):
        result = _run(*command, env=env | {"LSTM_HPO_DATABASE_URL": unreachable})
        _refused(result, 1, "The database is unreachable", "Connection refused")
    result = _run(
        "worker", "-p", "1", env=env | {"LSTM_HPO_DATABASE_URL": "sqlite:////proc/x/y.db"}
    )
    _refused(result, 2, "cannot create /proc/x for the SQLite database")
    # A connection option the driver refuses: exit 2 with its words (was a traceback).
    # Workers refused to start at once, not waiting for a database that cannot come.
    for query, needle, command in (
        ("connect_timeout=abc", "bad value for connect_timeout: 'abc'", ("migrate",)),
        ("connect_timeout=abc", "bad value for connect_timeout: 'abc'", ("token", "list")),
        ("bogus_option=1", 'invalid connection option "bogus_option"', ("worker", "-p", "1")),
        ("sslmode=wrong", 'invalid sslmode value: "wrong"', ("worker", "-p", "1")),
        ("sslmode=wrong", 'invalid sslmode value: "wrong"', ("token", "list")),
        ("port=99999", 'invalid port number: "99999"', ("migrate",)),
    ):
        url = f"postgresql+psycopg://nobody@127.0.0.1:1/x?{query}"
        result = _run(*command, env=env | {"LSTM_HPO_DATABASE_URL": url})
        _refused(result, 2, "the database URL's connection options: " + needle)
    url = "postgresql+psycopg://nobody@127.0.0.1:1/x?port=abc"  # SQLAlchemy's own refusal
    result = _run("migrate", env=env | {"LSTM_HPO_DATABASE_URL": url})
    _refused(result, 2, "LSTM_HPO_DATABASE_URL: its connection options: Received non-integer port")
    _refused(_run("serve", "--port", "99999", env=env), 2, "65535")  # was OverflowError


def test_a_worker_waiting_for_the_database_says_so_and_stops_at_once(tmp_path: Path) -> None:
    """Was silent while it waited, and ignored SIGTERM until its supervisor gave up (28 s)."""
    env = dict(os.environ) | {
        "LSTM_HPO_DATA_DIR": str(tmp_path / "data"),
        "LSTM_HPO_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x",
        "PYTHONUNBUFFERED": "1",
    }
    worker = subprocess.Popen(
        [*CLI, "worker", "-p", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert worker.stdout is not None
        lines: list[str] = []
        for line in worker.stdout:
            lines.append(line)
            if "waiting for the database" in line:
                break
        assert "Connection refused" in lines[-1], "".join(lines)
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=15)  # the wait checks for a stop every second
        assert worker.returncode == 0, "".join(lines) + rest
        assert "still running" not in rest, rest
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_a_database_host_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    """A host that accepts and never answers hung `migrate` (Optuna's engine had no connect
    timeout): it gives up after the connect timeout, the URL's own when it sets one."""
    env = dict(os.environ) | {"LSTM_HPO_DATA_DIR": str(tmp_path / "data")}
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; never accepts a word
        url = f"postgresql+psycopg://nobody@127.0.0.1:{silent.getsockname()[1]}/x"
        result = _run("migrate", "--database-url", url + "?connect_timeout=1", env=env, timeout=60)
        _refused(result, 1, "The database is unreachable", "timeout")
        result = _run("migrate", "--database-url", url, env=env, timeout=60)
        _refused(result, 1, "The database is unreachable", "timeout")
