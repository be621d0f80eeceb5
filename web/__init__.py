"""The Flask app factory: ``create_app()`` builds everything; nothing at import."""
from __future__ import annotations

import logging

from flask import Flask

from orchestrator.config import Settings, get_settings
from orchestrator.db import Database
from orchestrator.jobtypes import BUCKETS
from orchestrator.dispatch_marks import DispatchMarks
from orchestrator.queues import Estimates
from orchestrator.revocation import RevocationList
from orchestrator.storage import LocalStorage, UrlSigner
from web.services import Publisher, Services, signing_key

MAX_BODY_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None, *, publisher: Publisher | None = None) -> Flask:
    """Build the app.

    Args:
        settings: defaults to the process settings read from the environment.
        publisher: how committed jobs reach the workers; defaults to Celery.
    """
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    if publisher is None:
        from tasks.publish import publish_job

        publisher = publish_job
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url, pool_size=settings.db_pool_size,
                        max_overflow=settings.db_max_overflow)
    app.extensions["orchestrator"] = Services(
        settings=settings,
        db=database,
        storage=LocalStorage(settings.storage_root, buckets=BUCKETS),
        signer=UrlSigner(signing_key(settings), ttl_seconds=settings.url_ttl_seconds),
        publish=publisher,
        revocations=RevocationList(database, settings.revocation_refresh_seconds),
        estimates=Estimates(database),
        dispatch_marks=DispatchMarks(database),
    )

    from web import (api, auth, errors, files, functions, health, limits, live, openapi, security,
                     workers)

    from web import logs, metrics

    logs.init_app(app)
    metrics.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    limits.init_app(app)
    from web import console

    for module in (functions, api, files, health, openapi, console):
        app.register_blueprint(module.bp)
    workers.init_app(app)
    live.init_app(app)
    security.init_app(app)

    logging.getLogger(__name__).info("web app ready (database %s)", settings.database_url.split(":")[0])
    return app
