"""The console: a page at ``/`` for people, built on the public API only.

Plain HTML, one script and one stylesheet under ``web/static/console/``, served
by the app's own static route (``/static/console/…``): no build step, no CDN,
no inline script, so it runs under the page Content-Security-Policy of
``web.security`` (``script-src 'self'``, ``connect-src 'self'``). The token a
person pastes stays in the tab's ``sessionStorage`` and travels only in the
``Authorization`` header, so the live stream is read with ``fetch()`` rather
than ``EventSource`` (which cannot send headers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response

from web.openapi import Reply, spec

bp = Blueprint("console", __name__)

STATIC = Path(__file__).resolve().parent / "static" / "console"

_PAGE = Reply(description="The console page (HTML; its script and stylesheet are under "
                          "`/static/console/`)",
              content={"text/html": {"type": "string"}})


@bp.get("/")
@spec(summary="The console: submit jobs and watch them live (a page for people)", tags=["meta"],
      responses={200: _PAGE})
def index() -> Any:
    response = Response((STATIC / "index.html").read_bytes(), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"  # revalidated, never stale after an upgrade
    return response
