"""The benchmark suite of issue 7 (``make bench``; not in CI).

    .venv/bin/python -m bench.suite [--runs 3] [--duration 10] [--connections 16] [--no-write]
    .venv/bin/python -m bench.suite --only orchestration,callback [--runs 1]

Starts on loopback what it measures: a private PostgreSQL server (durable
defaults; the local server on 127.0.0.1:5432 with a fresh database when a
private one cannot be started), a private Redis on a free port, gunicorn with
the Procfile's ``web`` settings, and Celery workers with the Procfile's
commands. It measures, in one run and each figure ``--runs`` times:

1. raw limits: Redis LPUSH ops/s (``redis-benchmark``), PostgreSQL
   single-connection INSERT+COMMIT/s (psycopg), a Flask hello-world JSON
   endpoint (``bench.naive_app:create_hello``) under the ``web`` settings;
2. the naive reference (``bench.naive_app:create_naive``: one ORM INSERT and an
   ``apply_async``) under the same settings;
3. the service: ``queue-job`` and ``job-callback`` requests/s and latency
   under ``wrk`` (``bench/requests.lua``), dispatch latency (commit → task
   start on an idle worker), the orchestration throughput and CPU per job of
   one worker process with a trivial generator (``bench.trivial_worker``),
   commit → SSE latency (``bench.sse_latency.measure``), and the RSS of web and
   worker processes;
4. ``queue-job`` and the naive reference again, in turns on the same servers
   (``bench.paired``: the machine's speed drifts between the phases above), with the
   CPU per request of gunicorn, PostgreSQL and Redis and the WAL per submission;

then stops everything it started and rewrites its section of
``bench/RESULTS.md`` (between the ``bench:suite`` markers; the other sections
stay). The raw figures go to ``var/bench/last.json``.

``--only`` measures some phases (a comma list of ``PHASES``); such a partial
run never touches ``bench/RESULTS.md``: it prints the medians and writes its raw
figures to ``var/bench/last-partial.json``. The py-spy profiles of the last run
stay in ``var/bench/profile-*.txt`` (py-spy's raw format).
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import redis as redis_lib
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.conftest  # noqa: E402
import tests.stack  # noqa: E402
from tests.stack import BIN, PrivatePostgres, PrivateRedis, Stack, free_port, make_stack, procfile  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
LUA = ROOT / "bench" / "requests.lua"
BEGIN, END = "<!-- bench:suite:begin -->", "<!-- bench:suite:end -->"
JOB_TYPES_MIX = ("sdxl_image_fast", "image_fast", "video_fast", "sdxl_image_high",
                 "image7b_fast_enhanced", "video_high")

# The old system's dispatch: Redis polled every 2 s (SDXL) and 5 s (WAN), i.e. a mean wait of
# half the period before a GPU saw the job.
OLD_POLL_MEAN_S = {"SDXL": 1.0, "WAN": 2.5}

#: What ``--only`` can select, in the order the suite measures them.
PHASES = ("raw", "naive", "queue-job", "callback", "paired", "dispatch", "orchestration", "rss",
          "sse")

TARGETS = {
    "queue_job_ratio": 1.0,      # × naive reference requests/s
    "queue_job_p99_ms": 30.0,
    "dispatch_p99_ms": 10.0,
    "worker_cpu_ms": 5.0,
    "worker_jobs_s": 300.0,
    "callback_ratio": 1.0,
    "web_rss_mb": 150.0,
    "worker_rss_mb": 250.0,
}


# --- small helpers -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # [state, ppid, pgrp, ...]: comm may hold spaces


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (a Procfile command and its children)."""
    return [pid for pid in _pids() if (st := _stat(pid)) and int(st[2]) == pgid]


def children(pid: int) -> list[int]:
    return [p for p in _pids() if (st := _stat(p)) and int(st[1]) == pid]


def cpu_seconds(pids: list[int], system_only: bool = False) -> float:
    """CPU time of ``pids`` (user + system, or the system part only)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st:
            total += int(st[12]) if system_only else int(st[11]) + int(st[12])  # utime, stime
    return total / tick


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def version_of(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def other_suites() -> list[str]:
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            line = cmdline(pid)
        except OSError:
            continue
        if "pytest" in line and "bench" not in line:
            found.append(f"{pid}: {line[:100]}")
    return found


class Watcher:
    """Notes other test suites running on the machine while the bench measures, and
    holds each phase back (within a total budget) until none runs."""

    def __init__(self, budget: float) -> None:
        self.seen: dict[str, set[str]] = collections.defaultdict(set)
        self.phase = "start"
        self.paused = True
        self.deadline = time.monotonic() + budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            if not self.paused:
                for line in other_suites():
                    self.seen[self.phase].add(line)
            if self._stop.wait(5):
                return

    def enter(self, phase: str) -> None:
        """Start measuring ``phase``, once no other test suite runs (or the budget is spent)."""
        self.paused = True
        while (busy := other_suites()) and time.monotonic() < self.deadline:
            log(f"before {phase}: waiting for other test runs to end: {busy[0]}")
            time.sleep(15)
        self.phase, self.paused = phase, False

    def phase_of(self, phase: str, measure: Callable[[], Any], retries: int = 2) -> Any:
        """``measure()``, measured again (budget allowing) when another test suite ran meanwhile."""
        for attempt in range(retries + 1):
            self.enter(phase)
            result = measure()
            self.paused = True
            if not self.seen.get(phase) or attempt == retries or time.monotonic() >= self.deadline:
                return result
            log(f"{phase}: other test runs appeared while measuring; measuring it again")
            self.seen.pop(phase)
        return result

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()


# --- servers -------------------------------------------------------------------------------
class BenchRedis(PrivateRedis):
    """A private redis-server: AOF with fsync every second, no RDB snapshots."""

    appendfsync = "everysec"


class BenchPostgres(PrivatePostgres):
    """A private PostgreSQL server with the stock durability settings (fsync and
    synchronous_commit on), unlike the tests' (fsync off)."""

    def start(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.dir / "data", "-w", "-l",
                          self.dir / "server.log", "-o",
                          f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                          "-c max_connections=300", "start")


class Servers:
    def __init__(self, workdir: Path, pg: str) -> None:
        self.redis = BenchRedis(workdir)
        self.redis.start()
        self.postgres: BenchPostgres | None = None
        self.pg_admin = tests.conftest.PG_ADMIN
        self.pg_url_base = tests.conftest.PG_URL_BASE
        if pg == "private":
            try:
                self.postgres = BenchPostgres()
                self.postgres.start()
                self.pg_admin = self.postgres.admin
                self.pg_url_base = f"postgresql+psycopg://postgres@127.0.0.1:{self.postgres.port}"
            except Exception as e:  # noqa: BLE001 - no private server here: use the local one
                log(f"private PostgreSQL unavailable ({e!r}); using {self.pg_admin}")
                if self.postgres is not None:
                    self.postgres.destroy()
                self.postgres = None
        # make_stack (and bench.sse_latency through it) create their databases and Redis
        # databases on these servers.
        tests.stack.PG_ADMIN, tests.stack.PG_URL_BASE = self.pg_admin, self.pg_url_base
        tests.conftest.REDIS_BASE = f"redis://127.0.0.1:{self.redis.port}"
        self.databases: list[str] = []

    @property
    def pg_where(self) -> str:
        return "private server" if self.postgres else "local server 127.0.0.1:5432"

    def create_database(self, prefix: str) -> tuple[str, str]:
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name, f"{self.pg_url_base}/{name}"

    def libpq(self, name: str) -> str:
        return re.sub(r"dbname=\S+", f"dbname={name}", self.pg_admin)

    def stop(self) -> None:
        if self.postgres is not None:
            self.postgres.destroy()
        else:
            with psycopg.connect(self.pg_admin, autocommit=True) as conn:
                for name in self.databases:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.redis.stop()


# --- load generation -----------------------------------------------------------------------
class Load:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir, self.args = workdir, args
        self.wrk = shutil.which("wrk")
        if not self.wrk:
            raise SystemExit("wrk is missing: `make bench` installs it (apt-get install wrk)")

    def lines(self, name: str, rows: list[tuple[str, str, str, str]]) -> Path:
        path = self.workdir / f"{name}.tsv"
        path.write_text("".join("\t".join(r) + "\n" for r in rows))
        return path

    def wrk_once(self, url: str, lines: Path, duration: int) -> dict[str, Any]:
        a = self.args
        cmd = [self.wrk, f"-t{a.threads}", f"-c{a.connections}", f"-d{duration}s", "--timeout", "5s",
               "-s", str(LUA), url, "--", str(lines), str(a.threads),
               "keep-alive" if a.keepalive else "close"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        found = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not found:
            raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
        r = json.loads(found[-1])
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
        r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                         "status_errors", "timeouts"))
        return r

    def runs(self, what: str, url: str, lines: Path, *,
             between: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        self.wrk_once(url, lines, self.args.warmup)
        if between:
            between()
        results = []
        for i in range(self.args.runs):
            r = self.wrk_once(url, lines, self.args.duration)
            log(f"{what} run {i + 1}: {r['rps']:.0f} req/s, p50 {r['p50_us'] / 1000:.1f} ms, "
                f"p99 {r['p99_us'] / 1000:.1f} ms, errors {r['errors']}")
            results.append(r)
            if between:
                between()
        return results

    @staticmethod
    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        return {"rps": spread([r["rps"] for r in results]),
                "p50_ms": spread([r["p50_us"] / 1000 for r in results]),
                "p99_ms": spread([r["p99_us"] / 1000 for r in results]),
                "max_ms": spread([r["max_us"] / 1000 for r in results]),
                "errors": sum(r["errors"] for r in results),
                "requests": sum(r["requests"] for r in results)}


def request_cost(kind: str, env: dict[str, str], redis_url: str, *extra: str) -> dict[str, Any] | None:
    """``bench.request_cost`` in a process of its own with the app's environment."""
    out = subprocess.run([sys.executable, "-m", "bench.request_cost", kind, "--redis", redis_url,
                          *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    found = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not found:
        log(f"request_cost {kind} failed: {out.stdout[-1000:]} {out.stderr[-2000:]}")
        return None
    r = json.loads(found[-1])
    log(f"{kind}: {r['wall_ms']:.2f} ms in-process ({r['cpu_ms']:.2f} ms CPU), "
        f"{r['sql_total_per_request']:.1f} SQL, "
        f"{r['redis_total_per_request']:.1f} Redis commands, "
        f"{r['python_calls_per_request']:,.0f} Python calls per request")
    return r


def start_gunicorn(app: str, env: dict[str, str], logs: Path, health: str) -> tuple[subprocess.Popen[bytes], str]:
    """The Procfile's ``web`` command line with another app and without the service's
    gunicorn config file (its logging and metrics hooks are the service's)."""
    web = procfile()["web"]
    service_app = "-c web/gunicorn_conf.py 'web:create_app()'"
    if service_app not in web:
        raise RuntimeError(f"the Procfile's web command changed: {web}")
    command = web.replace(service_app, f"'{app}'")
    log_file = open(logs / f"{app.split(':')[1].split('(')[0]}.log", "ab")
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, cwd=ROOT, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{env['PORT']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{app} exited: {Path(log_file.name).read_text()[-2000:]}")
        try:
            if requests.get(url + health, timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{app} did not start")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def web_rss(master: int) -> dict[str, float]:
    workers = children(master)
    return {"master_mb": rss_mb(master),
            "workers_mb": [rss_mb(p) for p in workers]}


# --- py-spy --------------------------------------------------------------------------------
OURS = ("orchestrator", "web", "tasks", "bench")


def _category(frame: str) -> str:
    """The package of a py-spy frame ``name (path:line)``: py-spy shortens paths to the
    module path (``sqlalchemy/orm/session.py``), stdlib modules included (``json/encoder.py``)."""
    m = re.search(r"\((.*):\d+\)$", frame)
    path = m.group(1) if m else frame
    if path.startswith("<frozen "):
        return path[len("<frozen "):].rstrip(">")
    if path.startswith("<"):  # generated code, e.g. "<sqlalchemy generated … wrapper …>"
        return path[1:].split(" ", 1)[0].split(".", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3" in path:
        path = path.rsplit("/lib/python3", 1)[1].split("/", 1)[-1]
    top = path.lstrip("/").split("/", 1)[0].removesuffix(".py")
    return f"{top} (ours)" if top in OURS else top


def profile_summary(raw: Path, top: int = 14) -> dict[str, Any]:
    """Where the samples of a py-spy ``--format raw`` profile went: self time by package
    (the innermost frame's), the share of samples under each package (inclusive), and
    the inclusive time of our own functions."""
    by_package: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if "(" in f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        by_package[_category(frames[-1])] += n
        for cat in {_category(f) for f in frames}:
            under[cat] += n
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames if _category(f).endswith("(ours)")}:
            inclusive[name] += n
    pct = lambda n: round(100 * n / max(total, 1), 1)  # noqa: E731
    return {"samples": total,
            "self_by_package": [(k, pct(v)) for k, v in by_package.most_common(top)],
            # Packages every sample passes through (the server loop, threading) say nothing.
            "under_package": [(k, pct(v)) for k, v in under.most_common()
                              if v < 0.9 * total and not k.endswith("(ours)")][:top],
            "inclusive": [(k, pct(v)) for k, v in inclusive.most_common(top * 2)]}


def py_spy(pid: int, seconds: float, out: Path, *, subprocesses: bool) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if exe is None:
        log("py-spy not installed: no profile")
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
           "--format", "raw", "--output", str(out), "--gil", "--nonblocking"]
    if subprocesses:
        cmd.append("--subprocesses")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- 1. raw limits -------------------------------------------------------------------------
def redis_lpush(servers: Servers, runs: int) -> dict[str, Any]:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(servers.redis.port), "-t", "lpush",
           "-n", "200000", "-c", "50", "--csv"]
    values = []
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
        row = [line for line in out.splitlines() if line.startswith('"LPUSH"')][0]
        values.append(float(row.split(",")[1].strip('"')))
    servers.redis.client().flushall()
    log(f"redis LPUSH: {values}")
    return {"command": " ".join(cmd[:3] + ["<port>"] + cmd[5:]), "ops_s": spread(values)}


def pg_inserts(servers: Servers, runs: int, seconds: float) -> dict[str, Any]:
    name, _ = servers.create_database("bench_raw")
    values = []
    with psycopg.connect(servers.libpq(name)) as conn:
        conn.execute("CREATE TABLE raw_inserts (id bigserial PRIMARY KEY, payload text NOT NULL, "
                     "created_at timestamptz NOT NULL DEFAULT now())")
        conn.commit()
        for _ in range(runs):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                conn.execute("INSERT INTO raw_inserts (payload) VALUES (%s)", ("a lighthouse",))
                conn.commit()
                n += 1
            values.append(n / (time.perf_counter() - start))
    log(f"postgres INSERT+COMMIT: {[round(v) for v in values]}")
    return {"inserts_s": spread(values)}


def baseline_env(directory: Path) -> dict[str, str]:
    """The environment a baseline app runs in under the ``web`` settings (its own port)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "REDIS_URL"}}
    env.update(VAR_DIR=str(directory), WEB_CONCURRENCY="2", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PORT=str(free_port()))
    directory.mkdir(exist_ok=True)
    return env


def start_naive(servers: Servers, directory: Path,
                prefix: str) -> tuple[str, subprocess.Popen[bytes], str, dict[str, str]]:
    """The naive reference on a new database of ``servers`` (publishing to Redis db 3):
    the database's name, the gunicorn process, its URL and its environment."""
    from bench.naive_app import create_schema

    name, url_db = servers.create_database(prefix)
    create_schema(url_db)
    env = dict(baseline_env(directory), NAIVE_DATABASE_URL=url_db,
               NAIVE_BROKER_URL=f"redis://127.0.0.1:{servers.redis.port}/3")
    proc, url = start_gunicorn("bench.naive_app:create_naive()", env, directory, "/healthz")
    return name, proc, url, env


def naive_rows() -> list[tuple[str, str, str, str]]:
    """The naive reference's requests: six job types, a prompt each."""
    return [("POST", "/submit", "", json.dumps({"jobType": JOB_TYPES_MIX[i % len(JOB_TYPES_MIX)],
                                                "metadata": {"prompt": f"a lighthouse {i}"}}))
            for i in range(600)]


def flask_apps(servers: Servers, load: Load, workdir: Path) -> dict[str, Any]:
    """The hello-world raw limit and the naive reference, under the web settings."""
    out: dict[str, Any] = {}
    proc, url = start_gunicorn("bench.naive_app:create_hello()", baseline_env(workdir / "flask"),
                               workdir / "flask", "/hello")
    try:
        lines = load.lines("hello", [("GET", "/hello", "", "")])
        out["hello"] = Load.summarise(load.runs("hello", url, lines))
        out["hello"]["rss"] = web_rss(proc.pid)
    finally:
        stop_process(proc)

    name, proc, url, env = start_naive(servers, workdir / "flask", "bench_naive")
    try:
        naive_broker = redis_lib.Redis(port=servers.redis.port, db=3)
        # Nothing consumes the messages: drop them between runs so Redis stays small.
        out["naive"] = Load.summarise(load.runs("naive", url, load.lines("naive", naive_rows()),
                                                between=lambda: naive_broker.delete("naive")))
        out["naive"]["rss"] = web_rss(proc.pid)
        with psycopg.connect(servers.libpq(name)) as conn:
            out["naive"]["rows"] = conn.execute("SELECT count(*) FROM naive_jobs").fetchone()[0]
        out["naive"]["cost"] = request_cost("naive", env, env["NAIVE_BROKER_URL"])
    finally:
        stop_process(proc)
        redis_lib.Redis(port=servers.redis.port, db=3).flushdb()
    return out


# --- 3. the service ------------------------------------------------------------------------
def _users(stack: Stack, count: int, balance: int) -> list[tuple[str, str]]:
    """``count`` users with a profile and ``balance`` credits; their bearer tokens."""
    from orchestrator.config import Settings
    from orchestrator.tokens import mint_user_token

    settings = Settings.from_env(stack.env)
    users = [str(uuid.uuid4()) for _ in range(count)]
    url = stack.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY profiles (id, token_balance, created_at, updated_at) FROM STDIN") as cp:
            now = dt.datetime.now(dt.timezone.utc)
            for u in users:
                cp.write_row((u, balance, now, now))
    return [(u, "Bearer " + mint_user_token(settings, u, ttl_seconds=4 * 3600)) for u in users]


#: The service's limits under the queue-job load (the defaults, said out loud).
SERVICE_LIMITS = {"SUBMIT_RATE_LIMIT": "30/minute;5/second", "MAX_ACTIVE_JOBS": "20"}


def queue_job_rows(users: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """``queue-job`` requests: each the next user's token (no per-user limit is reached),
    job types rotating, every user twice."""
    rows = []
    for i in range(2 * len(users)):
        _, auth = users[i % len(users)]
        job_type = JOB_TYPES_MIX[(i + i // len(users)) % len(JOB_TYPES_MIX)]
        body = {"jobType": job_type, "metadata": {"prompt": f"a lighthouse on a cliff, take {i}"}}
        rows.append(("POST", "/functions/v1/queue-job", auth, json.dumps(body)))
    return rows


def drainer(stack: Stack) -> Callable[[], list[str]]:
    """A stand-in for workers between runs: the queue (and each user's active jobs) starts
    empty every run; the jobs stay as rows, so tables keep growing. It returns the ids of
    the jobs it ended."""
    pg_url = stack.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    broker = redis_lib.Redis.from_url(stack.env["BROKER_URL"])

    def drain() -> list[str]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            ids = [r[0] for r in conn.execute(
                "UPDATE jobs SET status = 'completed', completed_at = now() "
                "WHERE status = 'queued' RETURNING id::text").fetchall()]
            conn.execute("VACUUM ANALYZE jobs")
        broker.delete("sdxl", "wan")  # nothing consumes them: keep Redis small
        return ids

    return drain


def service_web(servers: Servers, load: Load, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    var = Path(tempfile.mkdtemp(prefix="service-", dir=workdir))  # a phase may be measured again
    stack = make_stack("postgres-redis", var, ("web",), redis_db=1, **SERVICE_LIMITS)
    out: dict[str, Any] = {"settings": "SUBMIT_RATE_LIMIT=30/minute;5/second (the default), "
                                       "MAX_ACTIVE_JOBS=20 (the default)"}
    with stack.running():
        pg_url = stack.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
        users = _users(stack, args.users, 100_000)
        lines = load.lines("queue-job", queue_job_rows(users))
        batches: list[list[str]] = []
        drain_stack = drainer(stack)

        def drain() -> None:
            # The ids are kept: they become the fresh queued jobs of the callback runs.
            batches.append(drain_stack())

        if "queue-job" in args.only:
            results = load.runs("queue-job", stack.base_url, lines, between=drain)
            out["queue_job"] = Load.summarise(results)
            with psycopg.connect(pg_url) as conn:
                out["queue_job"]["jobs_in_db"] = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]

            if args.profile:
                out["queue_job"]["profile"] = profile_web(stack, load, lines, workdir, "queue-job", drain)

            # One request's cost, in-process: queue-job, then the first callback of the jobs it made.
            auth_file = workdir / "auth.txt"
            auth_file.write_text("\n".join(auth for _, auth in users))
            out["queue_job"]["cost"] = request_cost("queue-job", stack.env, stack.env["REDIS_URL"],
                                                    "--auth-file", str(auth_file))
            qj_rps = out["queue_job"]["rps"]["median"]
        else:
            # Only the callback is measured: queue-job just makes its jobs (not measured).
            r = load.wrk_once(stack.base_url, lines, args.duration)
            qj_rps = r["rps"]
            drain()
            batch = batches.pop()
            log(f"queue-job (not measured): {r['requests']} requests, {r['errors']} errors, "
                f"{len(batch)} jobs for the callback runs")
            if not batch:
                raise RuntimeError(f"queue-job made no jobs: {stack.log_tail('web')}")
            keep = min(len(batch) // 2, 330)
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("UPDATE jobs SET status = 'queued', completed_at = NULL "
                             "WHERE id = ANY(%s::uuid[])", (batch[:keep],))
            batches.append(batch[keep:])
        if "callback" not in args.only:
            out["rss"] = web_rss(stack.procs["web"].pid)
            return out
        with psycopg.connect(pg_url) as conn:
            fresh = [r[0] for r in conn.execute("SELECT id::text FROM jobs WHERE status = 'queued' "
                                                "ORDER BY created_at").fetchall()]
        from orchestrator.config import Settings

        worker_auth = "Bearer " + Settings.from_env(stack.env).worker_token
        (workdir / "worker-auth.txt").write_text(worker_auth)
        (workdir / "fresh-jobs.txt").write_text("\n".join(fresh))
        out["callback_cost"] = request_cost(
            "callback", stack.env, stack.env["REDIS_URL"], "--auth-file",
            str(workdir / "worker-auth.txt"), "--jobs-file", str(workdir / "fresh-jobs.txt"),
            "--requests", str(max(10, (len(fresh) - 30) // 3)))
        # The same reports again: the jobs are processing now, so these are heartbeats.
        out["heartbeat_cost"] = request_cost(
            "callback", stack.env, stack.env["REDIS_URL"], "--auth-file",
            str(workdir / "worker-auth.txt"), "--jobs-file", str(workdir / "fresh-jobs.txt"),
            "--requests", str(max(10, (len(fresh) - 30) // 3)))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET status = 'completed' WHERE status IN ('queued', 'processing')")

        # job-callback: a worker's `processing` reports. Claims: the first report of a fresh
        # queued job (the jobs queue-job made, put back in the queue slice by slice);
        # heartbeats: the report repeated for jobs already processing (lease renewal).
        pool = [j for batch in batches for j in batch]

        def claim_run(chunk: list[str], seconds: int, name: str) -> dict[str, Any]:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("UPDATE jobs SET status = 'queued', completed_at = NULL "
                             "WHERE id = ANY(%s::uuid[])", (chunk,))
            rows = [("POST", "/functions/v1/job-callback", worker_auth,
                     json.dumps({"job_id": j, "status": "processing"})) for j in chunk]
            return load.wrk_once(stack.base_url, load.lines(name, rows), seconds)

        # A warm-up estimates the claim rate; every measured run needs more fresh jobs than it
        # can claim (or it wraps round to heartbeats): top the pool up through the API if short.
        warm = claim_run(pool[:len(pool) // 4], args.warmup, "callback-claim-warm")
        pool = pool[len(pool) // 4:]
        # The warm-up is slower than the measured runs (cold caches): leave room for twice its rate.
        size = int(warm["rps"] * args.duration * 2) + 100
        while len(pool) < size * args.runs:
            missing = size * args.runs - len(pool)
            seconds = max(2, int(missing / max(qj_rps, 1) * 1.1) + 1)
            log(f"job-callback: {len(pool)} fresh jobs, {size * args.runs} wanted: "
                f"queue-job for {seconds} s more")
            load.wrk_once(stack.base_url, lines, seconds)
            drain()
            pool += batches[-1]
        claims = []
        for i in range(args.runs):
            chunk = pool[i * size:(i + 1) * size]
            r = claim_run(chunk, args.duration, f"callback-claim-{i}")
            r["jobs"] = len(chunk)
            log(f"job-callback claims run {i + 1}: {r['rps']:.0f} req/s, p50 "
                f"{r['p50_us'] / 1000:.1f} ms, p99 {r['p99_us'] / 1000:.1f} ms, errors "
                f"{r['errors']}, {r['requests']} requests for {len(chunk)} fresh jobs")
            claims.append(r)
        out["callback_claim"] = Load.summarise(claims)
        out["callback_claim"]["wrapped"] = sum(max(0, r["requests"] - r["jobs"]) for r in claims)
        heartbeat = [("POST", "/functions/v1/job-callback", worker_auth,
                      json.dumps({"job_id": j, "status": "processing"})) for j in pool[:2000]]
        results = load.runs("job-callback heartbeats", stack.base_url,
                            load.lines("callback-heartbeat", heartbeat))
        out["callback_heartbeat"] = Load.summarise(results)
        out["rss"] = web_rss(stack.procs["web"].pid)
    return out


def profile_web(stack: Stack, load: Load, lines: Path, workdir: Path, what: str,
                between: Callable[[], None]) -> dict[str, Any] | None:
    raw = workdir / f"profile-{what}.txt"
    spy = py_spy(stack.procs["web"].pid, load.args.duration, raw, subprocesses=True)
    if spy is None:
        return None
    time.sleep(1)
    r = load.wrk_once(stack.base_url, lines, load.args.duration)
    spy.wait(timeout=60)
    between()
    if not raw.exists():
        log("py-spy wrote no profile")
        return None
    summary = profile_summary(raw)
    summary["rps_while_profiled"] = r["rps"]
    return summary


def service_worker(servers: Servers, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    var = Path(tempfile.mkdtemp(prefix="worker-", dir=workdir))  # a phase may be measured again
    stack = make_stack("postgres-redis", var, (), redis_db=2, GENERATION_TIME_SCALE="0")
    # This process publishes (as the web does) and submits through orchestrator.submission.
    os.environ.update({k: stack.env[k] for k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL",
                                                  "VAR_DIR")})
    os.environ["RESULT_BACKEND"] = stack.env["BROKER_URL"]
    from orchestrator import completion, submission
    from orchestrator.db import Database
    from tasks.publish import publish_job

    out: dict[str, Any] = {}
    with stack.running():
        trivial = procfile()["worker_sdxl"].replace("tasks.celery_app:celery_app",
                                                    "bench.trivial_worker:celery_app")
        _start(stack, "worker_trivial", trivial)
        db = Database(stack.env["DATABASE_URL"])
        user = str(uuid.uuid4())
        stack.cli("grant-credits", user, "1000000")

        def submit(prompt: str) -> Any:
            req = submission.SubmitRequest(job_type="sdxl_image_fast",
                                           metadata={"prompt": prompt, "num_images": 1})
            return submission.submit_job(db, user, req, max_attempts=3).job

        watch = psycopg.connect(_libpq(stack), autocommit=True)

        def wait_done(ids: list[str], timeout: float = 120, poll: float = 0.005) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                n = watch.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND "
                                  "status = 'completed'", (ids,)).fetchone()[0]
                if n == len(ids):
                    return
                time.sleep(poll)
            raise RuntimeError(f"jobs not completed in {timeout} s: "
                               f"{stack.log_tail('worker_trivial')}")

        # Dispatch latency: commit → task start, one job at a time on an idle worker.
        def probe_run(n: int) -> list[float]:
            committed: dict[str, float] = {}
            for i in range(n):
                job = submit(f"probe {i}")
                committed[job.id] = time.time()  # submit_job returns once COMMIT has returned
                publish_job(job.id, job.job_type)  # what web.functions.publish_committed does
                completion.mark_dispatched(db, job.id)
                wait_done([job.id])
                time.sleep(args.probe_gap)
            started = dict(watch.execute("SELECT id::text, started_at FROM jobs WHERE "
                                         "id = ANY(%s::uuid[])", (list(committed),)).fetchall())
            return [(started[j].timestamp() - t) * 1000 for j, t in committed.items()]

        if "dispatch" in args.only:
            probe_run(10)  # warm: the worker's runtime, connections
            runs = []
            for i in range(args.runs):
                lat = probe_run(args.probes)
                runs.append({"p50": percentile(lat, 50), "p90": percentile(lat, 90),
                             "p99": percentile(lat, 99), "max": max(lat),
                             "mean": statistics.fmean(lat)})
                log(f"dispatch run {i + 1}: p50 {runs[-1]['p50']:.2f} ms p99 {runs[-1]['p99']:.2f} ms")
            out["dispatch"] = {k: spread([r[k] for r in runs]) for k in runs[0]}
            out["dispatch"]["probes"] = args.probes

        # Orchestration throughput: N jobs committed, then published at once; one worker process
        # (prefork, concurrency 1: the consumer and its one pool child) drains them.
        pgid = stack.procs["worker_trivial"].pid
        tp = []
        for i in range(args.runs + 2 if "orchestration" in args.only else 0):
            # a warm-up, the runs, a profiled run
            profiled = args.profile and i == args.runs + 1
            if i == args.runs + 1 and not profiled:
                break
            ids = [submit(f"drain {i}.{k}").id for k in range(args.jobs)]
            time.sleep(0.5)
            pids = group_pids(pgid)
            spy, raw = None, workdir / "profile-worker.txt"
            if profiled:
                spy = py_spy(pgid, 120, raw, subprocesses=True)
                time.sleep(1)
            cpu0 = {p: cpu_seconds([p]) for p in pids}
            for j in ids:
                publish_job(j, "sdxl_image_fast")
            wait_done(ids, poll=0.05)
            cpu1 = {p: cpu_seconds([p]) for p in pids}
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                if raw.exists():
                    out["worker_profile"] = profile_summary(raw)
                continue
            first, last = watch.execute("SELECT min(started_at), max(completed_at) FROM jobs "
                                        "WHERE id = ANY(%s::uuid[])", (ids,)).fetchone()
            if i == 0:
                noop_rate(stack)  # warm-up, of the no-op task too
                continue
            seconds = (last - first).total_seconds()
            per_job = {p: (cpu1[p] - cpu0[p]) * 1000 / args.jobs for p in pids}
            tp.append({"jobs_s": args.jobs / seconds, "cpu_ms": sum(per_job.values()),
                       "cpu_ms_main": per_job.get(pgid, 0.0),
                       "cpu_ms_child": sum(v for p, v in per_job.items() if p != pgid)})
            # Celery's own ceiling on the same worker, right after (the machine's speed drifts).
            noop_s = noop_rate(stack)
            tp[-1].update(noop_s=noop_s, of_noop=tp[-1]["jobs_s"] / noop_s)
            log(f"orchestration run {i}: {tp[-1]['jobs_s']:.0f} jobs/s, "
                f"{tp[-1]['cpu_ms']:.2f} ms CPU per job; no-op drain {noop_s:.0f} tasks/s")
        if tp:
            out["orchestration"] = {k: spread([r[k] for r in tp]) for k in tp[0]}
            out["orchestration"]["jobs"] = args.jobs
            out["noop"] = {"tasks_s": out["orchestration"].pop("noop_s"), "tasks": NOOP_TASKS}
        out["trivial_rss"] = _rss_of(stack, "worker_trivial")
        stack.kill("worker_trivial", signal.SIGTERM)

        # RSS with the procedural generator: the Procfile's workers after real jobs of each family.
        if "rss" in args.only:
            stack.start("worker_sdxl", "worker_wan")
            jobs = []
            for job_type in ("sdxl_image_fast", "sdxl_image_high", "video_fast", "image_fast"):
                req = submission.SubmitRequest(job_type=job_type,
                                               metadata={"prompt": f"rss {job_type}"})
                job = submission.submit_job(db, user, req, max_attempts=3).job
                publish_job(job.id, job.job_type)
                jobs.append(job.id)
            wait_done(jobs, timeout=300, poll=0.2)
            out["procedural_rss"] = {name: _rss_of(stack, name)
                                     for name in ("worker_sdxl", "worker_wan")}
        watch.close()
        db.dispose()
    return out


#: No-op tasks per drain (bench.noop, see noop_rate).
NOOP_TASKS = 2000


def noop_rate(stack: Stack, tasks: int = NOOP_TASKS) -> float:
    """Celery's own ceiling on this worker: ``bench.noop`` tasks (a body of one INCR) sent
    to the same worker process, then drained; tasks/s over the part of the drain after the
    last send (from the counter's value then to ``tasks``), so the sender's CPU is not in
    it."""
    from bench.trivial_worker import NOOP_COUNTER, celery_app

    counter = redis_lib.Redis.from_url(stack.env["BROKER_URL"])
    counter.delete(NOOP_COUNTER)
    for _ in range(tasks):
        celery_app.send_task("bench.noop", queue="sdxl")
    start, t0 = int(counter.get(NOOP_COUNTER) or 0), time.monotonic()
    deadline = t0 + 120
    while (done := int(counter.get(NOOP_COUNTER) or 0)) < tasks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no-op tasks not drained: {done}/{tasks}")
        time.sleep(0.002)
    if tasks - start < tasks // 4:
        raise RuntimeError(f"no-op drain too short to time: {tasks - start} of {tasks} tasks")
    return (tasks - start) / (time.monotonic() - t0)


def _rss_of(stack: Stack, name: str) -> list[tuple[str, float]]:
    """(role, MB) of a Celery worker's processes: its main process and its pool children."""
    main = stack.procs[name].pid
    return [("main" if p == main else "pool child", rss_mb(p)) for p in group_pids(main)]


def _libpq(stack: Stack) -> str:
    return stack.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


def _start(stack: Stack, name: str, command: str) -> None:
    """Stack.start for a command that is not in the Procfile."""
    log_file = open(stack.logs / f"{name}.log", "ab")
    log_file.write(f"\n=== start {time.time():.3f}\n".encode())
    log_file.flush()
    stack.procs[name] = subprocess.Popen(["bash", "-c", f"exec {command}"], env=stack.env, cwd=ROOT,
                                         stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
    stack.wait_ready(name)


def sse(args: argparse.Namespace) -> dict[str, Any]:
    from bench.sse_latency import measure

    runs = []
    for i in range(args.runs):
        r = measure("postgres-redis", args.sse_events, 0.02)
        log(f"SSE run {i + 1}: p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
            f"({r['received']}/{r['events']})")
        runs.append(r)
    return {k: spread([r[k] for r in runs]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")} | {
        "received": sum(r["received"] for r in runs), "events": sum(r["events"] for r in runs)}


# --- the report ----------------------------------------------------------------------------
def machine(servers: Servers) -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    os_name = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release")
                    .read_text().splitlines() if line.startswith("PRETTY_NAME=")), platform.system())
    with psycopg.connect(servers.pg_admin) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
        durability = ", ".join(f"{k}={conn.execute(f'SHOW {k}').fetchone()[0]}"
                               for k in ("fsync", "synchronous_commit", "shared_buffers"))
    packages = ", ".join(f"{p} {pkg_metadata.version(p)}" for p in
                         ("flask", "gunicorn", "celery", "kombu", "sqlalchemy", "psycopg", "redis",
                          "pydantic", "limits"))
    head = version_of("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.split("\n")
    changed = sorted({line[3:] for line in dirty if line[3:] and not line[3:].startswith("bench/")})
    return {
        "code": f"commit {head}" + (f" plus uncommitted changes to {', '.join(changed)}"
                                    if changed else ""),
        "cpu": f"{os.cpu_count()} × {cpu}", "memory": f"{mem / 1024 / 1024:.0f} GiB",
        "os": f"{os_name}, Linux {platform.release()}", "python": platform.python_version(),
        "postgres": f"PostgreSQL {pg} ({servers.pg_where}; {durability})",
        "redis": version_of("redis-server", "--version").split(" sha=")[0]
        + " (private, AOF appendfsync everysec)",
        "wrk": version_of("wrk", "-v").split(" [")[0], "packages": packages,
    }


def _fmt(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}–{f.format(s['max'])})"


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _paired_headline(paired: dict[str, Any] | None) -> list[str]:
    """The headline row of ``bench.paired``'s figures (none in a run saved before it)."""
    if not paired:
        return []
    ratios = paired["service"]["ratios"]
    mid = statistics.median(ratios)
    svc, naive = paired["service"]["median"], paired["naive"]["median"]
    return [f"| `queue-job` req/s, in turns with the naive reference ({len(ratios)} "
            f"pair{'s' if len(ratios) != 1 else ''} of "
            f"{paired['duration']:g} s) | {svc['rps']:,.0f} | naive reference "
            f"{naive['rps']:,.0f} | {mid:.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | ≥ 1.0× | "
            f"{_mark(mid >= TARGETS['queue_job_ratio'])} |",
            f"| `queue-job` p99, in turns | {svc['p99_ms']:.1f} ms | naive {naive['p99_ms']:.1f} ms "
            f"| {svc['p99_ms'] / naive['p99_ms']:.2f}× | ≤ 30 ms | "
            f"{_mark(svc['p99_ms'] <= TARGETS['queue_job_p99_ms'])} |",
            *_paired_heartbeats(paired, naive)]


def _paired_heartbeats(paired: dict[str, Any], naive: dict[str, float]) -> list[str]:
    if "heartbeat" not in paired:  # measured since 2026-11-29
        return []
    beat, ratios = paired["heartbeat"]["median"], paired["heartbeat"]["ratios"]
    mid = statistics.median(ratios)
    return [f"| `job-callback` heartbeats req/s, in turns with the naive reference | "
            f"{beat['rps']:,.0f} | naive reference {naive['rps']:,.0f} | {mid:.2f}× "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | ≥ 1.0× | "
            f"{_mark(mid >= TARGETS['callback_ratio'])} |"]


def _paired_table(paired: dict[str, Any] | None) -> list[str]:
    """Where a request's CPU goes, service against naive reference (``bench.paired``)."""
    if not paired:
        return []
    rows = ["", "Where a request's CPU goes, measured in turns (`bench.paired`: the naive reference "
            "and the service on the same servers, one after the other, "
            f"{len(paired['service']['ratios'])} time(s); CPU of each process group from `/proc` "
            "÷ requests; WAL from the server's WAL position, rows from `pg_stat_database`, whose "
            "counters idle connections report up to 10 s late, so they are approximate; medians):",
            "",
            "| | req/s | p99 | gunicorn workers (system part) | PostgreSQL (system part) | Redis "
            "| idle CPU | WAL per request | rows inserted / updated per request |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("naive", "naive reference"), ("service", "`queue-job`"),
                        ("heartbeat", "`job-callback` heartbeat")):
        if name not in paired:
            continue
        m = paired[name]["median"]
        wal = f"{m['wal_bytes']:,.0f} B, {m['wal_records']:.0f} records"
        written = f"{m['rows_inserted']:.1f} / {m['rows_updated']:.1f}"
        rows.append(f"| {label} | {m['rps']:,.0f} | {m['p99_ms']:.1f} ms | {m['web_ms']:.2f} ms "
                    f"({m['web_sys_ms']:.2f}) | {m['pg_ms']:.2f} ms ({m['pg_sys_ms']:.2f}) | "
                    f"{m['redis_ms']:.2f} ms | {m['idle_pct']:.1f} % | {wal} | {written} |")
    return rows


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    m, raw, fl, web, wk = res["machine"], res["raw"], res["flask"], res["web"], res["worker"]
    naive, hello = fl["naive"], fl["hello"]
    qj, cbc, cbh = web["queue_job"], web["callback_claim"], web["callback_heartbeat"]
    disp, orch = wk["dispatch"], wk["orchestration"]
    noop = (wk.get("noop") or {}).get("tasks_s")  # measured since 2026-11-29
    noop_s = noop["median"] if noop else 1000.0
    web_rss_max = max(web["rss"]["workers_mb"])
    proc_rss = [mb for rows in wk["procedural_rss"].values() for _, mb in rows]
    n_rps = naive["rps"]["median"]
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    qj_ratio = ratio(qj["rps"]["median"], n_rps)
    cb_ratio = ratio(min(cbc["rps"]["median"], cbh["rps"]["median"]), n_rps)
    lines = [
        BEGIN,
        "## Speed against same-run baselines (`make bench`, `bench/suite.py`)",
        "",
        f"Generated {res['date']} by `make bench` "
        f"(`.venv/bin/python -m bench.suite --runs {args.runs} --duration {args.duration:g} "
        f"--connections {args.connections}`), {res['seconds']:.0f} s. Every figure is the "
        f"median of {args.runs} runs, with (min–max) of the runs.",
        "",
        f"- Machine: {m['cpu']}, {m['memory']}; {m['os']}; Python {m['python']}",
        f"- {m['postgres']}; {m['redis']}; {m['wrk']}",
        f"- {m['packages']}",
        f"- Code: {m['code']}",
        "- Web: the Procfile's `web` line (gunicorn gthread, `WEB_CONCURRENCY=2` workers × "
        "`WEB_THREADS=64`, access log on); the baselines run the same line with their own app "
        "and without `-c web/gunicorn_conf.py`.",
        f"- Load: `wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s -s "
        "bench/requests.lua` (closed loop; "
        + ("keep-alive" if args.keepalive else
           "`Connection: close`, a new connection per request: with keep-alive the "
           f"{args.connections} connections stay with whichever gunicorn worker accepted them, and one worker "
           "often got most, which made runs differ by 2×; the issue's reference used sync "
           "workers, which close every connection too")
        + f"), after a {args.warmup:g} s warm-up; wrk, the servers and the bench share the "
        f"{os.cpu_count()} cores.",
        "- Other test suites seen running while measuring (before each phase the bench waits "
        "until none runs, and measures a phase again if one started meanwhile, up to "
        f"{args.quiet_wait:g} s of waiting in all): "
        + ("none." if not res["interference"] else
           "**yes, these figures may be polluted**: " + "; ".join(
               f"{phase} ({len(lines)} processes, e.g. `{lines[0].split(': ', 1)[1][:70]}`)"
               for phase, lines in res["interference"].items()) + "."),
        "",
        "### Headline",
        "",
        "| measure | service | reference | ratio | target | |",
        "|---|---|---|---|---|---|",
        f"| `queue-job` req/s | {qj['rps']['median']:,.0f} | naive reference {n_rps:,.0f} | "
        f"{qj_ratio:.2f}× | ≥ 1.0× | {_mark(qj_ratio >= TARGETS['queue_job_ratio'])} |",
        f"| `queue-job` p99 at that load | {qj['p99_ms']['median']:.1f} ms | naive "
        f"{naive['p99_ms']['median']:.1f} ms | {ratio(qj['p99_ms']['median'], naive['p99_ms']['median']):.2f}× "
        f"| ≤ 30 ms | {_mark(qj['p99_ms']['median'] <= TARGETS['queue_job_p99_ms'])} |",
        *_paired_headline(res.get("paired")),
        f"| `queue-job` req/s ÷ raw limits | {qj['rps']['median']:,.0f} | hello-world "
        f"{hello['rps']['median']:,.0f} / PG INSERT+COMMIT {raw['pg']['inserts_s']['median']:,.0f} "
        f"/ Redis LPUSH {raw['redis']['ops_s']['median']:,.0f} | "
        f"{ratio(qj['rps']['median'], hello['rps']['median']):.2f}× / "
        f"{ratio(qj['rps']['median'], raw['pg']['inserts_s']['median']):.2f}× / "
        f"{ratio(qj['rps']['median'], raw['redis']['ops_s']['median']):.3f}× | – | |",
        f"| `job-callback` req/s (claims / heartbeats) | {cbc['rps']['median']:,.0f} / "
        f"{cbh['rps']['median']:,.0f} | naive reference {n_rps:,.0f} | "
        f"{ratio(cbc['rps']['median'], n_rps):.2f}× / {ratio(cbh['rps']['median'], n_rps):.2f}× | "
        f"≥ 1.0× | {_mark(cb_ratio >= TARGETS['callback_ratio'])} |",
        f"| dispatch p99, commit → task start | {disp['p99']['median']:.2f} ms | old polling, mean "
        f"1 s (SDXL) – 2.5 s (WAN) | {1000 / disp['p99']['median']:,.0f}× – "
        f"{2500 / disp['p99']['median']:,.0f}× faster | ≤ 10 ms | "
        f"{_mark(disp['p99']['median'] <= TARGETS['dispatch_p99_ms'])} |",
        f"| dispatch p50 | {disp['p50']['median']:.2f} ms | old polling, mean 1–2.5 s | "
        f"{1000 / disp['p50']['median']:,.0f}× – {2500 / disp['p50']['median']:,.0f}× faster | – | |",
        f"| worker CPU per job | {orch['cpu_ms']['median']:.2f} ms | – | – | ≤ 5 ms | "
        f"{_mark(orch['cpu_ms']['median'] <= TARGETS['worker_cpu_ms'])} |",
        f"| jobs/s, one worker process | {orch['jobs_s']['median']:,.0f} | Celery no-op drain"
        + (f", same worker {noop_s:,.0f} (issue: ≈ 1,000)" if noop else " ≈ 1,000 (issue)")
        + (f" | {orch['of_noop']['median']:.2f}× ({orch['of_noop']['min']:.2f}–"
           f"{orch['of_noop']['max']:.2f}), in turns | " if "of_noop" in orch
           else f" | {orch['jobs_s']['median'] / noop_s:.2f}× | ")
        + f"≥ 300 | {_mark(orch['jobs_s']['median'] >= TARGETS['worker_jobs_s'])} |",
        f"| web process RSS (largest gunicorn worker) | {web_rss_max:.0f} MB | hello-world "
        f"{max(hello['rss']['workers_mb']):.0f} MB, naive {max(naive['rss']['workers_mb']):.0f} MB "
        f"| – | ≤ 150 MB | {_mark(web_rss_max <= TARGETS['web_rss_mb'])} |",
        f"| worker process RSS (largest, procedural generator) | {max(proc_rss):.0f} MB | – | – | "
        f"≤ 250 MB | {_mark(max(proc_rss) <= TARGETS['worker_rss_mb'])} |",
        f"| commit → SSE client p99 | {res['sse']['p99_ms']['median']:.1f} ms | – | – | "
        "≤ 100 ms (issue 5) | " + _mark(res['sse']['p99_ms']['median'] <= 100) + " |",
        "",
        "### Every figure",
        "",
        "| what | how | req/s (or ops/s) | p50 | p99 | max |",
        "|---|---|---|---|---|---|",
        f"| Redis LPUSH (raw) | `{raw['redis']['command']}` | {_fmt(raw['redis']['ops_s'])} | | | |",
        f"| PostgreSQL INSERT+COMMIT (raw) | one psycopg connection, one-row INSERT then COMMIT, "
        f"{args.pg_seconds:g} s | {_fmt(raw['pg']['inserts_s'])} | | | |",
    ]
    for label, how, s in (
        ("Flask hello-world (raw)", "`GET /hello` → `{\"hello\": \"world\"}`", hello),
        ("naive reference", "`POST /submit`: ORM INSERT + COMMIT, `apply_async` (Redis)", naive),
        ("service `queue-job`", f"{args.users:,} users, 6 job types, valid bodies, JWT", qj),
        ("service `job-callback`, claims", "worker token; `processing` for a queued job "
         "(queued → processing, asset row, events)", cbc),
        ("service `job-callback`, heartbeats", "worker token; `processing` again (lease renewal), "
         "2,000 jobs in rotation", cbh),
    ):
        lines.append(f"| {label} | {how} | {_fmt(s['rps'])} | {_fmt(s['p50_ms'], ' ms', 1)} | "
                     f"{_fmt(s['p99_ms'], ' ms', 1)} | {_fmt(s['max_ms'], ' ms', 1)} |")
    lines += [
        f"| dispatch latency | commit → `started_at` of the task, {disp['probes']} jobs one at a "
        f"time on an idle worker | | {_fmt(disp['p50'], ' ms', 2)} | {_fmt(disp['p99'], ' ms', 2)} "
        f"| {_fmt(disp['max'], ' ms', 2)} |",
        f"| orchestration throughput | {orch['jobs']} jobs drained by one worker process, "
        f"trivial generator | {_fmt(orch['jobs_s'])} jobs/s; CPU {_fmt(orch['cpu_ms'], ' ms', 2)} "
        f"per job (consumer {_fmt(orch['cpu_ms_main'], ' ms', 2)}, pool child "
        f"{_fmt(orch['cpu_ms_child'], ' ms', 2)}) | | | |",
        *([f"| Celery no-op drain (raw) | {wk['noop']['tasks']:,} `bench.noop` tasks (one INCR) "
           f"drained by the same worker process | {_fmt(noop)} tasks/s | | | |"] if noop else []),
        f"| commit → SSE client | `bench.sse_latency.measure`, {args.sse_events} events per run | | "
        f"{_fmt(res['sse']['p50_ms'], ' ms', 1)} | {_fmt(res['sse']['p99_ms'], ' ms', 1)} | "
        f"{_fmt(res['sse']['max_ms'], ' ms', 1)} |",
    ]
    lines += _paired_table(res.get("paired"))
    costs = [("naive reference", naive.get("cost")), ("`queue-job`", qj.get("cost")),
             ("`job-callback`, claim", web.get("callback_cost")),
             ("`job-callback`, heartbeat", web.get("heartbeat_cost"))]
    if any(c for _, c in costs):
        lines += [
            "",
            "What one request costs, counted in-process by `bench/request_cost.py` (Flask's test "
            "client, one request at a time, no HTTP server, so no gunicorn or HTTP parsing; wall and "
            "CPU time (`time.process_time`) without a profiler; SQL counted at the driver "
            "(psycopg's cursors and commits); Redis from the server's `INFO commandstats`; Python function calls from "
            "cProfile):",
            "",
            "| request | wall ms | CPU ms of the app's process | SQL round trips (statements + "
            "COMMIT) | Redis commands | Python function calls |",
            "|---|---|---|---|---|---|",
        ]
        for label, c in costs:
            if c:
                sql = ", ".join(f"{k} {v:.3g}" for k, v in c["sql_per_request"].items())
                red = ", ".join(f"{k} {v:g}" for k, v in c["redis_per_request"].items())
                lines.append(f"| {label} | {c['wall_ms']:.2f} | {c['cpu_ms']:.2f} | "
                             f"{c['sql_total_per_request']:.3g} "
                             f"({sql}) | {c['redis_total_per_request']:g} ({red}) | "
                             f"{c['python_calls_per_request']:,.0f} |")
        if qj.get("cost"):
            lines += ["", "`queue-job` under cProfile, cumulative ms per request of our "
                      "functions (profiled time "
                      f"{qj['cost']['profiled_ms_per_request']:.1f} ms per request): "
                      + "; ".join(f"`{name}` {ms:.1f}" for name, ms in qj["cost"]["cumulative_ms"][:12])
                      + "."]
    lines += [
        "",
        f"Errors (non-2xx, socket errors, timeouts) over every measured run: hello-world "
        f"{hello['errors']}, naive {naive['errors']}, queue-job {qj['errors']}, job-callback "
        f"{cbc['errors'] + cbh['errors']}. Claim requests that found their job already "
        f"claimed (the run outran its fresh jobs): {cbc.get('wrapped', 0)}. SSE events received: "
        f"{res['sse']['received']}/{res['sse']['events']}.",
        "",
        "RSS (MB, from `/proc/<pid>/status` after the load): "
        f"service web master {web['rss']['master_mb']:.0f}, workers "
        f"{', '.join(f'{x:.0f}' for x in web['rss']['workers_mb'])}; hello-world workers "
        f"{', '.join(f'{x:.0f}' for x in hello['rss']['workers_mb'])}; naive workers "
        f"{', '.join(f'{x:.0f}' for x in naive['rss']['workers_mb'])}; Celery workers after one "
        "job of each kind with the procedural generator: "
        + "; ".join(f"{name} " + ", ".join(f"{role} {mb:.0f}" for role, mb in rows)
                    for name, rows in wk["procedural_rss"].items())
        + "; trivial-generator worker "
        + ", ".join(f"{role} {mb:.0f}" for role, mb in wk["trivial_rss"]) + ".",
        "",
        "How each figure is taken:",
        "",
        f"- `queue-job`: {web['settings']}; {args.users:,} users with a profile and credits, "
        "each request the next user's token (so no per-user limit is reached), job types "
        "rotating over " + ", ".join(f"`{t}`" for t in JOB_TYPES_MIX) + ". Between runs the "
        "queued jobs are marked completed and `jobs` vacuumed (as if workers had drained the "
        "queue), so every run starts at an empty queue; rows accumulate "
        f"({qj['jobs_in_db']:,} jobs at the end). Nothing consumes the queues during the run. "
        f"Each user's token comes back every {args.users:,} requests, so the web's cache of verified "
        "tokens (`JWT_CACHE_SIZE`, 10,000) misses on a token's first use (the warm-up and "
        "most of the first run) and hits after that, as for a client that keeps its token; "
        "the in-process cost below uses a new token per request (every one a miss). The "
        "answer's `queueLength` is counted by the database at most once a second per family "
        "and web process (`QUEUE_LENGTH_MAX_AGE`).",
        "- `job-callback`: claims are the first `processing` report of a fresh queued job "
        "(each run its own slice of jobs submitted through the API beforehand); heartbeats "
        "repeat `processing` for 2,000 jobs already processing (one guarded UPDATE renewing the "
        "lease). The naive reference is the yardstick for both.",
        "- Dispatch: this process commits a job through `orchestrator.submission.submit_job` "
        "(one transaction, as the API does), takes `time.time()` when the commit has returned, "
        "then publishes and marks it dispatched exactly as `web.functions.publish_committed` "
        "does; the task's `started_at` (written by `completion.start_job` with the worker's "
        "clock, the same machine clock, first thing in the task) minus that instant is the "
        "latency. The next job is committed once the previous one completed and the worker "
        f"was idle {args.probe_gap * 1000:.0f} ms.",
        "- Orchestration: the Procfile's `worker_sdxl` command (prefork, concurrency 1) on "
        "`bench.trivial_worker:celery_app`, the service's app whose generator returns one 67-byte "
        "PNG: everything else is the service's (claim, lease keeper, storage write with fsync, "
        "success signal, completion, asset row, events). "
        f"{orch['jobs']} `sdxl_image_fast` jobs (`num_images` 1) are committed, then published "
        "in one burst; jobs/s = jobs ÷ (last `completed_at` − first `started_at`); CPU = "
        "user+system time of the worker's process group (consumer and pool child) over the "
        "drain ÷ jobs. The no-op drain: the same worker process and settings (late ack, "
        "prefetch 1, its logging) running `bench.noop`, whose body is one Redis INCR that the "
        "bench reads; tasks/s over the part of the drain after the last task was sent; one "
        "right after each orchestration run, and the ratio is taken pair by pair.",
        "- SSE: `bench/sse_latency.py`'s `measure` (one user's stream open on the `web` line, "
        "jobs committed 20 ms apart, commit → `job.queued` frame read by the client).",
        "- Old system: Redis polled every 2 s (SDXL) and 5 s (WAN), a mean wait of 1 s and 2.5 s "
        "before a GPU saw the job; the ratio divides those by the measured dispatch latency.",
    ]
    for title, prof, rate in (
            ("`queue-job` under the same load (both gunicorn workers)", qj.get("profile"),
             (qj.get("profile") or {}).get("rps_while_profiled")),
            ("the worker while it drains (consumer and pool child)", wk.get("worker_profile"), None)):
        if not prof:
            continue
        lines += ["", f"Profile of {title}: py-spy `--gil` (samples only while a thread holds "
                  f"the GIL, i.e. Python CPU time), {prof['samples']:,} samples"
                  + (f", {rate:,.0f} req/s while sampled" if rate else "") + ".", "",
                  "| innermost frame's package (self) | % | package anywhere on the stack | % |",
                  "|---|---|---|---|"]
        pairs = zip(prof["self_by_package"], prof["under_package"])
        lines += [f"| {a} | {x} | {b} | {y} |" for (a, x), (b, y) in pairs]
        lines += ["", "| our function (inclusive) | % |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in prof["inclusive"][:16]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark and soak results\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        cut = text.find("\n## ")
        text = (text[:cut + 1] + section + "\n" + text[cut + 1:]) if cut >= 0 else text + "\n" + section
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of wrk warm-up")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--keepalive", action="store_true",
                        help="keep connections open (default: a new connection per request, so "
                             "load spreads over the gunicorn workers request by request)")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--probes", type=int, default=200, help="dispatch probes per run")
    parser.add_argument("--probe-gap", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=500, help="jobs per orchestration run")
    parser.add_argument("--pg-seconds", type=float, default=3)
    parser.add_argument("--sse-events", type=int, default=300)
    parser.add_argument("--pg", choices=("private", "local"), default="private")
    parser.add_argument("--quiet-wait", type=float, default=900, metavar="SECONDS",
                        help="wait up to this long in all for other pytest runs to end "
                             "(before each phase)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="print the section instead of writing bench/RESULTS.md")
    parser.add_argument("--only", metavar="PHASES", type=_phases, default=set(PHASES),
                        help="comma list of phases to measure (" + ", ".join(PHASES) + "; default "
                             "all); a partial run prints its figures and writes "
                             "var/bench/last-partial.json, never bench/RESULTS.md")
    parser.add_argument("--rerender", metavar="JSON",
                        help="measure nothing: rewrite the section from a saved var/bench/last.json")
    args = parser.parse_args()
    if args.rerender:
        res = json.loads(Path(args.rerender).read_text())
        args = argparse.Namespace(**{**vars(args), **res["args"], "write": args.write})
        section = report(res, args)
        write_section(section) if args.write else print(section)
        return 0

    watcher = Watcher(args.quiet_wait)
    watcher.enter("start")
    watcher.paused = True  # nothing is measured until the first phase
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    log(f"work directory {workdir}")
    servers = Servers(workdir, args.pg)
    only = args.only
    partial = only != set(PHASES)
    res: dict[str, Any] = {"date": dt.date.today().isoformat(),
                           "args": {k: (sorted(v) if k == "only" else v)
                                    for k, v in vars(args).items() if k != "write"}}
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with watcher:
            res["machine"] = machine(servers)
            load = Load(workdir, args)
            if "raw" in only:
                res["raw"] = watcher.phase_of("raw limits", lambda: {
                    "redis": redis_lpush(servers, args.runs),
                    "pg": pg_inserts(servers, args.runs, args.pg_seconds)})
            if "naive" in only:
                res["flask"] = watcher.phase_of("hello-world and naive reference",
                                                lambda: flask_apps(servers, load, workdir))
            if only & {"queue-job", "callback"}:
                res["web"] = watcher.phase_of("queue-job and job-callback",
                                              lambda: service_web(servers, load, workdir, args))
            if "paired" in only:
                from bench import paired

                res["paired"] = watcher.phase_of("queue-job, heartbeats and the naive reference "
                                                 "in turns",
                                                 lambda: paired.measure(servers, load, workdir,
                                                                        args.runs, args.duration))
            if only & {"dispatch", "orchestration", "rss"}:
                res["worker"] = watcher.phase_of("dispatch and worker",
                                                 lambda: service_worker(servers, workdir, args))
            if "sse" in only:
                res["sse"] = watcher.phase_of("SSE", lambda: sse(args))
        res["interference"] = {phase: sorted(lines) for phase, lines in watcher.seen.items()}
        res["seconds"] = time.monotonic() - started
    finally:
        servers.stop()
        for old in out.glob("profile-*.txt"):
            old.unlink()
        for prof in workdir.glob("profile-*.txt"):
            shutil.copy(prof, out / prof.name)
    if partial:
        (out / "last-partial.json").write_text(json.dumps(res, indent=1, default=str))
        print(partial_summary(res))
        log(f"partial run ({', '.join(p for p in PHASES if p in only)}; {res['seconds']:.0f} s): "
            "bench/RESULTS.md untouched; raw figures in var/bench/last-partial.json")
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    (out / "last.json").write_text(json.dumps(res, indent=1, default=str))
    section = report(res, args)
    if args.write:
        write_section(section)
        log(f"wrote {RESULTS.relative_to(ROOT)} ({res['seconds']:.0f} s); raw figures in var/bench/last.json")
    else:
        print(section)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _phases(value: str) -> set[str]:
    chosen = {p.strip() for p in value.split(",") if p.strip()}
    unknown = chosen - set(PHASES)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(sorted(unknown)) or '(none)'}; "
                                         f"choose from {', '.join(PHASES)}")
    return chosen


def partial_summary(res: dict[str, Any]) -> str:
    """The figures of a partial run, one line each: every median (min–max), and the
    in-process cost of a request."""
    lines: list[str] = []

    def walk(path: str, node: Any) -> None:
        if not isinstance(node, dict):
            return
        if isinstance(node.get("median"), dict):  # bench.paired's, per target
            ratios = node.get("ratios")
            lines.append(f"{path}: " + " ".join(f"{k}={v:.2f}" for k, v in node["median"].items())
                         + (f"; ÷ naive in turns: {', '.join(f'{r:.3f}' for r in ratios)}"
                            if ratios else ""))
            return
        if "median" in node and "runs" in node:
            lines.append(f"{path}: {node['median']:,.2f} ({node['min']:,.2f}–{node['max']:,.2f})")
            return
        if "wall_ms" in node and "sql_per_request" in node:
            sql = ", ".join(f"{k} {v:.3g}" for k, v in node["sql_per_request"].items())
            lines.append(f"{path}: {node['wall_ms']:.2f} ms wall, {node['cpu_ms']:.2f} ms CPU, "
                         f"{node['sql_total_per_request']:.3g} SQL ({sql}), "
                         f"{node['redis_total_per_request']:g} Redis, "
                         f"{node['python_calls_per_request']:,.0f} Python calls")
            return
        for k, v in node.items():
            if k in ("machine", "args", "profile", "worker_profile"):
                continue
            walk(f"{path}.{k}" if path else k, v)

    walk("", res)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
