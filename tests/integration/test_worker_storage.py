"""The worker's Optuna storage (service.worker_storage) writes the rows Optuna writes, in
fewer transactions, on SQLite and PostgreSQL: what any reader sees of a trial it ran is
exactly what Optuna's own storage would have stored."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from service.studies import optuna_storage
from service.worker_storage import WorkerStorage

Storages = Callable[[type[optuna.storages.RDBStorage]], optuna.storages.RDBStorage]


@pytest.fixture
def storages(migrated_db_url: str) -> Iterator[Storages]:
    """Storages on one migrated database (Optuna's tables made by the first), disposed after."""
    made: list[optuna.storages.RDBStorage] = [optuna_storage(migrated_db_url)]

    def make(cls: type[optuna.storages.RDBStorage]) -> optuna.storages.RDBStorage:
        made.append(optuna_storage(migrated_db_url, worker=True, storage_class=cls))
        return made[-1]

    yield make
    for storage in made:
        storage.engine.dispose()


def publish_trial_setup(trial: optuna.Trial) -> None:
    """What the worker does once a trial's config is recorded (``run_trial``'s
    ``on_configured``); Optuna's own storage writes as it goes and has nothing to publish."""
    storage = trial.storage._backend  # type: ignore[attr-defined]  # Optuna's _CachedStorage
    if isinstance(storage, WorkerStorage):
        storage.publish_setup(trial._trial_id)


def _run(study: optuna.Study, outcome: TrialState) -> int:
    """What a worker's trial does to its storage: suggest, attributes, publish, reports,
    a constraint, the end. Returns the trial's number."""
    trial = study.ask()
    trial.suggest_int("num_layers", 1, 4)
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_categorical("cell", ["lstm", "gru", None])
    trial.suggest_float("dropout", 0.0, 0.5, step=0.1)
    trial.set_user_attr("config", {"space": {"hidden_sizes": [64, 32]}, "note": "ü \" '"})
    trial.set_user_attr("params", 12345)
    trial.set_user_attr("config", {"overwritten": True})  # the last write wins
    publish_trial_setup(trial)
    trial.report(0.5, step=0)
    trial.report(float("nan"), step=1)
    trial.report(float("inf"), step=2)
    trial.report(0.25, step=3)
    trial.set_user_attr("late", [1, 2.5, "x"])
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [0.5])
    if outcome == TrialState.COMPLETE:
        study.tell(trial, 0.125)
    elif outcome == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)  # Optuna stores the last report as value
    else:
        trial.set_user_attr("failure_reason", "boom")
        study.tell(trial, state=TrialState.FAIL)
    return trial.number


def _reader_and_worker_study(
    storages: Storages,
) -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    """A new study "s": Optuna's own storage to read it, and the study on a worker's."""
    reader = storages(optuna.storages.RDBStorage)
    optuna.create_study(study_name="s", storage=reader)
    return reader, optuna.load_study(study_name="s", storage=storages(WorkerStorage))


def _view(trial: FrozenTrial) -> tuple[object, ...]:
    """Everything a reader sees of a trial except its ids and clock times."""
    curve = trial.intermediate_values
    intermediate = {k: ("nan" if math.isnan(v) else v) for k, v in curve.items()}
    return (
        trial.number,
        trial.state,
        trial.values,
        trial.params,
        trial.distributions,
        trial.user_attrs,
        trial.system_attrs,
        intermediate,
        trial.datetime_start is not None,
        trial.datetime_complete is not None,
    )


@pytest.mark.parametrize("outcome", [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
def test_a_trial_reads_back_as_optunas_own_storage_wrote_it(
    storages: Storages, outcome: TrialState
) -> None:
    reader = storages(optuna.storages.RDBStorage)
    seen = []
    for cls in (optuna.storages.RDBStorage, WorkerStorage):
        name = f"{cls.__name__}-{outcome.name}"
        optuna.create_study(study_name=name, storage=reader)
        sampler = optuna.samplers.RandomSampler(seed=0)  # the same parameters for both
        number = _run(
            optuna.load_study(study_name=name, storage=storages(cls), sampler=sampler), outcome
        )
        (trial,) = optuna.load_study(study_name=name, storage=reader).get_trials()
        assert trial.number == number == 0
        seen.append(_view(trial))
    assert seen[0] == seen[1]


def test_parameters_are_published_before_training_and_a_finished_trial_refuses_writes(
    storages: Storages,
) -> None:
    reader, study = _reader_and_worker_study(storages)
    trial = study.ask()
    trial.suggest_float("lr", 0.1, 1.0)
    trial.set_user_attr("config", {"lr": 0.5})
    assert trial.params == {"lr": trial.params["lr"]}  # the trial sees its own writes
    assert reader.get_trial(trial._trial_id).params == {}  # held until published
    publish_trial_setup(trial)
    stored = reader.get_trial(trial._trial_id)
    assert stored.params == trial.params and stored.user_attrs == {"config": {"lr": 0.5}}

    # The reaper fails it meanwhile (another process): every later write is refused as
    # Optuna refuses it, and the worker's next read shows the stored state.
    trial.set_user_attr("held", 1)  # straight through once published
    reader.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        study.tell(trial, 1.0)
    assert study._storage.get_trial(trial._trial_id).state == TrialState.FAIL
    assert reader.get_trial(trial._trial_id).values is None

    late = study.ask()
    late.suggest_float("lr", 0.1, 1.0)
    reader.set_trial_state_values(late._trial_id, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        publish_trial_setup(late)
    assert reader.get_trial(late._trial_id).params == {}


def test_an_incompatible_distribution_is_refused_as_optuna_refuses_it(
    storages: Storages,
) -> None:
    reader = storages(optuna.storages.RDBStorage)
    optuna.create_study(study_name="s", storage=reader)
    first = optuna.load_study(study_name="s", storage=storages(optuna.storages.RDBStorage))
    trial = first.ask()
    trial.suggest_categorical("cell", ["lstm", "gru"])
    first.tell(trial, 1.0)

    worker = storages(WorkerStorage)
    study = optuna.load_study(study_name="s", storage=worker)
    fresh = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        worker.set_trial_param(fresh._trial_id, "cell", 0.5, FloatDistribution(0.0, 1.0))
    worker.set_trial_param(fresh._trial_id, "cell", 1, CategoricalDistribution(["lstm", "gru"]))
    publish_trial_setup(fresh)
    assert reader.get_trial(fresh._trial_id).params == {"cell": "gru"}


def test_trials_created_at_once_by_several_workers_are_numbered_once_each(
    storages: Storages,
) -> None:
    reader = storages(optuna.storages.RDBStorage)
    optuna.create_study(study_name="s", storage=reader)
    per_worker, workers = 15, 4
    studies = [
        optuna.load_study(study_name="s", storage=storages(WorkerStorage)) for _ in range(workers)
    ]
    errors: list[BaseException] = []

    def work(study: optuna.Study) -> None:
        try:
            for _ in range(per_worker):
                trial = study.ask()
                trial.suggest_float("x", 0.0, 1.0)
                study.tell(trial, trial.params["x"])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    trials = optuna.load_study(study_name="s", storage=reader).get_trials()
    assert sorted(t.number for t in trials) == list(range(per_worker * workers))
    assert all(t.state == TrialState.COMPLETE and "x" in t.params for t in trials)


def test_reports_are_stored_as_made_and_refused_once_the_trial_finished_elsewhere(
    storages: Storages,
) -> None:
    reader, study = _reader_and_worker_study(storages)
    trial = study.ask()
    trial.suggest_float("lr", 0.1, 1.0)
    trial.report(0.5, step=0)  # the first report publishes the held set-up with it
    stored = reader.get_trial(trial._trial_id)
    assert stored.params == trial.params and stored.intermediate_values == {0: 0.5}
    trial.report(0.25, step=1)  # then one statement each, visible at once (live curves)
    assert reader.get_trial(trial._trial_id).intermediate_values == {0: 0.5, 1: 0.25}

    reader.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # the reaper
    with pytest.raises(UpdateFinishedTrialError):
        trial.report(0.0, step=2)
    assert reader.get_trial(trial._trial_id).intermediate_values == {0: 0.5, 1: 0.25}
    # The refusal made the worker forget its copy: it now reads the stored FAIL, and tell
    # refuses as Optuna's does for a trial it knows is finished.
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
        study.tell(trial, 1.0)
    assert reader.get_trial(trial._trial_id).state == TrialState.FAIL


def test_a_trial_id_reused_after_a_deletion_is_not_read_from_the_finished_copy(
    storages: Storages,
) -> None:
    """SQLite hands out a deleted trial's id again: an enqueued trial of another study may
    get the id of a trial this process ran and keeps a finished copy of. Popping it must
    see the new trial (it once read back as finished, and its tell failed: 'Trial#3 has
    already finished'). PostgreSQL's sequence never reuses an id: there the precondition
    does not hold and the rest is the ordinary path."""
    reader = storages(optuna.storages.RDBStorage)
    optuna.create_study(study_name="gone", storage=reader)
    worker = storages(WorkerStorage)
    gone = optuna.load_study(study_name="gone", storage=worker)
    _run(gone, TrialState.COMPLETE)
    ran = gone.trials[-1]._trial_id
    optuna.delete_study(study_name="gone", storage=reader)
    optuna.create_study(study_name="next", storage=reader)
    optuna.load_study(study_name="next", storage=reader).enqueue_trial({"num_layers": 2})
    study = optuna.load_study(study_name="next", storage=worker)

    trial = study.ask()  # pops the enqueued one

    assert trial.params == {} or trial.number == 0
    assert worker.get_trial(trial._trial_id).state == TrialState.RUNNING
    assert trial.suggest_int("num_layers", 1, 4) == 2
    study.tell(trial, 0.5)
    stored = reader.get_trial(trial._trial_id)
    assert (stored.state, stored.value, stored.params) == (
        TrialState.COMPLETE,
        0.5,
        {"num_layers": 2},
    )
    if "sqlite" in str(reader.engine.url):
        assert trial._trial_id == ran  # the precondition: the id was reused
