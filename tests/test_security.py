"""Errors and headers: no stack trace, SQL or path in any answer; no secret in
any log line; hardening headers on every response."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Any, Callable

import pytest

from orchestrator.webhooks import sign
from tests.helpers import assert_json_error
from web.security import API_CSP

LEAKS = ("Traceback", "File \"", "sqlalchemy", "psycopg", "SELECT ", "INSERT ", "UPDATE ",
         "/tmp/", "/work/", "site-packages", ".py\"", "postgresql://", "sqlite:///")


def _assert_no_leak(resp: Any) -> None:
    text = resp.get_data(as_text=True)
    for marker in LEAKS:
        assert marker not in text, (marker, text[:500])


def _assert_hardened(resp: Any) -> None:
    h = resp.headers
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["X-Frame-Options"] == "DENY"
    assert h["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert h.get("X-Request-Id")
    assert h.get("Cross-Origin-Opener-Policy") == "same-origin"


@pytest.mark.parametrize("method,path,expected", [
    ("GET", "/healthz", 200), ("GET", "/v1/me", 401), ("GET", "/no/such/route", 404),
    ("DELETE", "/v1/me", 405), ("POST", "/functions/v1/queue-job", 401),
    ("GET", "/v1/files/sdxl_image_fast/x.png?expires=1&sig=x", 404),
])
def test_every_answer_is_hardened(client: Any, method: str, path: str, expected: int) -> None:
    resp = client.open(path, method=method)
    assert resp.status_code == expected
    _assert_hardened(resp)
    _assert_no_leak(resp)
    if path != "/healthz":
        assert resp.is_json and resp.get_json()["success"] is False
    assert resp.headers["Content-Security-Policy"] == API_CSP
    assert resp.headers["Cache-Control"] == "no-store"


def test_oversized_body_is_413_json_and_hardened(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    resp = client.post("/functions/v1/queue-job", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                       headers={**headers, "Content-Type": "application/json"})
    assert_json_error(resp, 413)
    _assert_hardened(resp)


def test_unexpected_error_is_generic_500(settings: Any, db: Any, caplog: pytest.LogCaptureFixture) -> None:
    from web import create_app

    app = create_app(settings, publisher=lambda *a: None)

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError(f"secret detail at {settings.storage_root}: SELECT * FROM profiles")

    with caplog.at_level(logging.ERROR):
        resp = app.test_client().get("/boom", headers={"X-Request-Id": "req-123"})
    body = assert_json_error(resp, 500)
    assert body == {"success": False, "error": "Internal server error", "code": "internal"}
    _assert_no_leak(resp)
    _assert_hardened(resp)
    # ...while the operator's log has the detail, tied to the request id
    assert any("req-123" in r.getMessage() and r.exc_info for r in caplog.records)


def test_database_down_is_503_without_sql_or_host(settings: Any, db: Any, backend: str,
                                                  make_user: Callable[..., Any]) -> None:
    from web import create_app

    broken = ("postgresql+psycopg://nobody@127.0.0.1:1/none" if backend == "postgres"
              else f"sqlite:///{settings.var_dir}/missing-dir/none/db.sqlite")
    app = create_app(dataclasses.replace(settings, database_url=broken), publisher=lambda *a: None)
    _, headers = make_user()
    for method, path, body in [("GET", "/v1/me", None), ("GET", "/v1/jobs", None),
                               ("POST", "/functions/v1/queue-job",
                                {"jobType": "sdxl_image_fast", "metadata": {"prompt": "a cat"}})]:
        resp = app.test_client().open(path, method=method, json=body, headers=headers)
        assert_json_error(resp, 503)
        _assert_no_leak(resp)
        assert "127.0.0.1" not in resp.get_data(as_text=True)


def test_no_secret_reaches_the_logs(client: Any, settings: Any, make_user: Callable[..., Any],
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Every credential the service sees, sent on good and bad requests, at DEBUG."""
    user_id, headers = make_user()
    token = headers["Authorization"].split()[1]
    secrets = [token, settings.worker_token, settings.jwt_secret, *settings.worker_secrets]
    with caplog.at_level(logging.DEBUG):
        job = client.post("/functions/v1/queue-job", headers=headers,
                          json={"jobType": "sdxl_image_fast", "metadata": {"prompt": "a cat"}}).get_json()["job"]
        client.get("/v1/me", headers={"Authorization": f"Bearer {token}x"})
        client.get(f"/v1/me?access_token={token}")
        client.post("/functions/v1/job-callback", headers={"Authorization": f"Bearer {settings.worker_token}"},
                    json={"job_id": job["id"], "status": "processing"})
        client.post("/functions/v1/job-callback", headers={"Authorization": f"Bearer {settings.worker_token}1"},
                    json={"job_id": job["id"], "status": "processing"})
        body = json.dumps({"job_id": job["id"], "status": "processing"}).encode()
        ts = int(time.time())
        client.post("/functions/v1/job-callback", data=body, headers={
            "webhook-id": "msg_1", "webhook-timestamp": str(ts),
            "webhook-signature": sign(settings.worker_secrets[0], "msg_1", ts, body),
            "Content-Type": "application/json"})
        client.post("/functions/v1/job-callback", data=body + b" ", headers={
            "webhook-id": "msg_2", "webhook-timestamp": str(ts),
            "webhook-signature": sign(settings.worker_secrets[0], "msg_2", ts, body),
            "Content-Type": "application/json"})
        client.post("/functions/v1/queue-job", headers=headers, data=b"{not json")
    assert caplog.records, "nothing was logged at all: the check would be vacuous"
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info)
                                      if record.exc_info else "")
        for secret in secrets:
            assert secret not in text, (record.name, text[:300])


def test_config_command_masks_secrets(settings: Any) -> None:
    from click.testing import CliRunner

    from orchestrator import cli
    from orchestrator.config import get_settings

    env = {"JWT_SECRET": "jwt-" + uuid.uuid4().hex, "WORKER_TOKEN": "wt-" + uuid.uuid4().hex,
           "WORKER_SECRET": "ws-" + uuid.uuid4().hex, "DATABASE_URL": settings.database_url}
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(cli.main, ["config"], env=env).output
    finally:
        get_settings.cache_clear()
    assert "jwt_secret = (set)" in out
    for secret in env.values():
        if secret != settings.database_url:
            assert secret not in out
