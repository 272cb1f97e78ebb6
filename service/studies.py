"""The study domain: submit, get, list, cancel, trials, best, reap. Wraps Optuna's storage.

A study is two records in one database: our job row (``queue``: state, slots, owner) and
Optuna's study (trials, params, values; what optuna-dashboard shows). The job row is the
source of truth for *how many* trials run; Optuna's is the truth for *what* they found.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service import queue
from service.db import (
    configure_sqlite_engine,
    is_sqlite,
    make_engine,
    make_session_factory,
    session_scope,
)
from service.errors import Conflict, LeaseLost, NoCompletedTrials
from service.schemas import BestPublic, Page, StudyPublic, TrialCounts, TrialPublic
from service.search_space import TASK_METRICS, SpecLimits, StudySpec, parse_spec, sample_config
from service.training.objective import CONFIG_ATTR, FAILURE_ATTR, RETRY_OF_ATTR

log = logging.getLogger(__name__)

#: Optuna study user attribute linking it back to our job.
JOB_ID_ATTR = "lstm_hpo_job_id"
_IDEMPOTENCY_NAMESPACE = uuid.UUID("0d9a7a53-4f0e-4e61-9b8f-3c1a4c6f2a10")


@dataclass(frozen=True)
class Backend:
    """What the domain functions need: our sessions, Optuna's storage, and the limits."""

    sessions: sessionmaker[Session]
    storage: optuna.storages.BaseStorage
    limits: SpecLimits
    base_url: str


def optuna_storage(
    database_url: str, *, pool_size: int = 2, worker: bool = False
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the same database, with its own small pool.

    ``worker=True``: no table creation and no schema-version check. Workers never run DDL
    (the server created Optuna's tables before ours, and workers wait for ours), and
    skipping the check lets one pooled connection suffice: one for Optuna plus one for our
    tables keeps a worker within its budget of two database connections.
    """
    if is_sqlite(database_url):
        # Same lock patience as our own engine: busy workers must wait, not fail.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        engine_kwargs = {"pool_size": pool_size, "max_overflow": 0, "pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(
        database_url,
        engine_kwargs=engine_kwargs,
        skip_table_creation=worker,
        skip_compatibility_check=worker,
    )
    if is_sqlite(database_url):
        configure_sqlite_engine(storage.engine)
        storage.engine.dispose()  # connections opened during __init__ lack the set-up
    return storage


def open_backend(
    database_url: str,
    *,
    limits: SpecLimits,
    base_url: str,
    pool_size: int = 2,
    storage: optuna.storages.BaseStorage | None = None,
) -> Backend:
    """Connect to the database (schema must already be migrated)."""
    engine = make_engine(database_url, pool_size=pool_size, max_overflow=0)
    return Backend(
        sessions=make_session_factory(engine),
        storage=storage or optuna_storage(database_url, pool_size=max(pool_size, 2)),
        limits=limits,
        base_url=base_url.rstrip("/"),
    )


# --------------------------------------------------------------------------------------
# Submit / read / cancel
# --------------------------------------------------------------------------------------


def submit_study(
    backend: Backend,
    spec: StudySpec,
    *,
    owner: str = "local",
    idempotency_key: str | None = None,
) -> tuple[StudyPublic, bool]:
    """Queue a validated study; returns it and whether it was created (False: a retried key).

    With an idempotency key the job id and Optuna study name are derived from the key, so
    a client retrying after a lost response (or a server killed mid-request) gets the same
    study, never a second one.
    """
    spec_json = spec.model_dump(mode="json")
    if idempotency_key is not None:
        job_id = uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{owner}\0{idempotency_key}").hex
        existing = queue.find_job(backend.sessions, job_id)
        if existing is not None:
            return _existing_for_key(backend, existing, spec_json), False
    else:
        job_id = uuid.uuid4().hex
    name = spec.name or spec.task.kind
    study_name = f"{name}-{job_id[:8]}"
    study = optuna.create_study(
        storage=backend.storage,
        study_name=study_name,
        direction=spec.direction,
        load_if_exists=True,
    )
    study.set_user_attr(JOB_ID_ATTR, job_id)
    study.set_user_attr("metric", spec.metric.name)
    study.set_user_attr("spec", spec_json)
    job, created = queue.create_job(
        backend.sessions,
        job_id=job_id,
        spec=spec_json,
        name=name,
        owner=owner,
        optuna_study_name=study_name,
        n_trials=spec.study.n_trials,
        max_retries=spec.study.max_retries,
        timeout_s=spec.study.timeout_s,
        idempotency_key=idempotency_key,
    )
    if not created:
        return _existing_for_key(backend, job, spec_json), False
    return _study_public(backend, job), True


def _existing_for_key(backend: Backend, job: queue.JobRecord, spec_json: Any) -> StudyPublic:
    if job.spec != spec_json:
        raise Conflict("Idempotency-Key was already used for a different spec")
    return _study_public(backend, job)


def get_study(backend: Backend, job_id: str, *, owner: str | None = None) -> StudyPublic:
    """One study with live trial counts and its best value."""
    return _study_public(backend, queue.get_job(backend.sessions, job_id, owner=owner))


def list_studies(
    backend: Backend,
    *,
    state: str | None = None,
    owner: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> Page[StudyPublic]:
    """Studies, newest first, optionally only those in ``state``."""
    jobs, total = queue.list_jobs(
        backend.sessions, state=state, owner=owner, limit=limit, offset=offset
    )
    items = [_study_public(backend, job, include_spec=False) for job in jobs]
    return Page[StudyPublic](items=items, total=total, limit=limit, offset=offset)


def cancel_study(backend: Backend, job_id: str, *, owner: str | None = None) -> StudyPublic:
    """Stop claiming new trials; running trials finish and are recorded."""
    queue.get_job(backend.sessions, job_id, owner=owner)
    queue.cancel_job(backend.sessions, job_id)
    return get_study(backend, job_id, owner=owner)


def study_spec(job: queue.JobRecord) -> StudySpec:
    """The spec a job was submitted with (validated again: specs are data, not trusted code)."""
    return parse_spec(job.spec)


# --------------------------------------------------------------------------------------
# Trials and the best configs
# --------------------------------------------------------------------------------------

_STATE_NAMES = {
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.WAITING: "waiting",
}


def _trials(backend: Backend, study_name: str) -> list[FrozenTrial]:
    study_id = backend.storage.get_study_id_from_name(study_name)
    return backend.storage.get_all_trials(study_id, deepcopy=False)


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ranked(trials: Sequence[FrozenTrial], direction: str) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value, best first (NaN/inf never win)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and _is_finite(t.value)]
    return sorted(done, key=lambda t: t.value or 0.0, reverse=direction == "maximize")


def study_trials(
    backend: Backend,
    job_id: str,
    *,
    owner: str | None = None,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[TrialPublic]:
    """A study's trials in trial-number order."""
    job = queue.get_job(backend.sessions, job_id, owner=owner)
    trials = _trials(backend, job.optuna_study_name)
    if state is not None:
        trials = [t for t in trials if _STATE_NAMES.get(t.state) == state]
    page = trials[offset : offset + limit]
    return Page[TrialPublic](
        items=[_trial_public(t) for t in page], total=len(trials), limit=limit, offset=offset
    )


def best_configs(
    backend: Backend, job_id: str, *, k: int = 1, owner: str | None = None
) -> list[BestPublic]:
    """The top ``k`` completed trials and their resolved configs, best first."""
    job = queue.get_job(backend.sessions, job_id, owner=owner)
    spec = study_spec(job)
    ranked = _ranked(_trials(backend, job.optuna_study_name), spec.direction)
    if not ranked:
        raise NoCompletedTrials()
    out = []
    for trial in ranked[:k]:
        config = trial.user_attrs.get(CONFIG_ATTR)
        if config is None:  # replay the sampler's mapping on the recorded params
            config = sample_config(optuna.trial.FixedTrial(trial.params), spec).model_dump(
                mode="json", exclude_none=True
            )
        assert trial.value is not None
        out.append(BestPublic(value=trial.value, trial_number=trial.number, config=config))
    return out


def _trial_public(trial: FrozenTrial) -> TrialPublic:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialPublic(
        number=trial.number,
        state=_STATE_NAMES.get(trial.state, "failed"),
        params=trial.params,
        value=trial.value if _is_finite(trial.value) else None,
        duration_s=duration,
        intermediate_values={
            int(k): float(v) if math.isfinite(v) else None
            for k, v in trial.intermediate_values.items()
        },
        failure_reason=trial.user_attrs.get(FAILURE_ATTR),
        retry_of=trial.user_attrs.get(RETRY_OF_ATTR),
        config=trial.user_attrs.get(CONFIG_ATTR),
    )


def _study_public(
    backend: Backend, job: queue.JobRecord, *, include_spec: bool = True
) -> StudyPublic:
    trials = _trials(backend, job.optuna_study_name)
    counts: dict[str, int] = {}
    for t in trials:
        name = _STATE_NAMES.get(t.state, "failed")
        counts[name] = counts.get(name, 0) + 1
    spec = job.spec
    task = spec["task"]["kind"]
    metric = TASK_METRICS[task]
    direction = spec.get("study", {}).get("direction") or metric.direction
    ranked = _ranked(trials, direction)
    end = job.finished_at or (datetime.now(UTC) if job.started_at else None)
    study_id = backend.storage.get_study_id_from_name(job.optuna_study_name)
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
        best_value=ranked[0].value if ranked else None,
        best_trial_number=ranked[0].number if ranked else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        elapsed_s=(end - job.started_at).total_seconds() if end and job.started_at else None,
        dashboard_url=f"{backend.base_url}/dashboard/studies/{study_id}",
        optuna_study_name=job.optuna_study_name,
        error=job.error,
        spec=spec if include_spec else None,
    )


# --------------------------------------------------------------------------------------
# The reaper
# --------------------------------------------------------------------------------------


def check_database(backend: Backend) -> None:
    """A round trip to the database; ``DatabaseUnavailable`` when it cannot be reached."""
    with session_scope(backend.sessions) as session:
        session.execute(text("SELECT 1"))


#: Optuna's final trial states -> the queue outcome a slot is finished with.
_OPTUNA_OUTCOMES: dict[TrialState, queue.FinishOutcome] = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def reap_stale_trials(
    backend: Backend, *, grace_s: float, now: datetime | None = None
) -> list[queue.StaleLease]:
    """Fail trials whose worker stopped heartbeating and enqueue their retries.

    Optuna's trial state decides who owns the outcome of a stale lease, because a worker
    tells Optuna first and finishes its slot second (``set_trial_state_values`` moves a
    trial out of RUNNING at most once, under a row lock on PostgreSQL):

    1. For each stale lease with an Optuna trial, while it is still RUNNING the reaper
       fails it in Optuna (reason "worker stopped heartbeating"); from then on a late
       ``tell`` is rejected. If the worker's ``tell`` got there first (it died between
       ``tell`` and ``finish_trial_slot``), the slot is finished with the Optuna outcome
       instead: it counts as complete / pruned / failed and is NOT retried.
    2. The queue takes the remaining stale slots back (``fail_stale_trials`` with the same
       ``now``, so it reaps only leases step 1 looked at); for each slot to be retried the
       failed trial's parameters are enqueued, linked by the ``retry_of`` user attribute.

    Every step is idempotent, so a round interrupted by a database error is completed by
    the next one. Returns the leases the queue reaped.
    """
    at = now or datetime.now(UTC)
    cutoff = at - timedelta(seconds=grace_s)
    for candidate in queue.stale_leases(backend.sessions, cutoff=cutoff):
        if candidate.optuna_trial_id is None:
            continue  # died between claim and ask: nothing in Optuna to settle
        try:
            _settle_with_optuna(backend, candidate)
        except Exception:  # one unreadable trial must not stop the other leases' reaping
            log.exception("reaper: could not check trial %s", candidate.optuna_trial_id)

    stale = queue.fail_stale_trials(backend.sessions, grace_s=grace_s, now=at)
    _fail_orphan_trials(backend, grace_s=grace_s)
    for lease in stale:
        if lease.optuna_trial_id is None:
            continue  # died between claim and ask: nothing in Optuna to fail or repeat
        trial = _fail_if_running(backend, lease.optuna_trial_id)
        if not _failed_by_reaper(trial):
            # The worker attached and told between step 1's read and the reap (a silent
            # worker that came back within milliseconds). The slot is already taken back;
            # the queue has no call to give it the Optuna outcome, so the study may end
            # with one extra finished trial. Never enqueue a duplicate on top of that.
            log.error(
                "reaper: trial %s of %s finished as %s after its slot was reaped",
                lease.trial_number,
                lease.optuna_study_name,
                trial.state.name,
            )
            continue
        if lease.retry:
            study = optuna.load_study(study_name=lease.optuna_study_name, storage=backend.storage)
            study.enqueue_trial(
                trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False
            )
        log.warning(
            "reaped trial %s of %s (worker %s)%s",
            lease.trial_number,
            lease.optuna_study_name,
            lease.worker_id,
            "; retrying it" if lease.retry else "",
        )
    return stale


ORPHAN_REASON = "no worker owned this trial (its worker lost the database before claiming it)"
#: Finished studies the orphan sweep still looks at (newest first): a trial orphaned just
#: before its study's last slot finished is failed on the next rounds.
_RECENTLY_FINISHED_SWEPT = 20


def _fail_orphan_trials(backend: Backend, *, grace_s: float) -> int:
    """FAIL Optuna trials left RUNNING with no running lease behind them.

    A worker whose ``ask()`` created a trial but which lost the database (or died) before
    attaching it to its slot leaves such an orphan; no heartbeat can ever end it. Only
    trials older than the grace period count, so a worker between ``ask`` and ``attach``
    (milliseconds) is never touched. Returns how many were failed.
    """
    running, _ = queue.list_jobs(backend.sessions, state="running", limit=1000)
    recent: list[queue.JobRecord] = []
    for state in ("succeeded", "failed", "cancelled"):
        jobs, _total = queue.list_jobs(
            backend.sessions, state=state, limit=_RECENTLY_FINISHED_SWEPT
        )
        recent += jobs
    cutoff = datetime.now() - timedelta(seconds=grace_s)  # Optuna stores naive local times
    failed = 0
    for job in [*running, *recent]:
        study_id = backend.storage.get_study_id_from_name(job.optuna_study_name)
        trials = backend.storage.get_all_trials(
            study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        if not trials:
            continue
        owned = {
            lease.optuna_trial_id
            for lease in queue.list_leases(backend.sessions, job.id, state="running")
        }
        for trial in trials:
            started = trial.datetime_start
            if trial._trial_id in owned or started is None or started > cutoff:
                continue
            if _fail_if_running(backend, trial._trial_id, ORPHAN_REASON).state == TrialState.FAIL:
                failed += 1
                log.warning(
                    "failed orphaned trial %d of %s (no worker owns it)",
                    trial.number,
                    job.optuna_study_name,
                )
    return failed


def _settle_with_optuna(backend: Backend, candidate: queue.StaleCandidate) -> None:
    """Step 1 for one stale lease: fail its RUNNING trial in Optuna, or, when its worker
    told Optuna the result before dying, finish the slot with that result."""
    assert candidate.optuna_trial_id is not None
    trial = _fail_if_running(backend, candidate.optuna_trial_id)
    if _failed_by_reaper(trial):
        return  # ours: the queue reaps the slot (and may retry it) in step 2
    outcome = _OPTUNA_OUTCOMES.get(trial.state)
    if outcome is None:
        return  # WAITING: never attached to a lease; leave it to the queue
    reason = trial.user_attrs.get(FAILURE_ATTR)
    try:
        queue.finish_trial_slot(
            backend.sessions,
            candidate.id,
            outcome,
            None if reason is None else str(reason)[:2000],
        )
    except LeaseLost:
        return  # its worker finished the slot itself meanwhile
    log.warning(
        "trial %s of %s: worker told %s but stopped before finishing its slot; "
        "counted as %s, not retried",
        candidate.trial_number,
        candidate.optuna_study_name,
        trial.state.name,
        outcome,
    )


def _fail_if_running(
    backend: Backend, trial_id: int, reason: str = queue.REAPED_REASON
) -> FrozenTrial:
    """Fail trial ``trial_id`` in Optuna if it is still RUNNING; return it as it is now."""
    trial = backend.storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return trial
    try:
        # The reason first: Optuna refuses attributes on a finished trial. If the worker's
        # tell wins the race in between, its state stands and ours is rejected below.
        backend.storage.set_trial_user_attr(trial_id, FAILURE_ATTR, reason)
        backend.storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # its worker told the result just now: that result stands
    return backend.storage.get_trial(trial_id)


def _failed_by_reaper(trial: FrozenTrial) -> bool:
    return (
        trial.state == TrialState.FAIL and trial.user_attrs.get(FAILURE_ATTR) == queue.REAPED_REASON
    )
