"""the Optuna trial a pending retry must run: the reaper enqueues the retried trial's
parameters first and then, in the same transaction that makes the slot claimable, names
that WAITING trial here; the claim hands its id to the worker, which pops exactly it

Revision ID: 0003_retry_trial_id
Revises: 0002_retry_pending_index
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_retry_trial_id"
down_revision: str | None = "0002_retry_pending_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trial_leases") as batch:
        batch.add_column(sa.Column("retry_trial_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trial_leases") as batch:
        batch.drop_column("retry_trial_id")
