"""Structured logs: one JSON object per line from the web (app, gunicorn, access
log) and the Celery workers, with the request, job, user and task ids they
concern; ``LOG_FORMAT=text`` for humans."""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import uuid
from typing import Any, Iterator

import pytest
import requests

from orchestrator import logs
from orchestrator.config import ConfigurationError, Settings
from tests.stack import Stack, make_stack

FIELDS = ("ts", "level", "logger", "msg")


def _lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    """Every line the process wrote, parsed (the harness's own start markers aside)."""
    out = []
    for line in (stack.logs / f"{name}.log").read_text().splitlines():
        if not line.strip() or line.startswith("=== start"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{name}: not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert all(isinstance(record.get(f), str) for f in FIELDS), line
        dt.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        out.append(record)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack("postgres-redis", tmp_path_factory.mktemp("logs"), ("web", "worker_sdxl"),
                   private_redis=True, LOG_FORMAT="json")
    with s.running():
        yield s


@pytest.mark.e2e
def test_every_line_is_json_with_its_ids(stack: Stack) -> None:
    user_id, headers = stack.user()
    rid = f"logs-test-{uuid.uuid4().hex[:12]}"
    r = requests.post(f"{stack.base_url}/functions/v1/queue-job", timeout=10,
                      headers={**headers, "X-Request-Id": rid},
                      json={"jobType": "sdxl_image_fast", "metadata": {"prompt": "a log cabin"}})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == rid
    job_id = r.json()["job"]["id"]
    # A refused request after authentication: the app logs it, with the user and the job asked for.
    missing, rid404 = str(uuid.uuid4()), f"logs-404-{uuid.uuid4().hex[:12]}"
    r = requests.get(f"{stack.base_url}/v1/jobs/{missing}", timeout=10,
                     headers={**headers, "X-Request-Id": rid404})
    assert r.status_code == 404
    assert stack.wait_for(headers, [job_id], timeout=60)[job_id]["status"] == "completed"

    web = _lines(stack, "web")
    loggers = {line["logger"] for line in web}
    assert {"gunicorn.error", "gunicorn.access", "web"} <= loggers, loggers
    access = [line for line in web if line.get("request_id") == rid]
    assert access and access[0]["logger"] == "gunicorn.access"
    assert access[0]["path"] == "/functions/v1/queue-job" and access[0]["status"] == "200"
    assert access[0]["method"] == "POST" and isinstance(access[0]["duration_ms"], int)
    refused = [line for line in web if line.get("request_id") == rid404 and line["logger"] != "gunicorn.access"]
    assert refused, "the app's line about the refused request"
    assert refused[0]["user_id"] == user_id and refused[0]["job_id"] == missing
    assert refused[0]["level"] == "INFO" and "404" in refused[0]["msg"]

    worker = _lines(stack, "worker_sdxl")
    about = [line for line in worker if job_id in line["msg"]]
    assert len(about) >= 3, about  # received, completed, succeeded
    assert all(line.get("job_id") == job_id and line.get("task_id") == job_id for line in about)
    assert any(line["logger"] == "tasks.signals" for line in about)  # logged inside the task
    assert any("ready." in line["msg"] for line in worker)

    token = headers["Authorization"].split()[1]
    for name in ("web", "worker_sdxl"):
        assert token not in (stack.logs / f"{name}.log").read_text()


# --- in process ---------------------------------------------------------------------------------


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("orchestrator.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_and_text_formatters() -> None:
    logs.add_context(lambda record: {"request_id": "from-context", "user_id": None})
    try:
        line = json.loads(logs.JsonFormatter().format(_record("job %s done", "j1", job_id="j1")))
        assert line["msg"] == "job j1 done" and line["level"] == "WARNING"
        assert line["logger"] == "orchestrator.test" and line["ts"].endswith("Z")
        assert line["job_id"] == "j1" and line["request_id"] == "from-context"
        assert "user_id" not in line  # unknown ids are left out
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record = _record("failed")
            record.exc_info = sys.exc_info()
        line = json.loads(logs.JsonFormatter().format(record))
        assert "ValueError: boom" in line["exc"] and "\n" not in logs.JsonFormatter().format(record)
        text = logs.TextFormatter().format(_record("job %s done", "j1", job_id="j1"))
        assert text.endswith("orchestrator.test: job j1 done [job_id=j1 request_id=from-context]")
    finally:
        logs._providers.pop()


def test_configure_and_log_format_setting() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("json", logging.INFO, stream)
        logging.getLogger("orchestrator.test").info("hello %s", "world")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    assert json.loads(stream.getvalue())["msg"] == "hello world"
    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"LOG_FORMAT": "TEXT"}).log_format == "text"
    with pytest.raises(ConfigurationError):
        Settings.from_env({"LOG_FORMAT": "xml"})
