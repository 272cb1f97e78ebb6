"""initial: search_jobs, trial_leases, workers

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "search_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("optuna_study_name", sa.String(length=200), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("n_running", sa.Integer(), nullable=False),
        sa.Column("n_finished", sa.Integer(), nullable=False),
        sa.Column("n_complete", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "n_trials >= 1 AND n_running >= 0 AND n_complete >= 0"
            " AND n_complete <= n_finished AND n_running + n_finished <= n_trials",
            name=op.f("ck_search_jobs_slot_counters"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_search_jobs")),
        sa.UniqueConstraint("optuna_study_name", name=op.f("uq_search_jobs_optuna_study_name")),
        sa.UniqueConstraint(
            "owner", "idempotency_key", name=op.f("uq_search_jobs_owner_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_search_jobs_owner"), "search_jobs", ["owner"])
    op.create_index(
        "ix_search_jobs_state_last_claimed_at", "search_jobs", ["state", "last_claimed_at"]
    )

    op.create_table(
        "trial_leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.Integer(), nullable=True),
        sa.Column("retry_pending", sa.Boolean(), nullable=False),
        sa.Column("optuna_trial_id", sa.Integer(), nullable=True),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["search_jobs.id"],
            name=op.f("fk_trial_leases_job_id_search_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["retry_of"],
            ["trial_leases.id"],
            name=op.f("fk_trial_leases_retry_of_trial_leases"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trial_leases")),
        sa.UniqueConstraint("retry_of", name=op.f("uq_trial_leases_retry_of")),
    )
    op.create_index(op.f("ix_trial_leases_job_id"), "trial_leases", ["job_id"])
    op.create_index("ix_trial_leases_state_heartbeat_at", "trial_leases", ["state", "heartbeat_at"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_trial_leases_state_heartbeat_at", table_name="trial_leases")
    op.drop_index(op.f("ix_trial_leases_job_id"), table_name="trial_leases")
    op.drop_table("trial_leases")
    op.drop_index("ix_search_jobs_state_last_claimed_at", table_name="search_jobs")
    op.drop_index(op.f("ix_search_jobs_owner"), table_name="search_jobs")
    op.drop_table("search_jobs")
