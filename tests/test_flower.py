"""The Procfile's ``flower`` against the Celery app on Redis: it sees the running
worker and the test's task through its HTTP API behind basic auth. The workers
start without task events (``WORKER_TASK_EVENTS`` unset); Flower turns them on."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.stack import Stack, free_port, make_stack

AUTH = ("ops", "flower-test-password")
WAIT_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack("postgres-redis", tmp_path_factory.mktemp("flower"),
                   ("web", "worker_sdxl", "flower"), private_redis=True,
                   FLOWER_PORT=str(free_port()), FLOWER_BASIC_AUTH=":".join(AUTH))
    with s.running():
        yield s


def _until(what: str, probe: Callable[[], Any], deadline: float) -> Any:
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except requests.RequestException as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"flower never showed {what}; last answer: {last!r}")


@pytest.mark.e2e
def test_flower_shows_workers_and_tasks(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.env['FLOWER_PORT']}"
    deadline = time.monotonic() + WAIT_S
    assert requests.get(f"{base}/api/workers", timeout=5).status_code == 401  # auth required

    def get(path: str, **params: Any) -> Any:
        r = requests.get(f"{base}{path}", params=params, auth=AUTH, timeout=10)
        r.raise_for_status()
        return r.json()

    # The worker, as the dashboard sees it (its heartbeat events) and as inspect answers.
    seen = _until("the sdxl worker on its dashboard", lambda: [
        w for w in get("/workers", json=1)["data"]
        if w["hostname"].startswith("sdxl@") and w["status"]], deadline)
    assert seen
    workers = _until("the sdxl worker in /api/workers", lambda: {
        name: info for name, info in get("/api/workers", refresh=1).items()
        if name.startswith("sdxl@")}, deadline)
    queues = {q["name"] for info in workers.values() for q in info.get("active_queues") or []}
    assert "sdxl" in queues

    # Flower turns the worker's task events on (``enable_events`` every few seconds).
    log = stack.logs / "worker_sdxl.log"
    _until("the worker's task events turned on",
           lambda: "enabled by remote" in log.read_text(errors="replace"), deadline)
    _, headers = stack.user()
    r = stack.submit(headers, "sdxl_image_fast", prompt="a flower in a field")
    assert r.status_code == 200, r.text
    job_id = r.json()["job"]["id"]

    def our_task() -> dict[str, Any] | None:
        for task_id, task in get("/api/tasks").items():
            if job_id in (task.get("args") or "") and task.get("state") == "SUCCESS":
                return {"id": task_id, **task}
        return None

    task = _until(f"the task of job {job_id}", our_task, deadline)
    assert task["id"] == job_id  # published with the job id as task id
    assert task["name"] == "generation.run" and task["worker"].startswith("sdxl@")
    assert stack.job(headers, job_id)["status"] == "completed"
