"""The one vocabulary of states: jobs, trial slots (leases), trial outcomes, and their names
in Optuna and in the API. A leaf module: it imports nothing of ours and not Optuna, so the
queue, the worker, the schemas, the routes and the client all read the same names.

Also the names of the attributes the service writes on Optuna studies and trials, so the
domain (``studies``) and the reaper read what the worker (``training.objective``) writes
without importing the training package.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Lifecycle of a search job (one Optuna study): the API's study ``state``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        """Queued or running: the job may still take trial slots."""
        return self in ACTIVE_JOB_STATES

    @property
    def is_terminal(self) -> bool:
        """Succeeded, failed or cancelled: nothing of the job runs any more."""
        return not self.is_active


ACTIVE_JOB_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
TERMINAL_JOB_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
)


class TrialOutcome(StrEnum):
    """How a trial that ran ended; a finished lease's state and the Optuna state it is told."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"

    @property
    def optuna_name(self) -> str:
        """The ``optuna.trial.TrialState`` member name (``TrialState[outcome.optuna_name]``)."""
        return _OPTUNA_NAMES[self]


_OPTUNA_NAMES = {
    TrialOutcome.COMPLETE: "COMPLETE",
    TrialOutcome.PRUNED: "PRUNED",
    TrialOutcome.FAILED: "FAIL",
}


class LeaseState(StrEnum):
    """Lifecycle of one claimed trial slot (a row of ``trial_leases``)."""

    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    #: The worker stopped heartbeating; the reaper took the slot back.
    REAPED = "reaped"
    #: Its worker was told to stop (SIGTERM / SIGUSR1) and gave the slot back: requeued at
    #: once, and its retry does not count against ``study.max_retries``.
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"


class TrialState(StrEnum):
    """A trial's state as the API shows it (``GET /v1/studies/{id}/trials``)."""

    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    WAITING = "waiting"

    @classmethod
    def from_optuna(cls, optuna_name: str) -> TrialState:
        """The API name of an ``optuna.trial.TrialState`` member name (``"FAIL"`` -> failed)."""
        return _FROM_OPTUNA.get(optuna_name, cls.FAILED)


_FROM_OPTUNA = {
    "RUNNING": TrialState.RUNNING,
    "COMPLETE": TrialState.COMPLETE,
    "PRUNED": TrialState.PRUNED,
    "FAIL": TrialState.FAILED,
    "WAITING": TrialState.WAITING,
}

# --------------------------------------------------------------------------------------
# Attribute names on Optuna records (what optuna-dashboard shows as user attributes)

#: Study: the id of our job row (the other half of the study).
JOB_ID_ATTR = "lstm_hpo_job_id"
#: Study: what the submit did that the user should know (warm start's dropped params...).
NOTES_ATTR = "lstm_hpo:notes"
#: Trial: True on a WAITING trial enqueued at submit from ``study.enqueue`` (never on a
#: retry's copy): a fresh slot runs these first, lowest trial number first.
ENQUEUED_ATTR = "lstm_hpo:enqueued"
#: Trial: with ``ENQUEUED_ATTR``, its index in ``study.enqueue``.
ENQUEUE_INDEX_ATTR = "lstm_hpo:enqueue_index"
#: Trial: a COMPLETE trial copied at submit from an earlier study (``study.warm_start_from``)
#: into the sampler's history: that study's id. Never run; not one of the study's trials.
WARM_START_FROM_ATTR = "lstm_hpo:warm_start_from"
#: Trial: with ``WARM_START_FROM_ATTR``, its number in that study.
WARM_START_TRIAL_ATTR = "lstm_hpo:warm_start_trial"
#: Trial: its resolved config (``{task, params}``), what `lstm-hpo train` takes.
CONFIG_ATTR = "config"
#: Trial: why it failed or was pruned, for people.
FAILURE_ATTR = "failure_reason"
#: Trial: trivial predictors' validation metric values.
BASELINES_ATTR = "val_baselines"
#: Trial: every validation metric at its best epoch (the ranked one and those beside it).
VAL_METRICS_ATTR = "val_metrics"
#: Trial: set on a retry, the number of the trial (same params) whose worker died.
RETRY_OF_ATTR = "retry_of"
#: Trial: set on a retry, the number of the first trial of its retry chain (the trial
#: whose checkpoints every retry of it resumes from; ``service.artifacts``).
ORIGINAL_TRIAL_ATTR = "original_trial"
#: Trial: set on a retry that resumed from a checkpoint, the (0-based) epoch it resumed at.
RESUMED_FROM_ATTR = "resumed_from_epoch"
#: Trial: set on a trial whose worker was preempted, the signal's name (``SIGTERM``); the
#: trial is FAIL with the reason, and its retry (same params) resumes from its checkpoint.
PREEMPTED_ATTR = "preempted"
#: Trial of a confirmation study (``study.confirm_of``, :mod:`service.confirm`): its metric
#: on the test split (its value stays the validation metric).
TEST_VALUE_ATTR = "test_value"
#: Trial of a confirmation study: every test-split metric by its logged name
#: (``test_loss``, ``test_acc``, ...): what a task reports beside the ranked one.
TEST_METRICS_ATTR = "test_metrics"
#: Study: on a confirmation study, what it confirms (the original study's id, the seeds,
#: and each confirmed config's trial number, search value and params).
CONFIRMATION_ATTR = "lstm_hpo:confirmation"
#: Study: on a confirmed study, one attribute per confirmation (this prefix + its id), the
#: time it was made (ISO 8601, UTC): ``best`` reports the newest.
CONFIRMED_BY_PREFIX = "lstm_hpo:confirmed_by:"
