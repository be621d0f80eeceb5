"""What one request costs, counted in-process (``make bench`` runs it; not timed under load).

    python -m bench.request_cost queue-job --redis URL --auth-file F [--requests 300]
    python -m bench.request_cost callback --redis URL --auth-file F --jobs-file J
    python -m bench.request_cost naive --redis URL

Runs the app in this process (Flask's test client, no HTTP server, the
environment's settings: ``DATABASE_URL``, ``REDIS_URL``… or ``NAIVE_*``) and
prints one JSON object: per request, the wall and CPU time without a profiler, the SQL
statements and COMMITs sent (counted at the driver, psycopg), the Redis commands
(``INFO commandstats`` of the server, before and after), the Python function
calls and the time blocked on PostgreSQL and Redis (cProfile), and the
functions with the most cumulative time.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import count_statements  # noqa: E402


def _redis_calls(client: redis_lib.Redis) -> collections.Counter[str]:
    stats = client.info("commandstats")
    return collections.Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})


def _requests(kind: str, args: argparse.Namespace) -> tuple[Any, Callable[[int], Any]]:
    if kind == "naive":
        from bench.naive_app import create_naive

        client = create_naive().test_client()
        return client, lambda i: client.post("/submit", json={
            "jobType": "sdxl_image_fast", "metadata": {"prompt": f"a lighthouse {i}"}})
    from web import create_app

    client = create_app().test_client()
    auths = Path(args.auth_file).read_text().split("\n")
    if kind == "queue-job":
        return client, lambda i: client.post(
            "/functions/v1/queue-job", headers={"Authorization": auths[i % len(auths)]},
            json={"jobType": "sdxl_image_fast", "metadata": {"prompt": f"a lighthouse {i}"}})
    jobs = Path(args.jobs_file).read_text().split("\n")
    return client, lambda i: client.post(
        "/functions/v1/job-callback", headers={"Authorization": auths[0]},
        json={"job_id": jobs[i], "status": "processing"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("queue-job", "callback", "naive"))
    parser.add_argument("--redis", required=True, help="the Redis server the app talks to")
    parser.add_argument("--auth-file", help="Authorization header values, one a line")
    parser.add_argument("--jobs-file", help="queued job ids for callback, one a line")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    _, send = _requests(args.kind, args)
    n = args.requests
    def run(offset: int, count: int) -> None:
        for i in range(offset, offset + count):
            r = send(i)
            if r.status_code != 200:
                raise SystemExit(f"request {i}: {r.status_code} {r.get_data(as_text=True)[:300]}")

    run(0, 30)  # warm: connections, statement caches, prepared statements
    # 1. wall and CPU time of this process, nothing attached
    start, cpu = time.perf_counter(), time.process_time()
    run(30, n)
    wall_ms = (time.perf_counter() - start) * 1000 / n
    cpu_ms = (time.process_time() - cpu) * 1000 / n
    # 2. round trips
    rc = redis_lib.Redis.from_url(args.redis)
    redis_before = _redis_calls(rc)
    seen, stop = count_statements(None)  # at the driver: every PostgreSQL statement and COMMIT
    try:
        run(30 + n, n)
    finally:
        stop()
    statements = collections.Counter(seen)
    redis_after = _redis_calls(rc)
    redis_after.subtract(redis_before)
    redis_after.pop("info", None)
    # 3. Python function calls
    profile = cProfile.Profile()
    profile.enable()
    run(30 + 2 * n, n)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    ours = []
    db_wait = redis_wait = 0.0
    for (path, line, name), (_, _, tt, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        # Blocked on a server: libpq waits inside psycopg's wait(); Redis replies are the only
        # socket reads here (the test client needs no socket).
        if "psycopg" in path and name.startswith("wait"):
            db_wait += tt
        elif path == "~" and "_socket.socket" in name and "recv" in name:
            redis_wait += tt
        rel = path.replace(str(ROOT) + "/", "")
        if rel.split("/", 1)[0] in ("orchestrator", "web", "tasks") and name != "<module>":
            ours.append((f"{rel}:{name}", cum))
    ours.sort(key=lambda x: -x[1])
    print(json.dumps({
        "kind": args.kind, "requests": n, "wall_ms": wall_ms, "cpu_ms": cpu_ms,
        "sql_per_request": {k: v / n for k, v in statements.most_common()},
        "sql_total_per_request": sum(statements.values()) / n,
        "redis_per_request": {k: v / n for k, v in redis_after.most_common() if v > 0},
        "redis_total_per_request": sum(v for v in redis_after.values() if v > 0) / n,
        "python_calls_per_request": stats.total_calls / n,  # type: ignore[attr-defined]
        "profiled_ms_per_request": total * 1000 / n,
        "db_wait_ms": db_wait * 1000 / n, "redis_wait_ms": redis_wait * 1000 / n,
        "cumulative_ms": [(name, cum * 1000 / n) for name, cum in ours[:14]],
    }))


if __name__ == "__main__":
    main()
