"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28

profiles, user_roles, projects, images, videos, jobs, the job event log and
the credit ledger, with the indexes of the queries the service runs.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Column types shared by the tables below (UTC timestamps, JSONB on PostgreSQL,
# a 64-bit id that SQLite still auto-increments).
UTC = sa.DateTime(timezone=True)
JSONB = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('credit_ledger',
    sa.Column('id', BIGID, autoincrement=True, nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('job_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('charge_no', sa.Integer(), nullable=False),
    sa.Column('delta', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('balance_after', sa.Integer(), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'reason', 'charge_no', name='uq_credit_ledger_job_reason_charge')
    )
    with op.batch_alter_table('credit_ledger', schema=None) as batch_op:
        batch_op.create_index('ix_credit_ledger_user_id', ['user_id', 'id'], unique=False)

    op.create_table('job_events',
    sa.Column('id', BIGID, autoincrement=True, nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('job_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('entity', sa.String(length=16), nullable=False),
    sa.Column('entity_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('type', sa.String(length=48), nullable=False),
    sa.Column('payload', JSONB, nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_job_id', ['job_id', 'id'], unique=False)
        batch_op.create_index('ix_job_events_user_id', ['user_id', 'id'], unique=False)

    op.create_table('profiles',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('token_balance', sa.Integer(), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('updated_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('projects',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=True),
    sa.Column('original_prompt', sa.Text(), nullable=True),
    sa.Column('enhanced_prompt', sa.Text(), nullable=True),
    sa.Column('media_type', sa.String(length=16), nullable=True),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('updated_at', UTC, nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.create_index('ix_projects_user_created', ['user_id', 'created_at'], unique=False)

    op.create_table('user_roles',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id', 'role', name='uq_user_roles_user_role')
    )
    op.create_table('images',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('project_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('title', sa.String(length=200), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('enhanced_prompt', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('image_url', sa.Text(), nullable=True),
    sa.Column('image_urls', JSONB, nullable=True),
    sa.Column('thumbnail_url', sa.Text(), nullable=True),
    sa.Column('quality', sa.String(length=16), nullable=True),
    sa.Column('generation_mode', sa.String(length=48), nullable=True),
    sa.Column('metadata', JSONB, nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('updated_at', UTC, nullable=False),
    sa.Column('completed_at', UTC, nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_user_created', ['user_id', 'created_at'], unique=False)

    op.create_table('videos',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('project_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('title', sa.String(length=200), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('enhanced_prompt', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('video_url', sa.Text(), nullable=True),
    sa.Column('thumbnail_url', sa.Text(), nullable=True),
    sa.Column('duration', sa.Float(), nullable=True),
    sa.Column('resolution', sa.String(length=16), nullable=True),
    sa.Column('format', sa.String(length=16), nullable=True),
    sa.Column('quality', sa.String(length=16), nullable=True),
    sa.Column('metadata', JSONB, nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('updated_at', UTC, nullable=False),
    sa.Column('completed_at', UTC, nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.create_index('ix_videos_user_created', ['user_id', 'created_at'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('user_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('job_type', sa.String(length=48), nullable=False),
    sa.Column('family', sa.String(length=16), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('quality', sa.String(length=16), nullable=False),
    sa.Column('model_variant', sa.String(length=48), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=True),
    sa.Column('enhanced_prompt', sa.Text(), nullable=True),
    sa.Column('metadata', JSONB, nullable=False),
    sa.Column('result', JSONB, nullable=True),
    sa.Column('project_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('image_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('video_id', sa.Uuid(as_uuid=False), nullable=True),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('credits', sa.Integer(), nullable=False),
    sa.Column('charges', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', UTC, nullable=True),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('updated_at', UTC, nullable=False),
    sa.Column('dispatched_at', UTC, nullable=True),
    sa.Column('started_at', UTC, nullable=True),
    sa.Column('completed_at', UTC, nullable=True),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['video_id'], ['videos.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_family_status_created', ['family', 'status', 'created_at'], unique=False)
        batch_op.create_index('ix_jobs_status_lease', ['status', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_jobs_user_created', ['user_id', 'created_at', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_user_created')
        batch_op.drop_index('ix_jobs_status_lease')
        batch_op.drop_index('ix_jobs_family_status_created')

    op.drop_table('jobs')
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.drop_index('ix_videos_user_created')

    op.drop_table('videos')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_user_created')

    op.drop_table('images')
    op.drop_table('user_roles')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_index('ix_projects_user_created')

    op.drop_table('projects')
    op.drop_table('profiles')
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_index('ix_job_events_user_id')
        batch_op.drop_index('ix_job_events_job_id')

    op.drop_table('job_events')
    with op.batch_alter_table('credit_ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_credit_ledger_user_id')

    op.drop_table('credit_ledger')
