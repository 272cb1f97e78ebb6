"""workers.device: what each worker process trains on (``gpu 0``, ``cpu``), so ``/metrics``
reports live workers by host and device

Revision ID: 0006_worker_device
Revises: 0005_owner_last_claimed_index
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_worker_device"
down_revision: str | None = "0005_owner_last_claimed_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: rows of workers registered before this revision have no device.
    op.add_column("workers", sa.Column("device", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:  # SQLite drops a column by copying
        batch.drop_column("device")
