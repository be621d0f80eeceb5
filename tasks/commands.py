"""``orchestrator`` CLI commands that need Celery, plugged in through the
``orchestrator.commands`` entry point (the domain's CLI never imports Celery)."""
from __future__ import annotations

import json

import click

from orchestrator import reconciler
from orchestrator.config import get_settings
from orchestrator.db import Database


@click.command("reconcile")
def reconcile() -> None:
    """Run one reconciliation pass now and print what it did."""
    from tasks.publish import publish_job

    settings = get_settings()
    db = Database(settings.database_url)
    report = reconciler.reconcile(db, settings, publish_job)
    click.echo(json.dumps(report.as_dict()))
    db.dispose()
