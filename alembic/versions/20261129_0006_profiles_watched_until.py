"""profiles.watched_until

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

Until when some web process holds an event stream of the user open (a lease that
process renews while the stream lives). PostgreSQL writers NOTIFY a user's new
events only while it lasts: a NOTIFY takes a lock that every notifying commit
holds through its WAL flush, so commits that all NOTIFY cannot share a flush, and
with nobody listening that is pure cost (orchestrator.events).
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("profiles", sa.Column("watched_until", sa.DateTime(timezone=True),
                                        nullable=True))


def downgrade() -> None:
    op.drop_column("profiles", "watched_until")
