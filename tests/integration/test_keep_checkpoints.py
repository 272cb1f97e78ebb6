"""``study.keep_checkpoints``: once a study has ended and nothing of it runs, the reaper
deletes every resume (``last``) checkpoint and the best-epoch ones the study does not
keep (keyed by the original trial number: a retry's checkpoints are its chain's), once;
``DELETE /v1/studies/{id}`` (``studies.delete_study``) removes them all. On SQLite and
PostgreSQL; the trials and checkpoint files are made by hand (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from service import queue, reaper, studies
from service.artifacts import CheckpointStore, open_artifact_store
from service.auth import LOCAL
from service.errors import InvalidSpec
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.states import ORIGINAL_TRIAL_ATTR, RETRY_OF_ATTR


def _spec(**study: Any) -> dict[str, Any]:
    return {
        "name": "keep",
        "task": {"kind": "synthetic"},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "study": {"n_trials": 4, "direction": "minimize", **study},
    }


def _study_with_checkpoints(
    backend: studies.Backend, store: CheckpointStore, tmp_path: Path, **study: Any
) -> str:
    """A cancelled study with trials 0-4 by hand: values 0.3, (1 killed), 0.2, pruned 3,
    and 4 = the retry of 1 with 0.1 (the best); a last and a best checkpoint per chain."""
    spec = parse_spec(_spec(**study), DEFAULT_LIMITS)
    public, _ = studies.submit_study(backend, spec, principal=LOCAL)
    optuna_study = optuna.load_study(study_name=public.optuna_study_name, storage=backend.storage)
    dist: dict[str, BaseDistribution] = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}

    def add(state: TrialState, value: float | None = None, **attrs: Any) -> None:
        optuna_study.add_trial(
            optuna.trial.create_trial(
                state=state, value=value, params={"lr": 0.01}, distributions=dist, user_attrs=attrs
            )
        )

    add(TrialState.COMPLETE, 0.3)
    add(TrialState.FAIL)
    add(TrialState.COMPLETE, 0.2)
    add(TrialState.PRUNED)
    add(TrialState.COMPLETE, 0.1, **{RETRY_OF_ATTR: 1, ORIGINAL_TRIAL_ATTR: 1})
    source = tmp_path / "x.ckpt"
    source.write_bytes(b"ckpt")
    for number in (0, 1, 2, 3):  # the retry (4) wrote into its chain's, trial 1's
        store.save(public.id, number, "last", source)
        store.save(public.id, number, "best", source)
    queue.cancel_job(backend.sessions, public.id)
    return public.id


def _stored(store: CheckpointStore, job_id: str) -> dict[str, list[int]]:
    return {
        kind: [n for n in range(5) if store.exists(job_id, n, kind)] for kind in ("last", "best")
    }


@pytest.fixture
def backend(migrated_db_url: str, tmp_path: Path) -> studies.Backend:
    return studies.open_backend(
        migrated_db_url,
        limits=DEFAULT_LIMITS,
        base_url="http://test",
        checkpoints=open_artifact_store(None, tmp_path / "data"),
    )


@pytest.mark.parametrize(
    ("study", "kept"),
    [
        pytest.param({}, [1], id="default-best"),  # trial 4 is best: its chain is trial 1
        pytest.param({"keep_checkpoints": "top_k", "keep_top_k": 2}, [1, 2], id="top_k-2"),
        pytest.param({"keep_checkpoints": "all"}, [0, 1, 2, 3], id="all"),
        pytest.param({"keep_checkpoints": "none"}, [], id="none"),
    ],
)
def test_an_ended_study_keeps_only_the_checkpoints_it_asked_for(
    backend: studies.Backend, tmp_path: Path, study: dict[str, Any], kept: list[int]
) -> None:
    store = backend.checkpoints
    assert store is not None
    job_id = _study_with_checkpoints(backend, store, tmp_path, **study)
    assert _stored(store, job_id) == {"last": [0, 1, 2, 3], "best": [0, 1, 2, 3]}

    reaper.reap_once(backend, grace_s=60)
    assert _stored(store, job_id) == {"last": [], "best": kept}
    # Once per study: a checkpoint written afterwards (by hand here) is left alone.
    store.save(job_id, 0, "last", tmp_path / "x.ckpt")
    assert studies.prune_checkpoints(backend, queue.get_job(backend.sessions, job_id)) is None
    assert store.exists(job_id, 0, "last")


def test_a_running_study_keeps_every_checkpoint(backend: studies.Backend) -> None:
    store = backend.checkpoints
    assert store is not None
    public, _ = studies.submit_study(backend, parse_spec(_spec(), DEFAULT_LIMITS), principal=LOCAL)
    assert studies.prune_checkpoints(backend, queue.get_job(backend.sessions, public.id)) is None


def test_delete_removes_every_checkpoint_of_the_study(
    backend: studies.Backend, tmp_path: Path
) -> None:
    store = backend.checkpoints
    assert store is not None
    job_id = _study_with_checkpoints(backend, store, tmp_path, keep_checkpoints="all")
    other = _study_with_checkpoints(backend, store, tmp_path)
    studies.delete_study(backend, job_id, principal=LOCAL)
    assert _stored(store, job_id) == {"last": [], "best": []}
    assert not (tmp_path / "data" / "artifacts" / "checkpoints" / job_id).exists()
    assert _stored(store, other) == {"last": [0, 1, 2, 3], "best": [0, 1, 2, 3]}


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"keep_checkpoints": "top_k"}, "study.keep_top_k: required with keep_checkpoints: top_k"),
        ({"keep_top_k": 3}, "study.keep_top_k: only with keep_checkpoints: top_k (it is best)"),
        ({"keep_checkpoints": "top_k", "keep_top_k": 0}, "study.keep_top_k"),
        ({"keep_checkpoints": "last"}, "study.keep_checkpoints"),
    ],
)
def test_bad_keep_settings_name_the_field(study: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(_spec(**study), DEFAULT_LIMITS)
    assert message in str(err.value)
