"""Our Alembic migrations produce exactly the ORM schema, on SQLite and PostgreSQL, and live
beside Optuna's tables without touching them."""

from __future__ import annotations

import multiprocessing
from typing import Any

import optuna
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text

from service import models, queue
from service.db import make_engine, make_session_factory
from service.migrate import (
    VERSION_TABLE,
    head_revision,
    include_name,
    include_object,
    make_alembic_config,
    optuna_tables_lock,
    schema_is_current,
    upgrade_schema,
)
from service.studies import optuna_storage

OUR_TABLES = {"api_tokens", "search_jobs", "trial_leases", "webhook_events", "workers"}


def _schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_name": include_name,
                "include_object": include_object,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, models.Base.metadata))


def _versions(engine: Engine, table: str) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text(f"SELECT version_num FROM {table}")).scalars())


def _table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_produces_exactly_the_orm_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert _table_names(engine) == set()
        assert not schema_is_current(engine)

        upgrade_schema(db_url)

        assert _table_names(engine) == {*OUR_TABLES, VERSION_TABLE}
        assert _schema_diff(engine) == []
        head = "0007_webhook_events"
        assert _versions(engine, VERSION_TABLE) == [head_revision()] == [head]
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade_schema(db_url)
    engine = make_engine(db_url)
    try:
        queue.create_job(
            make_session_factory(engine),
            spec={"k": 1},
            name="kept",
            optuna_study_name="kept-study",
            n_trials=3,
        )
        upgrade_schema(db_url)
        upgrade_schema(db_url)

        assert _versions(engine, VERSION_TABLE) == [head_revision()]
        assert _schema_diff(engine) == []
        with engine.connect() as connection:
            names = connection.execute(select(models.SearchJob.name)).scalars().all()
        assert names == ["kept"]
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    upgrade_schema(db_url)
    # Through env.py's own-engine path (no connection handed over).
    command.downgrade(make_alembic_config(db_url), "base")
    engine = make_engine(db_url)
    try:
        assert _table_names(engine) == {VERSION_TABLE}
        assert _versions(engine, VERSION_TABLE) == []
        assert not schema_is_current(engine)
        upgrade_schema(db_url)
        assert _schema_diff(engine) == []
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def _optuna_snapshot(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        return {
            "alembic_version": sorted(
                connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
            ),
            "studies": sorted(connection.execute(text("SELECT study_name FROM studies")).scalars()),
            "trials": connection.execute(text("SELECT count(*) FROM trials")).scalar_one(),
            "columns": {
                table: [column["name"] for column in inspect(connection).get_columns(table)]
                for table in ("studies", "trials", "trial_values")
            },
        }


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "ours-first"])
def test_optuna_tables_are_untouched_and_ignored(db_url: str, optuna_first: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not optuna_first:
        upgrade_schema(db_url)
    storage = optuna.storages.RDBStorage(db_url)
    study = optuna.create_study(storage=storage, study_name="theirs")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    engine = make_engine(db_url)
    try:
        before = _optuna_snapshot(engine)
        upgrade_schema(db_url)
        upgrade_schema(db_url)
        after = _optuna_snapshot(engine)

        assert after == before
        assert before["studies"] == ["theirs"] and before["trials"] == 2
        # Optuna's version table holds only Optuna's revision; ours only ours.
        assert head_revision() not in after["alembic_version"]
        assert _versions(engine, VERSION_TABLE) == [head_revision()]
        assert _table_names(engine) > {*OUR_TABLES, "studies", "trials", "alembic_version"}
        # Optuna's tables are in the database but not in the comparison.
        assert _schema_diff(engine) == []
        # And Optuna still accepts its schema.
        reopened = optuna.load_study(
            study_name="theirs", storage=optuna.storages.RDBStorage(db_url)
        )
        assert len(reopened.trials) == 2
    finally:
        engine.dispose()
        storage.engine.dispose()


def test_servers_starting_together_upgrade_once(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.map(upgrade_schema, [db_url] * 3)  # re-raises any process's exception
    engine = make_engine(db_url)
    try:
        assert _versions(engine, VERSION_TABLE) == [head_revision()]
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def _create_optuna_tables(db_url: str) -> None:
    """What a server does first at start: Optuna's tables, under the lock."""
    with optuna_tables_lock(db_url):
        optuna_storage(db_url).engine.dispose()


def test_servers_starting_together_create_optuna_tables_once(postgres_url: str) -> None:
    # Without the lock, Optuna's create_all races on PostgreSQL (UniqueViolation on its
    # enum type studydirection) and one server of a fresh deployment fails to start; on
    # SQLite writers are serialised already (the lock is a no-op there).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.map(_create_optuna_tables, [postgres_url] * 3)  # re-raises any exception
    study = optuna.create_study(storage=optuna_storage(postgres_url))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
