"""Small factories shared by the tests (plain functions, no magic)."""
from __future__ import annotations

import io
from typing import Any

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
