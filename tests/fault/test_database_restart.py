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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from service.config import Settings
from service.db import is_outage
from service.reaper import ORPHAN_REASON
from service.states import RETRY_OF_ATTR
from service.studies import optuna_storage
from service.worker import Worker, WorkerOptions
from service.worker_storage import WorkerStorage
from tests.fault.conftest import (
    Cluster,
    Database,
    assert_study_finished_exactly,
    failure_reason,
    free_port,
    live_group_members,
    synthetic_spec,
    wait_until,
)
from tests.servers import serve_in_thread


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
        trials = assert_study_finished_exactly(database, job_id)
        # Lose nothing: the trials that were training, reporting or telling while the
        # database was away waited for it. A FAIL can only be an orphan (an ask() whose
        # reply was lost: it never trained) or a lost trial that was retried.
        failed = [
            (t.number, failure_reason(t))
            for t in trials
            if t.state == TrialState.FAIL
            and failure_reason(t) != ORPHAN_REASON
            and not any(u.user_attrs.get(RETRY_OF_ATTR) == t.number for u in trials)
        ]
        assert not failed, failed
        # No worker process crashed: the supervisor never had to restart one.
        assert workers.poll() is None
        log = (tmp_path / "workers.log").read_text(errors="replace")
        assert "restarting" not in log and "Traceback" not in log, log[-3000:]
        print(f"first trial finished {reconnect_s:.1f}s after the database came back")
    finally:
        if db is not None:
            db.close()
        cluster.kill_all()


def test_a_stopped_database_is_an_outage_to_every_storage_call_and_a_training_trial_waits(
    private_postgres: ThrowawayPostgres,
) -> None:
    """A refused connection must read as an outage (retried) at every call a worker makes,
    never as "the study cannot run" (the pipelined trial creation once let psycopg's own
    error through, and a restart failed whole studies). While a trial trains, its set-up,
    reports and its pruner's reads wait for the database instead of failing the trial."""
    url = private_postgres.url
    storage = optuna_storage(url, storage_class=WorkerStorage)
    assert isinstance(storage, WorkerStorage)
    worker = Worker(WorkerOptions(database_url=url, db_retry_s=60.0))
    try:
        study_id = storage.create_new_study([StudyDirection.MINIMIZE], "outage")
        trial_id = storage.create_new_trial(study_id)
        storage.set_trial_param(trial_id, "lr", 0.01, FloatDistribution(1e-4, 1e-1, log=True))
        storage.set_trial_user_attr(trial_id, "config", {"lr": 0.01})  # held until published
        private_postgres.stop("fast")
        calls: dict[str, Callable[[], Any]] = {
            "create a trial": lambda: storage.create_new_trial(study_id),
            "publish the set-up": lambda: storage.publish_setup(trial_id),
            "report": lambda: storage.set_trial_intermediate_value(trial_id, 0, 1.0),
            "read the trials": lambda: storage.get_all_trials(study_id),
            "read the study": lambda: storage.get_study_directions(study_id),
            "tell": lambda: storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0]),
        }
        for what, call in calls.items():
            with pytest.raises(Exception) as raised:
                call()
                pytest.fail(f"{what}: no error with the database stopped")
            assert is_outage(raised.value), f"{what}: {raised.value!r} is not an outage"

        # The worker sets outage_retry while the trial trains: the same calls now wait.
        restart = threading.Timer(1.5, private_postgres.start)
        restart.start()
        storage.outage_retry = worker._db
        try:
            storage.publish_setup(trial_id)
            storage.set_trial_intermediate_value(trial_id, 0, 0.5)
            others = storage.get_all_trials(study_id, states=(TrialState.COMPLETE,))
        finally:
            storage.outage_retry = None
            restart.join()
        assert others == []
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
        # What another process reads: everything written once, the trial complete.
        stored = optuna.storages.RDBStorage(url).get_trial(trial_id)
        assert stored.state == TrialState.COMPLETE and stored.value == 0.5
        assert stored.params == {"lr": 0.01} and stored.user_attrs == {"config": {"lr": 0.01}}
        assert stored.intermediate_values == {0: 0.5}
    finally:
        storage.engine.dispose()
        worker.engine.dispose()


def test_the_api_answers_503_while_the_database_is_away_and_serves_once_it_is_back(
    tmp_path: Path, private_postgres: ThrowawayPostgres
) -> None:
    """Every route a client uses is a JSON 503 with Retry-After while the database is
    away, never a bare 500: open mode's guard read the database outside FastAPI's error
    handlers, and Optuna's storage wrapped the dropped connection of a restart in its own
    StorageInternalError. The answer never names where the database is."""
    settings = Settings(data_dir=tmp_path / "data", database_url=private_postgres.url)
    with serve_in_thread(settings) as server:
        study = server.http.post("/v1/studies", json=synthetic_spec(2, sleep_s=0.1)).json()
        optuna_id = study["dashboard_url"].rsplit("/", 1)[1]
        dashboard = ["/api/studies", f"/api/studies/{optuna_id}", f"/csv/{optuna_id}"]
        reads = [
            *dashboard,
            "/v1/studies",
            *(f"/v1/studies/{study['id']}{tail}" for tail in ("", "/trials", "/best", "/report")),
            f"/v1/studies/{study['id']}/progress",
            "/v1/health",
        ]
        # Pooled connections that a restart will drop. /best: 409, no trial finished yet.
        before = {path: server.http.get(path).status_code for path in reads}
        assert set(before.values()) <= {200, 409}, before
        private_postgres.stop("fast")
        writes = [
            ("POST", "/v1/studies", synthetic_spec(2, sleep_s=0.1)),
            ("POST", f"/v1/studies/{study['id']}/cancel", None),
        ]
        answers = [(path, server.http.get(path)) for path in reads]
        answers += [(path, server.http.request(m, path, json=body)) for m, path, body in writes]
        for path, answer in answers:
            assert answer.status_code == 503, (path, answer.status_code, answer.text)
            assert answer.json()["error"] == "DatabaseUnavailable", path
            assert answer.headers["retry-after"] == "1", path
            assert str(private_postgres.port) not in answer.text, (path, answer.text)
        private_postgres.start()
        # The dashboard first, on Optuna's pool as the restart left it: its reads are made
        # once more on an outage, so the first answer is already right (was a 500).
        for path in dashboard:
            assert server.http.get(path).status_code == before[path], path
        # Our routes: a pooled connection the restart dropped fails once (503: the pool is
        # then renewed); the client's retry of a 503 is all it takes.
        for path in reads:
            statuses = [server.http.get(path).status_code for _ in range(2)]
            assert statuses[-1] == before[path], (path, statuses)
            assert set(statuses) <= {before[path], 503}, (path, statuses)
        assert server.http.get(f"/v1/studies/{study['id']}").json()["state"] == "queued"


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
