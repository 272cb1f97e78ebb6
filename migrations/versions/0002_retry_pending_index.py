"""a partial index on pending retries: a claim finds its job's pending retry without
scanning every lease of the job (long studies have thousands)

Revision ID: 0002_retry_pending_index
Revises: 0001_initial
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_retry_pending_index"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_trial_leases_retry_pending",
        "trial_leases",
        ["job_id"],
        postgresql_where=sa.text("retry_pending"),
        sqlite_where=sa.text("retry_pending"),
    )


def downgrade() -> None:
    op.drop_index("ix_trial_leases_retry_pending", table_name="trial_leases")
