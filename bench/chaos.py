"""Chaos soak (not in CI): submit N jobs while workers are killed (SIGKILL) and
Redis is restarted at random; then count what became of every accepted job.

    .venv/bin/python -m bench.chaos --jobs 200 [--seed 7] [--fault-every 2.5]

Prints ``accepted, completed, failed, lost, duplicated``:
- lost: accepted jobs not in a terminal state once the run has settled;
- duplicated: jobs with more than one completion event, or with files beyond
  the one set their type produces.
Everything runs on loopback: PostgreSQL (a fresh database), a private Redis on
a free port, and the Procfile's processes. It stops what it started.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.jobtypes import JOB_TYPES  # noqa: E402
from tests.stack import TERMINAL, Stack, make_stack  # noqa: E402

PROCESSES = ("web", "worker_sdxl", "worker_wan", "worker_maintenance", "beat")
ENV = dict(LEASE_SECONDS="3", RECONCILE_INTERVAL="1", PUBLISH_GRACE="1", REOFFER_AFTER="6",
           GENERATION_TIME_SCALE="0.002", MAX_ATTEMPTS="5")


def chaos(stack: Stack, rng: random.Random, stop: threading.Event, every: float,
          log: list[str]) -> None:
    while not stop.wait(rng.uniform(every * 0.5, every * 1.5)):
        action = rng.choice(["kill_sdxl", "kill_wan", "kill_wan", "restart_redis"])
        try:
            if action.startswith("kill_"):
                name = f"worker_{action[5:]}"
                stack.kill(name, signal.SIGKILL)
                stack.start(name)
            else:
                assert stack.redis is not None
                stack.redis.stop()
                time.sleep(rng.uniform(0.2, 1.5))
                stack.redis.start()
            log.append(f"{time.strftime('%H:%M:%S')} {action}")
        except Exception as e:  # noqa: BLE001 - keep the soak going, report it
            log.append(f"{time.strftime('%H:%M:%S')} {action} FAILED: {e!r}")


def _duplicated(stack: Stack, user_id: str, accepted: dict[str, str]) -> int:
    """Jobs completed more than once, or with more files than one set."""
    from sqlalchemy import func, select

    from orchestrator.db import Database
    from orchestrator.models import JobEvent

    db = Database(stack.env["DATABASE_URL"])
    with db.session() as s:
        completions = dict(s.execute(select(JobEvent.job_id, func.count()).where(
            JobEvent.type == "job.completed").group_by(JobEvent.job_id)).all())
    db.dispose()
    storage = Path(stack.env["VAR_DIR"]) / "storage"
    duplicated = 0
    for job_id, job_type in accepted.items():
        spec = JOB_TYPES[job_type]
        files = list((storage / job_type / user_id).glob(f"{job_id}*"))
        if completions.get(job_id, 0) > 1 or len(files) > spec.outputs + (1 if spec.is_video else 0):
            duplicated += 1
    return duplicated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fault-every", type=float, default=2.5, help="mean seconds between faults")
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait for the tail")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    stack = make_stack("postgres-redis", workdir, PROCESSES, private_redis=True, **ENV)
    faults: list[str] = []
    started = time.monotonic()
    try:
        stack.cli("db", "upgrade")
        stack.start()
        user_id, headers = stack.user()
        stack.cli("grant-credits", user_id, str(10 * args.jobs))
        stop = threading.Event()
        monkey = threading.Thread(target=chaos, args=(stack, rng, stop, args.fault_every, faults))
        monkey.start()
        accepted: dict[str, str] = {}
        refused = Counter()
        for _ in range(args.jobs):
            job_type = rng.choice(list(JOB_TYPES))
            try:
                r = stack.submit(headers, job_type, prompt=f"chaos {rng.random():.6f}", timeout=5)
            except requests.RequestException as e:
                refused[type(e).__name__] += 1
                continue
            if r.status_code == 200:
                accepted[r.json()["job"]["id"]] = job_type
            else:
                refused[str(r.status_code)] += 1
            time.sleep(rng.uniform(0, 0.1))
        # Faults continue while the queue drains, then stop for a quiet tail.
        final: dict[str, dict] = {}
        deadline = time.monotonic() + args.settle

        def poll() -> None:
            for job_id in accepted:
                if job_id not in final:
                    job = stack.job(headers, job_id)
                    if job["status"] in TERMINAL:
                        final[job_id] = job

        while time.monotonic() < deadline and len(final) < len(accepted) * 0.9:
            poll()
            time.sleep(1)
        stop.set()
        monkey.join()
        stack.wait_ready(*PROCESSES[1:])
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline and len(final) < len(accepted):
            poll()
            time.sleep(1)
        statuses = Counter(j["status"] for j in final.values())
        duplicated = _duplicated(stack, user_id, accepted)
        result = {
            "accepted": len(accepted), "completed": statuses["completed"],
            "failed": statuses["failed"], "lost": len(accepted) - len(final),
            "duplicated": duplicated, "refused": dict(refused), "faults": len(faults),
            "unfinished_by_status": dict(Counter(
                stack.job(headers, j)["status"] for j in accepted if j not in final)),
            "attempts_histogram": dict(sorted(Counter(j["attempts"] for j in final.values()).items())),
            "seconds": round(time.monotonic() - started, 1),
        }
        print("\n".join(faults))
        print(json.dumps(result))
        return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
