"""Engine and session plumbing for our tables: one place for SQLite pragmas, PostgreSQL pool
settings and the translation of driver errors into :mod:`service.errors`.

No module-level engines or sessions: entry points call :func:`make_engine` once per process
and pass a ``sessionmaker`` (or the engine) down.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

from optuna.exceptions import StorageInternalError
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service import errors

#: How long a SQLite connection waits for another writer before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0
#: PostgreSQL: seconds to establish a connection, and to wait for a free pooled one.
PG_CONNECT_TIMEOUT_S = 10
PG_POOL_TIMEOUT_S = 30.0
#: PostgreSQL: a pooled connection idle for longer than this is pinged before it is used.
#: A busy worker checks a connection out several times per trial, and SQLAlchemy's
#: ``pool_pre_ping`` pinged on every checkout: a round trip and a server statement each,
#: a third of a worker's statements (BENCHMARKS.md, "Scaling").
PG_PING_AFTER_IDLE_S = 5.0


def is_sqlite(url: str | URL) -> bool:
    """True when ``url`` names a SQLite database (any driver)."""
    return make_url(url).get_backend_name() == "sqlite"


def is_postgresql(url: str | URL) -> bool:
    """True when ``url`` names a PostgreSQL database (any driver)."""
    return make_url(url).get_backend_name() == "postgresql"


def make_engine(url: str | URL, *, pool_size: int = 2, max_overflow: int = 0) -> Engine:
    """An engine for our tables.

    SQLite: WAL journal (synchronous=NORMAL), a busy timeout, foreign keys on, and every
    transaction opened with ``BEGIN IMMEDIATE`` (the pysqlite recipe from SQLAlchemy's
    SQLite docs), so two write transactions never interleave: a claim takes the database
    write lock before it reads. Read-only transactions take it too (for milliseconds).
    The parent directory of the database file is created.

    PostgreSQL: a bounded pool (``pool_size`` + ``max_overflow`` connections, waiting at
    most ``PG_POOL_TIMEOUT_S`` for one), a connect timeout, and connections pinged when
    they were idle (:func:`ping_after_idle`).
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(sa_url)
    kwargs: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": PG_POOL_TIMEOUT_S,
    }
    if sa_url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = postgres_connect_args(sa_url)
    engine = create_engine(sa_url, **kwargs)
    ping_after_idle(engine)
    return engine


def postgres_connect_args(url: str | URL) -> dict[str, Any]:
    """A PostgreSQL engine's ``connect_args``: our connect timeout
    (:data:`PG_CONNECT_TIMEOUT_S`: a host that accepts and never answers must not hang a
    command), unless the URL sets its own ``connect_timeout``, which wins."""
    if "connect_timeout" in make_url(url).query:
        return {}
    return {"connect_timeout": PG_CONNECT_TIMEOUT_S}


def ping_after_idle(engine: Engine, idle_s: float = PG_PING_AFTER_IDLE_S) -> None:
    """Ping a pooled connection at checkout only when it sat idle for more than ``idle_s``.

    SQLAlchemy's pessimistic disconnect handling (``pool_pre_ping``, its pooling docs),
    limited to connections that may have gone stale: one that failed to answer is replaced
    (``DisconnectionError``: the pool connects again). A connection used within ``idle_s``
    is trusted; should the server have gone meanwhile, the statement fails, SQLAlchemy
    invalidates the pool (its optimistic handling) and the caller sees
    ``DatabaseUnavailable``: workers retry (``Worker._db``), the API answers 503.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        since = connection_record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since <= idle_s:
            return  # new, or used moments ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise exc.DisconnectionError(f"stale pooled connection: {error}") from error
        if not alive:
            raise exc.DisconnectionError("stale pooled connection")


_IDLE_SINCE = "lstm_hpo_idle_since"


def _make_sqlite_engine(url: URL) -> Engine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        folder = Path(database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise errors.DatabaseUnusable(
                f"cannot create {folder} for the SQLite database: {err.strerror}"
            ) from None
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    configure_sqlite_engine(engine)
    return engine


def configure_sqlite_engine(engine: Engine) -> None:
    """WAL, busy timeout and ``BEGIN IMMEDIATE`` transactions for a SQLite engine.

    Also applied to Optuna's own engine (same file): its check-then-update of a trial's
    state must not interleave with the reaper's, and deferred transactions would let both
    read "running" before either writes.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # pysqlite would emit its own deferred BEGIN lazily; we emit BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers (Optuna's dashboard, the API) never block the one writer.
            cursor.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: no fsync per commit; a power cut may drop the last commits but
            # never corrupts the file (an application crash loses nothing).
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock at BEGIN: transactions are serialised, and a deferred
        # read->write upgrade (which fails at once with SQLITE_BUSY in WAL) never happens.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _describe(error: exc.DBAPIError) -> str:
    """The driver's message, first line only: no SQL, no parameters, no URL."""
    text = str(error.orig).strip().splitlines()
    return f"{type(error.orig).__name__}: {text[0] if text else ''}".strip()


def _is_missing_table(error: exc.DBAPIError) -> bool:
    sqlstate = getattr(error.orig, "sqlstate", None)
    return sqlstate == "42P01" or "no such table" in str(error.orig)


def _is_unique_violation(error: exc.IntegrityError) -> bool:
    sqlstate = getattr(error.orig, "sqlstate", None)
    return sqlstate == "23505" or "UNIQUE constraint failed" in str(error.orig)


#: libpq's words for a connection option value it refuses (PQconnectdb, fe-connect.c):
#: ``invalid sslmode value``, ``invalid integer value "x" for connection option "y"``,
#: ``invalid port number``, ``setsockopt(TCP_KEEPIDLE) failed`` (keepalives_idle=-1).
_REFUSED_OPTION = re.compile(
    r'invalid (?:\w+ value|integer value "[^"]*" for connection option|port number)'
    r"|setsockopt\([A-Z_]+\) failed"
)


def _refuses_options(error: exc.SQLAlchemyError) -> TypeGuard[exc.DBAPIError]:
    """Whether ``error`` was the driver refusing the URL's connection options while
    connecting (no statement ran): psycopg's ProgrammingError (an unknown option, a bad
    connect_timeout) or libpq's "invalid sslmode value" and kin."""
    if not isinstance(error, exc.DBAPIError) or error.statement is not None:
        return False
    if isinstance(error, exc.ProgrammingError):
        return True
    return isinstance(error, exc.OperationalError) and bool(_REFUSED_OPTION.search(str(error.orig)))


def translate_db_error(error: exc.SQLAlchemyError) -> errors.LstmHpoError | None:
    """The :mod:`service.errors` counterpart of a SQLAlchemy error, or None to re-raise it.

    A unique violation -> ``AlreadyExists``; a missing table -> ``SchemaNotReady``; a
    connection option the driver refuses -> ``DatabaseUnusable``; a lock, deadlock, lost
    connection or exhausted pool -> ``DatabaseUnavailable`` (retryable).
    """
    if isinstance(error, exc.IntegrityError):
        if not _is_unique_violation(error):
            return None  # a CHECK / foreign key / NOT NULL violation is a bug, not a conflict
        return errors.AlreadyExists(
            f"{errors.AlreadyExists.default_message()} ({_describe(error)})"
        )
    if isinstance(error, exc.DBAPIError) and _is_missing_table(error):
        return errors.SchemaNotReady()
    if _refuses_options(error):
        # Raised while connecting, before any statement: the URL's connection options are
        # wrong (an unknown option, connect_timeout=abc, sslmode=wrong); waiting cannot help.
        refusal = str(error.orig).strip().splitlines()[0].removeprefix("connection is bad: ")
        return errors.DatabaseUnusable(f"the database URL's connection options: {refusal}")
    if isinstance(error, exc.OperationalError) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated
    ):
        return errors.DatabaseUnavailable(
            f"{errors.DatabaseUnavailable.default_message()} ({_describe(error)})"
        )
    if isinstance(error, exc.TimeoutError):  # no pooled connection became free in time
        return errors.DatabaseUnavailable(
            f"{errors.DatabaseUnavailable.default_message()} ({error})"
        )
    return None


def translate_any(error: BaseException) -> errors.LstmHpoError | None:
    """Our counterpart of any error a database call raised, or None when it is not the
    database's: ours as they are, SQLAlchemy's (:func:`translate_db_error`), and Optuna's
    ``StorageInternalError``, which wraps the SQLAlchemy error its storage met (its
    ``__cause__``: a pooled connection a restart dropped is an outage, as from our own
    tables). For the loops and routes that must tell an outage from a bug."""
    if isinstance(error, errors.LstmHpoError):
        return error
    cause = error.__cause__ if isinstance(error, StorageInternalError) else error
    return translate_db_error(cause) if isinstance(cause, exc.SQLAlchemyError) else None


def _driver_outage_errors() -> tuple[type[Exception], ...]:
    """psycopg's own connection errors, for a call that reaches the driver without
    SQLAlchemy wrapping what it raises (``Engine.raw_connection`` does not); () without the
    ``postgres`` extra."""
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


_DRIVER_OUTAGES = _driver_outage_errors()


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says the database is away for a moment (restarting, unreachable, a
    lock or an exhausted pool): a call to wait and retry, never a bug or a study that cannot
    run. Whoever raised it: ours, SQLAlchemy's, Optuna's wrapping (:func:`translate_any`) or
    psycopg's own (``Engine.raw_connection``). The one test the worker's retries, the
    background loops and the API's 503 share."""
    return isinstance(error, _DRIVER_OUTAGES) or isinstance(
        translate_any(error), errors.DatabaseUnavailable
    )


def raise_translated(error: exc.SQLAlchemyError) -> NoReturn:
    """Raise ``error``'s :mod:`service.errors` counterpart (:func:`translate_db_error`),
    chained to it, or ``error`` itself when it has none. Call it in an ``except`` block."""
    translated = translate_db_error(error)
    if translated is None:
        raise error
    raise translated from error


@contextmanager
def session_scope(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session, one transaction: commit on success, roll back on error, always close.

    As optuna's ``_create_scoped_session``; infrastructure errors are translated here (see
    :func:`translate_db_error`), chained to the original.
    """
    session = session_factory()
    try:
        yield session
        session.commit()
    except exc.SQLAlchemyError as error:
        _rollback_quietly(session)
        raise_translated(error)
    except BaseException:
        _rollback_quietly(session)
        raise
    finally:
        session.close()


@contextmanager
def connection_scope(engine: Engine, *, autocommit: bool = False) -> Iterator[Connection]:
    """One connection, one transaction (committed on success), without an ORM session:
    for single Core statements on hot paths, where a ``Session`` costs as much client CPU
    as the statement. ``autocommit``: no transaction, each statement commits as it ends.
    Errors are translated as in :func:`session_scope`."""
    try:
        if autocommit:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                yield conn
        else:
            with engine.begin() as conn:
                yield conn
    except exc.SQLAlchemyError as error:
        raise_translated(error)


def _rollback_quietly(session: Session) -> None:
    # A rollback on a dead connection fails too; the original error is the one to report.
    with suppress(exc.SQLAlchemyError):
        session.rollback()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The ``sessionmaker`` the queue and domain functions take.

    ``expire_on_commit=False``: values read in a scope stay readable after it commits.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def scratch_postgres_database(server_url: str | URL, *, prefix: str) -> Iterator[str]:
    """A new, empty database ``<prefix>_<random>`` on a PostgreSQL server; dropped after.

    For tests and benchmarks. The drop uses ``WITH (FORCE)``, so connections left open
    cannot block it. CREATE / DROP DATABASE cannot run inside a transaction: AUTOCOMMIT.
    """
    server = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
