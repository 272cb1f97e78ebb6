"""The reaper's (and a preempted worker's) retry copy keeps the chain's parameters, even
for a retry lost before it sampled any (killed between attaching its trial and training)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from service.reaper import enqueue_retry_copy
from service.states import ORIGINAL_TRIAL_ATTR, RETRY_OF_ATTR


def test_a_retry_lost_before_sampling_passes_its_fixed_params_on(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage)
    first = study.ask()
    first.suggest_float("lr", 1e-4, 1e-1, log=True)
    first.suggest_int("hidden_size", 8, 256)
    study.tell(first, state=TrialState.FAIL)
    sid = study._study_id

    retry_id = enqueue_retry_copy(storage, sid, storage.get_trial(first._trial_id))
    assert enqueue_retry_copy(storage, sid, storage.get_trial(first._trial_id)) == retry_id
    # The retry is popped and lost before its first suggest: no params of its own.
    storage.set_trial_state_values(retry_id, TrialState.RUNNING)
    storage.set_trial_state_values(retry_id, TrialState.FAIL)
    lost = storage.get_trial(retry_id)
    assert lost.params == {}

    copy = storage.get_trial(enqueue_retry_copy(storage, sid, lost))
    assert copy.state == TrialState.WAITING
    assert copy.system_attrs["fixed_params"] == first.params
    assert copy.user_attrs[RETRY_OF_ATTR] == lost.number
    assert copy.user_attrs[ORIGINAL_TRIAL_ATTR] == first.number
