"""Read-only SQL over Optuna's own tables: what the API answers about one study without
building every trial of it (counts by state, the best trials, one page of trials).

``RDBStorage.get_all_trials`` builds each trial of a study from about a dozen rows (params,
values, intermediate values, attributes). At 10,000 trials that took seconds, and
``GET /v1/studies/{id}`` needed only counts and one value. These queries read the same
tables through Optuna's own SQLAlchemy models (``optuna.storages._rdb.models``, private:
optuna is pinned to 5.x, and tests/integration/test_trial_queries.py checks every answer
against the same computation over ``get_all_trials`` on SQLite and PostgreSQL). They write
nothing: Optuna's schema stays Optuna's, for optuna-dashboard and optuna itself.

Every query leaves out the trials copied into a study by warm start (user attribute
``WARM_START_FROM_ATTR``), as :func:`service.studies.own_trials` does.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import ColumnElement, Row, Select, and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from service.states import WARM_START_FROM_ATTR

__all__ = [
    "RankedTrial",
    "StudySummaries",
    "StudySummary",
    "complete_finite_trials",
    "finished_durations",
    "page_of_trials",
    "ranked_trials",
    "rdb_storage",
    "trials_by_id",
]

_T = models.TrialModel
_VALUE = models.TrialValueModel
_FINITE = models.TrialValueModel.TrialValueType.FINITE
_FLOAT_MAX = sys.float_info.max
#: The largest LIMIT / OFFSET bound as a SQL INTEGER (PostgreSQL casts them to int4): a
#: larger limit means every row (the CSV export asks for 2**62), a larger offset none.
_SQL_INT_MAX = 2**31 - 1


def rdb_storage(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    """``storage`` as the RDB storage these queries read (the service only has that one)."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        raise TypeError(f"SQL over Optuna's tables needs an RDBStorage, not {type(storage)}")
    return storage


def _own() -> ColumnElement[bool]:
    """The trial (``models.TrialModel``) is one the study ran, not a warm-start copy."""
    attr = models.TrialUserAttributeModel
    copied = (
        select(attr.trial_id)
        .where(attr.trial_id == _T.trial_id, attr.key == WARM_START_FROM_ATTR)
        .exists()
    )
    return ~copied


def _finite(value: type[models.TrialValueModel]) -> ColumnElement[bool]:
    """A stored objective value that is a finite number. Optuna keeps +-inf as NULL with
    its own type; NaN is NULL on SQLite and NaN on PostgreSQL, where it sorts above every
    number and is not BETWEEN anything: both fail this (NULLs explicitly, so that ``NOT``
    of it is true for them)."""
    return and_(
        value.value_type == _FINITE,
        value.value.is_not(None),
        value.value.between(-_FLOAT_MAX, _FLOAT_MAX),
    )


def _complete_and_finite(study_id: int) -> ColumnElement[bool]:
    """An own COMPLETE trial of the study, every value of which is finite (one subquery per
    trial: :func:`_ranking` spares a single-objective study it)."""
    other = aliased(models.TrialValueModel)
    non_finite = select(other.trial_id).where(other.trial_id == _T.trial_id, ~_finite(other))
    return and_(
        _T.study_id == study_id,
        _T.state == TrialState.COMPLETE,
        _own(),
        ~non_finite.exists(),
    )


@dataclass(frozen=True)
class RankedTrial:
    """A completed trial's place in a ranking: its ids and the value it is ranked by."""

    trial_id: int
    number: int
    value: float


def _ranking(
    study_id: int, objective: int, objectives: int, maximize: bool, limit: int | None
) -> Select[Any, Any, Any]:
    value = aliased(models.TrialValueModel)
    order = value.value.desc() if maximize else value.value.asc()
    if objectives == 1:  # the value ranked by is the trial's only one
        where = and_(
            _T.study_id == study_id, _T.state == TrialState.COMPLETE, _own(), _finite(value)
        )
    else:
        where = _complete_and_finite(study_id)
    return (
        select(_T.trial_id, _T.number, value.value)
        .join(value, and_(value.trial_id == _T.trial_id, value.objective == objective))
        .where(where)
        .order_by(order, _T.trial_id)
        .limit(limit)
    )


def ranked_trials(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    *,
    objective: int,
    objectives: int,
    maximize: bool,
    limit: int | None,
) -> list[RankedTrial]:
    """The study's own COMPLETE trials whose values are all finite, best ``objective``
    value first (ties: the earlier trial first), at most ``limit`` (None: all).
    ``objectives``: how many the study has.

    The order of ``studies._ranked`` over every trial (a stable sort of the trials in id
    order): NaN and inf never rank.
    """
    with Session(storage.engine) as session:
        rows = session.execute(_ranking(study_id, objective, objectives, maximize, limit)).all()
    return [RankedTrial(int(trial_id), int(number), float(v)) for trial_id, number, v in rows]


@dataclass(frozen=True)
class StudySummary:
    """What ``GET /v1/studies/{id}`` shows of an Optuna study, read in one transaction."""

    study_id: int
    #: How many of its own trials are in each state (states with none left out).
    counts: dict[TrialState, int]
    #: Its best trial by the objective asked for (:func:`ranked_trials`' first).
    best: RankedTrial | None
    #: The study user attribute asked for (None when missing or not asked for).
    user_attr: Any


class StudySummaries:
    """Each study's summary (:class:`StudySummary`), kept up to date incrementally: what a
    study's finished trials contribute (counts by state, the best of them) is remembered,
    and each read fetches only the trials that are new or were unfinished, the way Optuna's
    ``_CachedStorage`` rereads a study (a finished trial never changes in Optuna). A large
    study's summary then costs what its running trials cost, not a scan of all its trials.

    Sound because a study's trials become visible in id order: Optuna creates each trial
    under a lock on its study row, so no trial with an id below one already seen appears
    later. Kept per process (each server has its own; each read checks the database) and
    per study name, which is unique for the study's life; a study found under another id
    (deleted, and another made under its name) is read afresh.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {}

    def get(
        self,
        storage: optuna.storages.RDBStorage,
        study_name: str,
        *,
        objective: int,
        objectives: int,
        maximize: bool,
        user_attr: str | None = None,
    ) -> StudySummary | None:
        """The Optuna study ``study_name``'s id, trial counts by state, best trial by
        ``objective`` (:func:`ranked_trials`' first; ``objectives``: how many the study
        has) and (when named) one of its user attributes; None when there is no such
        study. One transaction."""
        study = models.StudyModel
        attr = models.StudyUserAttributeModel
        key = (objective, objectives, maximize)
        with Session(storage.engine) as session:
            found = session.execute(
                select(study.study_id).where(study.study_name == study_name)
            ).scalar_one_or_none()
            if found is None:
                with self._lock:
                    self._tallies.pop(study_name, None)
                return None
            study_id = int(found)
            with self._lock:
                tally = self._tallies.get(study_name)
                if tally is None or (tally.study_id, tally.key) != (study_id, key):
                    tally = self._tallies[study_name] = _Tally(study_id, key)
            with tally.lock:  # one reader updates a study's tally at a time
                tally.read(session, objective=objective, maximize=maximize)
                counts, best = tally.counts(), tally.best
            text = None
            if user_attr is not None:
                text = session.execute(
                    select(attr.value_json).where(attr.study_id == study_id, attr.key == user_attr)
                ).scalar_one_or_none()
        return StudySummary(study_id, counts, best, None if text is None else json.loads(text))


class _Tally:
    """One study's finished trials, summed: see :class:`StudySummaries`."""

    def __init__(self, study_id: int, key: tuple[int, int, bool]) -> None:
        self.study_id = study_id
        self.key = key
        self.lock = threading.Lock()
        #: Own finished trials by state, and the best COMPLETE one with finite values.
        self.finished: Counter[TrialState] = Counter()
        self.best: RankedTrial | None = None
        #: The largest id of a finished trial seen; every trial up to it has been seen.
        self.last_finished_id = -1
        #: Trials seen unfinished (RUNNING, WAITING): id -> (state, own), read again each time.
        self.unfinished: dict[int, tuple[TrialState, bool]] = {}

    def read(self, session: Session, *, objective: int, maximize: bool) -> None:
        """Fetch the trials that are new or were unfinished, and fold the finished ones in."""
        copied = (
            select(models.TrialUserAttributeModel.trial_id)
            .where(
                models.TrialUserAttributeModel.trial_id == _T.trial_id,
                models.TrialUserAttributeModel.key == WARM_START_FROM_ATTR,
            )
            .exists()
        )
        seen_up_to = self.last_finished_id
        fresh = _T.trial_id > seen_up_to
        if self.unfinished:
            # Few in practice (running and waiting trials); past a chunk, every trial from
            # the oldest of them on (those already counted are skipped below).
            ids = sorted(self.unfinished)
            again = _T.trial_id.in_(ids) if len(ids) <= _IN_CHUNK else _T.trial_id >= ids[0]
            fresh = or_(fresh, again)
        rows = session.execute(
            select(_T.trial_id, _T.number, _T.state, copied, _VALUE.objective, _VALUE.value)
            .add_columns(_VALUE.value_type)
            .outerjoin(_VALUE, _VALUE.trial_id == _T.trial_id)
            .where(_T.study_id == self.study_id, fresh)
            .order_by(_T.trial_id)
        ).all()
        for trial_id, group in groupby(rows, key=lambda row: int(row[0])):
            trial_rows = list(group)
            _, number, state, is_copy, _, _, _ = trial_rows[0]
            state, own = TrialState(state), not is_copy
            if not state.is_finished():
                self.unfinished[trial_id] = (state, own)
                continue
            if self.unfinished.pop(trial_id, None) is None and trial_id <= seen_up_to:
                continue  # counted in an earlier read
            self.last_finished_id = max(self.last_finished_id, trial_id)
            if not own:
                continue
            self.finished[state] += 1
            values = {int(row[4]): row[5] for row in trial_rows if row[4] is not None}
            finite = all(
                row[6] == _FINITE and row[5] is not None and math.isfinite(row[5])
                for row in trial_rows
                if row[4] is not None
            )
            if state != TrialState.COMPLETE or objective not in values or not finite:
                continue
            candidate = RankedTrial(trial_id, int(number), float(values[objective]))
            if self.best is None or _better(candidate, self.best, maximize):
                self.best = candidate

    def counts(self) -> dict[TrialState, int]:
        counts = Counter(self.finished)
        counts.update(state for state, own in self.unfinished.values() if own)
        return {state: n for state, n in counts.items() if n}


def _better(a: RankedTrial, b: RankedTrial, maximize: bool) -> bool:
    """``a`` ranks before ``b``: a better value, or the same and the earlier trial."""
    if a.value != b.value:
        return a.value > b.value if maximize else a.value < b.value
    return a.trial_id < b.trial_id


def complete_finite_trials(storage: optuna.storages.RDBStorage, study_id: int) -> list[FrozenTrial]:
    """The study's own COMPLETE trials whose values are all finite, in id order, built with
    only their values and system attributes (where Optuna keeps a trial's constraints):
    what a Pareto front is computed from, without params, curves and user attributes."""
    values_query = (
        select(_T.trial_id, _T.number, _VALUE.value)
        .join(_VALUE, _VALUE.trial_id == _T.trial_id)
        .where(_complete_and_finite(study_id))
        .order_by(_T.trial_id, _VALUE.objective)
    )
    system = models.TrialSystemAttributeModel
    system_query = (
        select(_T.trial_id, system.key, system.value_json)
        .join(_T, _T.trial_id == system.trial_id)
        .where(_complete_and_finite(study_id))
    )
    numbers: dict[int, int] = {}
    values: dict[int, list[float]] = {}
    system_attrs: dict[int, dict[str, Any]] = {}
    with Session(storage.engine) as session:
        for trial_id, number, value in session.execute(values_query):
            assert value is not None  # the query keeps finite values only
            numbers[trial_id] = int(number)
            values.setdefault(trial_id, []).append(float(value))
        for trial_id, key, text in session.execute(system_query):
            system_attrs.setdefault(trial_id, {})[key] = json.loads(text)
    return [
        FrozenTrial(
            number=numbers[trial_id],
            state=TrialState.COMPLETE,
            value=None,
            values=trial_values,
            datetime_start=None,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs=system_attrs.get(trial_id, {}),
            intermediate_values={},
            trial_id=trial_id,
        )
        for trial_id, trial_values in values.items()
    ]


def page_of_trials(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    *,
    states: Collection[TrialState] | None,
    limit: int,
    offset: int,
) -> tuple[list[FrozenTrial], int]:
    """One page of the study's own trials (in ``states``, when given) in number order, as
    ``get_all_trials`` builds them, and how many there are in all."""
    if offset > _SQL_INT_MAX:
        limit, offset = 0, 0
    where = [_T.study_id == study_id, _own()]
    if states is not None:
        where.append(_T.state.in_(list(states)))
    count = select(func.count()).select_from(_T).where(*where)
    page = (
        _trial_columns()
        .where(*where)
        .order_by(_T.trial_id)
        .limit(limit if limit <= _SQL_INT_MAX else None)
        .offset(offset)
    )
    with Session(storage.engine) as session:  # one transaction: the count and the page agree
        total = int(session.execute(count).scalar_one())
        trials = _build_trials(session, session.execute(page).all())
    return trials, total


def trials_by_id(
    storage: optuna.storages.RDBStorage, trial_ids: Sequence[int]
) -> list[FrozenTrial]:
    """The trials with these ids, in that order, as ``get_all_trials`` builds them."""
    if not trial_ids:
        return []
    built: dict[int, FrozenTrial] = {}
    with Session(storage.engine) as session:
        for chunk in _chunks(list(trial_ids)):
            rows = session.execute(_trial_columns().where(_T.trial_id.in_(chunk))).all()
            built.update((t._trial_id, t) for t in _build_trials(session, rows))
    return [built[trial_id] for trial_id in trial_ids if trial_id in built]


# --------------------------------------------------------------------------------------
# Building FrozenTrials from rows: what RDBStorage._build_frozen_trial_from_trial_model
# makes of Optuna's ORM objects, from plain row tuples (building ~16 ORM objects per trial
# cost 1.5 ms a trial, most of a page's time).

#: Trials per ``trial_id IN (...)`` (SQLAlchemy's selectinload uses the same).
_IN_CHUNK = 500


def _trial_columns() -> Select[Any, Any, Any, Any, Any]:
    columns = _T.__table__.c
    return select(
        _T.trial_id, _T.number, _T.state, columns.datetime_start, columns.datetime_complete
    )


def _owned(trial_id: InstrumentedAttribute[int | None]) -> InstrumentedAttribute[int]:
    """An attribute table's ``trial_id``, which Optuna (5.1) types nullable: rows selected by
    ``trial_id IN (...)`` or joined to their trial always have one."""
    return cast("InstrumentedAttribute[int]", trial_id)


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]


def _local(utc: datetime | None) -> datetime | None:
    """Optuna's stored naive UTC time as the naive local time its FrozenTrials carry."""
    return None if utc is None else utc.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def _build_trials(
    session: Session, trial_rows: Sequence[Row[Any, Any, Any, Any, Any]]
) -> list[FrozenTrial]:
    """FrozenTrials of ``trial_rows`` (:func:`_trial_columns`), in their order, with their
    params, values, attributes and intermediate values (five queries per chunk)."""
    param = models.TrialParamModel
    value = models.TrialValueModel
    user = models.TrialUserAttributeModel
    system = models.TrialSystemAttributeModel
    step = models.TrialIntermediateValueModel
    ids = [int(row[0]) for row in trial_rows]
    params: dict[int, dict[str, Any]] = {i: {} for i in ids}
    dists: dict[int, dict[str, BaseDistribution]] = {i: {} for i in ids}
    values: dict[int, dict[int, float]] = {i: {} for i in ids}
    user_attrs: dict[int, dict[str, Any]] = {i: {} for i in ids}
    system_attrs: dict[int, dict[str, Any]] = {i: {} for i in ids}
    curves: dict[int, dict[int, float]] = {i: {} for i in ids}
    parsed: dict[str, BaseDistribution] = {}  # a page's trials share a few distributions
    for chunk in _chunks(ids):
        for trial_id, name, internal, text in session.execute(
            select(
                _owned(param.trial_id), param.param_name, param.param_value, param.distribution_json
            )
            .where(param.trial_id.in_(chunk))
            .order_by(param.param_id)
        ):
            dist = parsed.get(text) or parsed.setdefault(text, json_to_distribution(text))
            params[trial_id][name] = dist.to_external_repr(internal)
            dists[trial_id][name] = dist
        for trial_id, objective, stored, value_type in session.execute(
            select(value.trial_id, value.objective, value.value, value.value_type).where(
                value.trial_id.in_(chunk)
            )
        ):
            values[trial_id][objective] = value.stored_repr_to_value(stored, value_type)
        for attrs, query in (
            (
                user_attrs,
                select(_owned(user.trial_id), user.key, user.value_json)
                .where(user.trial_id.in_(chunk))
                .order_by(user.trial_user_attribute_id),
            ),
            (
                system_attrs,
                select(_owned(system.trial_id), system.key, system.value_json)
                .where(system.trial_id.in_(chunk))
                .order_by(system.trial_system_attribute_id),
            ),
        ):
            for trial_id, key, text in session.execute(query):
                attrs[trial_id][key] = json.loads(text)
        for trial_id, number, stored, step_type in session.execute(
            select(step.trial_id, step.step, step.intermediate_value, step.intermediate_value_type)
            .where(step.trial_id.in_(chunk))
            .order_by(step.trial_intermediate_value_id)
        ):
            curves[trial_id][number] = step.stored_repr_to_intermediate_value(stored, step_type)
    return [
        FrozenTrial(
            number=number,
            state=state,
            value=None,
            values=[values[i][k] for k in sorted(values[i])] if values[i] else None,
            datetime_start=_local(start),
            datetime_complete=_local(end),
            params=params[i],
            distributions=dists[i],
            user_attrs=user_attrs[i],
            system_attrs=system_attrs[i],
            intermediate_values=curves[i],
            trial_id=i,
        )
        for i, number, state, start, end in trial_rows
    ]


def finished_durations(
    storage: optuna.storages.RDBStorage, study_id: int
) -> tuple[int, float | None]:
    """How many of the study's own finished trials (COMPLETE, PRUNED, FAIL) have a start and
    an end time, and their mean duration in seconds (None for none): one aggregate row."""
    start = _T.__table__.c.datetime_start
    end = _T.__table__.c.datetime_complete
    seconds: ColumnElement[Any]
    if storage.engine.dialect.name == "sqlite":  # DATETIME is text there
        seconds = (func.julianday(end) - func.julianday(start)) * 86400.0
    else:  # PostgreSQL: an interval
        seconds = func.extract("epoch", end - start)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    query = select(func.count(), func.avg(seconds)).where(
        _T.study_id == study_id,
        _T.state.in_(finished),
        start.is_not(None),
        end.is_not(None),
        _own(),
    )
    with Session(storage.engine) as session:
        n, mean = session.execute(query).one()
    return int(n), None if mean is None else float(mean)
