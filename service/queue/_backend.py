"""The two backends behind one protocol, chosen once per engine (by its dialect).

A rule that differs between SQLite and PostgreSQL (the claim, the finish, how an idle
worker waits) is a method of :class:`Backend`, written once per backend in its module:
``_sqlite.py`` (ORM transactions) and ``_postgres.py`` (named SQL, one statement each).
Everything else in the package is written once for both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine

from service.queue._plumbing import engine_of
from service.queue._postgres import PostgresBackend
from service.queue._records import Lease, SessionSource
from service.queue._sqlite import SqliteBackend
from service.states import JobState, LeaseState


class Backend(Protocol):
    """What differs between the backends; each method is one short transaction."""

    name: str

    def claim(
        self,
        sm: SessionSource,
        worker_id: str,
        *,
        at: datetime,
        max_running_per_owner: int | None = None,
    ) -> Lease | None:
        """Claim one trial slot for ``worker_id`` at ``at`` (None: nothing claimable),
        fair across principals, skipping those at ``max_running_per_owner``."""
        ...

    def finish(
        self,
        sm: SessionSource,
        lease_id: int,
        *,
        job_id: str | None,
        state: LeaseState,
        failure_reason: str | None,
        at: datetime,
    ) -> JobState:
        """Record a running lease's outcome; the job's state after (``LeaseLost``)."""
        ...

    def wait_for_work(self, engine: Engine, timeout_s: float) -> bool:
        """Block an idle worker at most ``timeout_s``; True when woken by new work."""
        ...


_SQLITE = SqliteBackend()
_POSTGRES = PostgresBackend()
#: Backends hold no state: the choice is the engine's dialect. Any other dialect gets the
#: ORM transactions, which lock the job row first and so are correct on any database.
_BY_DIALECT: dict[str, Backend] = {"sqlite": _SQLITE, "postgresql": _POSTGRES}


def backend_for(source: SessionSource) -> Backend:
    """The backend that runs ``source``'s engine."""
    return _BY_DIALECT.get(engine_of(source).dialect.name, _SQLITE)
