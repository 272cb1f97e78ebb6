"""Waking idle workers on PostgreSQL: a slot becoming claimable (a new job, a queued retry)
is announced with ``NOTIFY`` on :data:`WORK_CHANNEL`; an idle worker ``LISTEN``s for it."""

from __future__ import annotations

from sqlalchemy import Engine, exc, func, select
from sqlalchemy.orm import Session

from service import errors
from service.db import raise_translated
from service.queue._plumbing import is_postgresql

#: PostgreSQL LISTEN / NOTIFY channel on which a slot becoming claimable (a new job, a
#: retry) is announced to idle workers (payload: the job id).
WORK_CHANNEL = "lstm_hpo_work"


def announce_work(session: Session, job_id: str) -> None:
    """Tell idle workers (PostgreSQL) that ``job_id`` has a claimable slot, at commit."""
    # Delivered at commit, and only then: a listener never wakes for a rolled-back job.
    if is_postgresql(session):
        session.execute(select(func.pg_notify(WORK_CHANNEL, job_id)))


def listen_for_work(engine: Engine, timeout_s: float) -> bool:
    """PostgreSQL: block until an announcement on :data:`WORK_CHANNEL` (True) or for
    ``timeout_s`` (False), on one of the engine's pooled connections (no extra one)."""
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"LISTEN {WORK_CHANNEL}")
            driver = connection.connection.driver_connection
            assert driver is not None  # checked out and valid
            try:
                woken = any(True for _ in driver.notifies(timeout=timeout_s, stop_after=1))
            except engine.dialect.loaded_dbapi.Error as error:  # psycopg's own, unwrapped
                connection.invalidate()  # never hand this connection out again
                raise errors.DatabaseUnavailable(
                    f"{errors.DatabaseUnavailable.default_message()} "
                    f"({type(error).__name__}: {error})"
                ) from error
            connection.exec_driver_sql(f"UNLISTEN {WORK_CHANNEL}")
            return woken
    except exc.SQLAlchemyError as error:
        raise_translated(error)
