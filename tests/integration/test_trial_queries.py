"""The study routes' SQL over Optuna's tables (``service.trial_queries``) answers what the
same computation over every trial (``get_all_trials``) answers: counts by state, the best
value and trial, the top k, a multi-objective study's Pareto front, pages of trials (by
state, deep offsets). Warm-start copies are never counted, listed or best; NaN and inf
never rank; pruned, failed, running and waiting trials are counted, listed, never ranked.

Real databases (SQLite and PostgreSQL), real Optuna studies made through the service's
``submit_study``, trials added through Optuna.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from service import queue, report, studies, trial_queries
from service.auth import LOCAL
from service.errors import NoCompletedTrials
from service.schemas import StudyPublic, TrialPublic
from service.search_space import DEFAULT_LIMITS, parse_spec
from service.states import CONFIG_ATTR, FAILURE_ATTR, WARM_START_FROM_ATTR
from service.states import TrialState as ApiTrialState

DISTRIBUTIONS = {
    "num_layers": IntDistribution(1, 3),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
}
SPACE: dict[str, Any] = {
    "num_layers": {"type": "int", "low": 1, "high": 3},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "max_epochs": 3,
}


def _spec(**study: Any) -> dict[str, Any]:
    return {
        "name": "queries",
        "task": {"kind": "synthetic"},
        "space": SPACE,
        "study": {"n_trials": 5, "sampler": "random", "pruner": "none"} | study,
    }


@pytest.fixture
def backend(migrated_db_url: str) -> Iterator[studies.Backend]:
    studies.optuna_storage(migrated_db_url).engine.dispose()  # Optuna's tables, as the server
    backend = studies.open_backend(
        migrated_db_url, limits=DEFAULT_LIMITS, base_url="http://test.invalid"
    )
    try:
        yield backend
    finally:
        backend.sessions.kw["bind"].dispose()
        trial_queries.rdb_storage(backend.storage).engine.dispose()


def _trial(
    i: int,
    state: TrialState,
    values: list[float] | None = None,
    *,
    copy: bool = False,
    config: bool = True,
    system_attrs: dict[str, Any] | None = None,
) -> FrozenTrial:
    params = {"num_layers": 1 + i % 3, "lr": 10 ** -(1 + (i % 7) / 2)}
    attrs: dict[str, Any] = {}
    if config:
        attrs[CONFIG_ATTR] = {"task": {"kind": "synthetic"}, "params": {"trial": i} | params}
    if copy:
        attrs[WARM_START_FROM_ATTR] = "an-earlier-study"
    if state in (TrialState.PRUNED, TrialState.FAIL):
        attrs[FAILURE_ATTR] = f"{state.name.lower()} at epoch 1"
    curve = {} if state == TrialState.WAITING else {0: 2.0 + i, 1: float("nan"), 2: 1.0 + i}
    return create_trial(
        state=state,
        values=values,
        params=params,
        distributions=DISTRIBUTIONS,
        user_attrs=attrs,
        system_attrs=system_attrs or {},
        intermediate_values=curve if state != TrialState.FAIL else {0: 2.0 + i},
    )


def _submit(backend: studies.Backend, **study: Any) -> tuple[StudyPublic, optuna.Study]:
    public, _ = studies.submit_study(backend, parse_spec(_spec(**study)), principal=LOCAL)
    optuna_study = optuna.load_study(study_name=public.optuna_study_name, storage=backend.storage)
    return public, optuna_study


def _single_objective_trials() -> list[FrozenTrial]:
    """Ties, +-inf, every state, and warm-start copies better than anything the study ran."""
    complete = [0.5, 0.3, 0.9, 0.3, 0.7, 0.1, 0.1, 0.8, 0.2, 0.6]
    trials = [
        _trial(i, TrialState.COMPLETE, [v], config=i % 4 != 0) for i, v in enumerate(complete)
    ]
    trials += [
        _trial(20, TrialState.COMPLETE, [math.inf]),
        _trial(21, TrialState.COMPLETE, [-math.inf]),
        _trial(22, TrialState.COMPLETE, [-5.0], copy=True),  # a copy: never best
        _trial(23, TrialState.COMPLETE, [50.0], copy=True),
        _trial(24, TrialState.PRUNED),
        _trial(25, TrialState.PRUNED),
        _trial(26, TrialState.FAIL),
        _trial(27, TrialState.RUNNING),
        _trial(28, TrialState.COMPLETE, [0.1]),  # ties with 5 and 6
    ]
    return trials


def _oracle(backend: studies.Backend, public: StudyPublic) -> list[FrozenTrial]:
    study_id = backend.storage.get_study_id_from_name(public.optuna_study_name)
    return studies.own_trials(backend.storage.get_all_trials(study_id, deepcopy=False))


def _public(trials: list[FrozenTrial], public: StudyPublic) -> list[dict[str, Any]]:
    assert public.spec is not None
    return [studies._trial_public(t, public.spec).model_dump() for t in trials]


def _dumps(items: list[TrialPublic]) -> list[dict[str, Any]]:
    return [t.model_dump() for t in items]


def test_counts_best_and_pages_match_every_trial(backend: studies.Backend) -> None:
    for direction in ("minimize", "maximize"):
        _check_counts_best_and_pages(backend, direction)


def _check_counts_best_and_pages(backend: studies.Backend, direction: str) -> None:
    public, optuna_study = _submit(backend, direction=direction)
    optuna_study.add_trials(_single_objective_trials())
    optuna_study.enqueue_trial({"num_layers": 2, "lr": 0.01})
    every = _oracle(backend, public)
    assert len(every) == 18  # 20 trials less the 2 copies

    study = studies.get_study(backend, public.id, principal=LOCAL)
    expected_counts = Counter(ApiTrialState.from_optuna(t.state.name).value for t in every)
    assert study.counts.model_dump() == {
        name: expected_counts.get(name, 0)
        for name in ("complete", "pruned", "failed", "running", "waiting")
    }
    assert study.counts.complete == 13 and study.counts.waiting == 1
    ranked = studies._ranked(every, direction)
    assert study.best_trial_number == ranked[0].number
    assert study.best_value == ranked[0].value
    best_value = 0.1 if direction == "minimize" else 0.9
    assert study.best_value == best_value  # never a copy's, never inf
    listed = studies.list_studies(backend, principal=LOCAL)
    assert listed.items[0].counts == study.counts
    assert listed.items[0].best_trial_number == study.best_trial_number

    for k in (None, 1, 3, 11, 100):
        best = studies.best_configs(backend, public.id, principal=LOCAL, k=k)
        want = ranked[: 1 if k is None else k]
        assert [b.trial_number for b in best] == [t.number for t in want]
        assert [b.value for b in best] == [t.value for t in want]
        for b, t in zip(best, want, strict=True):
            if CONFIG_ATTR in t.user_attrs:
                assert b.config == t.user_attrs[CONFIG_ATTR]
            else:  # replayed from the params, as before
                assert b.config["params"]["num_layers"] == t.params["num_layers"]
    assert len(studies.best_configs(backend, public.id, principal=LOCAL, k=100)) == 11

    # Pages: every state filter, offsets inside, at and past the end, "every trial".
    for state in (None, *ApiTrialState):
        matching = [t for t in every if state is None or studies._api_state(t) == state]
        for limit, offset in (
            (100, 0),
            (3, 0),
            (3, 4),
            (5, max(len(matching) - 2, 0)),
            (5, 500),
            (2**62, 0),
            (7, 2**40),
        ):
            page = studies.study_trials(
                backend, public.id, principal=LOCAL, state=state, limit=limit, offset=offset
            )
            assert page.total == len(matching)
            assert _dumps(page.items) == _public(matching[offset : offset + limit], public)


def test_trials_by_id_and_pages_build_what_optuna_builds(backend: studies.Backend) -> None:
    public, optuna_study = _submit(backend)
    optuna_study.add_trials(_single_objective_trials())
    storage = trial_queries.rdb_storage(backend.storage)
    study_id = storage.get_study_id_from_name(public.optuna_study_name)
    every = storage.get_all_trials(study_id, deepcopy=False)
    page, total = trial_queries.page_of_trials(storage, study_id, states=None, limit=1000, offset=0)
    assert total == len(page) == len(studies.own_trials(every))
    # Every field (repr: a NaN intermediate value is not equal to itself).
    assert [repr(t) for t in page] == [repr(t) for t in studies.own_trials(every)]
    picked = [every[7]._trial_id, every[2]._trial_id, every[12]._trial_id]
    by_id = trial_queries.trials_by_id(storage, picked)
    assert [repr(t) for t in by_id] == [repr(every[i]) for i in (7, 2, 12)]
    assert trial_queries.trials_by_id(storage, []) == []


def test_nan_values_never_rank(backend: studies.Backend, db_url: str) -> None:
    """A COMPLETE trial whose stored value is NaN (Optuna's tell fails such a trial, but
    the storage takes it: NULL on SQLite, NaN on PostgreSQL, where NaN sorts above every
    number) is counted and never best, in either direction."""
    for direction in ("minimize", "maximize"):
        public, optuna_study = _submit(backend, direction=direction)
        optuna_study.add_trials([_trial(0, TrialState.COMPLETE, [0.5])])
        storage = backend.storage
        trial_id = storage.create_new_trial(optuna_study._study_id)
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [math.nan])
        study = studies.get_study(backend, public.id, principal=LOCAL)
        assert study.counts.complete == 2
        assert (study.best_trial_number, study.best_value) == (0, 0.5)
        best = studies.best_configs(backend, public.id, principal=LOCAL, k=10)
        assert [b.trial_number for b in best] == [0]
        if not db_url.startswith("sqlite"):  # Optuna reads the NaN back only on PostgreSQL
            every = _oracle(backend, public)
            assert math.isnan(every[1].values[0])
            assert [t.number for t in studies._ranked(every, direction)] == [0]


def test_no_completed_trial(backend: studies.Backend) -> None:
    public, optuna_study = _submit(backend)
    optuna_study.add_trials(
        [
            _trial(0, TrialState.PRUNED),
            _trial(1, TrialState.FAIL),
            _trial(2, TrialState.COMPLETE, [0.1], copy=True),
        ]
    )
    study = studies.get_study(backend, public.id, principal=LOCAL)
    assert (study.best_value, study.best_trial_number) == (None, None)
    assert (study.counts.pruned, study.counts.failed, study.counts.complete) == (1, 1, 0)
    with pytest.raises(NoCompletedTrials):
        studies.best_configs(backend, public.id, principal=LOCAL)


def test_multi_objective_front_matches_optuna(backend: studies.Backend) -> None:
    """The front from each trial's values and constraints alone is Optuna's front over
    every trial: infeasible trials (either way Optuna stores constraints) and inf values
    are off it, copies never on it."""
    public, optuna_study = _submit(
        backend, objectives=["value", "params"], constraints={"params": "<= 1000"}
    )
    points = [(0.5, 10.0), (0.4, 20.0), (0.3, 30.0), (0.6, 5.0), (0.45, 25.0), (0.3, 30.0)]
    trials = [_trial(i, TrialState.COMPLETE, [v, p]) for i, (v, p) in enumerate(points)]
    trials += [
        # Infeasible: would dominate everything.
        _trial(10, TrialState.COMPLETE, [0.01, 1.0], system_attrs={"constraints:params": 3.0}),
        _trial(11, TrialState.COMPLETE, [0.02, 2.0], system_attrs={"constraints": [1.0]}),
        # Feasible, with constraints recorded: on the front.
        _trial(12, TrialState.COMPLETE, [0.2, 40.0], system_attrs={"constraints:params": -1.0}),
        _trial(13, TrialState.COMPLETE, [0.1, math.inf]),  # inf: never on it
        _trial(14, TrialState.COMPLETE, [0.0, 0.0], copy=True),  # a copy: never on it
        _trial(15, TrialState.PRUNED),
        _trial(16, TrialState.FAIL),
    ]
    optuna_study.add_trials(trials)
    spec = studies.study_spec(studies._job(backend, public.id, LOCAL))
    every = _oracle(backend, public)
    front = studies.pareto_front(every, spec)
    assert [t.number for t in front] == [8, 2, 5, 1, 0, 3]  # trial 8 is _trial(12, ...)
    assert [
        b.trial_number for b in studies.best_configs(backend, public.id, principal=LOCAL, k=None)
    ] == [t.number for t in front]
    best = studies.best_configs(backend, public.id, principal=LOCAL, k=2)
    assert [b.trial_number for b in best] == [8, 2]
    assert best[0].values == {"value": 0.2, "params": 40.0}
    study = studies.get_study(backend, public.id, principal=LOCAL)
    ranked = studies._ranked(every, spec.direction, 0)
    # The metric's best, as before: constraints and the front aside.
    assert (study.best_trial_number, study.best_value) == (ranked[0].number, 0.01)
    assert study.counts.complete == 10 and study.counts.pruned == 1 and study.counts.failed == 1


def test_progress_reads_running_trials_and_the_mean_duration(backend: studies.Backend) -> None:
    """``/progress`` reads the running trials and the finished trials' mean duration in
    SQL; the answer is :func:`report.progress` over every trial (a copy's time left out)."""
    public, optuna_study = _submit(backend)
    start = datetime(2026, 5, 1, 12, 0, 0)
    trials = []
    for i, state in enumerate([TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.FAIL]):
        trial = _trial(i, state, [0.1 * i] if state == TrialState.COMPLETE else None)
        trial.datetime_start = start + timedelta(minutes=i)
        trial.datetime_complete = trial.datetime_start + timedelta(
            seconds=10 + 7 * i, microseconds=250_000
        )
        trials.append(trial)
    copy = _trial(9, TrialState.COMPLETE, [0.0], copy=True)
    copy.datetime_start, copy.datetime_complete = start, start + timedelta(hours=5)  # not in it
    running = _trial(10, TrialState.RUNNING)
    trials += [copy, running, _trial(11, TrialState.RUNNING)]
    optuna_study.add_trials(trials)
    now = datetime.now(UTC)

    got = report.load_progress(backend, public.id, principal=LOCAL, now=now).model_dump()
    job = queue.get_job(backend.sessions, public.id)
    want = report.progress(job, _oracle(backend, public), now=now).model_dump()
    assert [r["number"] for r in got["running"]] == [6, 7]
    assert got["mean_trial_s"] == pytest.approx(10.25 + 7 * 2, abs=1e-3)  # (10..38) / 5
    for key in ("mean_trial_s", "eta_s"):
        assert got.pop(key) == pytest.approx(want.pop(key), abs=1e-3)
    got_basis, want_basis = got.pop("eta_basis"), want.pop("eta_basis")
    assert got == want
    assert "the mean of 5 finished trial(s)" in got_basis and got_basis[:40] == want_basis[:40]


def test_summaries_follow_a_running_study(
    backend: studies.Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counts and the best trial are kept from a study's new and unfinished trials
    (``StudySummaries``); after every change a study goes through they match the
    computation over every trial, and a server that never saw the study before."""
    monkeypatch.setattr(trial_queries, "_IN_CHUNK", 2)  # the many-unfinished path too
    public, study = _submit(backend)

    def check() -> None:
        every = _oracle(backend, public)
        expected = Counter(ApiTrialState.from_optuna(t.state.name).value for t in every)
        ranked = studies._ranked(every, "minimize")
        # Twice on one server (the second read must not count anything again), and once on
        # a server that never saw the study.
        fresh = replace(backend, summaries=trial_queries.StudySummaries())
        for seen_by in (backend, backend, fresh):
            got = studies.get_study(seen_by, public.id, principal=LOCAL)
            assert {k: v for k, v in got.counts.model_dump().items() if v} == dict(expected)
            if ranked:
                assert (got.best_trial_number, got.best_value) == (
                    ranked[0].number,
                    ranked[0].value,
                )
                best = studies.best_configs(seen_by, public.id, principal=LOCAL)
                assert [b.trial_number for b in best] == [ranked[0].number]
            else:
                assert (got.best_trial_number, got.best_value) == (None, None)

    def ask() -> optuna.Trial:  # as a worker asks: the trial samples its params
        trial = study.ask()
        trial.suggest_int("num_layers", 1, 3)
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        return trial

    check()
    study.add_trials([_trial(0, TrialState.COMPLETE, [0.5]), _trial(1, TrialState.PRUNED)])
    check()
    first, second, third, fourth = ask(), ask(), ask(), ask()
    check()
    study.tell(second, 0.2)  # a new best, finished between running ones
    check()
    study.tell(first, state=TrialState.FAIL)
    check()
    study.enqueue_trial({"num_layers": 2, "lr": 0.01})
    study.enqueue_trial({"num_layers": 3, "lr": 0.01})
    check()
    popped = ask()  # the first waiting trial, now running
    check()
    study.tell(popped, 0.2)  # ties with the best: the earlier trial stays best
    study.tell(third, math.inf)  # inf: complete, never best
    study.tell(fourth, state=TrialState.PRUNED)
    study.add_trials([_trial(9, TrialState.COMPLETE, [-1.0], copy=True)])  # a copy: nothing
    check()
    study.tell(ask(), math.nan)  # Optuna fails a NaN
    study.tell(ask(), 0.1)
    check()
