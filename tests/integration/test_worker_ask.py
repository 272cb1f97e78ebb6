"""How a worker asks Optuna for a trial: fresh slots never take a retry's WAITING trial, a
retry slot runs exactly the WAITING trial its claim names, and the study a worker keeps
between trials still shows its sampler every finished trial."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from service import queue
from service.auth import LOCAL
from service.errors import LeaseLost
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.studies import Backend, open_backend, optuna_storage, submit_study
from service.worker import RetryTrialGone, Worker, WorkerOptions, _Heartbeat, _LeaseStudy
from service.worker_storage import WorkerStorage


def _spec(n_trials: int) -> dict[str, object]:
    return {
        "name": "ask",
        "task": {"kind": "synthetic"},
        "space": {"num_layers": {"type": "int", "low": 1, "high": 4}, "max_epochs": 1},
        "study": {"n_trials": n_trials, "sampler": "random", "pruner": "none"},
    }


def test_fresh_slots_skip_waiting_trials_and_see_other_workers_results(
    migrated_db_url: str,
) -> None:
    storage = optuna_storage(migrated_db_url, pool_size=2)
    optuna.create_study(study_name="s", storage=storage)
    kept = _LeaseStudy(study_name="s", storage=storage)  # a worker's cached study
    other = optuna.load_study(study_name="s", storage=storage)  # another worker

    first = kept.ask()
    kept.tell(first, 1.0)
    by_other = other.ask()
    other.tell(by_other, 2.0)
    other.enqueue_trial({"x": 0.5})  # what the reaper does for a retry slot
    (waiting,) = other.get_trials(states=(TrialState.WAITING,))

    fresh = kept.ask()
    assert fresh.number not in (first.number, by_other.number, waiting.number)
    # The sampler's view (the per-ask cache samplers read) includes the other worker's
    # trial that finished after this study's previous ask.
    seen = {t.number for t in kept._get_trials(deepcopy=False, use_cache=True)}
    assert {first.number, by_other.number} <= seen
    # The WAITING trial is left for the retry slot that names it.
    kept.pop_trial_id = waiting._trial_id
    assert kept.ask().number == waiting.number
    storage.engine.dispose()


def test_a_retry_slot_pops_exactly_its_trial_never_another(migrated_db_url: str) -> None:
    storage = optuna_storage(migrated_db_url, pool_size=2)
    other = optuna.create_study(study_name="s", storage=storage)
    other.enqueue_trial({"x": 0.1})
    other.enqueue_trial({"x": 0.2})
    first, second = other.get_trials(states=(TrialState.WAITING,))
    kept = _LeaseStudy(study_name="s", storage=storage)

    kept.pop_trial_id = second._trial_id
    popped = kept.ask()
    assert popped.number == second.number
    assert popped.suggest_float("x", 0.0, 1.0) == 0.2  # its enqueued parameters
    # Asked again for the same trial (it runs now): refused, never a fresh trial instead.
    with pytest.raises(RetryTrialGone):
        kept.ask()
    assert [t.number for t in other.get_trials(states=(TrialState.WAITING,))] == [first.number]
    storage.engine.dispose()


def test_worker_leaves_a_pending_retrys_trial_to_the_retry(migrated_db_url: str) -> None:
    backend = open_backend(migrated_db_url, limits=DEFAULT_LIMITS, base_url="http://t.invalid")
    study, _ = submit_study(backend, parse_spec(_spec(n_trials=2)), principal=LOCAL)
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=backend.storage)
    optuna_study.enqueue_trial({"num_layers": 3})

    worker = Worker(
        WorkerOptions(database_url=migrated_db_url, poll_interval_s=0.01, idle_exit_s=0.0)
    )
    try:
        assert worker.run() == 2
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()

    trials = optuna_study.get_trials()
    waiting, complete = TrialState.WAITING, TrialState.COMPLETE
    assert [t.state for t in trials] == [waiting, complete, complete]
    leases = queue.list_leases(backend.sessions, study.id)
    assert {lease.trial_number for lease in leases} == {1, 2}
    assert queue.get_job(backend.sessions, study.id).state == queue.JobState.SUCCEEDED
    assert isinstance(backend.storage, optuna.storages.RDBStorage)
    backend.storage.engine.dispose()


def test_a_fresh_trial_is_attached_as_it_is_created_and_a_lost_slot_creates_none(
    migrated_db_url: str,
) -> None:
    """The worker attaches a fresh trial to its lease in the transaction that creates it:
    right after the ask the lease names it, and a slot cancelled or reaped between its
    claim and the ask leaves no trial behind (nothing for the reaper to clean up)."""
    backend = open_backend(migrated_db_url, limits=DEFAULT_LIMITS, base_url="http://t.invalid")
    study, _ = submit_study(backend, parse_spec(_spec(n_trials=3)), principal=LOCAL)
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=backend.storage)
    worker = Worker(WorkerOptions(database_url=migrated_db_url, poll_interval_s=0.01))
    try:
        worker.start()
        lost = queue.claim_trial_slot(worker.sessions, worker.worker_id)
        assert lost is not None
        queue.finish_trial_slot(worker.sessions, lost.id, "failed", "taken back")
        assert worker.run_lease(lost, _Heartbeat(worker.sessions, worker.worker_id, 60.0)) is None
        assert optuna_study.get_trials() == []  # no trial, not even a failed one

        lease = queue.claim_trial_slot(worker.sessions, worker.worker_id)
        assert lease is not None
        _, _, trial = worker._start_trial(lease)
        assert trial is not None and trial.number == 0  # numbering has no gap
        [row] = [r for r in queue.list_leases(backend.sessions, study.id) if r.id == lease.id]
        assert (row.optuna_trial_id, row.trial_number) == (trial._trial_id, trial.number)
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
        assert isinstance(backend.storage, optuna.storages.RDBStorage)
        backend.storage.engine.dispose()


@dataclass
class _Creating:
    """A submitted study of 3 trials, the backend it was submitted through, and a worker's
    storage on the same database, whose fresh trials the tests create directly."""

    backend: Backend
    study_id: str
    study_name: str
    storage: WorkerStorage


@pytest.fixture
def creating(migrated_db_url: str) -> Iterator[_Creating]:
    backend = open_backend(migrated_db_url, limits=DEFAULT_LIMITS, base_url="http://t.invalid")
    study, _ = submit_study(backend, parse_spec(_spec(n_trials=3)), principal=LOCAL)
    storage = optuna_storage(migrated_db_url, worker=True, storage_class=WorkerStorage)
    assert isinstance(storage, WorkerStorage)
    try:
        yield _Creating(backend, study.id, study.optuna_study_name, storage)
    finally:
        storage.engine.dispose()
        assert isinstance(backend.storage, optuna.storages.RDBStorage)
        backend.storage.engine.dispose()


def test_the_storage_creates_a_fresh_trial_attached_to_its_lease_or_not_at_all(
    creating: _Creating,
) -> None:
    """``WorkerStorage.lease_id``: the trial is created attached to the lease (one pipelined
    transaction on PostgreSQL); a lease no longer running raises ``LeaseLost`` and creates
    nothing, leaving no gap in the numbering; without a lease it is created as Optuna
    creates it; an unknown study is Optuna's ``KeyError``."""
    sessions, storage = creating.backend.sessions, creating.storage
    study_id = storage.get_study_id_from_name(creating.study_name)
    lost = queue.claim_trial_slot(sessions, "w:1:a")
    assert lost is not None
    queue.finish_trial_slot(sessions, lost.id, "failed", "taken back")
    storage.lease_id = lost.id
    with pytest.raises(LeaseLost):
        storage.create_new_trial(study_id)
    assert storage.get_all_trials(study_id) == []
    assert storage.attached_trial_id is None

    lease = queue.claim_trial_slot(sessions, "w:1:a")
    assert lease is not None
    storage.lease_id = lease.id
    attached = storage.get_trial(storage.create_new_trial(study_id))
    assert (attached.number, attached.state) == (0, TrialState.RUNNING)
    assert storage.attached_trial_id == attached._trial_id
    [row] = [r for r in queue.list_leases(sessions, creating.study_id) if r.id == lease.id]
    assert (row.optuna_trial_id, row.trial_number) == (attached._trial_id, 0)

    storage.lease_id = None
    unattached = storage.get_trial(storage.create_new_trial(study_id))
    assert unattached.number == 1 and storage.attached_trial_id == attached._trial_id
    stored = storage.get_all_trials(study_id)  # Optuna's read, from the database
    assert [(t.number, t.state) for t in stored] == [
        (0, TrialState.RUNNING),
        (1, TrialState.RUNNING),
    ]
    assert [t.datetime_start for t in stored] == [
        attached.datetime_start,
        unattached.datetime_start,
    ]
    with pytest.raises(KeyError, match="No study with study_id"):
        storage.create_new_trial(study_id + 1000)
    storage.lease_id = lease.id
    with pytest.raises(KeyError, match="No study with study_id"):
        storage.create_new_trial(study_id + 1000)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_pipelined_creation_that_fails_creates_nothing_and_the_next_one_works(
    creating: _Creating, migrated_db_url: str
) -> None:
    """PostgreSQL: the creating transaction is one psycopg pipeline outside SQLAlchemy's
    statements. A statement the server refuses rolls it back (the pooled connection stays
    usable); a connection whose server went fails once as SQLAlchemy's
    ``OperationalError`` (what workers retry) and is not pooled again. Neither creates a
    trial or leaves a gap in the numbering."""
    storage = creating.storage
    admin = create_engine(migrated_db_url, poolclass=NullPool)

    def backend_pid() -> int:
        with storage.engine.connect() as connection:
            pid: int = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        return pid

    try:
        study_id = storage.get_study_id_from_name(creating.study_name)
        lease = queue.claim_trial_slot(creating.backend.sessions, "w:1:a")
        assert lease is not None
        pid = backend_pid()
        storage.lease_id = "not an id"  # type: ignore[assignment]  # refused by the server
        with pytest.raises(sa_exc.DataError):
            storage.create_new_trial(study_id)
        assert backend_pid() == pid  # rolled back, still pooled

        with admin.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        storage.lease_id = lease.id
        with pytest.raises(sa_exc.OperationalError):
            storage.create_new_trial(study_id)
        assert storage.get_all_trials(study_id) == []
        assert backend_pid() != pid

        created = storage.get_trial(storage.create_new_trial(study_id))
        assert created.number == 0 and storage.attached_trial_id == created._trial_id
    finally:
        admin.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_another_postgres_driver_runs_the_same_creation_in_an_ordinary_transaction(
    creating: _Creating, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg 3 pipelines the creating transaction; with another DBAPI driver (psycopg2,
    pg8000: SQLAlchemy's default for a bare ``postgresql://``) the same two statements run
    in an ordinary transaction, with the same outcomes."""
    sessions, storage = creating.backend.sessions, creating.storage
    monkeypatch.setattr(storage.engine.dialect, "driver", "psycopg2")  # this engine's only
    study_id = storage.get_study_id_from_name(creating.study_name)
    lost = queue.claim_trial_slot(sessions, "w:1:a")
    lease = queue.claim_trial_slot(sessions, "w:1:a")
    assert lost is not None and lease is not None
    queue.finish_trial_slot(sessions, lost.id, "failed", "taken back")
    storage.lease_id = lost.id
    with pytest.raises(LeaseLost):
        storage.create_new_trial(study_id)
    storage.lease_id = lease.id
    created = storage.get_trial(storage.create_new_trial(study_id))
    assert created.number == 0 and storage.attached_trial_id == created._trial_id
    [row] = [r for r in queue.list_leases(sessions, creating.study_id) if r.id == lease.id]
    assert (row.optuna_trial_id, row.trial_number) == (created._trial_id, 0)
    with pytest.raises(KeyError, match="No study with study_id"):
        storage.create_new_trial(study_id + 1000)
