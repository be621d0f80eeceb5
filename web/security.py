"""Response headers every answer carries: request id and browser hardening.

JSON answers get a Content-Security-Policy that allows nothing (an API
response rendered as a page cannot run or load anything); HTML pages served by
the service (``/docs``) get one that allows only this origin's scripts. API
answers are ``no-store`` (they hold private data and signed links); downloads
set their own caching and may be embedded by other origins (``<img>``,
``<video>`` in the legacy frontend). HSTS is sent when the public URL is https.
"""
from __future__ import annotations

import re
import uuid
from typing import Any

from flask import Flask, g, request

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
            "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def init_app(app: Flask) -> None:
    settings = app.extensions["orchestrator"].settings
    hsts = (settings.public_url or "").startswith("https://")

    @app.before_request
    def _request_id() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def _headers(response: Any) -> Any:
        headers = response.headers
        headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        wanted = {**COMMON,
                  "Content-Security-Policy": PAGE_CSP if response.mimetype == "text/html" else API_CSP,
                  "Cache-Control": "no-store",  # downloads set their own
                  "Cross-Origin-Resource-Policy":
                      "cross-origin" if request.blueprint == "files" else "same-origin"}
        if hsts:
            wanted["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
        # What the view did not set itself (one pass: Headers.setdefault scans the list each).
        present = {name.lower() for name, _ in headers.items()}
        headers.extend([(k, v) for k, v in wanted.items() if k.lower() not in present])
        return response
