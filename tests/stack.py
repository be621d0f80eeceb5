"""Real processes for end-to-end and fault tests: the Procfile's commands as
subprocesses, a private Redis server when a test must stop or flush it, and a
fresh PostgreSQL database per stack."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg
import redis as redis_lib
import requests

from tests.conftest import PG_ADMIN, PG_URL_BASE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TERMINAL = {"completed", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if line.strip())}


class PrivateRedis:
    """A redis-server of our own (AOF on), so a test may stop, restart or flush it."""

    #: fsync of the AOF: "always" (a test's queued message survives a kill); the bench: "everysec".
    appendfsync = "always"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind",
             "127.0.0.1", "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync",
             self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis_lib.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        """A clean shutdown: the AOF keeps what was queued."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class PrivatePostgres:
    """A PostgreSQL server of our own on a free port, so a test may stop it.

    The cluster lives in a folder the ``postgres`` user owns (initdb refuses
    to run as root); trust authentication on loopback only.
    """

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = bins[-1].parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="orch-pg-"))
        shutil.chown(self.dir, "postgres")
        self._as_postgres(self.bin / "initdb", "-D", str(self.dir / "data"), "-A", "trust",
                          "-U", "postgres", "--no-sync")

    def _as_postgres(self, *args: str | Path) -> None:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    @property
    def admin(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.dir / "data", "-w", "-l",
                          self.dir / "server.log", "-o",
                          f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                          "start")

    def stop(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.dir / "data", "-w", "-m", "fast", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    processes: tuple[str, ...]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pg_name: str | None = None
    redis: PrivateRedis | None = None
    postgres: PrivatePostgres | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    # --- processes -------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator["Stack"]:
        """Migrate, start every process, and stop everything (servers too) at the end."""
        try:
            self.cli("db", "upgrade")
            self.start()
            yield self
        finally:
            self.stop()

    def cli(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "orchestrator"), *args], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def start(self, *names: str) -> None:
        commands = procfile()
        for name in names or self.processes:
            log = open(self.logs / f"{name}.log", "ab")
            log.write(f"\n=== start {time.time():.3f}\n".encode())
            log.flush()
            self.procs[name] = subprocess.Popen(
                ["bash", "-c", f"exec {commands[name]}"], env=self.env, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(*(names or self.processes))

    def wait_ready(self, *names: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
                if self._ready(name):
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise RuntimeError(f"not ready: {pending}: " + " ".join(self.log_tail(n) for n in pending))

    def _ready(self, name: str) -> bool:
        if name == "web":
            try:
                return requests.get(f"{self.base_url}/healthz", timeout=1).ok
            except requests.RequestException:
                return False
        if name == "flower":
            try:
                return requests.get(f"http://127.0.0.1:{self.env['FLOWER_PORT']}/healthcheck",
                                    timeout=1).ok
            except requests.RequestException:
                return False
        text = (self.logs / f"{name}.log").read_bytes().rsplit(b"=== start", 1)[-1]
        if name == "beat":
            return b"beat: Starting" in text
        return re.search(rb"@\S+ ready\.", text) is not None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and all its children (a worker's pool included)."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def log_tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.redis:
            self.redis.stop()
        if os.environ.get("E2E_KEEP_LOGS"):
            shutil.copytree(self.logs, ROOT / "test-artifacts" / self.logs.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("storage", "*.sqlite*"))
        if self.postgres:
            self.postgres.destroy()
        elif self.pg_name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')

    # --- the API ---------------------------------------------------------------------
    def user(self) -> tuple[str, dict[str, str]]:
        user_id = str(uuid.uuid4())
        return user_id, {"Authorization": f"Bearer {self.cli('token', '--user', user_id)}"}

    def submit(self, headers: dict[str, str], job_type: str = "image_fast", prompt: str = "a kite",
               timeout: float = 10, **metadata: Any) -> requests.Response:
        return requests.post(f"{self.base_url}/functions/v1/queue-job", headers=headers,
                             timeout=timeout,
                             json={"jobType": job_type, "metadata": {"prompt": prompt, **metadata}})

    def job(self, headers: dict[str, str], job_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(self, headers: dict[str, str], job_ids: list[str], *, timeout: float = 120,
                 until: Any = None) -> dict[str, dict[str, Any]]:
        """Poll until every job is terminal (or satisfies ``until``)."""
        check = until or (lambda job: job["status"] in TERMINAL)
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(done) < len(job_ids):
            for job_id in job_ids:
                if job_id not in done:
                    job = self.job(headers, job_id)
                    if check(job):
                        done[job_id] = job
            time.sleep(0.2)
        missing = set(job_ids) - set(done)
        assert not missing, (f"not finished: {missing}\n" + "\n".join(
            f"--- {n}\n{self.log_tail(n)}" for n in self.processes))
        return done


def make_stack(kind: str, var_dir: Path, processes: tuple[str, ...], *,
               private_redis: bool = False, private_postgres: bool = False, redis_db: int = 12,
               **overrides: str) -> Stack:
    """Environment for a stack: ``postgres-redis`` or ``embedded`` (SQLite, no servers)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "REDIS_URL", "STORAGE_ROOT"}}
    env.update(VAR_DIR=str(var_dir), PORT=str(free_port()), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", WEB_CONCURRENCY="2",
               # stacks submit many jobs as one user: the limiter runs, generously
               SUBMIT_RATE_LIMIT="1000/second", MAX_ACTIVE_JOBS="0")
    env.update(overrides)
    stack = Stack(env=env, logs=var_dir, processes=processes)
    if kind == "postgres-redis":
        stack.pg_name = f"orch_e2e_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        admin, pg_url = PG_ADMIN, f"{PG_URL_BASE}/{stack.pg_name}"
        if private_postgres:
            stack.postgres = PrivatePostgres()
            stack.postgres.start()
            admin, pg_url = stack.postgres.admin, stack.postgres.url(stack.pg_name)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{stack.pg_name}"')
        if private_redis:
            stack.redis = PrivateRedis(var_dir)
            stack.redis.start()
            redis_url = stack.redis.url
        else:
            from tests.conftest import REDIS_BASE

            redis_url = f"{REDIS_BASE}/{redis_db}"
            redis_lib.Redis.from_url(redis_url).flushdb()
        env.update(DATABASE_URL=pg_url, BROKER_URL=redis_url,
                   REDIS_URL=redis_url)
    return stack
