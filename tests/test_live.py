"""Live events (SSE), queue position and ETA, GET /v1/queues: against real
processes (gunicorn + Celery workers) on PostgreSQL + Redis (LISTEN/NOTIFY push)
and on the embedded defaults (SQLite, polled log)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import select

from orchestrator.db import Database
from orchestrator.models import JobEvent
from tests.stack import Stack, make_stack

pytestmark = pytest.mark.e2e

TERMINAL = {"job.completed", "job.failed", "job.cancelled"}


@pytest.fixture(scope="module", params=["postgres-redis", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # sdxl_image_fast expects 30 s: × 0.04 = 1.2 s per job, with progress events.
    st = make_stack(request.param, tmp_path_factory.mktemp(f"live-{request.param}"),
                    ("web", "worker_sdxl", "worker_wan"), GENERATION_TIME_SCALE="0.04",
                    SSE_HEARTBEAT_SECONDS="1")
    with st.running():
        yield st


def _frames(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream into frames: {id?, event, data} or {"comment": ...}."""
    frame: dict[str, Any] = {}
    for raw in resp.iter_lines(decode_unicode=True):
        line = raw if raw is not None else ""
        if line == "":
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                frame["data"] = json.loads(value)
            elif name in ("id", "event", "retry"):
                frame[name] = value


def _open(stack: Stack, path: str, headers: dict[str, str], last_id: int | None = None) -> requests.Response:
    h = dict(headers)
    if last_id is not None:
        h["Last-Event-ID"] = str(last_id)
    resp = requests.get(f"{stack.base_url}{path}", headers=h, stream=True, timeout=(5, 30))
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


def _logged_ids(stack: Stack, job_id: str) -> list[int]:
    db = Database(stack.env.get("DATABASE_URL") or f"sqlite:///{stack.env['VAR_DIR']}/orchestrator.sqlite")
    try:
        with db.session() as s:
            return list(s.execute(select(JobEvent.id).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.id)).scalars())
    finally:
        db.dispose()


def test_reconnect_with_last_event_id_loses_and_repeats_nothing(stack: Stack) -> None:
    _, headers = stack.user()
    job_id = stack.submit(headers, "sdxl_image_fast").json()["job"]["id"]
    path = f"/v1/jobs/{job_id}/events"
    received: list[dict[str, Any]] = []
    first = _open(stack, path, headers)
    for frame in _frames(first):
        if "id" in frame:
            received.append(frame)
            if frame["event"] == "job.progress" or frame["event"] in TERMINAL:
                break  # drop the connection mid-job
    first.close()
    assert received, "no event before the disconnect"
    second = _open(stack, path, headers, last_id=int(received[-1]["id"]))
    for frame in _frames(second):  # the job stream ends after the terminal event
        if "id" in frame:
            received.append(frame)
    second.close()

    ids = [int(f["id"]) for f in received]
    assert ids == sorted(set(ids)), "repeated or out of order"
    job_events = [f["event"] for f in received if f["event"].startswith("job.")]
    assert job_events[-1] == "job.completed"  # (its image's event, same commit, may follow)
    assert ids == _logged_ids(stack, job_id), "the stream and the durable log differ"
    types = [f["event"] for f in received]
    assert types[0] == "job.queued" and "job.processing" in types and "image.completed" in types
    assert "job.progress" in types
    for f in received:
        assert f["data"]["id"] == int(f["id"]) and f["data"]["type"] == f["event"]
        assert f["data"]["job_id"] == job_id
    completed = [f for f in received if f["event"] == "job.completed"][0]
    assert completed["data"]["payload"]["status"] == "completed"
    assert completed["data"]["payload"]["progress"] == 100


def test_user_stream_delivers_every_job_and_resumes_with_since(stack: Stack) -> None:
    _, headers = stack.user()
    resp = _open(stack, "/v1/events", headers)
    ids = [stack.submit(headers, "sdxl_image_fast", prompt=f"kite {i}").json()["job"]["id"] for i in range(2)]
    seen: dict[str, list[str]] = {i: [] for i in ids}
    last = 0
    deadline = time.monotonic() + 60
    for frame in _frames(resp):
        if "id" in frame:
            assert int(frame["id"]) > last
            last = int(frame["id"])
            seen[frame["data"]["job_id"]].append(frame["event"])
        if all(any(t in TERMINAL for t in types) for types in seen.values()) or time.monotonic() > deadline:
            break
    resp.close()
    assert all("job.completed" in types for types in seen.values()), seen
    # ?since= replays exactly the log after an id (here: nothing after the last one)
    replay = requests.get(f"{stack.base_url}/v1/events?since=0", headers=headers, stream=True, timeout=(5, 30))
    replayed = []
    for frame in _frames(replay):
        if "id" in frame:
            replayed.append(int(frame["id"]))
        if replayed and replayed[-1] >= last:
            break
        if "comment" in frame and frame["comment"] == "keepalive":
            break
    replay.close()
    assert replayed and replayed == sorted(set(replayed)) and replayed[-1] == last


def test_queue_position_counts_down_with_a_plausible_eta(stack: Stack) -> None:
    _, headers = stack.user()
    ids = [stack.submit(headers, "sdxl_image_fast", prompt=f"queue {i}").json() for i in range(4)]
    last = ids[-1]["job"]
    # the answer already places it: behind the ones not yet started
    assert last["queue_position"] is not None and 1 <= last["queue_position"] <= 4
    resp = _open(stack, f"/v1/jobs/{last['id']}/events", headers)
    positions: list[int] = []
    etas: list[float] = []
    events: list[str] = []
    for frame in _frames(resp):
        if frame.get("event") == "queue":
            positions.append(frame["data"]["queue_position"])
            if frame["data"]["eta_seconds"] is not None:
                etas.append(frame["data"]["eta_seconds"])
        elif "id" in frame:
            events.append(frame["event"])
    resp.close()
    assert [e for e in events if e.startswith("job.")][-1] == "job.completed"
    # never up; a repeat is a new ETA at the same place
    assert positions and positions == sorted(positions, reverse=True), positions
    if last["queue_position"] > 1:
        assert positions[-1] < positions[0], positions
    assert etas, "a queued job with a live worker has an ETA"
    assert all(0 < eta < 120 for eta in etas), etas
    record = stack.job(headers, last["id"])
    assert record["queue_position"] is None and record["eta_seconds"] is None


def test_queues_endpoint(stack: Stack) -> None:
    _, headers = stack.user()
    job_id = stack.submit(headers, "sdxl_image_fast").json()["job"]["id"]
    stack.wait_for(headers, [job_id], timeout=60)
    body = requests.get(f"{stack.base_url}/v1/queues", headers=headers, timeout=10).json()
    by_family = {q["family"]: q for q in body["queues"]}
    assert set(by_family) == {"sdxl", "wan"}
    sdxl = by_family["sdxl"]
    assert sdxl["workers"] >= 1 and by_family["wan"]["workers"] >= 1
    assert sdxl["depth"] >= 0 and sdxl["running"] >= 0
    assert sdxl["completions_per_minute"] > 0
    assert 0 < sdxl["p50_run_seconds"] <= sdxl["p95_run_seconds"] < 60
    assert requests.get(f"{stack.base_url}/v1/queues", timeout=10).status_code == 401


def test_streams_are_private(stack: Stack) -> None:
    _, alice = stack.user()
    _, bob = stack.user()
    job_id = stack.submit(alice, "sdxl_image_fast").json()["job"]["id"]
    theirs = requests.get(f"{stack.base_url}/v1/jobs/{job_id}/events", headers=bob, timeout=10)
    random = requests.get(f"{stack.base_url}/v1/jobs/{uuid.uuid4()}/events", headers=bob, timeout=10)
    assert theirs.status_code == random.status_code == 404
    assert theirs.content == random.content
    bad = requests.get(f"{stack.base_url}/v1/events", headers={**bob, "Last-Event-ID": "x1"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
    # bob's own stream never carries alice's events
    resp = _open(stack, "/v1/events?since=0", bob)
    for frame in _frames(resp):
        assert "id" not in frame, frame
        if frame.get("comment") == "keepalive":
            break
    resp.close()
