"""Schema migrations for OUR tables (Alembic), run by the server at start-up and by
``lstm-hpo migrate``. Workers never run DDL: they wait for :func:`schema_is_current`.

Optuna's tables share the database and are upgraded with Optuna's own tooling; the
:func:`include_name` / :func:`include_object` filters keep Alembic's autogenerate away from
them, and our revisions are recorded in ``service_alembic_version`` (Optuna uses
``alembic_version``).

To write a new revision after changing :mod:`service.models`::

    from alembic import command
    command.revision(make_alembic_config(url), message="...", autogenerate=True)

against a database upgraded to the current head, then review the generated file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, exc, text
from sqlalchemy.engine import URL, Connection

from service import errors, models
from service.db import is_postgresql, make_engine, translate_db_error

log = logging.getLogger("lstm_hpo.migrate")

VERSION_TABLE = "service_alembic_version"
#: pg_advisory_xact_lock key serialising concurrent upgrades: any fixed 64-bit number
#: (this one is b"LSTM" followed by 0001).
ADVISORY_LOCK_KEY = 0x4C53_544D_0001
_PACKAGE_DIR = Path(__file__).resolve().parent
#: A wheel ships the repository's ``migrations/`` inside the package (``service/migrations``,
#: see pyproject.toml); a checkout or an editable install has it beside the package.
MIGRATIONS_DIR = next(
    (
        folder
        for folder in (_PACKAGE_DIR / "migrations", _PACKAGE_DIR.parent / "migrations")
        if (folder / "env.py").is_file()
    ),
    _PACKAGE_DIR.parent / "migrations",
)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic filter: reflect only our own tables (never Optuna's, never a version table)."""
    if type_ == "table":
        return name in models.Base.metadata.tables
    return True


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic filter: compare only objects of our own tables."""
    if type_ == "table":
        return name in models.Base.metadata.tables
    return True


def make_alembic_config(
    url: str | URL | None = None, *, connection: Connection | None = None
) -> Config:
    """An Alembic ``Config`` for ``migrations/``; the URL (or an open connection) is passed
    as a config attribute, never through an ini file or from a user."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise errors.SchemaNotReady(
            f"the migrations folder is missing ({MIGRATIONS_DIR}); reinstall lstm-hpo "
            "(pip install lstm-hpo, or pip install -e . in a checkout)"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    """The newest revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(make_alembic_config()).get_current_head()
    assert head is not None, "migrations/versions has no revision"
    return head


def upgrade_schema(url: str | URL, revision: str = "head") -> None:
    """Bring our tables to ``revision``: idempotent, safe at every server start.

    The whole upgrade runs in one transaction. On PostgreSQL it first takes a transaction
    advisory lock, so two servers starting together upgrade one after the other (the
    second then finds the schema current and does nothing). On SQLite the engine's
    ``BEGIN IMMEDIATE`` already serialises it.
    """
    engine = make_engine(url, pool_size=1)
    try:
        with engine.begin() as connection:
            if is_postgresql(url):
                # Serialise concurrent upgrades; released at commit.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
                )
            command.upgrade(make_alembic_config(url, connection=connection), revision)
    except exc.SQLAlchemyError as error:
        translated = translate_db_error(error)
        if translated is None:
            raise
        raise translated from error
    finally:
        engine.dispose()


#: The session advisory lock held while Optuna creates its own tables (see
#: :func:`optuna_tables_lock`); distinct from :data:`ADVISORY_LOCK_KEY`, which the upgrade
#: takes in its own transaction.
OPTUNA_TABLES_LOCK_KEY = ADVISORY_LOCK_KEY + 1


@contextmanager
def optuna_tables_lock(url: str | URL) -> Iterator[None]:
    """Serialise the creation of Optuna's tables between servers starting together.

    Optuna's ``RDBStorage`` runs ``create_all`` outside any lock: two servers starting on an
    empty PostgreSQL database race, and one fails with a UniqueViolation on its enum type
    ``studydirection``. Held on PostgreSQL (a session advisory lock on its own connection,
    released on exit); SQLite serialises writers already.
    """
    if not is_postgresql(url):
        yield
        return
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            connection.execute(
                text("SELECT pg_advisory_lock(:key)"), {"key": OPTUNA_TABLES_LOCK_KEY}
            )
            connection.commit()
            try:
                yield
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": OPTUNA_TABLES_LOCK_KEY}
                )
                connection.commit()
    finally:
        engine.dispose()


def current_revisions(engine: Engine) -> set[str]:
    """The revisions recorded in ``service_alembic_version`` (empty when never migrated)."""
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return set(context.get_current_heads())
    except exc.SQLAlchemyError as error:
        translated = translate_db_error(error)
        if translated is None:
            raise
        raise translated from error


def schema_is_current(engine: Engine) -> bool:
    """True when our tables are at the head revision (what workers wait for)."""
    return current_revisions(engine) == {head_revision()}


def wait_for_schema(
    engine: Engine,
    *,
    timeout_s: float,
    poll_s: float = 1.0,
    stopping: Callable[[], bool] = lambda: False,
    say_every_s: float = 30.0,
) -> bool:
    """Block until :func:`schema_is_current` (True), or until ``stopping()`` (False: a stop
    signal came while waiting); raise ``SchemaNotReady`` after ``timeout_s``, naming what
    was last in the way. What it waits for is logged at once and every ``say_every_s``:
    a worker started before the server (or with a wrong database URL) is not silent."""
    deadline = time.monotonic() + timeout_s
    said_at: float | None = None
    while not stopping():
        try:
            if schema_is_current(engine):
                return True
            why = "the schema is not there yet (lstm-hpo serve or lstm-hpo migrate creates it)"
        except errors.DatabaseUnavailable as err:  # the server may be creating the database
            why = err.message
        now = time.monotonic()
        if now >= deadline:
            raise errors.SchemaNotReady(f"{errors.SchemaNotReady.default_message()} Last: {why}")
        if said_at is None or now - said_at >= say_every_s:
            log.warning("waiting for the database (%.0fs left): %s", deadline - now, why)
            said_at = now
        time.sleep(poll_s)
    return False
