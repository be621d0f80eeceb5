"""The schema, as SQLAlchemy models. Alembic migrations create it; a structural
test proves the two agree.

Every default is computed in Python, so an INSERT never needs a refresh to know
the row it wrote (one round trip per statement, no read-back).
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String,
                        Text, TypeDecorator, UniqueConstraint, Uuid)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.status import AssetStatus, JobStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC on the way in and out, on every backend (SQLite keeps naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


JSONType = JSON().with_variant(JSONB(), "postgresql")
IdType = Uuid(as_uuid=False)
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Profile(Base):
    __tablename__ = "profiles"

    id: Mapped[str] = mapped_column(IdType, primary_key=True)
    token_balance: Mapped[int] = mapped_column(Integer, default=100)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    #: While some web process holds an event stream of this user open (a lease it renews):
    #: PostgreSQL writers NOTIFY this user's new events only until then (orchestrator.events).
    watched_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class UserRole(Base):
    __tablename__ = "user_roles"
    __table_args__ = (UniqueConstraint("user_id", "role", name="uq_user_roles_user_role"),)

    id: Mapped[str] = mapped_column(IdType, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdType, ForeignKey("profiles.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (Index("ix_projects_user_created", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(IdType, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdType, ForeignKey("profiles.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(200))
    original_prompt: Mapped[str | None] = mapped_column(Text)
    enhanced_prompt: Mapped[str | None] = mapped_column(Text)
    media_type: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class _Asset:
    """Columns an image row and a video row share (the legacy tables' common part)."""

    id: Mapped[str] = mapped_column(IdType, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdType, ForeignKey("profiles.id", ondelete="CASCADE"))
    project_id: Mapped[str | None] = mapped_column(IdType, ForeignKey("projects.id", ondelete="SET NULL"))
    title: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str | None] = mapped_column(Text)
    enhanced_prompt: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=AssetStatus.QUEUED.value)
    thumbnail_url: Mapped[str | None] = mapped_column(Text)
    quality: Mapped[str | None] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Image(_Asset, Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_user_created", "user_id", "created_at"),)

    image_url: Mapped[str | None] = mapped_column(Text)
    image_urls: Mapped[list[str] | None] = mapped_column(JSONType)
    generation_mode: Mapped[str | None] = mapped_column(String(48))


class Video(_Asset, Base):
    __tablename__ = "videos"
    __table_args__ = (Index("ix_videos_user_created", "user_id", "created_at"),)

    video_url: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[float | None] = mapped_column(Float)
    resolution: Mapped[str | None] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(16))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # GET /v1/jobs: a user's jobs, newest first, keyset-paginated.
        Index("ix_jobs_user_created", "user_id", "created_at", "id"),
        # queueLength / queue position / claim: waiting jobs of one family, oldest first.
        Index("ix_jobs_family_status_created", "family", "status", "created_at"),
        # Reconciler: expired leases and unpublished jobs.
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # The per-user cap on queued+processing jobs, counted at every submission.
        Index("ix_jobs_user_status", "user_id", "status"),
        # Room on each page for the updates that follow an insert (migration 0005).
        {"postgresql_with": {"fillfactor": 70}},
    )

    id: Mapped[str] = mapped_column(IdType, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdType, ForeignKey("profiles.id", ondelete="CASCADE"))
    job_type: Mapped[str] = mapped_column(String(48))
    family: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    quality: Mapped[str] = mapped_column(String(16))
    model_variant: Mapped[str] = mapped_column(String(48))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    enhanced_prompt: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    project_id: Mapped[str | None] = mapped_column(IdType, ForeignKey("projects.id", ondelete="SET NULL"))
    image_id: Mapped[str | None] = mapped_column(IdType, ForeignKey("images.id", ondelete="SET NULL"))
    video_id: Mapped[str | None] = mapped_column(IdType, ForeignKey("videos.id", ondelete="SET NULL"))
    seed: Mapped[int] = mapped_column(BigInteger)
    credits: Mapped[int] = mapped_column(Integer)
    charges: Mapped[int] = mapped_column(Integer, default=1)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error_message: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    #: When the current run was queued (submission, or the user's retry): its deadline counts from here.
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class JobEvent(Base):
    """The numbered, append-only log of every job/image/video change."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_user_id", "user_id", "id"),
        Index("ix_job_events_job_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(IdType)
    job_id: Mapped[str | None] = mapped_column(IdType)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(IdType)
    type: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CreditEntry(Base):
    """The credit ledger: every debit and refund, once each (the unique key says so)."""

    __tablename__ = "credit_ledger"
    __table_args__ = (
        UniqueConstraint("job_id", "reason", "charge_no", name="uq_credit_ledger_job_reason_charge"),
        Index("ix_credit_ledger_user_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(IdType)
    job_id: Mapped[str | None] = mapped_column(IdType)
    charge_no: Mapped[int] = mapped_column(Integer, default=1)
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))
    balance_after: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key``: the request it named and the answer it got.

    For job submission the row is written in the same transaction as the job,
    so a key names exactly one job whatever crashes.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),
        Index("ix_idempotency_keys_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(IdType)
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(IdType)
    status_code: Mapped[int] = mapped_column(Integer)
    #: The answer's JSON text, kept verbatim (JSONB would reorder its keys).
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Revocation(Base):
    """A revoked login session, or every token of a user issued before a moment.

    Written only by ``orchestrator revoke``; the web processes keep a copy
    refreshed every ``REVOCATION_REFRESH_SECONDS``.
    """

    __tablename__ = "revocations"
    __table_args__ = (UniqueConstraint("kind", "subject", name="uq_revocations_kind_subject"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: ``session`` (the token's ``session_id`` or ``jti``) or ``user`` (its ``sub``).
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(255))
    #: For ``user``: tokens issued (``iat``) at or before this moment are refused.
    revoked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(String(200))


class WorkerHeartbeat(Base):
    """A worker seen recently: Celery workers beat every few seconds; external
    workers are seen when they lease a job. Feeds ``workers seen`` and ETAs."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    family: Mapped[str] = mapped_column(String(16))
    #: Jobs this worker runs at once (its pool size).
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
