"""Event streams through the Flask test client: the per-process stream cap and
the resume point's validation (the live behaviour is in test_live.py)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from tests.helpers import assert_json_error


def test_stream_cap_answers_503_json_and_frees_its_slot(settings: Any, db: Any,
                                                        make_user: Callable[..., Any]) -> None:
    from web import create_app

    app = create_app(dataclasses.replace(settings, sse_max_streams=1, sse_max_seconds=30),
                     publisher=lambda *a: None)
    client = app.test_client()
    _, headers = make_user()
    first = client.get("/v1/events", headers=headers, buffered=False)
    assert first.status_code == 200
    chunks = iter(first.response)
    assert next(chunks).startswith(b"retry: 2000")  # the stream is open and holds the slot
    second = client.get("/v1/events", headers=headers)
    body = assert_json_error(second, 503)
    assert body["code"] == "unavailable"
    first.close()  # the client went away: its slot comes back
    third = client.get("/v1/events", headers=headers, buffered=False)
    assert third.status_code == 200
    third.close()


def test_bad_resume_points_are_400(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    for h, q in [({"Last-Event-ID": "-1"}, ""), ({"Last-Event-ID": "1e3"}, ""), ({}, "?since=abc"),
                 ({}, "?since=" + "9" * 30)]:
        resp = client.get("/v1/events" + q, headers={**headers, **h})
        assert_json_error(resp, 400)


def test_streams_are_woken_by_push_not_polling(settings: Any, db: Any, backend: str,
                                               make_user: Callable[..., Any],
                                               monkeypatch: Any) -> None:
    """PostgreSQL: the writer's NOTIFY; SQLite with REDIS_URL: Redis pub/sub. Polling and
    heartbeats are pushed out of reach (60 s), so only a push can deliver the event
    before the stream's 15 s lifetime ends."""
    import threading

    from orchestrator import events
    from tests.conftest import TEST_REDIS_URL
    from web import create_app, live

    monkeypatch.setattr(live, "POLL_S", 60.0)
    app = create_app(dataclasses.replace(settings, redis_url=TEST_REDIS_URL, sse_heartbeat_seconds=60,
                                         sse_max_seconds=15), publisher=lambda *a: None)
    hub = app.extensions["event_hub"]
    assert hub.mode == ("postgres" if backend == "postgres" else "redis")
    client = app.test_client()
    _, headers = make_user()
    submitted: dict[str, Any] = {}

    def submit_once_listening() -> None:
        if hub.connected.wait(10):
            time.sleep(0.3)  # the stream has read the (empty) log and waits
            submitted["resp"] = client.post("/functions/v1/queue-job", headers=headers, json={
                "jobType": "sdxl_image_fast", "metadata": {"prompt": "a push"}})

    writer = threading.Thread(target=submit_once_listening, daemon=True)
    stream = client.get("/v1/events", headers=headers, buffered=False)
    writer.start()
    seen, started = b"", time.monotonic()
    try:
        for chunk in stream.response:  # the stream is read in this thread, as gunicorn would
            seen += chunk
            if b"event: job.queued" in seen:
                break
    finally:
        stream.close()
        writer.join(10)
        events.set_publisher(None)
    assert hub.connected.is_set(), "the listener did not connect"
    job_id = submitted["resp"].get_json()["job"]["id"]
    assert job_id.encode() in seen and b"event: job.queued" in seen, seen[-500:]
    assert time.monotonic() - started < 15
