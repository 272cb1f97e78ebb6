"""Telling a database outage from a bug, whoever raised it: our tables (translated at the
session), SQLAlchemy untranslated (a query on Optuna's engine), or Optuna's storage, which
wraps every SQLAlchemy error in its own ``StorageInternalError``. The background loops
(reaper, webhooks, study.confirm) wait for an outage and skip a study only for a bug: a
wrapped outage once skipped a study's auto-confirmation for good."""

from __future__ import annotations

import logging
import sqlite3

import pytest
from optuna.exceptions import StorageInternalError
from sqlalchemy import exc as sa_exc

from service.db import is_outage, translate_any
from service.errors import AlreadyExists, DatabaseUnavailable, InvalidSpec, LstmHpoError
from service.periodic import skip_unless_outage


def _operational() -> sa_exc.OperationalError:
    return sa_exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))


def _wrapped_by_optuna(error: Exception) -> StorageInternalError:
    """What Optuna's ``_create_scoped_session`` raises: its error, chained to the cause."""
    try:
        raise StorageInternalError("An exception is raised during the commit.") from error
    except StorageInternalError as wrapped:
        return wrapped


def _unique_violation() -> sa_exc.IntegrityError:
    return sa_exc.IntegrityError(
        "INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed: t.k")
    )


@pytest.mark.parametrize(
    "raised",
    [_operational(), _wrapped_by_optuna(_operational()), DatabaseUnavailable()],
    ids=["sqlalchemy", "wrapped-by-optuna", "ours"],
)
def test_an_outage_is_one_whoever_raised_it(raised: Exception) -> None:
    ours = translate_any(raised)
    assert isinstance(ours, DatabaseUnavailable) and ours.retryable
    with pytest.raises(DatabaseUnavailable):
        skip_unless_outage(raised, "study x skipped", log=logging.getLogger("test"))


@pytest.mark.parametrize(
    ("raised", "translated"),
    [
        (_wrapped_by_optuna(_unique_violation()), AlreadyExists),
        (InvalidSpec([]), InvalidSpec),
        (ValueError("a bug"), None),
        (_wrapped_by_optuna(ValueError("invalid data")), None),
    ],
    ids=["conflict-wrapped", "ours-not-retryable", "bug", "optuna-wrapping-a-bug"],
)
def test_anything_else_skips_the_study_and_says_why(
    raised: Exception, translated: type[LstmHpoError] | None, caplog: pytest.LogCaptureFixture
) -> None:
    ours = translate_any(raised)
    assert (type(ours) if ours is not None else None) is translated
    with caplog.at_level(logging.ERROR, logger="test"):
        skip_unless_outage(raised, "study x skipped", log=logging.getLogger("test"))
    (record,) = caplog.records
    assert record.getMessage().startswith("study x skipped")
    # Our own errors say why in one line; anything else keeps its traceback.
    assert (record.exc_info is None) is (translated is not None)


def _driver_refused() -> Exception:
    import psycopg  # the dev extra installs it

    refused: Exception = psycopg.OperationalError("connection failed: Connection refused")
    return refused


@pytest.mark.parametrize(
    ("raised", "outage"),
    [
        (_operational(), True),
        (_wrapped_by_optuna(_operational()), True),
        (DatabaseUnavailable(), True),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (_driver_refused(), True),  # Engine.raw_connection() lets psycopg's own through
        (_wrapped_by_optuna(ValueError("invalid data")), False),
        (_wrapped_by_optuna(_unique_violation()), False),
        # sqlite3 says InterfaceError for a value it cannot bind: a bug, not an outage.
        (sa_exc.InterfaceError("INSERT", {}, sqlite3.InterfaceError("bad binding")), False),
        (InvalidSpec([]), False),
        (KeyError("Record does not exist."), False),
    ],
    ids=[
        "sqlalchemy",
        "wrapped-by-optuna",
        "ours",
        "pool-exhausted",
        "psycopg-raw",
        "optuna-wrapping-a-bug",
        "conflict",
        "sqlite-binding",
        "ours-not-retryable",
        "optuna-record-gone",
    ],
)
def test_the_worker_retries_an_outage_and_only_an_outage(raised: Exception, outage: bool) -> None:
    """``is_outage`` is what the worker's bounded retry (``Worker._db``) waits on: a bug that
    reached it as an outage was retried for minutes and then ended the worker process, for
    every study it served; an outage taken for a bug failed the study."""
    assert is_outage(raised) is outage
