"""`lstm-hpo serve` with LSTM_HPO_LOG_FORMAT=json: every line the server logs is one JSON
object, and lines about a study carry its id (the webhook sender's, here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.acceptance.conftest import CLI, free_port


def _lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_serve_logs_json_lines_with_the_study_id(tmp_path: Path) -> None:
    port, nobody = free_port(), free_port()  # nothing listens on `nobody`
    env = dict(os.environ) | {
        "LSTM_HPO_DATA_DIR": str(tmp_path / "data"),
        "LSTM_HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'lstm-hpo.db'}",
        "LSTM_HPO_PORT": str(port),
        "LSTM_HPO_LOG_FORMAT": "json",
        "LSTM_HPO_WEBHOOK_ALLOW": f"http://127.0.0.1:{nobody}/",
        "LSTM_HPO_NOTIFY_INTERVAL_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*CLI, "serve", "--workers", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.2)
        spec = {
            "task": {"kind": "synthetic"},
            "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}},
            "study": {
                "n_trials": 2,
                "notify": {"url": f"http://127.0.0.1:{nobody}/hook", "on": ["cancelled"]},
            },
        }
        study = httpx.post(f"{url}/v1/studies", json=spec, timeout=30).json()
        assert httpx.post(f"{url}/v1/studies/{study['id']}/cancel", timeout=30).is_success
        deadline = time.monotonic() + 20
        while not any("retrying" in line["message"] for line in _lines(stderr)):
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
    finally:
        os.killpg(os.getpgid(process.pid), signal.SIGTERM)
        process.wait(timeout=30)

    lines = _lines(stderr)  # json.loads of every line: each is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about = [line for line in lines if line["logger"] == "lstm_hpo.notify"]
    queued = next(line for line in about if line["message"].endswith(":cancelled:2 queued"))
    retrying = next(line for line in about if "retrying" in line["message"])
    assert queued["study_id"] == retrying["study_id"] == study["id"]
    assert retrying["level"] == "WARNING"
    assert "ConnectError" in retrying["message"]
