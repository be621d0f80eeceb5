"""The service's Celery app with a trivial generator, for measuring orchestration alone.

    celery -A bench.trivial_worker:celery_app worker -Q sdxl ...   (the Procfile's worker_sdxl otherwise)

Everything a job goes through is the service's own code (claim, lease keeper,
progress, storage write with fsync, the success signal, completion with its
asset row, events and NOTIFY); only the pixels are replaced: each output is the
same 67-byte PNG, made in no time.
"""
from __future__ import annotations

import base64
from typing import Any

from tasks import runtime
from tasks.celery_app import celery_app
from tasks.generators.base import GeneratedFile, GenerationResult, GenerationSpec, ProgressCallback

__all__ = ["celery_app"]

#: A 1×1 transparent PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
                       "60e6kgAAAABJRU5ErkJggg==")


class TrivialGenerator:
    name = "trivial"

    def generate(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        progress(1, 1)
        files = [GeneratedFile(f"{spec.job_id}_{i}.png", "image/png", PNG)
                 for i in range(spec.num_outputs)]
        return GenerationResult(files=files, thumbnail=None,
                                metadata={"generator": self.name,
                                          "seeds": [spec.seed + i for i in range(spec.num_outputs)]})


def _trivial(*_: Any) -> TrivialGenerator:
    return TrivialGenerator()


runtime.get_generator = _trivial  # type: ignore[assignment]

#: Where :func:`noop` counts (the bench reads it; a Redis key of the broker's database).
NOOP_COUNTER = "bench:noop:done"


@celery_app.task(name="bench.noop")
def noop() -> None:
    """Celery's own cost per task on this worker, for the bench's raw limit: the same app,
    settings (late ack, prefetch 1, the worker's logging) and process, and a body that only
    counts the task (one INCR; the bench times the counter)."""
    _counter().incr(NOOP_COUNTER)


_client: Any = None


def _counter() -> Any:
    global _client
    if _client is None:
        import redis

        from orchestrator.config import get_settings

        _client = redis.Redis.from_url(get_settings().broker_url)
    return _client
