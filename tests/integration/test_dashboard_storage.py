"""The storage optuna-dashboard reads through (``service.api.dashboard.DashboardStorage``):
the same trials as Optuna's ``RDBStorage``, rereading only new and unfinished ones, and never
a deleted study's trials under a new study's id (SQLite reuses ids). SQLite and PostgreSQL.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState, create_trial

from service.api.dashboard import DashboardStorage
from service.studies import optuna_storage


def test_reads_what_optuna_reads_and_forgets_a_deleted_study(db_url: str) -> None:
    rdb = optuna_storage(db_url)
    try:
        dashboard = DashboardStorage(rdb)
        study = optuna.create_study(storage=rdb, study_name="first")
        study.add_trials([create_trial(value=1.0), create_trial(value=2.0)])
        running = study.ask()
        seen = dashboard.get_all_trials(study._study_id, deepcopy=False)
        assert [t.state for t in seen] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]

        study.tell(running, 0.5)
        study.add_trials([create_trial(value=3.0)])
        again = dashboard.get_all_trials(study._study_id, deepcopy=False)
        assert [repr(t) for t in again] == [repr(t) for t in rdb.get_all_trials(study._study_id)]
        assert again[0] is seen[0]  # a finished trial is not read again
        assert [
            t.value
            for t in dashboard.get_all_trials(study._study_id, states=(TrialState.COMPLETE,))
        ] == [1.0, 2.0, 0.5, 3.0]
        assert dashboard.get_best_trial(study._study_id).value == 0.5

        old_id = study._study_id
        rdb.delete_study(old_id)  # as DELETE /v1/studies/{id} does, past this storage
        other = optuna.create_study(storage=rdb, study_name="second", direction="maximize")
        other.add_trials([create_trial(value=9.0)])
        if db_url.startswith("sqlite"):
            assert other._study_id == old_id  # the case this guards against
        assert [t.value for t in dashboard.get_all_trials(other._study_id)] == [9.0]
        assert dashboard.get_study_name_from_id(other._study_id) == "second"
        assert dashboard.get_study_directions(other._study_id) == [
            optuna.study.StudyDirection.MAXIMIZE
        ]
        assert [s.study_name for s in dashboard.get_all_studies()] == ["second"]
    finally:
        rdb.engine.dispose()
