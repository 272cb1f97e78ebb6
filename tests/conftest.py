"""Shared fixtures: a fresh database per test on SQLite and (when configured) PostgreSQL.

PostgreSQL tests run whenever ``LSTM_HPO_TEST_POSTGRES_URL`` is set (a server URL whose
user may CREATE DATABASE, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
they skip only when it is not set. Each test gets its own ``lstm_hpo_test_<random>``
database, dropped afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, make_session_factory, scratch_postgres_database
from service.migrate import upgrade_schema

POSTGRES_URL_ENV = "LSTM_HPO_TEST_POSTGRES_URL"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file (not yet created) in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'lstm-hpo.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the server of ``LSTM_HPO_TEST_POSTGRES_URL``,
    dropped (``WITH (FORCE)``, so leftover connections cannot block it) after the test."""
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        if os.environ.get("CI"):  # CI has PostgreSQL: a skipped backend would hide a failure
            pytest.fail(f"{POSTGRES_URL_ENV} must be set under CI")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    with scratch_postgres_database(server_url, prefix="lstm_hpo_test") as url:
        yield url


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database, once per backend."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """``db_url`` with our tables at the head revision."""
    upgrade_schema(db_url)
    return db_url


@pytest.fixture
def db_engine(migrated_db_url: str) -> Iterator[Engine]:
    """An engine (``service.db.make_engine``) on a migrated database; disposed after."""
    engine = make_engine(migrated_db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def session_factory(db_engine: Engine) -> sessionmaker[Session]:
    """The ``sessionmaker`` that queue and domain functions take."""
    return make_session_factory(db_engine)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as a worker runs: bitwise-reproducible CPU kernels, no contention.

    Modules that train use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch  # only the tests that train pay for the import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
