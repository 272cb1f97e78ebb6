"""API output models (``*Public``). ORM rows and Optuna objects never leave the service."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from service.states import JobState, TrialState

T = TypeVar("T")


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class TrialCounts(_Public):
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0


#: A study id is 32 lowercase hex digits (uuid4().hex); any 1..32 of its first digits are a
#: short id (``GET /v1/studies?id_prefix=``), as ``docker`` and ``git`` take one.
STUDY_ID_LENGTH = 32
ID_PREFIX_PATTERN = r"^[0-9a-f]{1,32}$"


class StudyPublic(_Public):
    """One study as the API shows it."""

    id: str
    name: str
    state: JobState
    task: str
    metric: str
    direction: Literal["minimize", "maximize"]
    n_trials: int
    #: Finished trials: complete + pruned + failed that are not retried. Ends at n_trials.
    n_finished: int
    counts: TrialCounts
    best_value: float | None = None
    best_trial_number: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    elapsed_s: float | None = None
    dashboard_url: str
    optuna_study_name: str
    #: A multi-objective study's objectives (``study.objectives``); None: the metric alone.
    objectives: list[str] | None = None
    error: str | None = None
    spec: dict[str, Any] | None = None
    #: What the submit did that the spec alone does not say (rows of a CSV series dropped
    #: for a missing value, warm start's dropped parameters); in the answers about one
    #: study, not in lists.
    notes: list[str] | None = None


class TrialPublic(_Public):
    number: int
    state: TrialState
    params: dict[str, Any]
    #: The task metric's value (in a multi-objective study too).
    value: float | None = None
    #: A multi-objective study's values, in ``study.objectives`` order.
    values: list[float] | None = None
    duration_s: float | None = None
    #: When a worker started the trial and when it finished (UTC; Optuna's datetime_start /
    #: datetime_complete): best-so-far against wall time, trials per hour.
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: epoch -> validation metric, as reported to the pruner (null where NaN/inf).
    intermediate_values: dict[int, float | None]
    failure_reason: str | None = None
    #: The trial this one retries (same parameters), when its worker died.
    retry_of: int | None = None
    #: A retry that resumed from its chain's checkpoint: the (0-based) epoch it started at;
    #: its ``intermediate_values`` before it come from the checkpoint.
    resumed_from_epoch: int | None = None
    config: dict[str, Any] | None = None


class BestPublic(_Public):
    #: The task metric's value.
    value: float
    trial_number: int
    #: The resolved config: `lstm-hpo train` takes it as it is.
    config: dict[str, Any]
    #: A multi-objective study (``best`` is then its Pareto front): objective -> value.
    values: dict[str, float] | None = None
    #: The study's newest confirmation (``POST /v1/studies/{id}/confirm``), or on a
    #: confirmation study its own: which config won it, by how much, and this one's rank.
    confirmation: BestConfirmationPublic | None = None


class Page(_Public, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class HealthPublic(_Public):
    status: Literal["ok"]
    version: str
    database: str
    schema_revision: str | None


class EstimatePublic(_Public):
    """The cost of the most expensive config a spec allows (``service.estimate``): its
    parameters and the memory of one float32 training step, and whether it fits a worker."""

    params: int
    #: What the forward pass keeps for the backward pass, plus the backward's own buffers.
    activation_bytes: int
    #: Weights + gradients + optimizer state + working copies + activations.
    total_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    #: The config estimated (a resolved config): every searched value at its costliest.
    config: dict[str, Any]
    #: Whether ``total_bytes`` fits ``limit_bytes``; null when no limit is set.
    fits: bool | None
    #: A worker's memory (``LSTM_HPO_WORKER_MEMORY_GB``) in bytes; null when not set.
    limit_bytes: int | None
    #: How the task's shape was found (e.g. the vocabulary read from the data file).
    shape: str | None


class FieldErrorPublic(_Public):
    """One bad field: its dotted path (``space.dropout.high``; empty for the whole body)."""

    loc: str
    msg: str


class ErrorPublic(_Public):
    """Every error answer of the API (4xx and 5xx alike)."""

    detail: str
    #: The error class, e.g. ``InvalidSpec``, ``StudyNotFound``, ``Unauthorized``.
    error: str
    #: With 422: every bad field.
    errors: list[FieldErrorPublic] | None = None


class RunningTrialPublic(_Public):
    """One trial that is training now (``GET /v1/studies/{id}/progress``)."""

    number: int
    started_at: datetime | None = None
    #: Seconds since it started (its worker's clock may differ from the server's a little).
    elapsed_s: float | None = None
    #: Epochs reported to the pruner so far (the last reported 0-based step + 1); 0 before
    #: the first.
    epoch: int
    #: The trial's ``max_epochs`` when its config records one.
    max_epochs: int | None = None
    #: The last intermediate value (null before the first, or where NaN/inf).
    last_value: float | None = None


class ProgressPublic(_Public):
    """How far a study is and when it should end (``GET /v1/studies/{id}/progress``)."""

    id: str
    state: JobState
    n_trials: int
    n_finished: int
    running: list[RunningTrialPublic]
    #: Mean wall time in seconds of the finished trials (complete, pruned, failed) that
    #: recorded one; null before the first has finished.
    mean_trial_s: float | None = None
    #: Seconds until the last trial should finish: see ``eta_basis``. Null when no trial
    #: has finished yet or the study has ended.
    eta_s: float | None = None
    #: How ``eta_s`` was computed, in words.
    eta_basis: str
    #: ``study.timeout_s`` of the spec (null: no timeout).
    timeout_s: float | None = None
    #: Seconds of ``timeout_s`` left: counts from the first claimed trial (the whole
    #: timeout while the study is queued); 0 once past; null without a timeout or once the
    #: study has ended.
    timeout_left_s: float | None = None
    #: True when the timeout should stop the study before its trials are done.
    timeout_first: bool = False


# --------------------------------------------------------------------------------------
# Confirm the winner (service.confirm)


class MetricSummaryPublic(_Public):
    """One metric of one config over the confirmation's seeds (those with a finite value)."""

    n: int
    mean: float | None = None
    #: Sample standard deviation (n - 1 in the denominator); null below 2 seeds.
    sd: float | None = None
    #: 95% interval of the mean: mean +- t(0.975, n - 1) * sd / sqrt(n) (Student t); null
    #: below 2 seeds.
    ci95_low: float | None = None
    ci95_high: float | None = None
    #: seed -> value.
    values: dict[int, float]


class ConfirmedConfigPublic(_Public):
    """One confirmed config: its search result and its statistics over the new seeds."""

    #: 1: the best mean validation metric.
    rank: int
    #: The confirmed study's trial whose config this is (null if unknown).
    trial_number: int | None = None
    #: That trial's value in the search.
    search_value: float | None = None
    #: Its parameters (Optuna's names), without ``seed``.
    params: dict[str, Any]
    validation: MetricSummaryPublic
    test: MetricSummaryPublic
    #: Every test-split metric by its name (``test_loss``, ``test_acc`` for classify, ...):
    #: what a task reports beside the ranked one (accuracy of a cross-entropy search).
    test_metrics: dict[str, MetricSummaryPublic] = {}
    #: Seeds with no completed trial (yet): failed, or not run yet.
    missing_seeds: list[int]


class PairedTestPublic(_Public):
    """The paired t-test over seeds of best minus runner-up on one split."""

    split: Literal["validation", "test"]
    #: Seeds both configs completed (the pairs).
    n: int
    #: Mean over those seeds of best minus runner-up (negative favours the best when
    #: minimising).
    mean_difference: float | None = None
    #: 95% interval of that mean difference (Student t, n - 1 degrees of freedom).
    ci95_low: float | None = None
    ci95_high: float | None = None
    #: The t statistic (null when the differences do not vary, or below 2 pairs).
    t: float | None = None
    df: int | None = None
    #: Two-sided p-value; null below 2 pairs.
    p_value: float | None = None
    #: p < 0.05 and the difference favours the best.
    significant: bool = False


class ComparisonPublic(_Public):
    """The best config against the runner-up."""

    best_trial_number: int | None = None
    runner_up_trial_number: int | None = None
    #: How much better the best's mean validation metric is than the runner-up's, in the
    #: metric's units (>= 0, the study's direction's way).
    margin: float | None = None
    #: The same on the test split (negative: the test split disagrees).
    test_margin: float | None = None
    validation: PairedTestPublic
    test: PairedTestPublic
    #: The validation split's paired test says the best is better (p < 0.05).
    better_beyond_noise: bool


class ConfirmationPublic(_Public):
    """A confirmation study's result (``GET /v1/studies/{id}/confirmation``)."""

    #: The confirmation study (every study route takes it).
    id: str
    #: The study whose top configs it re-trains.
    confirms: str
    state: JobState
    n_trials: int
    n_finished: int
    metric: str
    direction: Literal["minimize", "maximize"]
    top_k: int
    #: The seeds every config trained with (none of them used by the confirmed study).
    seeds: list[int]
    #: Best mean validation metric first.
    configs: list[ConfirmedConfigPublic]
    #: The best against the runner-up; null with one config, or before both have a seed.
    comparison: ComparisonPublic | None = None
    #: What it found, in words.
    verdict: str
    #: The test, named.
    method: str


class BestConfirmationPublic(_Public):
    """What a study's confirmation found, as ``best`` tells it."""

    #: The confirmation study.
    study_id: str
    state: JobState
    n_trials: int
    n_finished: int
    #: The confirmed study's trial whose config won (best mean validation metric).
    winner_trial_number: int | None = None
    runner_up_trial_number: int | None = None
    #: By how much the winner's mean validation metric beats the runner-up's (>= 0).
    margin: float | None = None
    test_margin: float | None = None
    #: The paired t-test's two-sided p-value over seeds (validation split).
    p_value: float | None = None
    #: Null: no comparison (one config, or too few seeds completed yet).
    better_beyond_noise: bool | None = None
    #: This config's rank in the confirmation (1: it won); null when it was not confirmed.
    rank: int | None = None
    verdict: str


BestPublic.model_rebuild()
