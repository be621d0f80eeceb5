"""Commit → SSE client latency (not in CI).

    .venv/bin/python -m bench.sse_latency [--events 300] [--kinds postgres-redis,embedded]

Starts the Procfile's ``web`` (gunicorn, 2 workers) on loopback, opens one
user's ``GET /v1/events`` stream, then commits jobs for that user straight
through ``orchestrator.submission`` (one write transaction each, like the
API's) at a steady pace, and times each from just before the transaction's
COMMIT to the moment its ``job.queued`` frame is read off the socket. On
PostgreSQL the writer's NOTIFY wakes the stream; the embedded default
(SQLite) polls the log every 0.5 s, shown for comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import submission  # noqa: E402
from orchestrator.db import Database  # noqa: E402
from tests.stack import make_stack  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def measure(kind: str, events: int, gap: float) -> dict[str, float]:
    var = Path(tempfile.mkdtemp(prefix=f"sse-{kind}-"))
    stack = make_stack(kind, var, ("web",), SUBMIT_RATE_LIMIT="", MAX_ACTIVE_JOBS="0")
    with stack.running():
        user_id, headers = stack.user()
        stack.cli("grant-credits", user_id, str(events + 10))
        url = stack.env.get("DATABASE_URL") or f"sqlite:///{var / 'orchestrator.sqlite'}"
        db = Database(url)
        sent: dict[str, float] = {}
        got: dict[str, float] = {}
        ready = threading.Event()

        def read() -> None:
            with requests.get(f"{stack.base_url}/v1/events", headers=headers, stream=True,
                              timeout=(5, 60)) as resp:
                ready.set()
                for line in resp.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        data = json.loads(line[5:])
                        if data.get("type") == "job.queued":
                            got[data["job_id"]] = time.perf_counter()
                            if len(got) >= events:
                                return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ready.wait(10)
        time.sleep(0.5)

        for i in range(events):
            req = submission.SubmitRequest(job_type="sdxl_image_fast",
                                           metadata={"prompt": f"latency {i}"})
            # Timed from just before COMMIT: the answer hook runs inside the transaction.
            def stamp(sub: submission.Submitted) -> tuple[int, dict]:
                sent[sub.job.id] = time.perf_counter()
                return 200, {}

            submission.submit_job(db, user_id, req, max_attempts=3,
                                  key=_key(user_id), answer=stamp)
            time.sleep(gap)
        reader.join(timeout=30)
        db.dispose()
    lat = [(got[j] - sent[j]) * 1000 for j in sent if j in got]
    return {"events": len(sent), "received": len(lat), "p50_ms": _percentile(lat, 50),
            "p95_ms": _percentile(lat, 95), "p99_ms": _percentile(lat, 99), "max_ms": max(lat),
            "mean_ms": statistics.fmean(lat)}


def _key(user_id: str) -> submission.KeyedRequest:
    # An Idempotency-Key makes submit_job call the answer hook inside the transaction.
    return submission.KeyedRequest(user_id, uuid.uuid4().hex, uuid.uuid4().hex * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between commits")
    parser.add_argument("--kinds", default="postgres-redis,embedded")
    args = parser.parse_args()
    for kind in args.kinds.split(","):
        r = measure(kind, args.events, args.gap)
        print(f"{kind:15} events {r['events']} received {r['received']}  p50 {r['p50_ms']:.1f} ms  "
              f"p95 {r['p95_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  "
              f"(mean {r['mean_ms']:.1f})", flush=True)


if __name__ == "__main__":
    main()
