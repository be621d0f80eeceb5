"""The ``orchestrator`` command: what an operator needs without a web request.

    orchestrator db upgrade            apply migrations to DATABASE_URL
    orchestrator token --user UUID     mint a user JWT (development / support)
    orchestrator grant-admin UUID      the only way to make an admin
    orchestrator revoke-admin UUID
    orchestrator grant-credits UUID N
    orchestrator revoke --session ID | --user UUID   refuse tokens from now on
    orchestrator jobs list|show        inspect jobs and their event log
    orchestrator config                effective settings, secrets masked
    orchestrator reconcile             one reconciler pass (from the tasks package)
"""
from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import click
from sqlalchemy import select

from orchestrator import credits, events, migrations, queries, revocation
from orchestrator.config import ConfigurationError, Settings, get_settings
from orchestrator.db import Database
from orchestrator.models import Job
from orchestrator.records import job_row
from orchestrator.tokens import mint_user_token


def _uuid(_ctx: Any, _param: Any, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a uuid") from None


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigurationError as e:
        raise click.ClickException(str(e)) from e


def _db() -> Database:
    return Database(_settings().database_url)


@click.group()
def main() -> None:
    """Operate the job orchestration service."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply Alembic migrations up to REVISION."""
    url = _settings().database_url
    migrations.upgrade(url, revision)
    click.echo(f"database at {revision} ({url.split('://')[0]})")


@main.command()
@click.option("--user", "user_id", required=True, callback=_uuid, help="the user's uuid")
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1, 30 * 24 * 3600),
              help="seconds until the token expires")
def token(user_id: str, ttl: int) -> None:
    """Print a signed user JWT."""
    click.echo(mint_user_token(_settings(), user_id, ttl_seconds=ttl))


@main.command("grant-admin")
@click.argument("user_id", callback=_uuid)
def grant_admin(user_id: str) -> None:
    """Give USER_ID the admin role."""
    added = queries.grant_role(_db(), user_id)
    click.echo(f"{user_id} is admin" + ("" if added else " (already)"))


@main.command("revoke-admin")
@click.argument("user_id", callback=_uuid)
def revoke_admin(user_id: str) -> None:
    """Take the admin role from USER_ID."""
    removed = queries.revoke_role(_db(), user_id)
    click.echo(f"{user_id} is not admin" + ("" if removed else " (was not)"))


@main.command("grant-credits")
@click.argument("user_id", callback=_uuid)
@click.argument("amount", type=click.IntRange(1, 1_000_000))
def grant_credits(user_id: str, amount: int) -> None:
    """Add AMOUNT credits to USER_ID's balance (recorded in the ledger)."""
    with _db().transaction() as session:
        balance = credits.grant(session, user_id, amount)
    click.echo(f"{user_id} balance {balance}")


@main.command()
@click.option("--session", "session_id", default=None,
              help="a token's session_id (or jti): refuse every token of that session")
@click.option("--user", "user_id", default=None, callback=_uuid,
              help="a user's uuid: refuse every token issued to them until now")
@click.option("--reason", default=None, help="kept with the revocation (max 200 chars)")
def revoke(session_id: str | None, user_id: str | None, reason: str | None) -> None:
    """Revoke a login session or all of a user's current tokens (persisted)."""
    if (session_id is None) == (user_id is None):
        raise click.UsageError("give exactly one of --session or --user")
    if session_id is not None and not 1 <= len(session_id.strip()) <= 255:
        raise click.BadParameter("session id must be 1 to 255 characters", param_hint="--session")
    kind, subject = ((revocation.SESSION, session_id.strip()) if session_id is not None
                     else (revocation.USER, user_id))
    at = revocation.revoke(_db(), kind, subject, (reason or "")[:200] or None)
    click.echo(f"revoked {kind} {subject} at {at.isoformat()}; web processes refuse it within "
               f"{_settings().revocation_refresh_seconds:g} s")


@main.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("list")
@click.option("--status", default=None)
@click.option("--user", "user_id", default=None, callback=_uuid)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def jobs_list(status: str | None, user_id: str | None, limit: int) -> None:
    """Newest jobs first, one line each."""
    stmt = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status:
        stmt = stmt.where(Job.status == status)
    if user_id:
        stmt = stmt.where(Job.user_id == user_id)
    with _db().session() as session:
        for job in session.execute(stmt).scalars():
            click.echo(f"{job.id}  {job.job_type:<24} {job.status:<10} {job.progress:>3}%  "
                       f"attempt {job.attempts}/{job.max_attempts}  {job.created_at:%Y-%m-%d %H:%M:%S}")


@jobs.command("show")
@click.argument("job_id", callback=_uuid)
@click.option("--events/--no-events", "with_events", default=False)
def jobs_show(job_id: str, with_events: bool) -> None:
    """One job as JSON (and its event log)."""
    with _db().session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise click.ClickException("no such job")
        out: dict[str, Any] = {"job": job_row(job)}
        if with_events:
            out["events"] = events.payloads(session, job_id)
    click.echo(json.dumps(out, indent=2, default=str))


@main.command("config")
def show_config() -> None:
    """Effective settings, with secrets masked."""
    s = _settings()
    masked = {"jwt_secret": "JWT_SECRET", "worker_token": "WORKER_TOKEN",
              "worker_secrets": "WORKER_SECRET"}
    for name, value in sorted(vars(s).items()):
        if name in masked:
            value = "(development default)" if masked[name] in s.dev_secrets else "(set)"
        elif name == "metrics_token" and value:
            value = "(set)"
        click.echo(f"{name} = {value}")


def _plugin_commands() -> None:
    """Commands other packages add (``tasks`` adds ``reconcile``), by entry point."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="orchestrator.commands"):
        main.add_command(ep.load(), ep.name)


_plugin_commands()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
