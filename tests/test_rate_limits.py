"""Rate limits: per-user submission budget (flask-limiter, Redis-shared when
REDIS_URL is set) and the per-user cap on queued+processing jobs; both 429 JSON
with Retry-After, both leave no job and no charge behind."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from orchestrator.models import Job
from orchestrator.tokens import mint_user_token
from tests.conftest import REDIS_BASE
from tests.helpers import assert_json_error

LIMITER_REDIS_DB = 14
BODY = {"jobType": "sdxl_image_fast", "metadata": {"prompt": "a red bicycle"}}
QUEUE = "/functions/v1/queue-job"


def _app(settings: Any, **changes: Any) -> Any:
    from web import create_app

    return create_app(dataclasses.replace(settings, **changes),
                      publisher=lambda job_id, job_type: None)


def _jobs(db: Any, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(Job).where(Job.user_id == user_id)).scalar_one()


def _headers(settings: Any, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_user_token(settings, user_id)}"}


def _assert_429(resp: Any) -> dict[str, Any]:
    body = assert_json_error(resp, 429)
    assert body["code"] == "rate_limited"
    retry_after = resp.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, retry_after
    return body


def test_submission_rate_limit_is_per_user_and_shared_by_routes(settings: Any, db: Any) -> None:
    client = _app(settings, submit_rate_limit="3/minute").test_client()
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    a, b = _headers(settings, alice), _headers(settings, bob)
    assert client.post(QUEUE, json=BODY, headers=a).status_code == 200
    assert client.post("/v1/jobs", json=BODY, headers=a).status_code == 201
    assert client.post(QUEUE, json=BODY, headers=a).status_code == 200
    before = client.get("/v1/me", headers=a).get_json()["token_balance"]
    _assert_429(client.post(QUEUE, json=BODY, headers=a))
    _assert_429(client.post("/v1/jobs", json=BODY, headers=a))
    assert _jobs(db, alice) == 3
    assert client.get("/v1/me", headers=a).get_json()["token_balance"] == before
    # reads are not limited, and another user has a budget of their own
    assert client.get("/v1/jobs", headers=a).status_code == 200
    assert client.post(QUEUE, json=BODY, headers=b).status_code == 200


def test_limit_is_checked_after_authentication(settings: Any, db: Any) -> None:
    """Anonymous floods get 401, and do not spend a real user's budget."""
    client = _app(settings, submit_rate_limit="2/minute").test_client()
    for _ in range(5):
        assert client.post(QUEUE, json=BODY).status_code == 401
    user = str(uuid.uuid4())
    assert client.post(QUEUE, json=BODY, headers=_headers(settings, user)).status_code == 200


def _limiter_redis() -> str:
    url = f"{REDIS_BASE}/{LIMITER_REDIS_DB}"
    redis_lib.Redis.from_url(url).flushdb()
    return url


def test_redis_store_is_shared_by_web_processes(settings: Any, db: Any, tmp_path: Path) -> None:
    """Two submissions from another process count against the same budget here."""
    url = _limiter_redis()
    user = str(uuid.uuid4())
    token = mint_user_token(settings, user)
    script = textwrap.dedent(f"""
        import dataclasses, json
        from orchestrator.config import Settings
        from web import create_app
        settings = Settings.from_env({json.dumps({
            "DATABASE_URL": settings.database_url, "REDIS_URL": url,
            "STORAGE_ROOT": str(tmp_path / "storage"), "VAR_DIR": str(tmp_path / "var"),
            "SUBMIT_RATE_LIMIT": "3/minute", "MAX_ACTIVE_JOBS": "0"})})
        client = create_app(settings, publisher=lambda *a: None).test_client()
        codes = [client.post("{QUEUE}", json={json.dumps(BODY)},
                             headers={{"Authorization": "Bearer {token}"}}).status_code
                 for _ in range(2)]
        print(json.dumps(codes))
    """)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [200, 200]
    client = _app(settings, redis_url=url, submit_rate_limit="3/minute").test_client()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_429(client.post(QUEUE, json=BODY, headers=headers))
    assert _jobs(db, user) == 3
    assert redis_lib.Redis.from_url(url).keys("*job-submission*"), "limits were not kept in Redis"


def test_down_limiter_store_never_fails_a_request(settings: Any, db: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Documented behaviour: per-process in-memory limits take over, with a warning."""
    client = _app(settings, redis_url="redis://127.0.0.1:1/0", submit_rate_limit="2/minute").test_client()
    user = str(uuid.uuid4())
    headers = _headers(settings, user)
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_429(client.post(QUEUE, json=BODY, headers=headers))
    assert _jobs(db, user) == 2
    assert any("falling back to in-memory" in r.getMessage() for r in caplog.records)


def test_active_jobs_cap(settings: Any, db: Any, worker_headers: dict[str, str]) -> None:
    client = _app(settings, max_active_jobs=2).test_client()
    user = str(uuid.uuid4())
    headers = _headers(settings, user)
    first = client.post(QUEUE, json=BODY, headers=headers).get_json()["job"]["id"]
    second = client.post("/v1/jobs", json=BODY, headers=headers).get_json()["job"]["id"]
    balance = client.get("/v1/me", headers=headers).get_json()["token_balance"]
    body = _assert_429(client.post(QUEUE, json=BODY, headers=headers))
    assert body["details"] == {"active_jobs": 2, "max_active_jobs": 2}
    _assert_429(client.post("/v1/jobs", json=BODY, headers=headers))
    assert _jobs(db, user) == 2
    assert client.get("/v1/me", headers=headers).get_json()["token_balance"] == balance
    # a processing job still counts; a finished one frees a place
    assert client.post("/functions/v1/job-callback", json={"job_id": first, "status": "processing"},
                       headers=worker_headers).status_code == 200
    _assert_429(client.post(QUEUE, json=BODY, headers=headers))
    assert client.post("/functions/v1/job-callback",
                       json={"job_id": second, "status": "failed", "error_message": "x"},
                       headers=worker_headers).status_code == 200
    third = client.post(QUEUE, json=BODY, headers=headers)
    assert third.status_code == 200, third.get_data(as_text=True)
    # retrying the failed job would make three active: refused, nothing charged
    balance = client.get("/v1/me", headers=headers).get_json()["token_balance"]
    _assert_429(client.post(f"/v1/jobs/{second}/retry", headers=headers))
    assert client.get("/v1/me", headers=headers).get_json()["token_balance"] == balance
    with db.session() as s:
        assert s.get(Job, second).status == "failed"
