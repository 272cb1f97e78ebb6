"""The database password never appears in logs, responses, tracebacks or the dashboard
(OWASP API8, security misconfiguration): serve, a worker, a failing trial and every CLI
command run with a password in the database URL, and all their output is searched for it.
PostgreSQL here trusts local connections, so the password is accepted and ignored."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from tests.acceptance.conftest import CLI, start_server, stop_server

PASSWORD = "Zq7-s3cret-pw-4711"


def test_the_database_password_is_never_shown(tmp_path: Path, postgres_url: str) -> None:
    url = make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    unreachable = (
        make_url(postgres_url).set(password=PASSWORD, port=1).render_as_string(hide_password=False)
    )
    seen: list[str] = []
    server = start_server(tmp_path, url, workers=1)
    try:
        env = server.env | {"LSTM_HPO_SERVER": server.url}

        def cli(*args: str, database_url: str | None = None) -> None:
            run_env = env | ({"LSTM_HPO_DATABASE_URL": database_url} if database_url else {})
            result = subprocess.run(
                [*CLI, *args],
                env=run_env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            seen.extend((" ".join(args), result.stdout, result.stderr))

        spec = tmp_path / "fail.yaml"
        spec.write_text(
            "name: leak\ntask: {kind: synthetic, fail_when: {num_layers: 2}}\n"
            "space: {num_layers: 2, max_epochs: 1}\nstudy: {n_trials: 2, sampler: random}\n"
        )
        cli("submit", str(spec))
        study_id = seen[-2].strip()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deadline = time.monotonic() + 120
            while http.get(f"/v1/studies/{study_id}").json()["state"] not in ("failed",):
                assert time.monotonic() < deadline, "the failing study never ended"
                time.sleep(0.5)
            for path in (
                "/v1/health",
                f"/v1/studies/{study_id}",
                f"/v1/studies/{study_id}/trials",
                f"/v1/studies/{study_id}/best",
                "/v1/studies",
                "/openapi.json",
                "/api/meta",
                "/api/studies",
                "/dashboard",
                "/v1/studies/no-such-study",
            ):
                seen.append(http.get(path).text)
        for args in (
            ("status", study_id, "--no-watch"),
            ("status",),
            ("best", study_id),
            ("cancel", study_id),
            ("delete", study_id, "--yes"),
            ("migrate",),
            ("token", "list"),
            ("train", str(spec)),
        ):
            cli(*args)
        # The database unreachable: the errors name the server, never the password.
        cli("migrate", database_url=unreachable)
        cli("token", "list", database_url=unreachable)
        worker = subprocess.Popen(
            [*CLI, "worker", "--processes", "1"],
            env=env | {"LSTM_HPO_DATABASE_URL": unreachable},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        time.sleep(8)  # it retries the unreachable database, logging each attempt
        os.killpg(worker.pid, signal.SIGKILL)
        seen.append(worker.communicate(timeout=30)[0])
    finally:
        stop_server(server)
    seen.append(server.log.read_text(errors="replace"))
    leaked = [text for text in seen if PASSWORD in text]
    assert not leaked, leaked[0][-2000:]
    assert any("***" in text for text in seen)  # the URL is shown, masked
    assert (
        os.environ.get("LSTM_HPO_DATABASE_URL") is None
        or PASSWORD not in os.environ["LSTM_HPO_DATABASE_URL"]
    )
