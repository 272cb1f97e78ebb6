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
        self.message = message or self.default_message()
        super().__init__(self.message)

    @classmethod
    def default_message(cls) -> str:
        """The class's docstring on one line: its breaks and indentation are not the
        message's (a 404's detail read "trains none;\n    or it was deleted")."""
        return " ".join((cls.__doc__ or cls.__name__).split())


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
        super().__init__("; ".join(str(e) for e in self.errors) or self.default_message())


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


class AmbiguousStudyId(LstmHpoError):
    """A short study id that starts more than one study's id (client side: give more digits)."""


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


class NotPositive(DataError):
    """A value of the series that ``task.transform: log`` cannot take (0 or negative)."""


class InvalidCheckpoint(LstmHpoError):
    """The file is not a usable lstm-hpo checkpoint."""


class DatabaseUnavailable(LstmHpoError):
    """The database is unreachable or locked; the call can be retried."""

    retryable = True


class DatabaseUnusable(LstmHpoError):
    """The database cannot be used as configured; waiting will not help."""

    # A SQLite file whose directory cannot be created (a path under /proc, a read-only
    # mount): unlike DatabaseUnavailable, no worker retries it.


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


class ConfirmationNotReady(Conflict):
    """The study's confirmation has not succeeded yet: its winner is not known."""


# --------------------------------------------------------------------------------------
# What the Python client (service.client) raises for the server's answers.


class ApiError(LstmHpoError):
    """The server answered with an error."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        errors: Sequence[FieldError] = (),
        error: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        #: The HTTP status; 0 when no answer came (:class:`ServerUnreachable`).
        self.status_code = status_code
        #: The server's message (its ``detail``), or the body's text from something else
        #: on the way (a proxy).
        self.detail = message
        #: The server's error class (``StudyNotFound``, ``NoCompletedTrials``, ...); None
        #: when the answer did not name one.
        self.error = error
        #: With 422: every bad field, by its dotted path (also on other statuses when the
        #: answer carried some; empty otherwise).
        self.errors = list(errors)
        #: ``Retry-After`` in seconds, when the answer said (429, 503).
        self.retry_after_s = retry_after_s
        self.retryable = status_code in RETRYABLE_STATUSES
        # Not super(): in InvalidRequest the next class is InvalidSpec, which takes errors.
        LstmHpoError.__init__(self, f"HTTP {status_code}: {message}")


#: Statuses after which the same request may succeed later: no answer at all (0), a
#: gateway's 502 / 504 and a server that cannot serve now (503). Whether sending it again
#: is safe is another matter: a 502, 504 or lost answer may come after the server did it.
RETRYABLE_STATUSES = frozenset({0, 502, 503, 504})


class InvalidRequest(ApiError, InvalidSpec):
    """The server refused the input as invalid."""

    # HTTP 422; ``errors`` names every bad field (at least one: a 422 without field errors,
    # such as a task's unreadable data, has its message as the one error).


class InvalidServerUrl(LstmHpoError, ValueError):
    """The server URL is not an http:// or https:// URL with a host."""

    # Raised before any request: no retry can make such a URL work (was: five retries and
    # "cannot reach", or httpx's own InvalidURL).


class ServerUnreachable(ApiError):
    """The server could not be reached (refused, timed out, connection lost)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class WaitTimeout(LstmHpoError, TimeoutError):
    """The study did not end within the time waited."""

    def __init__(self, study_id: str, state: str, timeout_s: float, progress: str) -> None:
        self.study_id = study_id
        #: The study's state when the wait gave up.
        self.state = state
        super().__init__(
            f"study {study_id} is still {state} after {timeout_s:g} s ({progress}): "
            "wait again, or cancel it"
        )
