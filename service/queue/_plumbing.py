"""Transactions: one short transaction per call, retried (bounded) when PostgreSQL rolled it
back for a deadlock or serialization failure; the time a call runs at; the engine behind a
session source."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine, exc
from sqlalchemy.orm import Session, sessionmaker

from service import errors
from service.db import connection_scope, session_scope
from service.models import utcnow
from service.queue._records import SessionSource

#: Attempts for one transaction that PostgreSQL aborted with a deadlock or serialization
#: failure (SQLSTATE class 40: rolled back entirely, so running it again is safe).
MAX_TRANSACTION_ATTEMPTS = 3

_T = TypeVar("_T")


def session_factory(source: SessionSource) -> sessionmaker[Session]:
    """The ``sessionmaker`` of a session source (a new one bound to an ``Engine``)."""
    if isinstance(source, Engine):
        return sessionmaker(bind=source, expire_on_commit=False)
    return source


def engine_of(source: SessionSource) -> Engine:
    """The engine a session source is bound to."""
    engine: Engine = source if isinstance(source, Engine) else source.kw["bind"]
    return engine


def is_postgresql(session: Session) -> bool:
    """Whether ``session`` talks to PostgreSQL."""
    return session.get_bind().dialect.name == "postgresql"


def resolve_now(now: datetime | None) -> datetime:
    """``now`` (which must be timezone-aware), or the current UTC time."""
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _rolled_back_by_server(error: errors.DatabaseUnavailable) -> bool:
    cause = error.__cause__
    if not isinstance(cause, exc.DBAPIError):
        return False
    return str(getattr(cause.orig, "sqlstate", "") or "").startswith("40")


def transact(source: SessionSource, work: Callable[[Session], _T]) -> _T:
    """Run ``work`` in one transaction (commit / rollback / close via ``session_scope``)."""
    factory = session_factory(source)
    return _retried(lambda: _in_session(factory, work))


def _in_session(factory: sessionmaker[Session], work: Callable[[Session], _T]) -> _T:
    with session_scope(factory) as session:
        return work(session)


def one_statement(source: SessionSource, work: Callable[[Connection], _T]) -> _T:
    """Run ``work``, which executes a single Core statement, on a connection of its own.

    On PostgreSQL in autocommit mode: the server commits the statement as it ends, so the
    row locks it takes are held for the statement alone, never across a client round trip
    (BEGIN and COMMIT cost two more). With many workers on few cores, a lock holder waiting
    to be scheduled to send its COMMIT is what queued every other claim behind it. On
    SQLite in a transaction (``BEGIN IMMEDIATE``). No ORM session: on the worker's path
    (claim, attach, heartbeat, finish) it cost as much client CPU as the statement.
    """
    engine = engine_of(source)
    autocommit = engine.dialect.name == "postgresql"

    def run() -> _T:
        with connection_scope(engine, autocommit=autocommit) as connection:
            return work(connection)

    return _retried(run)


def _retried(attempt_once: Callable[[], _T]) -> _T:
    for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
        try:
            return attempt_once()
        except errors.DatabaseUnavailable as error:
            # Deadlock / serialization failure: the server rolled everything back, so a
            # bounded re-run is safe. Locks, lost connections: surface to the caller.
            if attempt == MAX_TRANSACTION_ATTEMPTS or not _rolled_back_by_server(error):
                raise
            time.sleep(random.uniform(0.005, 0.02) * attempt)
    raise AssertionError("unreachable")
