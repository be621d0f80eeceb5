"""Small factories shared by the tests (plain functions, no magic)."""
from __future__ import annotations

import io
import time
from typing import Any, Callable

from orchestrator import submission
from orchestrator.db import Database
from orchestrator.models import Job


def submit(db: Database, user_id: str, job_type: str = "image_fast", prompt: str = "a red fox",
           **metadata: Any) -> Job:
    """Record a job through the domain (no broker), as queue-job would."""
    req = submission.SubmitRequest(job_type=job_type, metadata={"prompt": prompt, **metadata})
    return submission.submit_job(db, user_id, req, max_attempts=3).job


def png_info(data: bytes) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size


def mp4_info(data: bytes) -> dict[str, Any]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {"codec": stream.codec_context.name, "width": stream.width, "height": stream.height,
                "frames": frames, "fps": float(stream.average_rate)}


def balance(client: Any, headers: dict[str, str]) -> int:
    """The user's token balance, through the API."""
    resp = client.get("/v1/me", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["token_balance"]


def assert_json_error(resp: Any, status: int) -> dict[str, Any]:
    """A JSON error body of the service's shape, with no trace in it."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.is_json, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def wait_until(check: Callable[[], Any], timeout: float = 3.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or ``timeout`` passes
    (then its last value is returned, for the caller's assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
