"""revocations, jobs(user_id, status) index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Revoked user sessions and users (``orchestrator revoke``), so a revocation
survives restarts and reaches every web process; an index for counting a
user's queued and processing jobs (the per-user cap) at each submission.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "revocations",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "subject", name="uq_revocations_kind_subject"),
    )
    op.create_index("ix_jobs_user_status", "jobs", ["user_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_user_status", table_name="jobs")
    op.drop_table("revocations")
