"""ORM rows for our tables. They never leave the domain layer: :mod:`service.queue` returns
frozen dataclasses, the API returns ``*Public`` schemas.

Table names must never collide with Optuna's (``studies``, ``trials``, ``version_info``,
``alembic_version``, ...), which live in the same database. Every change here needs an
Alembic revision in ``migrations/versions`` (``tests/integration/test_migrations.py``
fails otherwise).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.states import ACTIVE_JOB_STATES, JobState, LeaseState

__all__ = [
    "ACTIVE_JOB_STATES",
    "ApiToken",
    "Base",
    "JobState",
    "LeaseState",
    "SearchJob",
    "TrialLease",
    "Worker",
    "new_job_id",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A fresh job id: 32 hex characters."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always returns aware UTC datetimes.

    SQLite keeps no offset, so values are normalised to UTC on the way in (string order is
    then time order) and marked UTC on the way out. Naive datetimes are rejected.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base for our tables; ``Base.metadata`` is Alembic's target metadata."""

    # Deterministic constraint names on every backend, so later migrations can name them.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class SearchJob(Base):
    """One hyperparameter search: an Optuna study plus the slot accounting around it.

    Counters (kept by :mod:`service.queue` under a row lock): ``n_running`` slots are
    claimed and not yet finished; ``n_finished`` = complete + pruned + failed-not-retried;
    ``n_running + n_finished <= n_trials`` always holds.
    """

    __tablename__ = "search_jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_search_jobs_state_last_claimed_at", "state", "last_claimed_at"),
        # Fair share: a claim reads each principal's last claim over all its jobs (one
        # index probe per principal, however many studies it ever ran).
        Index("ix_search_jobs_owner_last_claimed_at", "owner", "last_claimed_at"),
        # The slot invariant, enforced by the database as a last line of defence.
        CheckConstraint(
            "n_trials >= 1 AND n_running >= 0 AND n_complete >= 0"
            " AND n_complete <= n_finished AND n_running + n_finished <= n_trials",
            name="slot_counters",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str] = mapped_column(String(100), default="local", index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    optuna_study_name: Mapped[str] = mapped_column(String(200), unique=True)
    n_trials: Mapped[int] = mapped_column(Integer)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    n_running: Mapped[int] = mapped_column(Integer, default=0)
    n_finished: Mapped[int] = mapped_column(Integer, default=0)
    n_complete: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    #: ``started_at + timeout_s``, fixed at the first claim: a portable "past its timeout"
    #: test in SQL (interval arithmetic differs between SQLite and PostgreSQL).
    deadline_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    last_claimed_at: Mapped[datetime | None]


class TrialLease(Base):
    """One claimed trial slot of a job, owned by one worker while ``running``.

    Retry of a reaped slot: the reaper enqueues the retried trial's parameters in Optuna,
    then sets ``retry_pending`` and ``retry_trial_id`` on the reaped lease (the slot
    is not counted finished); the next claim of that job takes it over, clearing the flag
    and inserting a lease with ``retry_of`` = the reaped lease and ``attempt`` + 1.
    """

    __tablename__ = "trial_leases"
    __table_args__ = (
        Index("ix_trial_leases_state_heartbeat_at", "state", "heartbeat_at"),
        # Partial: a claim looks up its job's pending retry under the job's lock.
        Index(
            "ix_trial_leases_retry_pending",
            "job_id",
            postgresql_where=text("retry_pending"),
            sqlite_where=text("retry_pending"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("search_jobs.id", ondelete="CASCADE"), index=True
    )
    worker_id: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=LeaseState.RUNNING)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    retry_of: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("trial_leases.id", ondelete="SET NULL"), unique=True
    )
    retry_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    #: With ``retry_pending``: the WAITING Optuna trial (same params) the retry must run;
    #: None when the reaped lease never attached a trial (its retry asks a fresh one).
    retry_trial_id: Mapped[int | None] = mapped_column(Integer)
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    trial_number: Mapped[int | None] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """A worker process that has registered itself (for liveness and one-host checks)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: What it trains on, as ``ProcessPlan.device`` says it: ``gpu 0``, ``cpu``, ``auto``.
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """One principal's API token. Only a SHA-256 hash of the token is stored (the token is
    32 random bytes, so a fast hash is enough: there is nothing to brute-force).

    A revoked token keeps its row (``revoked_at``): that a token was ever created is what
    turns authentication on, so revoking the last one never reopens a server.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The principal's name: the owner of the studies it submits.
    name: Mapped[str] = mapped_column(String(100), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebhookEvent(Base):
    """A webhook event one server has claimed to send (:mod:`service.notify`): the primary
    key makes the claim atomic, so servers sharing a database send each event once."""

    __tablename__ = "webhook_events"

    #: As the payload's ``event_id``: ``<study id>:new_best:7``, ``<study id>:finished:20``.
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("search_jobs.id", ondelete="CASCADE"), index=True
    )
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
