"""The study domain: submit, get, list, cancel, delete, trials, best; and the Optuna-side
helpers the reaper (:mod:`service.reaper`) uses. Wraps Optuna's storage.

Every function that reads or changes a study takes the calling ``principal`` (required: a
missed argument must fail closed, never mean "every study"); another principal's study is
``StudyNotFound``, exactly like one that does not exist.

A study is two records in one database: our job row (``queue``: state, slots, owner) and
Optuna's study (trials, params, values; what optuna-dashboard shows). The job row is the
source of truth for *how many* trials run; Optuna's is the truth for *what* they found.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service import queue, trial_queries
from service.artifacts import CheckpointNotFound, CheckpointStore, original_trial_number
from service.auth import Principal
from service.data_checks import check_task_data
from service.db import (
    configure_sqlite_engine,
    is_sqlite,
    make_engine,
    make_session_factory,
    ping_after_idle,
    postgres_connect_args,
    session_scope,
)
from service.errors import (
    CheckpointMissing,
    Conflict,
    FieldError,
    InvalidSpec,
    NoCompletedTrials,
    OptunaStudyDeleted,
    QuotaExceeded,
    StudyNotActive,
    StudyNotExtendable,
    StudyNotFound,
)
from service.schemas import BestPublic, Page, StudyPublic, TrialCounts, TrialPublic
from service.search_space import (
    MAX_TRIALS,
    STORED_SPEC_LIMITS,
    CategoricalDistribution,
    Distribution,
    FloatDistribution,
    IntDistribution,
    SpecLimits,
    StudySpec,
    grid_points,
    parse_spec,
    resolve_data_path,
    sample_config,
    searched_distributions,
    stored_metric,
    whole_number,
)
from service.states import (
    CONFIG_ATTR,
    ENQUEUE_INDEX_ATTR,
    ENQUEUED_ATTR,
    FAILURE_ATTR,
    JOB_ID_ATTR,
    NOTES_ATTR,
    RESUMED_FROM_ATTR,
    RETRY_OF_ATTR,
    WARM_START_FROM_ATTR,
    WARM_START_TRIAL_ATTR,
    JobState,
)
from service.states import TrialState as ApiTrialState

log = logging.getLogger(__name__)

#: Why a WAITING trial of a cancelled or deleted study was failed.
NOT_RUN_REASON = "not run: the study ended before this retry was claimed"
#: ... and why a WAITING trial enqueued from ``study.enqueue`` was.
NOT_RUN_ENQUEUED_REASON = "not run: the study ended before this enqueued configuration ran"
#: The most COMPLETE trials a new study is warm-started with (the best of its sources'):
#: Optuna adds trials one transaction each (~10 ms on SQLite, ~25 ms on PostgreSQL), and
#: the submit waits for them.
MAX_WARM_START_TRIALS = 200
_IDEMPOTENCY_NAMESPACE = uuid.UUID("0d9a7a53-4f0e-4e61-9b8f-3c1a4c6f2a10")


@dataclass(frozen=True)
class Backend:
    """What the domain functions need: our sessions, Optuna's storage, and the limits."""

    sessions: sessionmaker[Session]
    storage: optuna.storages.BaseStorage
    limits: SpecLimits
    base_url: str
    #: Most queued + running studies one principal may have (None: no quota).
    max_active_studies: int | None = None
    #: The trials' checkpoints (None: the service keeps none; nothing to delete or serve).
    checkpoints: CheckpointStore | None = None
    #: Each study's counts and best trial, kept up to date from its new and unfinished
    #: trials (``GET /v1/studies/{id}``, ``/best``).
    summaries: trial_queries.StudySummaries = field(
        default_factory=trial_queries.StudySummaries, compare=False
    )


def optuna_storage(
    database_url: str,
    *,
    pool_size: int = 2,
    worker: bool = False,
    storage_class: type[optuna.storages.RDBStorage] = optuna.storages.RDBStorage,
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the same database, with its own small pool.

    ``worker=True``: no table creation and no schema-version check. Workers never run DDL
    (the server created Optuna's tables before ours, and workers wait for ours), and
    skipping the check lets one pooled connection suffice: one for Optuna plus one for our
    tables keeps a worker within its budget of two database connections.

    ``storage_class``: a subclass of ``RDBStorage`` (the worker's trial loop passes
    :class:`service.worker_storage.WorkerStorage`).
    """
    if is_sqlite(database_url):
        # Same lock patience as our own engine: busy workers must wait, not fail.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        engine_kwargs = {
            "pool_size": pool_size,
            "max_overflow": 0,
            "connect_args": postgres_connect_args(database_url),
        }
    storage = storage_class(
        database_url,
        engine_kwargs=engine_kwargs,
        skip_table_creation=worker,
        skip_compatibility_check=worker,
    )
    if is_sqlite(database_url):
        configure_sqlite_engine(storage.engine)
        storage.engine.dispose()  # connections opened during __init__ lack the set-up
    else:
        ping_after_idle(storage.engine)
    return storage


def open_backend(
    database_url: str,
    *,
    limits: SpecLimits,
    base_url: str,
    pool_size: int = 2,
    storage: optuna.storages.BaseStorage | None = None,
    max_active_studies: int | None = None,
    checkpoints: CheckpointStore | None = None,
) -> Backend:
    """Connect to the database (schema must already be migrated)."""
    engine = make_engine(database_url, pool_size=pool_size, max_overflow=0)
    return Backend(
        sessions=make_session_factory(engine),
        storage=storage or optuna_storage(database_url, pool_size=max(pool_size, 2)),
        limits=limits,
        base_url=base_url.rstrip("/"),
        max_active_studies=max_active_studies,
        checkpoints=checkpoints,
    )


# --------------------------------------------------------------------------------------
# Submit / read / cancel
# --------------------------------------------------------------------------------------


def submit_study(
    backend: Backend,
    spec: StudySpec,
    *,
    principal: Principal,
    idempotency_key: str | None = None,
) -> tuple[StudyPublic, bool]:
    """Queue a validated study; returns it and whether it was created (False: a retried key).

    With an idempotency key the job id and Optuna study name are derived from the key, so
    a client retrying after a lost response (or a server killed mid-request) gets the same
    study, never a second one.
    """
    data_notes = check_task_data(spec, backend.limits.data_roots)
    spec_json = spec.model_dump(mode="json")
    if idempotency_key is not None:
        job_id = uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{principal.name}\0{idempotency_key}").hex
        existing = queue.find_job(backend.sessions, job_id)
        if existing is not None:
            return _existing_for_key(backend, existing, spec_json), False
    else:
        job_id = uuid.uuid4().hex
    warm = _warm_start(backend, spec, principal)
    name = spec.name or spec.task.kind
    study_name = f"{name}-{job_id[:8]}"
    study = optuna.create_study(
        storage=backend.storage,
        study_name=study_name,
        directions=spec.directions,
        load_if_exists=True,
    )
    # The dashboard's axes and legends: "val_loss (validation cross-entropy, nats/char)",
    # not "Objective 0".
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.objective_labels())
    study.set_user_attr(JOB_ID_ATTR, job_id)
    study.set_user_attr("metric", spec.metric.name)
    study.set_user_attr("spec", spec_json)
    _seed_study(study, spec, warm, [*data_notes, *warm.notes])
    try:
        job, created = queue.create_job(
            backend.sessions,
            job_id=job_id,
            spec=spec_json,
            name=name,
            owner=principal.name,
            optuna_study_name=study_name,
            n_trials=spec.study.n_trials,
            max_retries=spec.study.max_retries,
            timeout_s=spec.study.timeout_s,
            idempotency_key=idempotency_key,
            max_active=backend.max_active_studies,
        )
    except QuotaExceeded:
        backend.storage.delete_study(study._study_id)  # its job was never made
        raise
    if not created:
        return _existing_for_key(backend, job, spec_json), False
    return _study_public(backend, job), True


def _existing_for_key(backend: Backend, job: queue.JobRecord, spec_json: Any) -> StudyPublic:
    if job.spec != spec_json:
        raise Conflict("Idempotency-Key was already used for a different spec")
    return _study_public(backend, job)


def get_study(backend: Backend, job_id: str, *, principal: Principal) -> StudyPublic:
    """One study with live trial counts and its best value."""
    return _study_public(backend, _job(backend, job_id, principal))


def list_studies(
    backend: Backend,
    *,
    principal: Principal,
    state: str | None = None,
    id_prefix: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> Page[StudyPublic]:
    """The principal's studies (an admin's: all), newest first, optionally only in ``state``
    and only those whose id starts with ``id_prefix``."""
    jobs, total = queue.list_jobs(
        backend.sessions,
        state=state,
        owner=principal.owner_filter,
        id_prefix=id_prefix,
        limit=limit,
        offset=offset,
    )
    items = [_study_public(backend, job, include_spec=False) for job in jobs]
    return Page[StudyPublic](items=items, total=total, limit=limit, offset=offset)


def cancel_study(backend: Backend, job_id: str, *, principal: Principal) -> StudyPublic:
    """Stop claiming new trials; running trials finish and are recorded, retries that were
    not claimed yet are FAILed ("not run"). ``StudyNotActive`` when it already ended."""
    job = _job(backend, job_id, principal)
    queue.cancel_job(backend.sessions, job_id)
    _fail_waiting_trials(backend, job)
    return get_study(backend, job_id, principal=principal)


def extend_request(document: Any) -> int:
    """The number of trials an extend request body (``{"n_trials": 20}``) adds.

    Raises ``InvalidSpec`` naming the field: ``n_trials`` missing, not a whole number, or
    outside 1..MAX_TRIALS; any other field.
    """
    if not isinstance(document, Mapping):
        raise InvalidSpec([FieldError("", 'the body must be a JSON object: {"n_trials": N}')])
    errors = [FieldError(str(key), "unknown field") for key in document if key != "n_trials"]
    n = whole_number(document.get("n_trials"))
    if "n_trials" not in document:
        errors.append(FieldError("n_trials", "required (how many trials to add)"))
    elif n is None:
        errors.append(FieldError("n_trials", "must be a whole number"))
    elif n < 1:
        errors.append(FieldError("n_trials", "must be >= 1"))
    elif n > MAX_TRIALS:
        errors.append(FieldError("n_trials", f"must be <= {MAX_TRIALS}"))
    if errors:
        raise InvalidSpec(errors)
    assert isinstance(n, int)
    return n


def extend_study(
    backend: Backend, job_id: str, n_trials: int, *, principal: Principal
) -> StudyPublic:
    """Add ``n_trials`` trials to a queued, running or ended study (succeeded, cancelled,
    or failed for its timeout or with every trial pruned); returns it.

    The same Optuna study goes on, so the sampler keeps its history; the study ends once
    its finished trials reach its total so far plus ``n_trials`` (a cancelled study also
    runs the slots it had left). With ``study.timeout_s``, a started study's deadline is
    ``timeout_s`` from now. The stored spec stays as submitted (``study.n_trials`` there
    is the first total; the study's ``n_trials`` is the current one).

    Raises ``StudyNotFound`` (another principal's too); ``StudyNotExtendable`` for any
    other failed study (its spec, data or Optuna study is unusable) and for a
    confirmation study (its trials are its configs x seeds); ``InvalidSpec``
    (field ``n_trials``) when the total would pass ``LSTM_HPO_MAX_TRIALS``, or the
    grid's points with ``sampler: grid``.
    """
    job = _job(backend, job_id, principal)
    confirms = (job.spec.get("study") or {}).get("confirm_of")
    if confirms is not None:  # its trials are (config, seed) pairs: more would be random
        raise StudyNotExtendable(
            f"study {job_id} is a confirmation (of study {confirms}): it runs its configs x "
            "seeds only; confirm that study again with more seeds (lstm-hpo confirm "
            "--seeds N)"
        )
    try:
        study_id = optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        mark_optuna_study_deleted(backend, job.id)
        raise
    most, why = backend.limits.max_trials, "LSTM_HPO_MAX_TRIALS"
    with suppress(InvalidSpec):  # a stored spec no longer valid: its worker fails the job
        spec = study_spec(job)
        if spec.study.sampler == "grid" and grid_points(spec) < most:
            most, why = grid_points(spec), "the grid's points: with sampler grid each runs once"
    try:
        extended = queue.extend_job(backend.sessions, job_id, n_trials, max_n_trials=most)
    except InvalidSpec:
        room = max(most - job.n_trials, 0)
        msg = (
            f"must be <= {room}: the study has {job.n_trials} trials "
            f"and may have at most {most} ({why})"
            if room
            else f"the study has its most trials already ({job.n_trials} of {most}: {why}); "
            "submit a new study, warm-started from this one (study.warm_start_from)"
        )
        raise InvalidSpec([FieldError("n_trials", msg)]) from None
    # Its checkpoints are pruned again (study.keep_checkpoints) once it ends again.
    backend.storage.set_study_system_attr(study_id, CHECKPOINTS_PRUNED_ATTR, False)
    log.info("study %s extended by %d trials to %d", job_id, n_trials, extended.n_trials)
    return _study_public(backend, extended)


def delete_study(backend: Backend, job_id: str, *, principal: Principal) -> None:
    """Remove both records of a study: cancel it if it runs, delete its Optuna study, then
    our job row and leases. A worker still training one of its trials has its result
    rejected. ``StudyNotFound`` for an unknown id.

    Optuna's half goes first: a crash in between leaves a job whose Optuna study is gone
    (shown as failed, "its Optuna study was deleted"), and deleting it again finishes.
    """
    job = _job(backend, job_id, principal)
    if job.state.is_active:
        with suppress(StudyNotActive):  # it ended meanwhile
            queue.cancel_job(backend.sessions, job_id)
    # Already gone: deleted outside the service, or by an interrupted delete.
    with suppress(OptunaStudyDeleted):
        study_id = optuna_study_id(backend, job.optuna_study_name)
        if backend.checkpoints is not None:  # first: their keys are the trials' numbers
            numbers = [t.number for t in backend.storage.get_all_trials(study_id, deepcopy=False)]
            backend.checkpoints.remove_study(job.id, numbers)
        backend.storage.delete_study(study_id)
    queue.delete_job(backend.sessions, job_id)
    log.info("deleted study %s (%s)", job_id, job.optuna_study_name)


def delete_study_by_optuna_id(
    backend: Backend, optuna_study_id_: int, *, principal: Principal
) -> None:
    """:func:`delete_study` for the study optuna-dashboard names by its Optuna id.

    An Optuna study with no job of ours (made outside the service) is deleted as Optuna
    would, by an admin only. ``StudyNotFound`` when no such study is the principal's.
    """
    job = job_for_optuna_study(backend, optuna_study_id_, principal=principal)
    if job is not None:
        delete_study(backend, job.id, principal=principal)
        return
    if not principal.admin:
        raise StudyNotFound()
    try:
        study_name = backend.storage.get_study_name_from_id(optuna_study_id_)
    except KeyError:
        raise StudyNotFound() from None
    log.warning("deleting Optuna study %s, which no lstm-hpo study owns", study_name)
    backend.storage.delete_study(optuna_study_id_)


def job_for_optuna_study(
    backend: Backend, optuna_study_id_: int, *, principal: Principal
) -> queue.JobRecord | None:
    """Our job of the Optuna study with that id, when the principal may see it.

    None for an Optuna study that no job owns; ``StudyNotFound`` for one that does not
    exist, and for another principal's study (it must look exactly like one that does not).
    """
    try:
        attrs = backend.storage.get_study_user_attrs(optuna_study_id_)
    except KeyError:
        raise StudyNotFound() from None
    job_id = attrs.get(JOB_ID_ATTR)
    if not isinstance(job_id, str) or queue.find_job(backend.sessions, job_id) is None:
        return None
    return _job(backend, job_id, principal)


def optuna_study_names(backend: Backend, *, principal: Principal) -> set[str]:
    """The Optuna study names of every study the principal may see (for the dashboard)."""
    names: set[str] = set()
    page = 10_000
    while True:
        jobs, total = queue.list_jobs(
            backend.sessions, owner=principal.owner_filter, limit=page, offset=len(names)
        )
        names |= {job.optuna_study_name for job in jobs}
        if not jobs or len(names) >= total:
            return names


def _job(backend: Backend, job_id: str, principal: Principal) -> queue.JobRecord:
    """The job, if it is the principal's (an admin's: any); ``StudyNotFound`` otherwise,
    exactly as for an id that does not exist."""
    return queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)


#: Optuna study system attribute: the study's checkpoints were pruned to what it keeps.
CHECKPOINTS_PRUNED_ATTR = "lstm_hpo:checkpoints_pruned"


def prune_checkpoints(backend: Backend, job: queue.JobRecord) -> int | None:
    """Once a study has ended and nothing of it runs: delete every trial's resume
    (``last``) checkpoint and the best-epoch ones ``study.keep_checkpoints`` does not keep
    (``best``: the best trial's; ``top_k``: the ``keep_top_k`` best; ``all``; ``none``).
    Done once per study (a mark on its Optuna study); returns how many checkpoints were
    deleted, None when there was nothing to do (yet).
    """
    store = backend.checkpoints
    if store is None or job.state.is_active or job.n_running:
        return None
    try:
        study_id = optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        return None
    if backend.storage.get_study_system_attrs(study_id).get(CHECKPOINTS_PRUNED_ATTR):
        return None
    settings = study_spec(job).study
    trials = backend.storage.get_all_trials(study_id, deepcopy=False)
    ranked = _ranked(trials, study_spec(job).direction)
    keys = {original_trial_number(t.user_attrs, t.number) for t in trials}
    if settings.keep_checkpoints == "all":
        keep = keys  # pruned and failed trials' best epochs too
    else:
        n = {"best": 1, "top_k": settings.keep_top_k or 0, "none": 0}[settings.keep_checkpoints]
        keep = {original_trial_number(t.user_attrs, t.number) for t in ranked[:n]}
    removed = store.remove(job.id, sorted(keys), kinds=("last",))
    removed += store.remove(job.id, sorted(keys - keep), kinds=("best",))
    backend.storage.set_study_system_attr(study_id, CHECKPOINTS_PRUNED_ATTR, True)
    log.info(
        "study %s ended: kept the checkpoints of trials %s (keep_checkpoints: %s), deleted %d",
        job.id,
        sorted(keep) or "none",
        settings.keep_checkpoints,
        removed,
    )
    return removed


def _fail_waiting_trials(backend: Backend, job: queue.JobRecord) -> None:
    try:
        study_id = optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        return
    for trial in backend.storage.get_all_trials(
        study_id, deepcopy=False, states=(TrialState.WAITING,)
    ):
        fail_trial_if_waiting(backend, trial._trial_id, not_run_reason(trial))


def not_run_reason(trial: FrozenTrial) -> str:
    """Why a WAITING trial that nothing will run is failed: an enqueued configuration's
    reason, or a retry's."""
    return NOT_RUN_ENQUEUED_REASON if trial.user_attrs.get(ENQUEUED_ATTR) else NOT_RUN_REASON


def study_spec(job: queue.JobRecord) -> StudySpec:
    """The spec a job was submitted with (validated again: specs are data, not trusted code)."""
    return parse_spec(job.spec, STORED_SPEC_LIMITS)


# --------------------------------------------------------------------------------------
# Seeding a new study: study.enqueue and study.warm_start_from
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WarmStart:
    """Trials copied from earlier studies, ready for ``Study.add_trials``, and the notes on
    what was left out."""

    trials: list[FrozenTrial]
    notes: list[str]


def _warm_start(backend: Backend, spec: StudySpec, principal: Principal) -> _WarmStart:
    """The COMPLETE trials of the studies ``study.warm_start_from`` names, as trials of a
    study over ``spec``'s space, best first, at most ``MAX_WARM_START_TRIALS``.

    Each keeps the parameters the new space searches whose values lie inside it (with the
    new space's distributions); others are dropped, and a trial left with none is skipped,
    each with a note. Only a source's own trials are copied (not those it was itself
    warm-started with). Raises ``InvalidSpec`` naming ``study.warm_start_from.<i>`` for a
    study that does not exist or is another principal's, ran another task kind or
    direction, or whose Optuna study is gone.
    """
    ids = spec.study.warm_start_from or ()
    if not ids:
        return _WarmStart([], [])
    errors: list[FieldError] = []
    notes: list[str] = []
    found: list[tuple[str, FrozenTrial]] = []
    for i, source_id in enumerate(ids):
        where = f"study.warm_start_from.{i}"
        try:
            job = _job(backend, source_id, principal)
            trials = _trials(backend, job)
        except StudyNotFound:
            errors.append(FieldError(where, f"no study {source_id} (or not yours)"))
            continue
        except OptunaStudyDeleted as gone:
            errors.append(FieldError(where, f"study {source_id}: {gone.message}"))
            continue
        source = study_spec(job)
        if source.task.kind != spec.task.kind:
            msg = (
                f"study {source_id} ran task kind {source.task.kind}, this one is "
                f"{spec.task.kind}: warm start needs the same task"
            )
            errors.append(FieldError(where, msg))
            continue
        if source.metric.name != spec.metric.name:  # e.g. classify's val_acc and val_loss
            msg = (
                f"study {source_id} was ranked by {source.metric.name}, this one by "
                f"{spec.metric.name}: warm start needs the same metric"
            )
            errors.append(FieldError(where, msg))
            continue
        if source.direction != spec.direction:
            msg = f"study {source_id} was to {source.direction}, this one is to {spec.direction}"
            errors.append(FieldError(where, msg))
            continue
        if source.task != spec.task:
            notes.append(
                f"study {source_id} ran on other task settings than this one: its values "
                "may not compare with this study's"
            )
        done = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.values is not None
            and len(t.values) == 1
            and _is_finite(t.values[0])
        ]
        if not done:
            notes.append(f"study {source_id}: no completed trial to warm-start from")
        found += [(source_id, t) for t in done]
    if errors:
        raise InvalidSpec(errors)
    found.sort(key=lambda pair: pair[1].values[0], reverse=spec.direction == "maximize")
    if len(found) > MAX_WARM_START_TRIALS:
        notes.append(
            f"only the best {MAX_WARM_START_TRIALS} of the {len(found)} completed trials were "
            "added (the most a study is warm-started with)"
        )
        found = found[:MAX_WARM_START_TRIALS]
    return _copy_trials(found, spec, notes)


def _copy_trials(
    found: list[tuple[str, FrozenTrial]], spec: StudySpec, notes: list[str]
) -> _WarmStart:
    dists = {name: _optuna_distribution(d) for name, d in searched_distributions(spec).items()}
    added: Counter[str] = Counter()
    empty: Counter[str] = Counter()
    dropped: Counter[tuple[str, str, str]] = Counter()
    copies = []
    for source_id, trial in found:
        params: dict[str, Any] = {}
        for name, value in trial.params.items():
            dist = dists.get(name)
            if dist is None:
                dropped[source_id, name, "this space does not search it"] += 1
            elif not _contains(dist, value):
                dropped[source_id, name, "its value lies outside this space"] += 1
            else:
                params[name] = value
        if not params:
            empty[source_id] += 1
            continue
        added[source_id] += 1
        copies.append(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=trial.values,
                params=params,
                distributions={name: dists[name] for name in params},
                user_attrs={WARM_START_FROM_ATTR: source_id, WARM_START_TRIAL_ATTR: trial.number},
            )
        )
    for source_id, n in added.items():
        notes.append(f"study {source_id}: {n} completed trial(s) added to the sampler's history")
    for (source_id, name, why), n in dropped.items():
        notes.append(f"study {source_id}: parameter {name} dropped from {n} trial(s): {why}")
    for source_id, n in empty.items():
        notes.append(
            f"study {source_id}: {n} trial(s) left out: none of their parameters fits this space"
        )
    return _WarmStart(copies, notes)


def _optuna_distribution(dist: Distribution) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution a trial's ``suggest_*`` call records for ``dist``."""
    if isinstance(dist, IntDistribution):
        return optuna.distributions.IntDistribution(
            dist.low, dist.high, log=dist.log, step=dist.step
        )
    if isinstance(dist, FloatDistribution):
        return optuna.distributions.FloatDistribution(
            dist.low, dist.high, log=dist.log, step=dist.step
        )
    assert isinstance(dist, CategoricalDistribution)
    return optuna.distributions.CategoricalDistribution(dist.choices)


def _contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):  # e.g. not one of a categorical's choices
        return False


def _seed_study(study: optuna.Study, spec: StudySpec, warm: _WarmStart, notes: list[str]) -> None:
    """Enqueue ``study.enqueue`` (WAITING, marked ``ENQUEUED_ATTR``, in order) and add the
    warm-start copies (COMPLETE, marked ``WARM_START_FROM_ATTR``) to a new Optuna study,
    and keep ``notes`` (the data check's and the warm start's) on it. What a retried
    submit (same idempotency key) already added is not added twice."""
    present = study.get_trials(deepcopy=False)
    enqueued = {t.user_attrs.get(ENQUEUE_INDEX_ATTR) for t in present}
    copied = {
        (t.user_attrs.get(WARM_START_FROM_ATTR), t.user_attrs.get(WARM_START_TRIAL_ATTR))
        for t in present
    }
    for i, params in enumerate(spec.study.enqueue or ()):
        if i not in enqueued:
            study.enqueue_trial(
                dict(params), user_attrs={ENQUEUED_ATTR: True, ENQUEUE_INDEX_ATTR: i}
            )
    study.add_trials(
        [
            t
            for t in warm.trials
            if (t.user_attrs[WARM_START_FROM_ATTR], t.user_attrs[WARM_START_TRIAL_ATTR])
            not in copied
        ]
    )
    if notes:
        study.set_user_attr(NOTES_ATTR, notes)
        log.info("study %s: %s", study.study_name, "; ".join(notes))


# --------------------------------------------------------------------------------------
# Trials and the best configs
# --------------------------------------------------------------------------------------


def _api_state(trial: FrozenTrial) -> ApiTrialState:
    return ApiTrialState.from_optuna(trial.state.name)


def _optuna_id(backend: Backend, job: queue.JobRecord) -> int:
    """The job's Optuna study id; ``OptunaStudyDeleted`` (and the job marked failed) when gone."""
    try:
        return optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        mark_optuna_study_deleted(backend, job.id)
        raise


def _trials(backend: Backend, job: queue.JobRecord) -> list[FrozenTrial]:
    """Every trial the job's Optuna study ran (:func:`own_trials`); ``OptunaStudyDeleted``
    (and the job marked failed) when it is gone. Reads and builds them all: what answers
    about one study use :mod:`service.trial_queries` instead (counts, best, pages)."""
    study_id = _optuna_id(backend, job)
    return own_trials(backend.storage.get_all_trials(study_id, deepcopy=False))


def own_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials the study ran: not those copied from earlier studies (warm start,
    marked ``WARM_START_FROM_ATTR``), which only seed its sampler. Whatever lists, counts
    or ranks a study's trials reads them through this."""
    return [t for t in trials if WARM_START_FROM_ATTR not in t.user_attrs]


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ranked(
    trials: Sequence[FrozenTrial], direction: str, metric_index: int = 0
) -> list[FrozenTrial]:
    """The study's own COMPLETE trials with finite values, best metric first (NaN/inf
    never win; warm-start copies never either). ``metric_index``: the metric's place
    among a multi-objective study's values."""
    done = [
        t
        for t in own_trials(trials)
        if t.state == TrialState.COMPLETE and t.values and all(map(_is_finite, t.values))
    ]
    return sorted(done, key=lambda t: t.values[metric_index], reverse=direction == "maximize")


def pareto_front(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """A multi-objective study's Pareto front: its feasible COMPLETE trials with finite
    values that no other such trial dominates (Optuna's own computation, constraints
    considered), best metric first."""
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    directions = [optuna.study.StudyDirection[d.upper()] for d in spec.directions]
    index = spec.objectives.index(spec.metric.name)
    candidates = _ranked(trials, spec.direction, index)
    front = _get_pareto_front_trials_by_trials(candidates, directions, consider_constraint=True)
    on_front = {t.number for t in front}
    return [t for t in candidates if t.number in on_front]


def _metric_value(trial: FrozenTrial, spec_json: Mapping[str, Any]) -> float | None:
    """The task metric's value of a trial (a multi-objective trial holds several)."""
    if not trial.values:
        return None
    objectives = spec_json.get("study", {}).get("objectives") or ()
    metric = stored_metric(spec_json).name
    value = trial.values[list(objectives).index(metric)] if len(objectives) > 1 else trial.values[0]
    return value if _is_finite(value) else None


def study_trials(
    backend: Backend,
    job_id: str,
    *,
    principal: Principal,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[TrialPublic]:
    """A study's trials in trial-number order (``state``: only those in that API state).

    Reads only the page (and a count) from Optuna's tables: :mod:`service.trial_queries`.
    """
    job = _job(backend, job_id, principal)
    try:
        study_id = _optuna_id(backend, job)
    except OptunaStudyDeleted:
        return Page[TrialPublic](items=[], total=0, limit=limit, offset=offset)
    states = None if state is None else _optuna_states(ApiTrialState(state))
    page, total = trial_queries.page_of_trials(
        trial_queries.rdb_storage(backend.storage),
        study_id,
        states=states,
        limit=limit,
        offset=offset,
    )
    return Page[TrialPublic](
        items=[_trial_public(t, job.spec) for t in page], total=total, limit=limit, offset=offset
    )


def _optuna_states(state: ApiTrialState) -> list[TrialState]:
    """The Optuna trial states the API shows as ``state``."""
    return [s for s in TrialState if ApiTrialState.from_optuna(s.name) == state]


def best_configs(
    backend: Backend, job_id: str, *, principal: Principal, k: int | None = 1
) -> list[BestPublic]:
    """The top ``k`` completed trials and their resolved configs, best first. A
    multi-objective study's are its Pareto front (:func:`pareto_front`; ``k`` None: all
    of it; one otherwise), each with its ``values``. Raises ``NoCompletedTrials``."""
    job = _job(backend, job_id, principal)
    spec = study_spec(job)
    storage = trial_queries.rdb_storage(backend.storage)
    maximize = spec.direction == "maximize"
    # Ranked in SQL (a front from each trial's values only; the best one from the study's
    # summary); only the answer's trials are then read in full.
    if spec.is_multi_objective:
        study_id = _optuna_id(backend, job)
        front = pareto_front(trial_queries.complete_finite_trials(storage, study_id), spec)
        ids = [t._trial_id for t in front[: len(front) if k is None else k]]
    elif k is None or k == 1:
        summary = backend.summaries.get(
            storage, job.optuna_study_name, objective=0, objectives=1, maximize=maximize
        )
        if summary is None:
            mark_optuna_study_deleted(backend, job.id)
            raise OptunaStudyDeleted()
        ids = [summary.best.trial_id] if summary.best is not None else []
    else:
        study_id = _optuna_id(backend, job)
        top = trial_queries.ranked_trials(
            storage, study_id, objective=0, objectives=1, maximize=maximize, limit=k
        )
        ids = [t.trial_id for t in top]
    if not ids:
        raise _no_completed_trial(job)
    return _best_public(backend, spec, trial_queries.trials_by_id(storage, ids))


def trial_configs(
    backend: Backend, job_id: str, numbers: Sequence[int], *, principal: Principal
) -> list[BestPublic]:
    """The resolved configs of the study's completed trials ``numbers``, as
    :func:`best_configs` gives them (``lstm-hpo best --confirmed``: the confirmation's
    winner). Raises ``StudyNotFound``, ``NoCompletedTrials`` when one is not complete."""
    job = _job(backend, job_id, principal)
    spec = study_spec(job)
    optuna_id = _optuna_id(backend, job)
    storage = trial_queries.rdb_storage(backend.storage)
    try:
        find = backend.storage.get_trial_id_from_study_id_trial_number
        ids = [find(optuna_id, number) for number in numbers]
    except KeyError:
        raise NoCompletedTrials(f"study {job_id} has no trial {numbers}") from None
    trials = trial_queries.trials_by_id(storage, ids)
    if any(t.state != TrialState.COMPLETE for t in trials):
        raise NoCompletedTrials(f"trial(s) {numbers} of study {job_id} did not complete")
    return _best_public(backend, spec, trials)


def _best_public(
    backend: Backend, spec: StudySpec, trials: Sequence[FrozenTrial]
) -> list[BestPublic]:
    """Each completed trial's value(s) and resolved config, in the order given."""
    out = []
    for trial in trials:
        config = trial.user_attrs.get(CONFIG_ATTR)
        if config is None:  # replay the sampler's mapping on the recorded params
            config = sample_config(optuna.trial.FixedTrial(trial.params), spec).model_dump(
                mode="json", exclude_none=True
            )
        config = _with_data_located(config, backend.limits.data_roots)
        values = dict(zip(spec.objectives, trial.values, strict=True))
        out.append(
            BestPublic(
                value=values[spec.metric.name],
                trial_number=trial.number,
                config=config,
                values=values if spec.is_multi_objective else None,
            )
        )
    return out


def progress_inputs(
    backend: Backend, job_id: str, *, principal: Principal
) -> tuple[queue.JobRecord, list[FrozenTrial], int, float | None]:
    """What a study's progress is made of, read in SQL rather than from every trial: its
    job row, its own RUNNING trials, and how many of its finished trials have a duration
    and their mean in seconds (None for none). A study whose Optuna half is gone has none
    of them, and its job reads as failed (as ``get`` shows it)."""
    job = _job(backend, job_id, principal)
    try:
        study_id = _optuna_id(backend, job)
    except OptunaStudyDeleted:
        return _job(backend, job_id, principal), [], 0, None
    storage = trial_queries.rdb_storage(backend.storage)
    running, _ = trial_queries.page_of_trials(
        storage, study_id, states=[TrialState.RUNNING], limit=MAX_TRIALS, offset=0
    )
    n_timed, mean_s = trial_queries.finished_durations(storage, study_id)
    return job, running, n_timed, mean_s


def _no_completed_trial(job: queue.JobRecord) -> NoCompletedTrials:
    """ "Try again later" while a trial may still complete; why none will once it ended."""
    if job.state.is_terminal:
        return NoCompletedTrials(
            f"the study ended ({job.state}) without a completed trial: see its trials' "
            "failure reasons (GET /v1/studies/{id}/trials)"
        )
    return NoCompletedTrials()


def best_checkpoint(backend: Backend, job_id: str, *, principal: Principal) -> tuple[BinaryIO, int]:
    """A reader of the best trial's best-epoch checkpoint (close it) and that trial's number.

    ``NoCompletedTrials`` while none has completed; ``CheckpointMissing`` when the best
    trial has no checkpoint (none kept, a synthetic study, or no store configured).
    """
    job = _job(backend, job_id, principal)
    storage = trial_queries.rdb_storage(backend.storage)
    study_id = _optuna_id(backend, job)
    spec = study_spec(job)
    top = trial_queries.ranked_trials(
        storage,
        study_id,
        objective=0,
        objectives=len(spec.objectives),
        maximize=spec.direction == "maximize",
        limit=1,
    )
    if not top:
        raise _no_completed_trial(job)
    (best,) = trial_queries.trials_by_id(storage, [top[0].trial_id])
    if backend.checkpoints is None:
        raise CheckpointMissing()
    key = original_trial_number(best.user_attrs, best.number)
    try:
        return backend.checkpoints.open(job.id, key, "best"), best.number
    except CheckpointNotFound:
        raise CheckpointMissing() from None


def _with_data_located(
    config: dict[str, Any], data_roots: tuple[Path, ...] | None
) -> dict[str, Any]:
    """``config`` with a relative ``task.path`` replaced by the absolute file the server's
    workers read, so `lstm-hpo train` finds it on this machine from any directory."""
    task = config.get("task")
    if not isinstance(task, dict):
        return config
    path = task.get("path")
    if not isinstance(path, str) or Path(path).is_absolute():
        return config
    located = os.path.realpath(resolve_data_path(path, data_roots))  # a link loop: no error
    return {**config, "task": {**task, "path": located}}


def _utc(moment: datetime | None) -> datetime | None:
    """Optuna's trial times are naive local times (``datetime.now()``): made aware, in UTC."""
    return moment.astimezone(UTC) if moment is not None else None


def _trial_public(trial: FrozenTrial, spec_json: Mapping[str, Any]) -> TrialPublic:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialPublic(
        number=trial.number,
        state=_api_state(trial),
        params=trial.params,
        value=_metric_value(trial, spec_json),
        values=list(trial.values) if trial.values and len(trial.values) > 1 else None,
        duration_s=duration,
        started_at=_utc(trial.datetime_start),
        finished_at=_utc(trial.datetime_complete),
        intermediate_values={
            int(k): float(v) if math.isfinite(v) else None
            for k, v in trial.intermediate_values.items()
        },
        failure_reason=trial.user_attrs.get(FAILURE_ATTR),
        retry_of=trial.user_attrs.get(RETRY_OF_ATTR),
        resumed_from_epoch=trial.user_attrs.get(RESUMED_FROM_ATTR),
        config=trial.user_attrs.get(CONFIG_ATTR),
    )


def _study_public(
    backend: Backend, job: queue.JobRecord, *, include_spec: bool = True
) -> StudyPublic:
    spec = job.spec
    task = spec["task"]["kind"]
    metric = stored_metric(spec)
    direction = spec.get("study", {}).get("direction") or metric.direction
    objectives = spec.get("study", {}).get("objectives") or [metric.name]
    # Counts, the best value and the notes in SQL, one transaction: a large study's trials
    # are never all read here.
    summary = backend.summaries.get(
        trial_queries.rdb_storage(backend.storage),
        job.optuna_study_name,
        objective=list(objectives).index(metric.name),
        objectives=len(objectives),
        maximize=direction == "maximize",
        user_attr=NOTES_ATTR if include_spec else None,
    )
    if summary is None:
        mark_optuna_study_deleted(backend, job.id)
        job = replace(job, state=JobState.FAILED, error=OptunaStudyDeleted().message)
        dashboard_url = f"{backend.base_url}/dashboard"
    else:
        dashboard_url = f"{backend.base_url}/dashboard/studies/{summary.study_id}"
    counts: dict[str, int] = {}
    for optuna_state, n in (summary.counts if summary else {}).items():
        name = ApiTrialState.from_optuna(optuna_state.name).value
        counts[name] = counts.get(name, 0) + n
    best = summary.best if summary else None
    notes = summary.user_attr if summary else None
    end = job.finished_at or (datetime.now(UTC) if job.started_at else None)
    return StudyPublic(
        id=job.id,
        name=job.name,
        state=job.state,
        task=task,
        metric=metric.name,
        direction=direction,
        n_trials=job.n_trials,
        n_finished=job.n_finished,
        counts=TrialCounts(**counts),
        best_value=best.value if best is not None else None,
        best_trial_number=best.number if best is not None else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        elapsed_s=(end - job.started_at).total_seconds() if end and job.started_at else None,
        dashboard_url=dashboard_url,
        optuna_study_name=job.optuna_study_name,
        objectives=list(objectives) if len(objectives) > 1 else None,
        error=job.error,
        spec=spec if include_spec else None,
        # What the submit noted on the study (``NOTES_ATTR``), None when nothing.
        notes=[str(n) for n in notes] if isinstance(notes, list) and notes else None,
    )


# --------------------------------------------------------------------------------------
# Optuna-side helpers (the reaper's and the domain's)
# --------------------------------------------------------------------------------------


def check_database(backend: Backend) -> None:
    """A round trip to the database; ``DatabaseUnavailable`` when it cannot be reached."""
    with session_scope(backend.sessions) as session:
        session.execute(text("SELECT 1"))


def optuna_study_id(backend: Backend, study_name: str) -> int:
    """The Optuna study id of ``study_name``; ``OptunaStudyDeleted`` when it is gone."""
    try:
        return backend.storage.get_study_id_from_name(study_name)
    except KeyError:
        raise OptunaStudyDeleted() from None


def mark_optuna_study_deleted(backend: Backend, job_id: str) -> None:
    """Our half of a study whose Optuna half was deleted outside the service: ``failed``
    with the reason, so every route answers cleanly and no worker claims it again."""
    if queue.fail_job(backend.sessions, job_id, OptunaStudyDeleted().message):
        log.error("study %s: %s", job_id, OptunaStudyDeleted().message)


def fail_trial_if_running(backend: Backend, trial_id: int, reason: str) -> FrozenTrial:
    """FAIL trial ``trial_id`` in Optuna if it is still RUNNING; return it as it is now.

    Optuna moves a trial out of RUNNING at most once (row lock), so when a worker's tell
    wins the race its result stands and ours is rejected.
    """
    trial = backend.storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return trial
    try:
        # The reason first: Optuna refuses attributes on a finished trial.
        backend.storage.set_trial_user_attr(trial_id, FAILURE_ATTR, reason)
        backend.storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # its worker told the result just now: that result stands
    return backend.storage.get_trial(trial_id)


def fail_trial_if_waiting(backend: Backend, trial_id: int, reason: str) -> bool:
    """FAIL a WAITING trial nobody will run; True when this call failed it.

    It is moved WAITING -> RUNNING first, as a worker's pop does, so when a worker pops it
    at the same moment exactly one of the two wins.
    """
    return fail_waiting_trial(backend.storage, trial_id, reason)


def fail_waiting_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """:func:`fail_trial_if_waiting` on a storage (a worker has no :class:`Backend`)."""
    try:
        if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
            return False  # a worker popped it: it runs
        storage.set_trial_user_attr(trial_id, FAILURE_ATTR, reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True
