"""A retried trial resumes from its checkpoint: real server and worker processes, a
``kill -9`` of the worker during epoch 3 (0-based) of 5, on SQLite and PostgreSQL.

One worker runs a study of two trials with the same fixed config and seed: trial 0 runs
uninterrupted, trial 1 is killed while it trains epoch 3 (its checkpoint holds epochs
0-2), the reaper fails it and enqueues its retry (trial 2), which must start at epoch 3,
not 0, and end with exactly trial 0's value and learning curve.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from service.artifacts import open_artifact_store
from service.states import ORIGINAL_TRIAL_ATTR, RESUMED_FROM_ATTR, RETRY_OF_ATTR
from service.training.fit import read_checkpoint_progress
from tests.fault.conftest import (
    Cluster,
    Database,
    assert_study_finished_exactly,
    wait_until,
    worker_pid,
)

#: About 0.8 s per epoch on one (busy) core: time enough to land a kill inside epoch 3.
SPEC: dict[str, Any] = {
    "name": "resume",
    "task": {"kind": "adding", "seq_len": 10, "n_train": 3000, "n_val": 200, "n_test": 50},
    "space": {
        "num_layers": 2,
        "hidden_size": 16,
        "dropout": 0.2,
        "batch_size": 16,
        "lr": 0.01,
        "lr_schedule": "step",
        "lr_decay_start": 2,
        "max_epochs": 5,
        "seed": 11,
    },
    # Every trial keeps its best-epoch checkpoint once the study ends (the default, "best",
    # would have the reaper delete all but the best trial's, at a moment of its choosing).
    "study": {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "seed": 0,
        "keep_checkpoints": "all",
    },
}


def _epochs_in_checkpoint(path: Path) -> int | None:
    try:
        return read_checkpoint_progress(path).epochs_done
    except (OSError, EOFError, RuntimeError, ValueError):
        return None  # not written yet (each version appears whole: os.replace)


def test_kill_during_epoch_3_the_retry_resumes_at_epoch_3_and_ends_identically(
    cluster: Cluster, fault_db: Database
) -> None:
    cluster.start_server(wait=False)
    cluster.start_workers(1)
    cluster.wait_for_server()
    job_id = cluster.submit(SPEC)
    store = open_artifact_store(None, cluster.tmp_path / "data")
    last = cluster.tmp_path / "data" / "artifacts" / store.artifact_id(job_id, 1, "last")

    # Trial 1's checkpoint holds epochs 0-2: it is training epoch 3. Kill its worker now.
    wait_until(
        lambda: _epochs_in_checkpoint(last) == 3,
        timeout_s=120,
        what="trial 1 to finish epoch 2",
        interval_s=0.02,
        context=cluster.logs,
    )
    [victim] = fault_db.running_leases(job_id)
    assert victim.trial_number == 1
    cluster.kill_worker_process(worker_pid(victim.worker_id))
    killed_at = time.monotonic()
    assert _epochs_in_checkpoint(last) == 3, "the kill landed after epoch 3 ended"

    wait_until(
        lambda: fault_db.job(job_id).state == "succeeded",
        timeout_s=120,
        what="the study to finish",
        interval_s=0.2,
        context=cluster.logs,
    )
    print(f"kill -9 during epoch 3 -> study finished {time.monotonic() - killed_at:.1f}s later")
    trials = assert_study_finished_exactly(fault_db, job_id)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    uninterrupted, killed, retry = trials
    assert retry.user_attrs[RETRY_OF_ATTR] == 1 and retry.user_attrs[ORIGINAL_TRIAL_ATTR] == 1
    assert retry.params == killed.params == uninterrupted.params

    # It started at epoch 3, not 0 ...
    assert retry.user_attrs[RESUMED_FROM_ATTR] == 3
    assert "resumed trial 2 from epoch 3 (checkpoint of trial 1)" in cluster.logs(tail=100_000)
    assert sorted(killed.intermediate_values) == [0, 1, 2]  # what the killed one reported
    # ... its curve starts with the killed trial's epochs (the pruner sees it whole) ...
    assert retry.intermediate_values == uninterrupted.intermediate_values
    assert {k: retry.intermediate_values[k] for k in (0, 1, 2)} == killed.intermediate_values
    # ... and it ends bit for bit where the uninterrupted trial ended.
    assert retry.value == uninterrupted.value

    # The trials API shows it.
    with cluster.http() as http:
        items = http.get(f"/v1/studies/{job_id}/trials").json()["items"]
    assert [t.get("resumed_from_epoch") for t in items] == [None, None, 3]
    assert items[2]["retry_of"] == 1 and items[2]["value"] == uninterrupted.value

    # Once recorded, a trial's resume checkpoint is removed; its best-epoch one stays.
    for number in (0, 1):
        assert not store.exists(job_id, number, "last")
        assert store.exists(job_id, number, "best")
