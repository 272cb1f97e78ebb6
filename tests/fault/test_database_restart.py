"""The database goes away and comes back; workers start before the schema exists.

A throwaway PostgreSQL cluster (initdb + pg_ctl as the ``postgres`` user, on a free port)
is created for the restart test, so stopping it disturbs nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.conftest import (
    Cluster,
    Database,
    assert_study_finished_exactly,
    free_port,
    live_group_members,
    synthetic_spec,
    wait_until,
)


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory; stop/start at will."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lstm-hpo-pg-"))
        self.data = self.dir / "data"
        # initdb refuses to run as root: run the cluster as the postgres user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[ThrowawayPostgres]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are required under CI")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = ThrowawayPostgres(bin_dir)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def test_workers_reconnect_after_a_postgres_restart_and_lose_nothing(
    tmp_path: Path, private_postgres: ThrowawayPostgres
) -> None:
    cluster = Cluster(tmp_path, private_postgres.url)
    db: Database | None = None
    try:
        cluster.start_server()
        workers = cluster.start_workers(2)
        job_id = cluster.submit(synthetic_spec(14, sleep_s=0.8, name="restart"))
        db = Database(private_postgres.url)
        database = db
        wait_until(
            lambda: database.job(job_id).n_finished >= 3,
            timeout_s=90,
            what="3 finished trials",
            context=cluster.logs,
        )
        database.close()
        # Down for a few seconds mid-study: running trials keep training, their final
        # writes and the next claims fail and must be retried after reconnecting.
        private_postgres.stop("fast")
        time.sleep(4)
        private_postgres.start()
        back_up = time.monotonic()
        db = Database(private_postgres.url)
        database = db
        finished_at_restart = database.job(job_id).n_finished
        wait_until(
            lambda: database.job(job_id).n_finished > finished_at_restart,
            timeout_s=30,
            what="a trial finished within 30 s of the database coming back",
            context=cluster.logs,
        )
        reconnect_s = time.monotonic() - back_up
        wait_until(
            lambda: database.job(job_id).state == "succeeded",
            timeout_s=120,
            what="the study to finish",
            context=cluster.logs,
        )
        assert_study_finished_exactly(database, job_id)
        # No worker process crashed: the supervisor never had to restart one.
        assert workers.poll() is None
        log = (tmp_path / "workers.log").read_text(errors="replace")
        assert "restarting" not in log and "Traceback" not in log, log[-3000:]
        print(f"first trial finished {reconnect_s:.1f}s after the database came back")
    finally:
        if db is not None:
            db.close()
        cluster.kill_all()


def test_twenty_workers_started_before_the_schema_wait_for_the_server(
    cluster: Cluster, fault_db: Database
) -> None:
    # 20 worker processes on an empty database (no tables at all), before any server.
    groups = [cluster.start_workers(1) for _ in range(20)]
    time.sleep(3)
    for group in groups:
        assert group.poll() is None, cluster.logs()
    cluster.start_server()  # migrates; the workers notice and start claiming
    job_id = cluster.submit(synthetic_spec(20, sleep_s=0.1, name="startup"))
    wait_until(
        lambda: fault_db.job(job_id).state == "succeeded",
        timeout_s=180,
        what="the study to finish",
        context=cluster.logs,
    )
    assert_study_finished_exactly(fault_db, job_id)
    for group in groups:
        assert group.poll() is None and live_group_members(group.pid)
    log = (cluster.tmp_path / "workers.log").read_text(errors="replace")
    assert "Traceback" not in log and "restarting" not in log, log[-3000:]
    workers = {lease.worker_id for lease in fault_db.leases(job_id)}
    assert len(workers) >= 2  # the work was shared, not done by one early bird
