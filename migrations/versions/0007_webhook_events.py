"""webhook_events: each webhook event claimed by the one server that sends it

Revision ID: 0007_webhook_events
Revises: 0006_worker_device
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_webhook_events"
down_revision: str | None = "0006_worker_device"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["search_jobs.id"],
            name=op.f("fk_webhook_events_job_id_search_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_webhook_events")),
    )
    op.create_index(op.f("ix_webhook_events_job_id"), "webhook_events", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_events_job_id"), table_name="webhook_events")
    op.drop_table("webhook_events")
