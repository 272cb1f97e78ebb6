"""an index on (owner, last_claimed_at): the fair-share claim reads each principal's last
claim over all its jobs, one index probe per principal instead of a scan of its history

Revision ID: 0005_owner_last_claimed_index
Revises: 0004_api_tokens
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_owner_last_claimed_index"
down_revision: str | None = "0004_api_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_search_jobs_owner_last_claimed_at", "search_jobs", ["owner", "last_claimed_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_search_jobs_owner_last_claimed_at", table_name="search_jobs")
