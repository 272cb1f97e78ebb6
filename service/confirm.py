"""Confirm the winner: re-train a study's top-k configs over fresh seeds, as their own
linked study, and say whether the best is better than the runner-up beyond noise.

A search picks lucky configurations: one trial per config, and the best of many noisy
values is biased towards luck. :func:`confirm_study` submits a *confirmation study* (a
study like any other: its own job, its own Optuna study in the dashboard, every study
route takes its id) whose spec is derived from the original's: the same task and space,
``seed`` searched among ``seeds`` new seeds, every (config, seed) pair enqueued
(``study.enqueue``: the workers run them first, one trial each), random sampler, no
pruner, ``n_trials`` = top_k x seeds, and ``study.confirm_of`` naming the original, which
makes each trial score the test split too (the trial user attribute ``test_value``).

:func:`confirmation` computes, per config, the mean, standard deviation and 95% interval
(Student t, n = seeds) of the validation and test metric, ranks the configs by their mean
validation metric (the metric the study optimises; the test split is reported, never
selected on), and compares the best with the runner-up by a **paired t-test over
seeds** (two-sided, alpha 0.05) on each split; the validation split's decides
``better_beyond_noise``.

Why that test: a seed fixes the run's random streams (``seed_everything``: weight
initialisation, data order, dropout masks), so both configs trained with seed s share
whatever that seed's luck is; the per-seed difference cancels it, and a test on the
differences (paired) is far more sensitive than one on two independent samples. With 2-20
seeds the differences' mean is tested against Student's t with n - 1 degrees of freedom,
exact when the differences are normal. Wilcoxon's signed-rank test (no normality) cannot
reach p < 0.05 two-sided below 6 pairs (its smallest p at n = 5 is 0.0625), so with the
default 5 seeds it could never say "beyond noise". scipy is not a dependency of the
server (only of the ``datasets`` extra); the t distribution here is exact for whole
degrees of freedom (Abramowitz & Stegun 26.7.3-4, a finite series), and the unit tests
check it against ``scipy.stats``. Caveat: with top_k > 2 the two compared were chosen by
the same runs (best and second-best means), which makes the p-value somewhat optimistic.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from service import queue, studies
from service.auth import Principal
from service.errors import (
    ConfirmationNotFound,
    ConfirmationNotReady,
    FieldError,
    InvalidSpec,
    NotConfirmable,
    OptunaStudyDeleted,
    StudyNotFound,
)
from service.schemas import (
    BestConfirmationPublic,
    BestPublic,
    ComparisonPublic,
    ConfirmationPublic,
    ConfirmedConfigPublic,
    MetricSummaryPublic,
    PairedTestPublic,
    StudyPublic,
)
from service.search_space import (
    CONFIRM_DEFAULT_SEEDS,
    CONFIRM_DEFAULT_TOP_K,
    CONFIRM_SEEDS_RANGE,
    CONFIRM_TOP_K_RANGE,
    CategoricalDistribution,
    LSTMConfig,
    StudySettings,
    StudySpec,
    parse_spec,
    whole_number,
)
from service.states import (
    CONFIRMATION_ATTR,
    CONFIRMED_BY_PREFIX,
    NOTES_ATTR,
    TEST_METRICS_ATTR,
    TEST_VALUE_ATTR,
    JobState,
)

log = logging.getLogger(__name__)

DEFAULT_TOP_K = CONFIRM_DEFAULT_TOP_K
DEFAULT_SEEDS = CONFIRM_DEFAULT_SEEDS
TOP_K_RANGE = CONFIRM_TOP_K_RANGE
SEEDS_RANGE = CONFIRM_SEEDS_RANGE
#: A confirmation's seeds: the first whole numbers from here that none of the confirmed
#: study's trials trained with (deterministic: the same study gives the same seeds).
FIRST_SEED = 1000
#: The paired test's level (two-sided).
ALPHA = 0.05
METHOD = (
    "paired t-test over seeds (two-sided, alpha 0.05, Student t with n - 1 degrees of "
    "freedom) of best minus runner-up; configs ranked by mean validation metric; 95% "
    "intervals: mean +- t(0.975, n - 1) * sd / sqrt(n)"
)
_SEED = "seed"


# --------------------------------------------------------------------------------------
# Statistics: Student's t, exact for whole degrees of freedom
# --------------------------------------------------------------------------------------


def _t_central(t: float, df: int) -> float:
    """P(|T| <= |t|) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun
    26.7.3 for odd df, 26.7.4 for even: finite series in cos(theta), theta =
    atan(t / sqrt(df)))."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos, sin = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        term = total = cos if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= cos * cos * (2 * j) / (2 * j + 1)
            total += term
        central = 2.0 / math.pi * (theta + sin * total)
    else:
        term = total = 1.0
        for j in range(1, df // 2):
            term *= cos * cos * (2 * j - 1) / (2 * j)
            total += term
        central = sin * total
    return min(1.0, max(0.0, central))


def t_two_sided_p(t: float, df: int) -> float:
    """The two-sided p-value P(|T| >= |t|) of Student's t with ``df`` (a whole number >= 1)
    degrees of freedom."""
    if math.isnan(t):
        return math.nan
    return 1.0 - _t_central(t, df)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The t with P(|T| <= t) = ``confidence`` (for 0.95: the 0.975 quantile, 12.706 at
    df 1, 2.776 at df 4), by bisection on the exact distribution."""
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie in (0, 1)")
    low, high = 0.0, 1.0
    while _t_central(high, df) < confidence:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if _t_central(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and 95% interval of the mean of some values."""

    n: int
    mean: float | None
    sd: float | None
    ci95_low: float | None
    ci95_high: float | None


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values``: no mean without a value, no sd or interval below 2."""
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None, None)
    sd = statistics.stdev(values)
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``a - b`` over pairs."""

    n: int
    mean_difference: float | None
    ci95_low: float | None
    ci95_high: float | None
    #: None when the differences do not vary (or below 2 pairs).
    t: float | None
    df: int | None
    #: Two-sided; None below 2 pairs.
    p_value: float | None


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Student's paired t-test of ``a - b`` (pairs at the same index), two-sided:
    t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom (what
    ``scipy.stats.ttest_rel(a, b)`` computes). Differences that do not vary give p 0
    (a constant nonzero difference) or 1 (none)."""
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    summary = summarize(diffs)
    if summary.n < 2 or summary.mean is None or summary.sd is None:
        return PairedTest(summary.n, summary.mean, None, None, None, None, None)
    df = summary.n - 1
    if summary.sd == 0.0:
        p = 1.0 if summary.mean == 0.0 else 0.0
        return PairedTest(summary.n, summary.mean, summary.mean, summary.mean, None, df, p)
    t = summary.mean / (summary.sd / math.sqrt(summary.n))
    return PairedTest(
        summary.n,
        summary.mean,
        summary.ci95_low,
        summary.ci95_high,
        t,
        df,
        t_two_sided_p(t, df),
    )


# --------------------------------------------------------------------------------------
# The request, and the confirmation study
# --------------------------------------------------------------------------------------


def confirm_request(document: Any) -> tuple[int, int]:
    """``(top_k, seeds)`` of a confirm request body (``{"top_k": 3, "seeds": 5}``; either
    or the whole body may be left out: 3 and 5).

    Raises ``InvalidSpec`` naming the field: not a whole number, outside its range
    (top_k 1..20, seeds 2..20), or an unknown field.
    """
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        msg = 'the body must be a JSON object: {"top_k": 3, "seeds": 5}'
        raise InvalidSpec([FieldError("", msg)])
    errors = [
        FieldError(str(key), "unknown field (top_k, seeds)")
        for key in document
        if key not in ("top_k", "seeds")
    ]
    out: dict[str, int] = {}
    for name, default, (low, high), why in (
        ("top_k", DEFAULT_TOP_K, TOP_K_RANGE, "configs to confirm"),
        ("seeds", DEFAULT_SEEDS, SEEDS_RANGE, "a mean's interval and the paired test need 2"),
    ):
        value = whole_number(document.get(name, default))
        if value is None:
            errors.append(FieldError(name, "must be a whole number"))
        elif not low <= value <= high:
            errors.append(FieldError(name, f"must be within {low}..{high} ({why})"))
        else:
            out[name] = value
    if errors:
        raise InvalidSpec(errors)
    return out["top_k"], out["seeds"]


def refuse_confirm_marker(spec: StudySpec) -> None:
    """A submitted spec may not set ``study.confirm_of``: only :func:`confirm_study` makes
    confirmation studies. Raises ``InvalidSpec`` naming it."""
    if spec.study.confirm_of is not None:
        msg = "set by POST /v1/studies/{id}/confirm, not in a submitted spec"
        raise InvalidSpec([FieldError("study.confirm_of", msg)])


def confirm_study(
    backend: studies.Backend,
    job_id: str,
    top_k: int,
    seeds: int,
    *,
    principal: Principal,
    idempotency_key: str | None = None,
    keep_notify: bool = False,
) -> StudyPublic:
    """Submit the confirmation study of study ``job_id``: its ``top_k`` best distinct
    configs (params without ``seed``), each trained with ``seeds`` new seeds, through the
    same queue and workers. Returns the new study (``n_trials`` = top_k x seeds). With
    ``idempotency_key`` (``study.confirm``'s, :mod:`service.auto_confirm`), asking again
    gives the same confirmation study, never a second; ``keep_notify``: the confirmation
    tells the study's webhook too (``study.confirm``: nobody waits on it).

    The confirmation belongs to the study's owner, whoever asks (an admin may). Raises
    ``StudyNotFound`` (another principal's too); ``NotConfirmable`` (409) for a
    confirmation study, a multi-objective one, or fewer than ``top_k`` completed distinct
    configs; ``OptunaStudyDeleted`` (409); ``InvalidSpec`` (422) when top_k x seeds
    passes ``LSTM_HPO_MAX_TRIALS`` or the derived spec no longer validates (its data).
    """
    parent = queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)
    spec = studies.study_spec(parent)
    if spec.study.confirm_of is not None:
        raise NotConfirmable(
            f"study {job_id} is a confirmation (of study {spec.study.confirm_of}): "
            "confirm that study instead"
        )
    optuna_id = _optuna_id(backend, parent)
    if len(backend.storage.get_study_directions(optuna_id)) > 1:
        raise NotConfirmable(
            "confirm ranks one objective: this study has several (its best is a Pareto front)"
        )
    trials = studies.own_trials(backend.storage.get_all_trials(optuna_id, deepcopy=False))
    top, n_complete = _top_configs(trials, spec.direction, top_k)
    if len(top) < top_k:
        distinct = f" ({len(top)} distinct configs)" if len(top) != n_complete else ""
        raise NotConfirmable(
            f"study {job_id} has {n_complete} completed trial(s){distinct}: confirming the "
            f"top {top_k} needs {top_k}"
        )
    if top_k * seeds > backend.limits.max_trials:
        msg = (
            f"top_k x seeds = {top_k * seeds} trials, more than LSTM_HPO_MAX_TRIALS "
            f"({backend.limits.max_trials})"
        )
        raise InvalidSpec([FieldError("seeds", msg)])
    chosen = confirmation_seeds(_seeds_used(spec, trials), seeds)
    derived = parse_spec(
        confirmation_spec(spec, job_id, top, chosen, keep_notify=keep_notify), backend.limits
    )
    # The confirmation is part of the study's record: its owner's (in their list, their
    # quota, deleted with their studies), even when an admin asked for it.
    owner = principal if principal.name == parent.owner else Principal(parent.owner)
    study, _ = studies.submit_study(
        backend, derived, principal=owner, idempotency_key=idempotency_key
    )
    configs = [
        {"trial_number": t.number, "value": _value(t), "params": _without_seed(t.params)}
        for t in top
    ]
    numbers = ", ".join(str(t.number) for t in top)
    notes = [
        f"confirms study {job_id}: its top {top_k} config(s) (trials {numbers}) x seeds "
        f"{', '.join(map(str, chosen))}; each trial is scored on the validation and the "
        f"test split (GET /v1/studies/{study.id}/confirmation)"
    ]
    storage = backend.storage
    confirm_optuna_id = studies.optuna_study_id(backend, study.optuna_study_name)
    storage.set_study_user_attr(
        confirm_optuna_id,
        CONFIRMATION_ATTR,
        {
            "confirms": job_id,
            "top_k": top_k,
            "seeds": chosen,
            "configs": configs,
            # What it chose from: a study extended since has configs it never saw.
            "of_finished": parent.n_finished,
        },
    )
    storage.set_study_user_attr(confirm_optuna_id, NOTES_ATTR, notes)
    with suppress(KeyError):  # the original's Optuna study was deleted meanwhile
        storage.set_study_user_attr(
            optuna_id, CONFIRMED_BY_PREFIX + study.id, datetime.now(UTC).isoformat()
        )
    log.info("study %s: confirmation %s (top %d x %d seeds)", job_id, study.id, top_k, seeds)
    return studies.get_study(backend, study.id, principal=principal)


def confirmation_spec(
    spec: StudySpec,
    confirms: str,
    top: Sequence[FrozenTrial],
    seeds: Sequence[int],
    *,
    keep_notify: bool = False,
) -> dict[str, Any]:
    """The confirmation study's spec (a document for ``parse_spec``): ``spec``'s task and
    space with ``seed`` searched among ``seeds``; each of ``top``'s params x each seed
    enqueued, seed by seed; random sampler, no pruner, no timeout, warm start or
    webhook (``keep_notify``: the study's); ``study.confirm_of`` = ``confirms``."""
    doc = spec.model_dump(mode="json")
    doc["name"] = f"{(spec.name or spec.task.kind)[:92]}-confirm"
    doc["space"] = {**doc["space"], _SEED: {"type": "categorical", "choices": list(seeds)}}
    study = dict(doc["study"])
    # Not inherited: the sampler's seed, the search's time budget, its webhook, warm start,
    # constraints (a confirmed config runs, whatever its cost on this worker) and its own
    # confirm (a confirmation is not confirmed again).
    dropped = ["seed", "timeout_s", "warm_start_from", "constraints", "confirm"]
    for name in dropped if keep_notify else [*dropped, "notify"]:
        if name in study:
            study[name] = None
    if study.get("notify"):  # its end only: a new best among (config, seed) pairs means little
        on = [event for event in study["notify"]["on"] if event != "new_best"]
        study["notify"] = {**study["notify"], "on": on} if on else None
    study.update(
        n_trials=len(top) * len(seeds),
        sampler="random",
        pruner="none",
        pruner_warmup_epochs=StudySettings.model_fields["pruner_warmup_epochs"].default,
        # Seed by seed, every config: a confirmation cut short still has pairs to compare.
        enqueue=[{**_without_seed(t.params), _SEED: s} for s in seeds for t in top],
        confirm_of=confirms,
    )
    doc["study"] = study
    return doc


def confirmation_seeds(used: set[int], n: int) -> list[int]:
    """The first ``n`` whole numbers from :data:`FIRST_SEED` not in ``used``."""
    out: list[int] = []
    for seed in count(FIRST_SEED):
        if len(out) == n:
            return out
        if seed not in used:
            out.append(seed)
    raise AssertionError("unreachable")  # pragma: no cover


def _seeds_used(spec: StudySpec, trials: Sequence[FrozenTrial]) -> set[int]:
    """The seeds the study's trials trained with: searched (each trial's), or fixed."""
    fixed = spec.space.get(_SEED, LSTMConfig.model_fields[_SEED].default)
    used = {fixed} if isinstance(fixed, int) else set()
    return used | {t.params[_SEED] for t in trials if isinstance(t.params.get(_SEED), int)}


def _top_configs(
    trials: Sequence[FrozenTrial], direction: str, top_k: int
) -> tuple[list[FrozenTrial], int]:
    """The best trial of each of the ``top_k`` best distinct configs (params without
    ``seed``), and how many trials completed with a finite value."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and _value(t) is not None]
    done.sort(key=lambda t: _value(t) or 0.0, reverse=direction == "maximize")
    top: list[FrozenTrial] = []
    seen: set[str] = set()
    for trial in done:
        key = _config_key(trial.params)
        if key not in seen and len(top) < top_k:
            seen.add(key)
            top.append(trial)
    return top, len(done)


def _value(trial: FrozenTrial) -> float | None:
    """A single-objective trial's finite value; None otherwise."""
    values = trial.values
    if not values or len(values) != 1 or not math.isfinite(values[0]):
        return None
    return float(values[0])


def _without_seed(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != _SEED}


def _config_key(params: Mapping[str, Any]) -> str:
    """Which config a trial trained, whatever its seed."""
    return json.dumps(_without_seed(params), sort_keys=True, default=str)


def _optuna_id(backend: studies.Backend, job: queue.JobRecord) -> int:
    try:
        return studies.optuna_study_id(backend, job.optuna_study_name)
    except OptunaStudyDeleted:
        studies.mark_optuna_study_deleted(backend, job.id)
        raise


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


def confirmed_best(
    backend: studies.Backend, job_id: str, *, principal: Principal
) -> list[BestPublic]:
    """The config the newest confirmation of study ``job_id`` ranks first, as ``best``
    gives a config: the confirmed study's trial whose config won, with its
    ``confirmation``. What ``best --confirmed`` answers: the
    config with the best mean over new seeds, not the search's luckiest run. The newest
    confirmation that has succeeded: a newer one cancelled or still running is passed over.

    Raises ``StudyNotFound``; ``ConfirmationNotFound`` for a study never confirmed;
    ``ConfirmationNotReady`` (409) while none of its confirmations has succeeded, or when
    no config of it completed a seed; ``NotConfirmable`` (409) on a confirmation study."""
    job = queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)
    if _is_confirmation(job):
        # Its answer is a trial of the study it confirms: asked there, nothing is mixed up.
        confirms = job.spec["study"]["confirm_of"]
        raise NotConfirmable(
            f"study {job_id} is a confirmation: ask the study it confirms (lstm-hpo best "
            f"{confirms} --confirmed)"
        )
    found = _newest_confirmation(backend, job, principal, succeeded=True)
    if found is None:
        pending = _newest_confirmation(backend, job, principal)
        if pending is not None:
            raise ConfirmationNotReady(
                f"its confirmation {pending.id} is {pending.state}: its winner is known "
                "once it has succeeded (lstm-hpo status ID)"
            )
        if (job.spec.get("study") or {}).get("confirm") and job.state != JobState.SUCCEEDED:
            raise ConfirmationNotReady(
                f"study {job_id} is {job.state}: its study.confirm confirms it once it has "
                "succeeded"
            )
        raise ConfirmationNotFound(
            f"study {job_id} has no confirmation: lstm-hpo confirm ID (POST /v1/studies/"
            f"{job_id}/confirm), or study.confirm in its spec, makes one"
        )
    result = _result(backend, found)
    winner = next((c for c in result.configs if c.rank == 1), None)
    if winner is None or winner.trial_number is None or winner.validation.n == 0:
        raise ConfirmationNotReady(f"no config of confirmation {found.id} completed a seed")
    (best,) = studies.trial_configs(
        backend, result.confirms, [winner.trial_number], principal=principal
    )
    return [best.model_copy(update={"confirmation": _best_view(result, winner.rank)})]


def own_result(backend: studies.Backend, job_id: str) -> ConfirmationPublic | None:
    """What confirmation study ``job_id`` found (so far), or None for any other study: a
    webhook's payload carries it, so its receiver learns the winner and the verdict."""
    job = queue.get_job(backend.sessions, job_id)
    return _result(backend, job) if _is_confirmation(job) else None


def confirmation(
    backend: studies.Backend, job_id: str, *, principal: Principal
) -> ConfirmationPublic:
    """The statistics of confirmation study ``job_id``, or of the newest confirmation of
    study ``job_id`` (so far, while it runs). ``StudyNotFound`` for an unknown study (or
    another principal's); ``ConfirmationNotFound`` for a study never confirmed."""
    job = queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)
    if not _is_confirmation(job):
        found = _newest_confirmation(backend, job, principal)
        if found is None:
            raise ConfirmationNotFound(
                f"study {job_id} has no confirmation: POST /v1/studies/{job_id}/confirm makes one"
            )
        job = found
    return _result(backend, job)


def with_confirmation(
    backend: studies.Backend, job_id: str, best: list[BestPublic], *, principal: Principal
) -> list[BestPublic]:
    """``best`` (``studies.best_configs`` of study ``job_id``) with what its newest
    confirmation found (on a confirmation study: its own), each entry with its config's
    rank there. Unchanged when there is none; a confirmation that cannot be read (its
    Optuna study deleted) is left out rather than failing ``best``."""
    if not best:
        return best
    job = queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)
    own = _is_confirmation(job)
    try:
        found = job if own else _newest_confirmation(backend, job, principal)
        if found is None:
            return best
        result = _result(backend, found)
        if own:  # its trials' configs
            ranks = _trial_ranks(backend, found, result)
        else:  # the confirmed trials
            ranks = {c.trial_number: c.rank for c in result.configs if c.trial_number is not None}
    except (OptunaStudyDeleted, StudyNotFound):
        return best
    views = [_best_view(result, ranks.get(b.trial_number)) for b in best]
    if not own and (stale := _stale(backend, found, job)):
        views = [v.model_copy(update={"verdict": f"{v.verdict} {stale}"}) for v in views]
    return [b.model_copy(update={"confirmation": v}) for b, v in zip(best, views, strict=True)]


def _stale(backend: studies.Backend, found: queue.JobRecord, job: queue.JobRecord) -> str:
    """What to add to the verdict of confirmation ``found`` when study ``job`` has finished
    trials it never chose from (extended since); empty otherwise."""
    attr = backend.storage.get_study_user_attrs(_optuna_id(backend, found)).get(CONFIRMATION_ATTR)
    of = attr.get("of_finished") if isinstance(attr, Mapping) else None
    if not isinstance(of, int) or job.n_finished <= of:
        return ""
    return (
        f"(It chose from the study's first {of} finished trials; the study has "
        f"{job.n_finished} now: confirm it again to rank its newer configs.)"
    )


def _is_confirmation(job: queue.JobRecord) -> bool:
    """Whether a job is a confirmation study (its stored spec, validated when stored, read
    without parsing it again: ``best`` asks this of every study)."""
    study = job.spec.get("study")
    return isinstance(study, Mapping) and study.get("confirm_of") is not None


def _newest_confirmation(
    backend: studies.Backend,
    job: queue.JobRecord,
    principal: Principal,
    *,
    succeeded: bool = False,
) -> queue.JobRecord | None:
    """The newest confirmation study of ``job`` the principal may see (``succeeded``:
    the newest that has succeeded), if any."""
    try:
        attrs = backend.storage.get_study_user_attrs(_optuna_id(backend, job))
    except OptunaStudyDeleted:
        return None
    made = sorted(
        (
            (str(when), key.removeprefix(CONFIRMED_BY_PREFIX))
            for key, when in attrs.items()
            if key.startswith(CONFIRMED_BY_PREFIX)
        ),
        reverse=True,
    )
    for _, confirm_id in made:
        try:
            found = queue.get_job(backend.sessions, confirm_id, owner=principal.owner_filter)
        except StudyNotFound:
            continue  # deleted since, or another principal's (an admin confirmed it)
        if not succeeded or found.state == JobState.SUCCEEDED:
            return found
    return None


@dataclass(frozen=True)
class _Config:
    trial_number: int | None
    search_value: float | None
    params: dict[str, Any]


def _confirmed(spec: StudySpec, attr: Any) -> tuple[list[_Config], list[int]]:
    """The configs and seeds a confirmation study trains: what :func:`confirm_study` put on
    its Optuna study, else (a crash right after the submit) its spec's enqueued entries."""
    if isinstance(attr, Mapping) and isinstance(attr.get("configs"), list):
        configs = [
            _Config(c.get("trial_number"), c.get("value"), dict(c.get("params") or {}))
            for c in attr["configs"]
        ]
        return configs, [int(s) for s in attr.get("seeds") or ()]
    seed_dist = spec.space.get(_SEED)
    choices = seed_dist.choices if isinstance(seed_dist, CategoricalDistribution) else []
    seeds = [s for s in choices if isinstance(s, int)]
    configs, seen = [], set()
    for entry in spec.study.enqueue or ():
        key = _config_key(entry)
        if key not in seen:
            seen.add(key)
            configs.append(_Config(None, None, _without_seed(entry)))
    return configs, seeds


@dataclass
class _Runs:
    """One confirmed config's values by seed."""

    config: _Config
    validation: dict[int, float]
    test: dict[int, float]
    #: Every test metric's values by seed, by the metric's name.
    test_metrics: dict[str, dict[int, float]] = field(default_factory=dict)


def _result(backend: studies.Backend, job: queue.JobRecord) -> ConfirmationPublic:
    spec = studies.study_spec(job)
    optuna_id = _optuna_id(backend, job)
    attr = backend.storage.get_study_user_attrs(optuna_id).get(CONFIRMATION_ATTR)
    configs, seeds = _confirmed(spec, attr)
    runs = _runs(configs, seeds, backend.storage.get_all_trials(optuna_id, deepcopy=False))
    direction = spec.direction
    sign = 1.0 if direction == "minimize" else -1.0

    def order(item: tuple[int, _Runs]) -> tuple[int, float, int]:
        i, run = item
        mean = summarize(list(run.validation.values())).mean
        return (0, sign * mean, i) if mean is not None else (1, 0.0, i)

    ranked = [run for _, run in sorted(enumerate(runs), key=order)]
    public = [_config_public(rank, run, seeds) for rank, run in enumerate(ranked, start=1)]
    comparison = _compare(ranked, public, direction) if len(ranked) >= 2 else None
    confirms = spec.study.confirm_of or ""
    return ConfirmationPublic(
        id=job.id,
        confirms=confirms,
        state=job.state,
        n_trials=job.n_trials,
        n_finished=job.n_finished,
        metric=spec.metric.name,
        direction=direction,
        top_k=len(configs),
        seeds=seeds,
        configs=public,
        comparison=comparison,
        verdict=_verdict(job, spec.metric.name, public, comparison, len(seeds)),
        method=METHOD,
    )


def _runs(
    configs: Sequence[_Config], seeds: Sequence[int], trials: Sequence[FrozenTrial]
) -> list[_Runs]:
    """Each config's completed values by seed (a retry's trial counts for its seed)."""
    index = {_config_key(c.params): i for i, c in enumerate(configs)}
    runs = [_Runs(c, {}, {}) for c in configs]
    for trial in studies.own_trials(trials):
        value = _value(trial)
        seed = trial.params.get(_SEED)
        i = index.get(_config_key(trial.params))
        if trial.state != TrialState.COMPLETE or value is None or i is None:
            continue
        if not isinstance(seed, int) or seed not in seeds:
            continue
        runs[i].validation.setdefault(seed, value)
        test = trial.user_attrs.get(TEST_VALUE_ATTR)
        if isinstance(test, int | float) and math.isfinite(test):
            runs[i].test.setdefault(seed, float(test))
        metrics = trial.user_attrs.get(TEST_METRICS_ATTR)
        for name, value in (metrics if isinstance(metrics, dict) else {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                runs[i].test_metrics.setdefault(str(name), {}).setdefault(seed, float(value))
    return runs


def _trial_ranks(
    backend: studies.Backend, job: queue.JobRecord, result: ConfirmationPublic
) -> dict[int, int]:
    """A confirmation study's trial number -> its config's rank."""
    rank_of = {_config_key(c.params): c.rank for c in result.configs}
    trials = backend.storage.get_all_trials(_optuna_id(backend, job), deepcopy=False)
    return {t.number: rank_of[key] for t in trials if (key := _config_key(t.params)) in rank_of}


def _metric_public(values: Mapping[int, float]) -> MetricSummaryPublic:
    summary = summarize(list(values.values()))
    return MetricSummaryPublic(
        n=summary.n,
        mean=summary.mean,
        sd=summary.sd,
        ci95_low=summary.ci95_low,
        ci95_high=summary.ci95_high,
        values=dict(sorted(values.items())),
    )


def _config_public(rank: int, run: _Runs, seeds: Sequence[int]) -> ConfirmedConfigPublic:
    return ConfirmedConfigPublic(
        rank=rank,
        trial_number=run.config.trial_number,
        search_value=run.config.search_value,
        params=run.config.params,
        validation=_metric_public(run.validation),
        test=_metric_public(run.test),
        test_metrics={name: _metric_public(v) for name, v in sorted(run.test_metrics.items())},
        missing_seeds=[s for s in seeds if s not in run.validation],
    )


def _paired_public(
    split: str, best: Mapping[int, float], runner_up: Mapping[int, float], direction: str
) -> PairedTestPublic:
    common = sorted(set(best) & set(runner_up))
    test = paired_t_test([best[s] for s in common], [runner_up[s] for s in common])
    favours = test.mean_difference is not None and (
        test.mean_difference < 0 if direction == "minimize" else test.mean_difference > 0
    )
    return PairedTestPublic(
        split="validation" if split == "validation" else "test",
        n=test.n,
        mean_difference=test.mean_difference,
        ci95_low=test.ci95_low,
        ci95_high=test.ci95_high,
        t=test.t,
        df=test.df,
        p_value=test.p_value,
        significant=test.p_value is not None and test.p_value < ALPHA and favours,
    )


def _margin(best: float | None, runner_up: float | None, direction: str) -> float | None:
    if best is None or runner_up is None:
        return None
    return runner_up - best if direction == "minimize" else best - runner_up


def _compare(
    ranked: Sequence[_Runs], public: Sequence[ConfirmedConfigPublic], direction: str
) -> ComparisonPublic | None:
    best, runner_up = public[0], public[1]
    if best.validation.n == 0 or runner_up.validation.n == 0:
        return None
    validation = _paired_public("validation", ranked[0].validation, ranked[1].validation, direction)
    return ComparisonPublic(
        best_trial_number=best.trial_number,
        runner_up_trial_number=runner_up.trial_number,
        margin=_margin(best.validation.mean, runner_up.validation.mean, direction),
        test_margin=_margin(best.test.mean, runner_up.test.mean, direction),
        validation=validation,
        test=_paired_public("test", ranked[0].test, ranked[1].test, direction),
        better_beyond_noise=validation.significant,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _name(config: ConfirmedConfigPublic) -> str:
    return (
        f"trial {config.trial_number}'s config"
        if config.trial_number is not None
        else (f"config {config.rank}")
    )


def _verdict(
    job: queue.JobRecord,
    metric: str,
    configs: Sequence[ConfirmedConfigPublic],
    comparison: ComparisonPublic | None,
    n_seeds: int,
) -> str:
    """What the confirmation found, in one paragraph."""
    prefix = (
        ""
        if job.state.is_terminal
        else (f"{job.state}, {job.n_finished} of {job.n_trials} trials finished; so far: ")
    )
    if not configs or configs[0].validation.n == 0:
        return prefix + "no confirmation trial has completed yet"
    best = configs[0]
    v = best.validation
    head = (
        f"{_name(best)} is best: {metric} {_fmt(v.mean)} +- {_fmt(v.sd)} (mean +- sd over "
        f"{v.n} of {n_seeds} seeds; test {_fmt(best.test.mean)})"
    )
    if len(configs) == 1:
        return prefix + head + "; no comparison: only one config was confirmed (top_k 1)"
    runner = configs[1]
    if comparison is None:
        return prefix + head + f"; no comparison: {_name(runner)} has no completed seed"
    paired = comparison.validation
    versus = (
        f"; vs {_fmt(runner.validation.mean)} for {_name(runner)}, better by "
        f"{_fmt(comparison.margin)}"
    )
    if paired.p_value is None:
        return prefix + head + versus + f"; too few paired seeds ({paired.n}) for a test"
    if comparison.better_beyond_noise:
        call = f"beyond noise (paired t-test over {paired.n} seeds: p = {paired.p_value:.3g})"
    else:
        call = (
            f"within noise (paired t-test over {paired.n} seeds: p = {paired.p_value:.3g}): "
            "the two are as good as these seeds can tell"
        )
    test = comparison.test
    on_test = (
        f"; on the test split: better by {_fmt(comparison.test_margin)}"
        + (f" (p = {test.p_value:.3g})" if test.p_value is not None else "")
        if comparison.test_margin is not None
        else ""
    )
    return prefix + head + versus + ", " + call + on_test


def _best_view(result: ConfirmationPublic, rank: int | None) -> BestConfirmationPublic:
    comparison = result.comparison
    winner = result.configs[0] if result.configs and result.configs[0].validation.n else None
    return BestConfirmationPublic(
        study_id=result.id,
        state=result.state,
        n_trials=result.n_trials,
        n_finished=result.n_finished,
        winner_trial_number=winner.trial_number if winner else None,
        runner_up_trial_number=comparison.runner_up_trial_number if comparison else None,
        margin=comparison.margin if comparison else None,
        test_margin=comparison.test_margin if comparison else None,
        p_value=comparison.validation.p_value if comparison else None,
        better_beyond_noise=comparison.better_beyond_noise
        if comparison and comparison.validation.p_value is not None
        else None,
        rank=rank,
        verdict=result.verdict,
    )
