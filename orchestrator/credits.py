"""Credits: debited with the job, refunded once if it fails or is cancelled.

Both moves are single guarded UPDATEs on ``profiles`` plus a ledger row whose
unique key (job, reason, charge number) makes a second refund of the same
charge impossible even if two writers raced past every other guard.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, insert, literal, select, update
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


ACTIVE = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)


class Charge(NamedTuple):
    """What the charging statement returns besides the new balance."""

    balance: int
    active: int  #: the user's queued + processing jobs before this one
    queued: int  #: jobs of ``queued_family`` waiting before this one (0 without one)


@functools.cache
def _debit_statement(count_queued: bool, notify: bool) -> Any:
    """The charging UPDATE, built once per shape over the tables (plain Core: no ORM
    bulk-update machinery); values are bound at execution (``b_user``, ``b_amount``,
    ``b_now``, ``b_family``)."""
    profiles, jobs = Profile.__table__.c, Job.__table__.c
    user = bindparam("b_user", type_=profiles.id.type)
    active = (select(func.count()).select_from(Job.__table__)
              .where(jobs.user_id == user, jobs.status.in_(ACTIVE)).scalar_subquery())
    queued: Any = literal(0)
    if count_queued:
        queued = (select(func.count()).select_from(Job.__table__)
                  .where(jobs.family == bindparam("b_family", type_=jobs.family.type),
                         jobs.status == JobStatus.QUEUED.value)
                  .scalar_subquery())
    columns: list[Any] = [profiles.token_balance, active, queued]
    if notify:
        columns.append(events.NOTIFY_USER)
    amount = bindparam("b_amount", type_=profiles.token_balance.type)
    return (update(Profile.__table__).where(profiles.id == user, profiles.token_balance >= amount)
            .values(token_balance=profiles.token_balance - amount,
                    updated_at=bindparam("b_now", type_=profiles.updated_at.type))
            .returning(*columns))


def _debit_counting(session: Session, user_id: str, amount: int,
                    queued_family: str | None) -> Charge | None:
    """Debit, and in the same statement count the user's active jobs and the family's queue."""
    notify = events.announce_in(session, user_id) is not None  # the job's events follow
    params: dict[str, Any] = {"b_user": user_id, "b_amount": amount, "b_now": utcnow()}
    if queued_family is not None:
        params["b_family"] = queued_family
    row = session.execute(_debit_statement(queued_family is not None, notify), params).one_or_none()
    return None if row is None else Charge(row[0], row[1], row[2])


def debit(session: Session, user_id: str, amount: int, *, max_active: int = 0,
          retry_after: int = 10, queued_family: str | None = None) -> Charge:
    """Take ``amount`` from the user's balance, in one statement that also counts.

    A user seen for the first time gets a profile with the default balance.
    The same statement counts the user's queued and processing jobs (checked
    against ``max_active``; at the cap the caller's transaction must roll back,
    the debit with it) and, with ``queued_family``, that family's waiting jobs:
    no extra round trips.

    Raises:
        InsufficientCredits: the balance is below ``amount`` (nothing changes).
        RateLimited: the user already has ``max_active`` jobs queued or running.
    """
    charge = _debit_counting(session, user_id, amount, queued_family)
    if charge is None:
        ensure_profile(session, user_id)
        charge = _debit_counting(session, user_id, amount, queued_family)
    if charge is None:
        raise InsufficientCredits(
            f"Insufficient credits: this job costs {amount}",
            details={"required": amount})
    if max_active and charge.active >= max_active:
        raise RateLimited(
            f"You have {charge.active} jobs queued or running; the limit is {max_active}. "
            "Submit more when some finish.", retry_after=retry_after,
            details={"active_jobs": charge.active, "max_active_jobs": max_active})
    return charge


def record(session: Session, *, user_id: str, job_id: str | None, delta: int, reason: str,
           balance_after: int, charge_no: int = 1) -> None:
    session.execute(_INSERT_ENTRY, dict(
        user_id=user_id, job_id=job_id, delta=delta, reason=reason, charge_no=charge_no,
        balance_after=balance_after, created_at=utcnow()))


_INSERT_ENTRY = insert(CreditEntry.__table__)


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
