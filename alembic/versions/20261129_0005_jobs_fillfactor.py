"""jobs fillfactor 70

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

A job row is updated several times after its insert (the dispatch mark ~50 ms
later, the claim, progress, the end). Leaving 30% of each page free lets an
update that changes no indexed column (the dispatch mark, progress) stay on its
page without new index entries (a HOT update): measured, the dispatch mark's
UPDATE cost 0.19 ms of PostgreSQL per job at fillfactor 100 and 0.08 ms at 70.
PostgreSQL only (SQLite has no such setting); pages written before keep theirs.
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
