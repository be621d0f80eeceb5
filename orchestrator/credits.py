"""Credits: debited with the job, refunded once if it fails or is cancelled.

Both moves are single guarded UPDATEs on ``profiles`` plus a ledger row whose
unique key (job, reason, charge number) makes a second refund of the same
charge impossible even if two writers raced past every other guard.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from orchestrator import events
from orchestrator.errors import InsufficientCredits, RateLimited
from orchestrator.models import CreditEntry, Job, Profile, utcnow
from orchestrator.status import JobStatus

DEFAULT_BALANCE = 100


def ensure_profile(session: Session, user_id: str) -> None:
    """Create the user's profile (with the default balance) if it does not exist."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    now = utcnow()
    stmt = dialect.insert(Profile).values(id=user_id, token_balance=DEFAULT_BALANCE,
                                          created_at=now, updated_at=now)
    session.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))


def _add_to_balance(session: Session, user_id: str, delta: int) -> int | None:
    stmt = (update(Profile).where(Profile.id == user_id)
            .values(token_balance=Profile.token_balance + delta, updated_at=utcnow())
            .returning(Profile.token_balance))
    if delta < 0:
        stmt = stmt.where(Profile.token_balance >= -delta)
    return session.execute(stmt).scalar_one_or_none()


_ACTIVE = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)


def _debit_counting_active(session: Session, user_id: str, amount: int) -> tuple[int, int] | None:
    """Debit and count the user's queued+processing jobs in the same statement."""
    active = (select(func.count()).select_from(Job)
              .where(Job.user_id == user_id, Job.status.in_(_ACTIVE)).scalar_subquery())
    columns: list[Any] = [Profile.token_balance, active]
    notify = events.announce_in(session, user_id)  # the job's events follow in this transaction
    if notify is not None:
        columns.append(notify)
    row = session.execute(
        update(Profile).where(Profile.id == user_id, Profile.token_balance >= amount)
        .values(token_balance=Profile.token_balance - amount, updated_at=utcnow())
        .returning(*columns)).one_or_none()
    return None if row is None else (row[0], row[1])


def debit(session: Session, user_id: str, amount: int, *, max_active: int = 0,
          retry_after: int = 10) -> int:
    """Take ``amount`` from the user's balance; return the new balance.

    A user seen for the first time gets a profile with the default balance.
    With ``max_active``, the same statement counts the user's queued and
    processing jobs (no extra round trip); at the cap the caller's transaction
    must roll back (the debit with it).

    Raises:
        InsufficientCredits: the balance is below ``amount`` (nothing changes).
        RateLimited: the user already has ``max_active`` jobs queued or running.
    """
    row = _debit_counting_active(session, user_id, amount)
    if row is None:
        ensure_profile(session, user_id)
        row = _debit_counting_active(session, user_id, amount)
    if row is None:
        raise InsufficientCredits(
            f"Insufficient credits: this job costs {amount}",
            details={"required": amount})
    balance, active = row
    if max_active and active >= max_active:
        raise RateLimited(
            f"You have {active} jobs queued or running; the limit is {max_active}. "
            "Submit more when some finish.", retry_after=retry_after,
            details={"active_jobs": active, "max_active_jobs": max_active})
    return balance


def record(session: Session, *, user_id: str, job_id: str | None, delta: int, reason: str,
           balance_after: int, charge_no: int = 1) -> None:
    session.execute(insert(CreditEntry).values(
        user_id=user_id, job_id=job_id, delta=delta, reason=reason, charge_no=charge_no,
        balance_after=balance_after, created_at=utcnow()))


def refund(session: Session, *, user_id: str, job_id: str, amount: int, charge_no: int) -> int:
    """Give a job's charge back. Call only from the transaction that won the job's
    terminal transition; the ledger's unique key backs that up."""
    balance = _add_to_balance(session, user_id, amount)
    assert balance is not None, "a job's owner always has a profile"
    record(session, user_id=user_id, job_id=job_id, delta=amount, reason="job_refund",
           balance_after=balance, charge_no=charge_no)
    return balance


def grant(session: Session, user_id: str, amount: int) -> int:
    """Add credits by operator action (the CLI), recorded in the ledger."""
    ensure_profile(session, user_id)
    balance = _add_to_balance(session, user_id, amount)
    assert balance is not None
    record(session, user_id=user_id, job_id=None, delta=amount, reason="grant",
           balance_after=balance, charge_no=0)
    return balance
