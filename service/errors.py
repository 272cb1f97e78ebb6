"""One error hierarchy for lstm-hpo.

Each error's docstring is its default message. The API maps these classes to HTTP status
codes in one place (``service.api.errors``); nothing below the API raises ``HTTPException``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class LstmHpoError(Exception):
    """lstm-hpo failed."""

    #: True when the same call may succeed if simply tried again (lock, lost connection).
    retryable: bool = False

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        super().__init__(self.message)


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of user input.

    ``loc`` is a dotted path such as ``space.dropout.high``; empty for the whole document.
    """

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


class InvalidSpec(LstmHpoError):
    """The study spec is invalid."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors) or self.__doc__)


class InvalidConfig(InvalidSpec):
    """The training config is invalid."""


class CheckpointMismatch(InvalidConfig):
    """The checkpoint's model does not fit the config's architecture."""

    def __init__(self, path: str, errors: Sequence[FieldError]) -> None:
        #: The checkpoint file.
        self.path = path
        super().__init__(errors)


class InvalidName(InvalidSpec):
    """The principal name is invalid."""


class PayloadTooLarge(LstmHpoError):
    """The request body is too large."""


class UnsupportedMediaType(LstmHpoError):
    """The request body's content type is not accepted here."""


class NotFound(LstmHpoError):
    """No such object."""


class StudyNotFound(NotFound):
    """No study with that id."""


class CheckpointMissing(NotFound):
    """The best trial has no stored checkpoint (a synthetic study trains none; or it was
    deleted: study.keep_checkpoints)."""


class Conflict(LstmHpoError):
    """The request conflicts with the current state."""


class NoCompletedTrials(Conflict):
    """The study has no completed trial yet; try again once one has finished."""


class StudyNotActive(Conflict):
    """The study is no longer queued or running."""


class StudyNotExtendable(Conflict):
    """The study failed (its spec, data or Optuna study is unusable): it cannot take more
    trials; fix what its error names and submit a new study."""


class QuotaExceeded(Conflict):
    """Quota of active (queued + running) studies reached: let one end, or cancel one."""

    #: Not retryable: trying again at once cannot succeed, a quota clears only when one of
    #: the principal's own studies ends (the API still says when to look again).
    retryable = False


class OptunaStudyDeleted(Conflict):
    """its Optuna study was deleted (outside lstm-hpo); its trials and results are gone"""


class JobCannotRun(LstmHpoError):
    """The study cannot run: its spec, data or Optuna study is unusable."""


class AlreadyExists(Conflict):
    """An object with that key already exists."""


class DataError(LstmHpoError):
    """The task's data could not be loaded."""


class MissingExtra(DataError):
    """An optional dependency is not installed."""


class InvalidCheckpoint(LstmHpoError):
    """The file is not a usable lstm-hpo checkpoint."""


class DatabaseUnavailable(LstmHpoError):
    """The database is unreachable or locked; the call can be retried."""

    retryable = True


class SchemaNotReady(LstmHpoError):
    """The database schema is missing or out of date: start the server or run `lstm-hpo migrate`."""

    retryable = True


class SingleHostOnly(LstmHpoError):
    """SQLite is for one machine: workers on another host already use this database. Point
    every worker and the server at PostgreSQL (LSTM_HPO_DATABASE_URL=postgresql+psycopg://...)."""


class Unauthorized(LstmHpoError):
    """Authentication required: send Authorization: Bearer <token> (lstm-hpo token create NAME)."""


class OpenModeRefused(LstmHpoError):
    """Refusing to serve without authentication on a non-loopback address."""


class LeaseLost(LstmHpoError):
    """This worker no longer owns the trial (it was reaped or the study was cancelled)."""


class TrialPreempted(LstmHpoError):
    """The worker was told to stop (SIGTERM or SIGUSR1): the trial stopped at a step
    boundary after its last checkpoint, and its slot is requeued without using a retry."""

    def __init__(self, signal_name: str, epochs_done: int | None = None) -> None:
        self.signal_name = signal_name
        self.epochs_done = epochs_done
        at = "" if epochs_done is None else f" after {epochs_done} epoch(s)"
        super().__init__(f"preempted ({signal_name}){at}; it resumes from its last checkpoint")


class TrialTimedOut(LstmHpoError):
    """A trial ran past ``study.trial_timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(trial_timeout_reason(timeout_s))


def trial_timeout_reason(timeout_s: float) -> str:
    """The failure reason of a trial stopped by ``study.trial_timeout_s`` (the worker's
    step check and its supervisor's kill of a hung process record the same words)."""
    shown = f"{timeout_s:g}"
    return f"exceeded trial_timeout_s ({shown} s)"


class NotConfirmable(Conflict):
    """The study cannot be confirmed as asked."""


class ConfirmationNotFound(NotFound):
    """The study has no confirmation: POST /v1/studies/{id}/confirm makes one."""
