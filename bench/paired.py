"""`queue-job` (and `job-callback` heartbeats) against the naive reference in alternating
runs, with where the CPU goes (by hand, not in CI; ``make bench`` stays the reference run).

    .venv/bin/python -m bench.paired [--runs 4] [--duration 6] [--b-env KEY=VALUE,...]

``make bench`` measures the naive reference, then the service, minutes apart; on a
machine whose speed drifts that moves the ratio by ±0.1. Here both (and, with
``--b-env``, a second service stack with those environment overrides, to compare a
setting) stay up on one private PostgreSQL and Redis and take turns, ``--duration``
seconds each, with the bench's load (``bench.suite``: the Procfile's ``web`` line, wrk,
8 connections, a new connection per request, 4,000 users, six job types). Each run
prints, per request: the CPU of the gunicorn workers (``web``, with its system part),
of PostgreSQL's processes (``pg``, system part) and of Redis, the machine's idle share,
req/s and p99, and what its database did: commits and rows from ``pg_stat_database``
(approximate: an idle connection reports its counts up to 10 s late), WAL bytes from
the server's WAL position and records from ``pg_stat_wal`` (the whole server's, so the
run's own while nothing else writes). Then the medians and the paired ratios (each service
run ÷ the naive run next to it). After each turn of `queue-job`, the same service takes
a turn of `job-callback` heartbeats: a worker's `processing` report repeated for 2,000
jobs already processing (lease renewals), as ``make bench``'s heartbeat runs.
``make bench`` runs this as its ``paired`` phase.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import suite  # noqa: E402

DB_STATS = ("commits", "rows_inserted", "rows_updated", "wal_bytes", "wal_records")


def _machine() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


def _named(prefix: str) -> list[int]:
    found = []
    for pid in suite._pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith(prefix):
                found.append(pid)
        except OSError:
            pass
    return found


def _db_stats(url: str) -> tuple[int, ...]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, "
            "(pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, (SELECT wal_records FROM pg_stat_wal) "
            "FROM pg_stat_database WHERE datname = current_database()").fetchone()


class Target:
    def __init__(self, name: str, url: str, lines: Path, master: int,
                 between: Callable[[], Any], db_url: str) -> None:
        self.name, self.url, self.lines, self.master = name, url, lines, master
        self.between, self.db_url = between, db_url
        self.runs: list[dict[str, float]] = []

    def measure(self, load: suite.Load, seconds: int) -> dict[str, float]:
        web = suite.group_pids(self.master)
        pg, rd = _named("postgres"), _named("redis-server")

        def cpu() -> list[float]:
            return [suite.cpu_seconds(web), suite.cpu_seconds(web, True), suite.cpu_seconds(pg),
                    suite.cpu_seconds(pg, True), suite.cpu_seconds(rd)]

        cpu0, machine0, db0 = cpu(), _machine(), _db_stats(self.db_url)
        r = load.wrk_once(self.url, self.lines, seconds)
        cpu1, machine1 = cpu(), _machine()
        n = max(r["requests"], 1)
        row = {k: (b - a) * 1000 / n for k, a, b in
               zip(("web_ms", "web_sys_ms", "pg_ms", "pg_sys_ms", "redis_ms"), cpu0, cpu1)}
        idle, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
        row.update(idle_pct=100 * idle / max(total, 1), rps=r["rps"], p99_ms=r["p99_us"] / 1000,
                   errors=r["errors"])
        time.sleep(0.6)  # busy connections report their counts at most once a second
        for k, a, b in zip(DB_STATS, db0, _db_stats(self.db_url)):
            row[k] = (b - a) / n
        self.between()
        self.runs.append(row)
        print(f"{self.name:8s} " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
        return row


def _service(load: suite.Load, workdir: Path, name: str, redis_db: int,
             overrides: dict[str, str], stack: contextlib.ExitStack) -> tuple[Target, Any]:
    var = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    svc = suite.make_stack("postgres-redis", var, ("web",), redis_db=redis_db,
                           **{**suite.SERVICE_LIMITS, **overrides})
    stack.enter_context(svc.running())
    rows = suite.queue_job_rows(suite._users(svc, 4000, 100_000))
    pg_url = svc.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    return Target(name, svc.base_url, load.lines(name, rows), svc.procs["web"].pid,
                  suite.drainer(svc), pg_url), svc


#: Jobs whose `processing` report the heartbeat target repeats (as make bench's heartbeats).
HEARTBEAT_JOBS = 2000


def _heartbeats(load: suite.Load, service: Target, svc: Any) -> Target:
    """`job-callback` heartbeats on the service's web: a worker's `processing` report
    repeated for jobs already processing (each a lease renewal, changing nothing else), the
    jobs taken from those the service's warm-up queued, in rotation."""
    from orchestrator.config import Settings

    with psycopg.connect(service.db_url, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute(
            "UPDATE jobs SET status = 'processing', attempts = 1, started_at = now(), "
            "lease_owner = 'bench:1', lease_expires_at = now() + interval '1 hour' "
            "WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at "
            "LIMIT %s) RETURNING id::text", (HEARTBEAT_JOBS,)).fetchall()]
    if len(ids) < HEARTBEAT_JOBS // 2:
        raise RuntimeError(f"only {len(ids)} jobs to send heartbeats for")
    auth = "Bearer " + Settings.from_env(svc.env).worker_token
    rows = [("POST", "/functions/v1/job-callback", auth,
             json.dumps({"job_id": j, "status": "processing"})) for j in ids]
    return Target("heartbeat", service.url, load.lines("paired-heartbeat", rows), service.master,
                  lambda: None, service.db_url)


def measure(servers: suite.Servers, load: suite.Load, workdir: Path, runs: int, duration: int,
            b_env: dict[str, str] | None = None, heartbeats: bool = True) -> dict[str, Any]:
    """The naive reference and the service's `queue-job` (and, with ``b_env``, a second
    service with those overrides), then (``heartbeats``) the service's `job-callback`
    heartbeats, in turns on ``servers``: every run's figures, their medians, and the paired
    req/s ratios (each service run ÷ the naive run next to it)."""
    with contextlib.ExitStack() as stack:
        name, proc, url, _ = suite.start_naive(servers, workdir / "paired-naive",
                                               "bench_paired_naive")
        stack.callback(suite.stop_process, proc)
        naive_broker = redis_lib.Redis(port=servers.redis.port, db=3)
        stack.callback(naive_broker.flushdb)
        naive = Target("naive", url, load.lines("paired-naive", suite.naive_rows()), proc.pid,
                       lambda: naive_broker.delete("naive"), servers.libpq(name))
        service, svc = _service(load, workdir, "service", 1, {}, stack)
        targets = [naive, service]
        if b_env:
            targets.append(_service(load, workdir, "serviceB", 2, b_env, stack)[0])
        for t in targets:  # warm-up: connections, caches, the first tokens
            load.wrk_once(t.url, t.lines, 3 if t is naive else 8)
            if t is service and heartbeats:
                beats = _heartbeats(load, service, svc)
            t.between()
        if heartbeats:
            load.wrk_once(beats.url, beats.lines, 3)
        for i in range(runs):
            services = targets[1:] if i % 2 == 0 else targets[:0:-1]  # B first every other run
            for t in [naive, *services]:
                t.measure(load, duration)
            if heartbeats:
                beats.measure(load, duration)
    out: dict[str, Any] = {"runs": runs, "duration": duration}
    if heartbeats:
        targets.append(beats)
    for t in targets:
        out[t.name] = {"runs": t.runs, "median": {k: statistics.median(r[k] for r in t.runs)
                                                  for k in t.runs[0]}}
    for t in targets[1:]:
        out[t.name]["ratios"] = sorted(s["rps"] / n["rps"] for n, s in zip(naive.runs, t.runs))
    if b_env:
        in_order = [b["rps"] / a["rps"] for a, b in zip(targets[1].runs, targets[2].runs)]
        out["serviceB"]["ratios_to_service"] = sorted(in_order)
        out["serviceB"]["position_balanced"] = position_balanced(in_order)
    return out


def position_balanced(in_order: list[float]) -> dict[str, float] | None:
    """B ÷ A per run, B second in even runs and first in odd ones: the slot a stack runs in
    shifts its req/s by itself (seen: the second slot ±8 % with the same code in both), so
    a median over an unequal split, or a plain median, mixes that in. Here: the mean log
    ratio with B second and with B first, halved sum (B's own effect) and halved
    difference (the second slot's advantage). None without a run of each."""
    second = [math.log(r) for r in in_order[0::2]]
    first = [math.log(r) for r in in_order[1::2]]
    if not second or not first:
        return None
    s, f = statistics.fmean(second), statistics.fmean(first)
    return {"b_over_a": math.exp((s + f) / 2), "second_slot": math.exp((s - f) / 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--b-env", default="", help="KEY=VALUE,...: a second service stack "
                        "with these environment overrides, measured in turn with the first")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    load = suite.Load(workdir, argparse.Namespace(threads=1, connections=8, keepalive=False,
                                                  warmup=3, duration=args.duration, runs=1))
    servers = suite.Servers(workdir, "private")
    try:
        b_env = dict(kv.split("=", 1) for kv in args.b_env.split(",") if kv)
        res = measure(servers, load, workdir, args.runs, args.duration, b_env or None)
    finally:
        servers.stop()
    for name in ("naive", "service", "serviceB", "heartbeat"):
        if name in res:
            print(f"median {name:8s} " + " ".join(f"{k}={v:.2f}"
                                                   for k, v in res[name]["median"].items()))
    for name in ("service", "serviceB", "heartbeat"):
        if name in res:
            ratios = res[name]["ratios"]
            print(f"{name} / naive req/s, paired: " + " ".join(f"{r:.3f}" for r in ratios)
                  + f" (median {statistics.median(ratios):.3f})")
    if "serviceB" in res:
        ratios = res["serviceB"]["ratios_to_service"]
        print("serviceB / service req/s, paired: " + " ".join(f"{r:.3f}" for r in ratios)
              + f" (median {statistics.median(ratios):.3f})")
        balanced = res["serviceB"]["position_balanced"]
        if balanced:
            print(f"serviceB / service with the slot's own effect taken out: "
                  f"{balanced['b_over_a']:.3f} (the second slot: {balanced['second_slot']:.3f}×; "
                  "use an even --runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
