"""PostgreSQL connections are pinged at checkout only after sitting idle
(``service.db.ping_after_idle``): a stale idle connection is replaced without an error, and
one used moments ago is trusted; if its server went meanwhile, the statement fails once as
``DatabaseUnavailable`` (what workers retry) and the pool starts afresh."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, create_engine, exc

from service import errors
from service.db import make_engine, ping_after_idle, translate_db_error

pytestmark = pytest.mark.postgres


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        pid: int = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return pid


def _terminate(admin: Engine, pid: int) -> None:
    with admin.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()


def test_an_idle_connection_is_pinged_and_replaced_a_busy_one_is_trusted(
    postgres_url: str,
) -> None:
    admin = create_engine(postgres_url, pool_size=1)
    idle_s = 0.3
    engine = create_engine(postgres_url, pool_size=1, max_overflow=0)
    ping_after_idle(engine, idle_s=idle_s)
    trusting = create_engine(postgres_url, pool_size=1, max_overflow=0)
    ping_after_idle(trusting, idle_s=3600.0)
    try:
        first = _backend_pid(engine)
        _terminate(admin, first)
        time.sleep(idle_s * 2)  # idle past the limit: pinged at checkout, found dead
        second = _backend_pid(engine)  # no error: the pool connected again
        assert second != first

        dead = _backend_pid(trusting)
        _terminate(admin, dead)
        with pytest.raises(exc.OperationalError) as raised:  # trusted, so it fails once
            _backend_pid(trusting)
        translated = translate_db_error(raised.value)
        assert isinstance(translated, errors.DatabaseUnavailable)
        assert _backend_pid(trusting) != dead  # then a fresh connection
    finally:
        for made in (admin, engine, trusting):
            made.dispose()


def test_our_engines_ping_after_idle_instead_of_on_every_checkout(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert engine.pool._pre_ping is False  # SQLAlchemy's ping-every-checkout is off
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first  # pooled, and reused
    finally:
        engine.dispose()
