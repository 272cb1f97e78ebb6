"""Alembic environment for lstm-hpo's own tables (not Optuna's).

Run through :func:`service.migrate.upgrade_schema` (or ``make_alembic_config``): the URL,
or an open connection inside a transaction, arrives as a config attribute.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import URL, Connection, make_url

from service import models
from service.db import make_engine
from service.migrate import VERSION_TABLE, include_name, include_object

config = context.config
target_metadata = models.Base.metadata


def _configure_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "include_object": include_object,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
        "render_item": _render_item,
    }


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Revisions must not import service.models: render our UTC wrapper as its column type.
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _url() -> str | URL:
    # A URL object is passed on as is: str(URL) would mask the password.
    url: str | URL | None = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use service.migrate.make_alembic_config(url)")
    return url


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the connection handed over by ``upgrade_schema``, or a fresh engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.begin() as fresh_connection:
            _run_on(fresh_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
