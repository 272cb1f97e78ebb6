"""A grid study with ``n_trials`` equal to the grid's size runs each point exactly once,
with one worker and with several sharing it (shared/cases/grid-step-overshoots.yaml)."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import optuna
import pytest

from service import studies
from service.auth import LOCAL
from service.migrate import upgrade_schema
from service.search_space import SpecLimits, parse_spec
from service.worker import Worker, WorkerOptions

SPEC = {
    "name": "grid",
    "task": {"kind": "synthetic", "sleep_s": 0.2},
    "space": {
        "num_layers": 2,
        "dropout": {"type": "float", "low": 0.0, "high": 0.6, "step": 0.3},
        "lr": {"type": "categorical", "choices": [0.001, 0.01]},
        "max_epochs": 2,
    },
    "study": {"n_trials": 6, "sampler": "grid", "pruner": "none", "seed": 0},
}
POINTS = set(itertools.product([0.0, 0.3, 0.6], [0.001, 0.01]))


@pytest.mark.parametrize("n_workers", [1, 3])
def test_each_grid_point_runs_exactly_once(db_url: str, n_workers: int) -> None:
    storage = studies.optuna_storage(db_url)
    upgrade_schema(db_url)
    backend = studies.open_backend(
        db_url, limits=SpecLimits(), base_url="http://t.invalid", storage=storage
    )
    workers = [
        Worker(WorkerOptions(database_url=db_url, poll_interval_s=0.05, idle_exit_s=0.5))
        for _ in range(n_workers)
    ]
    try:
        study, _ = studies.submit_study(backend, parse_spec(SPEC), principal=LOCAL)
        threads = [threading.Thread(target=w.run) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        trials = optuna.load_study(study_name=study.optuna_study_name, storage=storage).get_trials()
    finally:
        for worker in workers:
            worker.engine.dispose()
            if worker.storage is not None:
                worker.storage.engine.dispose()
        backend.sessions.kw["bind"].dispose()
        storage.engine.dispose()
    ran = Counter((t.params["dropout"], t.params["lr"]) for t in trials)
    assert set(ran) == POINTS and set(ran.values()) == {1}, ran
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
