"""Reads of a user's own rows, and the few writes that are plain records
(projects, pre-created image/video rows, roles).

Every per-user read filters by owner in SQL; another user's row and a row that
does not exist are the same ``NotFound``.
"""
from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from orchestrator import credits, events
from orchestrator.db import Database
from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.jobtypes import JOB_TYPES
from orchestrator.models import Image, Job, Profile, Project, UserRole, Video, utcnow
from orchestrator.status import JobStatus

MAX_PAGE = 100
ADMIN = "admin"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def canonical_uuid(value: object) -> str | None:
    """The id in its one stored spelling (lowercase, hyphenated), or None.

    Only the hyphenated form is accepted: ``urn:uuid:…``, braces or bare hex
    would otherwise reach SQL in spellings the database does not compare equal.
    """
    return value.lower() if isinstance(value, str) and _UUID.fullmatch(value) else None


def is_uuid(value: object) -> bool:
    return canonical_uuid(value) is not None


def unstorable(value: object, path: str) -> str | None:
    """The path of the first part of a parsed JSON value that the databases
    cannot store faithfully, or None.

    Python's JSON parser accepts lone UTF-16 surrogates (``"\\ud800"``) and
    turns out-of-range numbers (``1e400``) into infinities: PostgreSQL refuses
    both (or the driver cannot encode them), SQLite stores them and hands back
    ``Infinity``, which is not JSON. Callers answer a 400 naming the path.
    """
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, float) and (node != node or node in (float("inf"), float("-inf"))):
            return where
        if isinstance(node, str) and not _utf8(node):
            return where
        if isinstance(node, dict):
            for key, child in node.items():
                if not _utf8(str(key)):
                    return where
                stack.append((child, f"{where}.{key}"[:200]))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]"[:200]) for i, child in enumerate(node))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _owned(session: Session, model: Any, user_id: str, row_id: str, label: str) -> Any:
    row = None
    row_id = canonical_uuid(row_id)
    if row_id is not None:
        row = session.execute(
            select(model).where(model.id == row_id, model.user_id == user_id)
        ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{label} not found")
    return row


def get_job(db: Database, user_id: str, job_id: str) -> Job:
    with db.session() as session:
        return _owned(session, Job, user_id, job_id, "Job")


def get_image(db: Database, user_id: str, image_id: str) -> Image:
    with db.session() as session:
        return _owned(session, Image, user_id, image_id, "Image")


def get_video(db: Database, user_id: str, video_id: str) -> Video:
    with db.session() as session:
        return _owned(session, Video, user_id, video_id, "Video")


def get_project(db: Database, user_id: str, project_id: str) -> Project:
    with db.session() as session:
        return _owned(session, Project, user_id, project_id, "Project")


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, job_id = raw.split("|", 1)
        when = dt.datetime.fromisoformat(stamp)
        if when.tzinfo is None or not is_uuid(job_id) or not 1970 < when.year < 9000:
            raise ValueError(raw)
        return when.astimezone(dt.timezone.utc), job_id.lower()
    except (ValueError, UnicodeDecodeError, OverflowError) as e:
        raise InvalidRequest("cursor is not valid", details={"field": "cursor"}) from e


def list_jobs(db: Database, user_id: str, *, status: str | None = None,
              job_type: str | None = None, limit: int = 20,
              cursor: str | None = None) -> tuple[list[Job], str | None]:
    """The user's jobs, newest first, keyset-paginated."""
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidRequest("status is not a job status",
                             details={"field": "status", "valid": [s.value for s in JobStatus]})
    if job_type is not None and job_type not in JOB_TYPES:
        raise InvalidRequest("job_type is not a job type",
                             details={"field": "job_type", "valid": list(JOB_TYPES)})
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE}", details={"field": "limit"})
    stmt = select(Job).where(Job.user_id == user_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if job_type:
        stmt = stmt.where(Job.job_type == job_type)
    if cursor:
        when, last_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < when, and_(Job.created_at == when, Job.id < last_id)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with db.session() as session:
        jobs = list(session.execute(stmt).scalars())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return jobs, (encode_cursor(jobs[-1]) if more and jobs else None)


def roles_of(session: Session, user_id: str) -> list[str]:
    return sorted(session.execute(select(UserRole.role).where(UserRole.user_id == user_id)).scalars())


def is_admin(db: Database, user_id: str) -> bool:
    with db.session() as session:
        return ADMIN in roles_of(session, user_id)


def _summary(session: Session, user_id: str) -> dict[str, Any] | None:
    balance = session.execute(
        select(Profile.token_balance).where(Profile.id == user_id)).scalar_one_or_none()
    if balance is None:
        return None
    return {"user_id": user_id, "token_balance": balance, "roles": roles_of(session, user_id)}


def me(db: Database, user_id: str) -> dict[str, Any]:
    """The caller's balance and roles. A plain read for a known user; only a
    first visit opens a write transaction (to create the profile)."""
    with db.session() as session:
        found = _summary(session, user_id)
    if found is not None:
        return found
    with db.transaction() as session:
        credits.ensure_profile(session, user_id)
        created = _summary(session, user_id)
    assert created is not None
    return created


def watch_events(db: Database, user_id: str, seconds: float) -> None:
    """Take or renew the user's watch lease (:func:`orchestrator.events.watch`), creating
    the profile on a first visit as :func:`me` does; committed when this returns."""
    with db.transaction() as session:
        credits.ensure_profile(session, user_id)
        events.watch(session, user_id, seconds)


def grant_role(db: Database, user_id: str, role: str = ADMIN) -> bool:
    """Give a role (operators only: the CLI). Returns False if it was already held."""
    with db.transaction() as session:
        credits.ensure_profile(session, user_id)
        if role in roles_of(session, user_id):
            return False
        session.add(UserRole(user_id=user_id, role=role, created_at=utcnow()))
        return True


def revoke_role(db: Database, user_id: str, role: str = ADMIN) -> bool:
    with db.transaction() as session:
        row = session.execute(select(UserRole).where(
            UserRole.user_id == user_id, UserRole.role == role)).scalar_one_or_none()
        if row is None:
            return False
        session.delete(row)
        return True


def create_project(db: Database, user_id: str, *, title: str | None, original_prompt: str | None,
                   enhanced_prompt: str | None, media_type: str | None) -> Project:
    now = utcnow()
    project = Project(id=str(uuid.uuid4()), user_id=user_id, title=title,
                      original_prompt=original_prompt, enhanced_prompt=enhanced_prompt,
                      media_type=media_type, created_at=now, updated_at=now)
    with db.transaction() as session:
        credits.ensure_profile(session, user_id)
        session.add(project)
    return project


def create_asset(db: Database, user_id: str, kind: str, *, title: str | None,
                 prompt: str | None, project_id: str | None) -> Image | Video:
    """Pre-create an image or video row, as legacy clients did before queue-job."""
    model = Video if kind == "video" else Image
    now = utcnow()
    asset = model(id=str(uuid.uuid4()), user_id=user_id, project_id=project_id, title=title,
                  prompt=prompt, status="queued", metadata_={}, created_at=now, updated_at=now)
    with db.transaction() as session:
        credits.ensure_profile(session, user_id)
        if project_id is not None:
            _owned(session, Project, user_id, project_id, "Project")
        session.add(asset)
    return asset
