"""Rate limits: the per-user submission budget (web/limits.py: one Lua script, one Redis round
trip per request, Redis-shared when REDIS_URL is set, per-process memory otherwise or while Redis
is down) and the per-user cap on queued+processing jobs; both 429 JSON with Retry-After, both
leave no job and no charge behind."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from orchestrator.config import Settings
from orchestrator.models import Job
from orchestrator.tokens import mint_user_token
from tests.conftest import REDIS_BASE, TEST_REDIS_URL
from tests.helpers import assert_json_error
from tests.stack import PrivateRedis

LIMITER_REDIS_DB = 14
BODY = {"jobType": "sdxl_image_fast", "metadata": {"prompt": "a red bicycle"}}
QUEUE = "/functions/v1/queue-job"
MESSAGE = "Too many job submissions; slow down"
FALLING_BACK = "falling back to in-memory"
# The shared test Redis; keys are per user (random ids), so nothing here flushes it.
SHARED_REDIS = f"{REDIS_BASE}/{LIMITER_REDIS_DB}"


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


def _assert_limited(resp: Any, limit: str) -> int:
    """A submission-limit 429 naming ``limit``; its Retry-After in seconds."""
    body = _assert_429(resp)
    assert body["error"] == MESSAGE
    assert body["details"] == {"limit": limit}
    return int(resp.headers["Retry-After"])


@pytest.fixture
def pg_settings(pg_database: str, tmp_path: Path) -> Settings:
    """PostgreSQL (its events go by NOTIFY): with REDIS_URL set, only the limiter uses Redis."""
    return Settings.from_env({
        "DATABASE_URL": pg_database, "BROKER_URL": TEST_REDIS_URL, "RESULT_BACKEND": TEST_REDIS_URL,
        "VAR_DIR": str(tmp_path / "var"), "STORAGE_ROOT": str(tmp_path / "storage"),
        "SUBMIT_RATE_LIMIT": "1000/second", "MAX_ACTIVE_JOBS": "0"})


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own: stopped, paused or counted without touching others."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class _User:
    def __init__(self, client: Any, settings: Settings) -> None:
        self.client, self.headers = client, _headers(settings, str(uuid.uuid4()))

    def submit(self) -> Any:
        return self.client.post(QUEUE, json=BODY, headers=self.headers)


def _limited_user(settings: Settings, store: str, limit: str) -> _User:
    redis_url = SHARED_REDIS if store == "redis" else None
    return _User(_app(settings, redis_url=redis_url, submit_rate_limit=limit).test_client(), settings)


def test_submission_rate_limit_is_per_user_and_shared_by_routes(settings: Any, db: Any) -> None:
    client = _app(settings, submit_rate_limit="3/minute").test_client()
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    a, b = _headers(settings, alice), _headers(settings, bob)
    assert client.post(QUEUE, json=BODY, headers=a).status_code == 200
    assert client.post("/v1/jobs", json=BODY, headers=a).status_code == 201
    assert client.post(QUEUE, json=BODY, headers=a).status_code == 200
    before = client.get("/v1/me", headers=a).get_json()["token_balance"]
    _assert_limited(client.post(QUEUE, json=BODY, headers=a), "3 per 1 minute")
    _assert_limited(client.post("/v1/jobs", json=BODY, headers=a), "3 per 1 minute")
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


def test_empty_setting_is_unlimited(pg_settings: Settings) -> None:
    user = _limited_user(pg_settings, "redis", "")
    assert [user.submit().status_code for _ in range(8)] == [200] * 8


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_window_is_enforced_and_moves(pg_settings: Settings, store: str) -> None:
    user = _limited_user(pg_settings, store, "3/second")
    assert [user.submit().status_code for _ in range(3)] == [200] * 3
    assert _assert_limited(user.submit(), "3 per 1 second") == 1
    time.sleep(1.1)  # the first three left the window
    assert user.submit().status_code == 200


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_every_window_counts(pg_settings: Settings, store: str) -> None:
    """The per-minute budget runs out though the per-second one never does."""
    user = _limited_user(pg_settings, store, "5/second;2/minute")
    assert [user.submit().status_code for _ in range(2)] == [200] * 2
    retry_after = _assert_limited(user.submit(), "2 per 1 minute")
    assert 55 <= retry_after <= 60, retry_after  # the first one leaves the minute then, not before


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_refused_requests_spend_nothing(pg_settings: Settings, store: str) -> None:
    """Documented choice: a refused request is recorded in no window (as flask-limiter's moving
    window did for the window that refused; it did record it in the windows checked before)."""
    user = _limited_user(pg_settings, store, "2/second;3/minute")
    assert [user.submit().status_code for _ in range(2)] == [200] * 2
    for _ in range(3):
        _assert_limited(user.submit(), "2 per 1 second")
    time.sleep(1.1)
    assert user.submit().status_code == 200  # the minute holds 3: the refusals were not counted
    _assert_limited(user.submit(), "3 per 1 minute")
    # refused by the longer window: nothing lands in the shorter one either
    other = _limited_user(pg_settings, store, "2/second;1/minute")
    assert other.submit().status_code == 200
    for _ in range(3):
        _assert_limited(other.submit(), "1 per 1 minute")  # never "2 per 1 second"


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_concurrent_submissions_never_overshoot(store: str) -> None:
    """Sixteen threads, one user: exactly the budget is admitted, each admission recorded once
    (atomic check-and-record; a unique member per request, however close in time)."""
    from orchestrator.errors import RateLimited
    from web.limits import KEY_PREFIX, SubmissionLimiter

    limiter = SubmissionLimiter("20/minute;1000/second", SHARED_REDIS if store == "redis" else None)
    user = str(uuid.uuid4())

    def submit(_: int) -> bool:
        try:
            limiter.hit(user)
            return True
        except RateLimited:
            return False

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(submit, range(60))) == 20
    if store == "redis":
        assert redis_lib.Redis.from_url(SHARED_REDIS).zcard(KEY_PREFIX + user) == 20


def test_two_app_instances_share_the_redis_budget(pg_settings: Settings) -> None:
    first = _app(pg_settings, redis_url=SHARED_REDIS, submit_rate_limit="3/minute").test_client()
    second = _app(pg_settings, redis_url=SHARED_REDIS, submit_rate_limit="3/minute").test_client()
    user_id = str(uuid.uuid4())
    headers = _headers(pg_settings, user_id)
    assert first.post(QUEUE, json=BODY, headers=headers).status_code == 200
    assert second.post("/v1/jobs", json=BODY, headers=headers).status_code == 201
    assert first.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_limited(second.post(QUEUE, json=BODY, headers=headers), "3 per 1 minute")
    key = f"orchestrator:job-submission:user:{user_id}"
    stored = redis_lib.Redis.from_url(SHARED_REDIS)
    assert stored.zcard(key) == 3
    assert 0 < stored.pttl(key) <= 60_001  # gone once the longest window has passed


def test_redis_store_is_shared_by_web_processes(settings: Any, db: Any, tmp_path: Path) -> None:
    """Two submissions from another process count against the same budget here."""
    user = str(uuid.uuid4())
    token = mint_user_token(settings, user)
    script = textwrap.dedent(f"""
        import dataclasses, json
        from orchestrator.config import Settings
        from web import create_app
        settings = Settings.from_env({json.dumps({
            "DATABASE_URL": settings.database_url, "REDIS_URL": SHARED_REDIS,
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
    client = _app(settings, redis_url=SHARED_REDIS, submit_rate_limit="3/minute").test_client()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_429(client.post(QUEUE, json=BODY, headers=headers))
    assert _jobs(db, user) == 3
    assert redis_lib.Redis.from_url(SHARED_REDIS).exists(f"orchestrator:job-submission:user:{user}")


def test_one_redis_round_trip_per_limited_request(pg_settings: Settings,
                                                  private_redis: PrivateRedis) -> None:
    """Allowed or refused, a submission costs the limiter one EVALSHA, whatever the windows."""
    user = _User(_app(pg_settings, redis_url=private_redis.url,
                      submit_rate_limit="30/minute;5/second;3/hour").test_client(), pg_settings)
    assert user.submit().status_code == 200  # loads the script (NOSCRIPT, SCRIPT LOAD) once
    redis = private_redis.client()
    redis.config_resetstat()
    marker = private_redis.client()
    marker.ping()  # connected (and its handshake sent) before the monitor starts
    with redis.monitor() as monitor:
        codes = [user.submit().status_code for _ in range(4)]
        sentinel = f"end-{uuid.uuid4().hex}"
        marker.echo(sentinel)
        top_level = []
        while True:
            entry = monitor.next_command()
            if sentinel in entry["command"]:
                break
            if entry["client_type"] != "lua":  # commands inside the script are not round trips
                top_level.append(entry["command"].split()[0].upper())
    assert codes == [200, 200, 429, 429]
    assert top_level == ["EVALSHA"] * 4
    stats = redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 4
    assert stats["cmdstat_time"]["calls"] == 4  # one script run each


def test_down_limiter_store_never_fails_a_request(settings: Any, db: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Documented behaviour: per-process in-memory limits take over, with one warning."""
    client = _app(settings, redis_url="redis://127.0.0.1:1/0", submit_rate_limit="2/minute").test_client()
    user = str(uuid.uuid4())
    headers = _headers(settings, user)
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    assert client.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_limited(client.post(QUEUE, json=BODY, headers=headers), "2 per 1 minute")
    assert _jobs(db, user) == 2
    assert sum(FALLING_BACK in r.getMessage() for r in caplog.records) == 1  # once per outage


def test_redis_outage_falls_back_to_memory_and_comes_back(
        pg_settings: Settings, private_redis: PrivateRedis,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="web.limits")
    apps = [_app(pg_settings, redis_url=private_redis.url, submit_rate_limit="3/minute")
            for _ in range(2)]
    user_id = str(uuid.uuid4())
    headers = _headers(pg_settings, user_id)
    a, b = (app.test_client() for app in apps)
    # up: both web processes count in Redis
    assert a.post(QUEUE, json=BODY, headers=headers).status_code == 200
    assert b.post(QUEUE, json=BODY, headers=headers).status_code == 200
    private_redis.stop()
    # down: each process counts in its own memory, from zero; nothing fails
    assert [a.post(QUEUE, json=BODY, headers=headers).status_code for _ in range(3)] == [200] * 3
    _assert_limited(a.post(QUEUE, json=BODY, headers=headers), "3 per 1 minute")
    assert b.post(QUEUE, json=BODY, headers=headers).status_code == 200
    assert sum(FALLING_BACK in r.getMessage() for r in caplog.records) == 2  # once per process
    private_redis.start()  # its append-only file kept the two hits from before the outage
    # Redis is tried again a second after the failure (not on every request meanwhile)
    limiters = [app.extensions["submission_limit"] for app in apps]
    time.sleep(max(0.0, max(lim._retry_at for lim in limiters) - time.monotonic()) + 0.05)
    # back: shared again. a's memory is full, so its 200 comes from Redis (3rd hit there);
    # b's memory has room, so its 429 comes from Redis too.
    assert a.post(QUEUE, json=BODY, headers=headers).status_code == 200
    _assert_limited(b.post(QUEUE, json=BODY, headers=headers), "3 per 1 minute")
    assert private_redis.client().zcard(f"orchestrator:job-submission:user:{user_id}") == 3
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 2


def test_slow_redis_times_out_to_memory(pg_settings: Settings, private_redis: PrivateRedis,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that does not answer costs a request its 0.5 s socket timeout, once."""
    user = _User(_app(pg_settings, redis_url=private_redis.url,
                      submit_rate_limit="2/minute").test_client(), pg_settings)
    assert user.submit().status_code == 200
    private_redis.client().execute_command("CLIENT", "PAUSE", "3000", "ALL")
    started = time.monotonic()
    assert user.submit().status_code == 200
    assert user.submit().status_code == 200  # memory now, no second wait
    _assert_limited(user.submit(), "2 per 1 minute")
    assert time.monotonic() - started < 2.0
    assert sum(FALLING_BACK in r.getMessage() for r in caplog.records) == 1
    assert any("TimeoutError" in r.getMessage() for r in caplog.records)


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
