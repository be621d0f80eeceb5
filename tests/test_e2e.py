"""End to end with real processes: the Procfile's web, worker_sdxl and
worker_wan commands, started as subprocesses, on PostgreSQL + Redis and on the
embedded defaults (SQLite + the SQLAlchemy broker, no servers).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import redis as redis_lib
import requests

from orchestrator.jobtypes import JOB_TYPES
from tests.conftest import PG_ADMIN, PG_URL_BASE, REDIS_BASE
from tests.helpers import mp4_info, png_info

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
E2E_REDIS_DB = 12
PROCESSES = ("web", "worker_sdxl", "worker_wan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lines if l.strip())}


@dataclass
class Stack:
    kind: str
    env: dict[str, str]
    base_url: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "orchestrator"), *args], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def user(self) -> tuple[str, dict[str, str]]:
        user_id = str(uuid.uuid4())
        return user_id, {"Authorization": f"Bearer {self.cli('token', '--user', user_id)}"}

    def start(self) -> None:
        commands = _procfile()
        for name in PROCESSES:
            log = open(self.logs / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                ["bash", "-c", f"exec {commands[name]}"], env=self.env, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        pending = set(PROCESSES)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
                if name == "web":
                    try:
                        if requests.get(f"{self.base_url}/healthz", timeout=1).ok:
                            pending.discard(name)
                    except requests.RequestException:
                        pass
                elif re.search(rb"@\S+ ready\.", (self.logs / f"{name}.log").read_bytes()):
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise RuntimeError(f"not ready: {pending}: " + " ".join(self.log_tail(n) for n in pending))

    def log_tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

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


def _stack_env(kind: str, var_dir: Path) -> tuple[dict[str, str], str | None]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "REDIS_URL", "STORAGE_ROOT"}}
    port = _free_port()
    env.update(VAR_DIR=str(var_dir), PORT=str(port), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", WEB_CONCURRENCY="2")
    pg_name = None
    if kind == "postgres-redis":
        pg_name = f"orch_e2e_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        redis_url = f"{REDIS_BASE}/{E2E_REDIS_DB}"
        redis_lib.Redis.from_url(redis_url).flushdb()
        env.update(DATABASE_URL=f"{PG_URL_BASE}/{pg_name}", BROKER_URL=redis_url,
                   REDIS_URL=redis_url)
    return env, pg_name


@pytest.fixture(scope="module", params=["postgres-redis", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    kind = request.param
    var_dir = tmp_path_factory.mktemp(f"e2e-{kind}")
    env, pg_name = _stack_env(kind, var_dir)
    st = Stack(kind=kind, env=env, base_url=f"http://127.0.0.1:{env['PORT']}", logs=var_dir)
    try:
        st.cli("db", "upgrade")
        st.start()
        yield st
    finally:
        st.stop()
        if os.environ.get("E2E_KEEP_LOGS"):
            shutil.copytree(var_dir, ROOT / "test-artifacts" / kind, dirs_exist_ok=True)
        if pg_name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


def _wait_terminal(stack: Stack, headers: dict[str, str], job_ids: list[str],
                   timeout: float = 120) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(done) < len(job_ids):
        for job_id in job_ids:
            if job_id in done:
                continue
            r = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=headers, timeout=10)
            assert r.status_code == 200, r.text
            if r.json()["status"] in {"completed", "failed", "cancelled"}:
                done[job_id] = r.json()
        time.sleep(0.25)
    missing = set(job_ids) - set(done)
    assert not missing, f"not finished: {missing}\n{stack.log_tail('worker_wan')}"
    return done


def test_all_ten_job_types_complete(stack: Stack) -> None:
    user_id, headers = stack.user()
    submitted: dict[str, str] = {}
    for job_type in JOB_TYPES:
        r = requests.post(f"{stack.base_url}/functions/v1/queue-job", headers=headers, timeout=10,
                          json={"jobType": job_type,
                                "metadata": {"prompt": f"a lighthouse at dusk ({job_type})"}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and body["jobType"] == job_type
        assert body["queue"] == f"{JOB_TYPES[job_type].family.value}_queue"
        submitted[body["job"]["id"]] = job_type

    jobs = _wait_terminal(stack, headers, list(submitted))
    for job_id, job in jobs.items():
        spec = JOB_TYPES[submitted[job_id]]
        assert job["status"] == "completed", job
        assert job["progress"] == 100 and job["attempts"] == 1
        assert len(job["assets"]) == spec.outputs
        if spec.enhanced:
            assert job["enhanced_prompt"] and job["enhanced_prompt"] != job["prompt"]
        for asset in job["assets"]:
            assert asset["bucket"] == spec.name and asset["path"].startswith(f"{user_id}/")
            download = requests.get(asset["url"], timeout=10)
            assert download.status_code == 200
            if spec.is_video:
                assert download.headers["Content-Type"] == "video/mp4"
                info = mp4_info(download.content)
                assert info == {"codec": "h264", "width": 480, "height": 832, "frames": 83,
                                "fps": 16.0}
            else:
                assert download.headers["Content-Type"] == "image/png"
                assert png_info(download.content) == ("PNG", (spec.width, spec.height))
        kind, asset_id = ("videos", job["video_id"]) if spec.is_video else ("images", job["image_id"])
        row = requests.get(f"{stack.base_url}/v1/{kind}/{asset_id}", headers=headers, timeout=10).json()
        assert row["status"] == "completed" and row["completed_at"]
        if spec.is_video:
            assert row["video_url"] == job["assets"][0]["path"] and row["thumbnail_url"]
        else:
            assert row["image_url"] == job["assets"][0]["path"]
    me = requests.get(f"{stack.base_url}/v1/me", headers=headers, timeout=10).json()
    assert me["token_balance"] == 100 - sum(t.credits for t in JOB_TYPES.values())


def test_admin_image_is_generated_for_admins_only(stack: Stack) -> None:
    user_id, headers = stack.user()
    url = f"{stack.base_url}/functions/v1/generate-admin-image"
    r = requests.post(url, headers=headers, json={"prompt": "a test card"}, timeout=10)
    assert r.status_code == 403 and r.json()["success"] is False
    stack.cli("grant-admin", user_id)
    r = requests.post(url, headers=headers, json={"prompt": "a test card", "mode": "fast"}, timeout=90)
    assert r.status_code == 200, r.text
    image = r.json()["image"]
    assert image["prompt"] == "a test card" and image["mode"] == "fast" and image["id"]
    assert png_info(requests.get(image["url"], timeout=10).content) == ("PNG", (1024, 1024))


def test_auth_isolation_and_credits_over_http(stack: Stack) -> None:
    _, alice = stack.user()
    _, bob = stack.user()
    base = stack.base_url
    r = requests.post(f"{base}/functions/v1/queue-job", headers=alice, timeout=10,
                      json={"jobType": "image_fast", "metadata": {"prompt": "a boat"}})
    job_id = r.json()["job"]["id"]
    theirs = requests.get(f"{base}/v1/jobs/{job_id}", headers=bob, timeout=10)
    random = requests.get(f"{base}/v1/jobs/{uuid.uuid4()}", headers=bob, timeout=10)
    assert theirs.status_code == random.status_code == 404 and theirs.content == random.content
    assert requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).status_code == 401
    bad = requests.post(f"{base}/functions/v1/queue-job", timeout=10,
                        headers={"Authorization": "Bearer not-a-token"}, json={"jobType": "image_fast"})
    assert bad.status_code == 401 and bad.json()["success"] is False
    unknown = requests.post(f"{base}/functions/v1/queue-job", headers=alice, timeout=10,
                            json={"jobType": "video_ultra", "metadata": {"prompt": "x"}})
    assert unknown.status_code == 400 and set(unknown.json()["details"]["valid_job_types"]) == set(JOB_TYPES)
    cb = requests.post(f"{base}/functions/v1/job-callback", timeout=10,
                       json={"job_id": job_id, "status": "failed", "error_message": "x"})
    assert cb.status_code == 401
    _wait_terminal(stack, alice, [job_id])
    # Spend Bob's 100 credits on video7b_high_enhanced (6 each), then one more is refused.
    for _ in range(16):
        ok = requests.post(f"{base}/functions/v1/queue-job", headers=bob, timeout=10,
                           json={"jobType": "video7b_high_enhanced", "metadata": {"prompt": "rain"}})
        assert ok.status_code == 200, ok.text
    short = requests.post(f"{base}/functions/v1/queue-job", headers=bob, timeout=10,
                          json={"jobType": "video7b_high_enhanced", "metadata": {"prompt": "rain"}})
    assert short.status_code == 402 and short.json()["code"] == "insufficient_credits"
    assert requests.get(f"{base}/v1/me", headers=bob, timeout=10).json()["token_balance"] == 4
