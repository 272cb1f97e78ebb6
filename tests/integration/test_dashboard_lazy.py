"""optuna-dashboard is built at its first request, not at the server's start: importing it
costs about 2 s of CPU (scikit-learn, through Optuna's fANOVA), twice the rest of a start.
Run in a fresh interpreter: in this one another test may have imported it already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import sys
from service.config import Settings
from tests.servers import serve_in_thread

with serve_in_thread(Settings(data_dir=sys.argv[1])) as server:
    assert server.http.get("/v1/health").status_code == 200
    assert "optuna_dashboard" not in sys.modules, "imported at the server's start"
    page = server.http.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"], page
    assert "optuna_dashboard" in sys.modules
    studies = server.http.get("/api/studies")  # its JSON API, through the same app
    assert studies.status_code == 200 and "study_summaries" in studies.json(), studies.text
print("served")
"""


def test_the_dashboard_is_imported_at_its_first_request(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "data")],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("served"), done.stderr[-3000:]
