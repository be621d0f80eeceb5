"""The console page in a real headless Chromium, and ``make demo``'s script,
against a real stack (the Procfile's web, worker_sdxl and worker_wan on
PostgreSQL + Redis).

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or ``$CHROMIUM``)
driven by Playwright; ``make test`` installs it when it is missing. Without it
these tests fail: they never skip. The screenshot lands in
``test-artifacts/console.png``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

from orchestrator.jobtypes import JOB_TYPES
from tests.helpers import png_info
from tests.stack import ROOT, Stack, make_stack

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PROCESSES = ("web", "worker_sdxl", "worker_wan")
WAIT_MS = 90_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = make_stack("postgres-redis", tmp_path_factory.mktemp("console"), PROCESSES, redis_db=13)
    with st.running():
        yield st


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
        "(apt-get install --no-install-recommends chromium)")
    with sync_playwright() as playwright:
        # --no-sandbox: the test machine runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


class Console:
    """One browser tab on the console, failing the test on any script error or CSP violation."""

    def __init__(self, browser: Browser, stack: Stack) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.stack = stack

    def _console(self, message: ConsoleMessage) -> None:
        # Answers the page expects (a 404 from an API it probes) are logged as failed loads;
        # anything else at error level (a script error, a CSP violation) is a failure.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def open(self, token: str) -> Page:
        page = self.page
        response = page.goto(self.stack.base_url + "/")
        assert response is not None and response.status == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        page.fill("#token-input", token)
        page.click("#token-use")
        expect(page.locator("#me")).to_be_visible()
        return page

    def job_card(self, job_type: str) -> Any:
        return self.page.locator(f"li.job:has(.job-type:text-is('{job_type}'))").first

    def submit(self, job_type: str, prompt: str, **fields: str) -> str:
        page = self.page
        page.select_option("#job-type", job_type)
        page.fill("#prompt", prompt)
        for selector, value in fields.items():
            page.fill(f"#{selector}", value)
        with page.expect_response(lambda r: r.url.endswith("/v1/jobs")
                                  and r.request.method == "POST") as answer:
            page.click("#job-submit")
        assert answer.value.status == 201, answer.value.text()
        job_id = answer.value.json()["job"]["id"]
        expect(page.locator(f"li.job[data-job-id='{job_id}']")).to_have_count(1)
        return job_id

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], self.errors


@pytest.fixture
def console(browser: Browser, stack: Stack) -> Iterator[Console]:
    tab = Console(browser, stack)
    try:
        yield tab
    finally:
        tab.close()


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _stream_served(stack: Stack, headers: dict[str, str]) -> bool:
    """Whether the service answers GET /v1/events with a stream (the page must then use it)."""
    with requests.get(f"{stack.base_url}/v1/events", headers=headers, stream=True, timeout=10) as r:
        return r.status_code == 200 and r.headers.get("Content-Type", "").startswith("text/event-stream")


# --- the page -----------------------------------------------------------------------------------


def test_console_submits_and_renders_an_image_and_a_video_job(console: Console, stack: Stack) -> None:
    user_id, headers = stack.user()
    page = console.open(_token(headers))
    expect(page.locator("#me-user")).to_have_text(user_id)
    expect(page.locator("#me-balance")).to_have_text("100 credits")
    expect(page.locator("#admin")).to_be_hidden()
    # The ten job types, read from /openapi.json.
    options = page.locator("#job-type option").all_text_contents()
    assert sorted(options) == sorted(JOB_TYPES)
    expect(page.locator("#connection")).to_have_attribute(
        "data-mode", "live" if _stream_served(stack, headers) else "polling")

    image_id = console.submit("sdxl_image_fast", "a lighthouse on a cliff at dusk",
                              **{"negative-prompt": "fog", "num-images": "2", "seed": "7"})
    card = page.locator(f"li.job[data-job-id='{image_id}']")
    expect(card).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    images = card.locator(".media img")
    expect(images).to_have_count(2)
    for i in range(2):
        images.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                               arg=images.nth(i).element_handle())
        assert images.nth(i).evaluate("img => img.naturalWidth") == 1024
    expect(card.locator("progress")).to_have_attribute("value", "100")
    expect(card.locator(".cancel")).to_be_hidden()
    record = stack.job(headers, image_id)
    assert record["status"] == "completed" and len(record["assets"]) == 2
    assert record["metadata"]["seed"] == 7 and "fog" in record["negative_prompt"]

    video_id = console.submit("video_fast", "a red fox running through snow")
    card = page.locator(f"li.job[data-job-id='{video_id}']")
    expect(card).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    video = card.locator(".media video")
    expect(video).to_have_count(1)
    src = video.get_attribute("src")
    assert src and "/v1/files/video_fast/" in src
    assert video.get_attribute("controls") is not None
    # Chromium reads the MP4's header: the link works and the file is H.264 it can play.
    page.wait_for_function("v => v.readyState >= 1 && v.videoWidth === 480", arg=video.element_handle())
    expect(page.locator("#me-balance")).to_have_text(
        f"{100 - JOB_TYPES['sdxl_image_fast'].credits - JOB_TYPES['video_fast'].credits} credits")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
    assert png_info((ARTIFACTS / "console.png").read_bytes())[0] == "PNG"


def test_cancel_and_retry_buttons(console: Console, stack: Stack) -> None:
    """Cancel answers for a queued job; retry shows only on a failed one."""
    _, headers = stack.user()
    page = console.open(_token(headers))
    # Keep the wan worker busy so the next job stays queued long enough to cancel.
    busy = [stack.submit(headers, "video_high", "a long queue").json()["job"]["id"] for _ in range(2)]
    job_id = console.submit("image_high", "a kite over a beach")
    card = page.locator(f"li.job[data-job-id='{job_id}']")
    card.locator(".cancel").click()
    expect(card).to_have_attribute("data-status", "cancelled")
    expect(card.locator(".cancel")).to_be_hidden()
    expect(card.locator(".retry")).to_be_hidden()  # only failed jobs can be retried
    assert stack.job(headers, job_id)["status"] == "cancelled"
    stack.wait_for(headers, busy)


def test_admin_sees_the_queues_panel(console: Console, stack: Stack) -> None:
    user_id, headers = stack.user()
    stack.cli("grant-admin", user_id)
    page = console.open(_token(headers))
    expect(page.locator("#me-roles")).to_have_text("admin")
    expect(page.locator("#admin")).to_be_visible()
    answer = requests.get(f"{stack.base_url}/v1/queues", headers=headers, timeout=10)
    if answer.status_code == 200:
        families = sorted(q["family"] for q in answer.json()["queues"])
        expect(page.locator("#queues tbody tr")).to_have_count(len(families))
        assert sorted(page.locator("#queues tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.family)")) == families
    else:
        expect(page.locator("#queues-note")).to_contain_text("does not report queue statistics")


def test_console_polls_where_there_is_no_stream(console: Console, stack: Stack) -> None:
    """A service without ``/v1/events`` (404): the page polls ``GET /v1/jobs`` and still shows
    the job to its rendered image."""
    _, headers = stack.user()
    page = console.page
    page.route("**/v1/events", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body='{"success": false, "error": "Not found", "code": "not_found"}'))
    console.open(_token(headers))
    expect(page.locator("#connection")).to_have_attribute("data-mode", "polling")
    job_id = console.submit("image_fast", "a windmill in a tulip field")
    card = page.locator(f"li.job[data-job-id='{job_id}']")
    expect(card).to_have_attribute("data-status", "completed")
    page.wait_for_function("img => img.complete && img.naturalWidth === 480",
                           arg=card.locator(".media img").element_handle())


# --- the stream client, against a scripted stream --------------------------------------------------


def _sse(*events: tuple[int | None, str, dict[str, Any]], crlf: bool = False) -> str:
    out = [": keepalive\n\n"]
    for event_id, kind, data in events:
        lines = ([f"id: {event_id}"] if event_id is not None else []) + [f"event: {kind}"]
        body = json.dumps(data, indent=1).splitlines()  # several data: lines, joined by the client
        lines += [f"data: {line}" for line in body]
        out.append("\n".join(lines) + "\n\n")
        out.append(":\n\n")
    text = "".join(out)
    return text.replace("\n", "\r\n") if crlf else text


def _event(event_id: int, job: dict[str, Any], **changes: Any) -> tuple[int, str, dict[str, Any]]:
    payload = {**job, **changes}
    payload["assets"] = [{"bucket": a["bucket"], "path": a["path"]} for a in payload.get("assets", [])]
    payload["thumbnail"] = None
    return (event_id, f"job.{payload['status']}", {
        "id": event_id, "type": f"job.{payload['status']}", "entity": "job", "entity_id": job["id"],
        "job_id": job["id"], "payload": payload, "created_at": job["updated_at"]})


def test_stream_client_parses_events_and_resumes_with_last_event_id(console: Console,
                                                                    stack: Stack) -> None:
    """The page's Server-Sent Events reader against a scripted ``/v1/events`` (the contract):
    multi-line data, CRLF, keepalive comments, ``queue`` updates without an id, and after
    the stream drops a reconnect carrying ``Last-Event-ID``; the signed links come from
    ``GET /v1/jobs/<id>`` once the job completed."""
    _, headers = stack.user()
    job_id = stack.submit(headers, "image_fast", "a paper boat").json()["job"]["id"]
    job = stack.wait_for(headers, [job_id])[job_id]
    assert job["status"] == "completed"

    requests_seen: list[dict[str, str]] = []
    held: list[Route] = []

    def events(route: Route) -> None:
        requests_seen.append(route.request.headers)
        if len(requests_seen) == 1:
            route.fulfill(status=200, content_type="text/event-stream", body=_sse(
                _event(41, job, status="queued", progress=0, completed_at=None),
                (None, "queue", {"job_id": job_id, "queue_position": 3, "eta_seconds": 300}),
                crlf=True))
        else:
            held.append(route)  # answered below, once the page has shown the queued state

    page = console.page
    page.route("**/v1/events", events)
    # The page learns of the job from the stream only: its first page of jobs is empty.
    page.route("**/v1/jobs?*", lambda route: route.fulfill(
        status=200, content_type="application/json", body='{"jobs": [], "next_cursor": null}'))
    console.open(_token(headers))
    card = page.locator(f"li.job[data-job-id='{job_id}']")
    expect(card).to_have_attribute("data-status", "queued")
    expect(card.locator(".queue-info")).to_contain_text("position 3")
    expect(card.locator(".queue-info")).to_contain_text(re.compile(r"ETA [45] min"))
    # The scripted stream has ended: the page reconnects, resuming after the last id.
    deadline = time.monotonic() + 15
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert held, "the page did not reconnect"
    assert requests_seen[0].get("authorization") == headers["Authorization"]
    assert "last-event-id" not in requests_seen[0]
    assert held[0].request.headers.get("last-event-id") == "41"
    held[0].fulfill(status=200, content_type="text/event-stream", body=_sse(
        _event(42, job, status="processing", progress=50, completed_at=None),
        _event(43, job)))
    expect(card).to_have_attribute("data-status", "completed")
    image = card.locator(".media img")
    expect(image).to_have_count(1)
    page.wait_for_function("img => img.complete && img.naturalWidth === 480",
                           arg=image.element_handle())
    expect(card.locator(".queue-info")).to_have_text("")
    while len(held) < 2 and time.monotonic() < deadline + 15:
        page.wait_for_timeout(100)
    assert held[-1].request.headers.get("last-event-id") == "43"
    page.unroute("**/v1/events")


# --- make demo -----------------------------------------------------------------------------------


def _demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_sse_parser() -> None:
    demo = _demo_module()
    raw = (b": keepalive\r\n\r\nid: 7\r\nevent: job.progress\r\ndata: {\"a\":\r\ndata:  1}\r\n\r\n"
           b"event: queue\ndata: {\"job_id\": \"x\"}\n\n:\n\nid: 8\ndata: x\n\ndata\n\n")
    assert list(demo.sse_events(iter(raw.splitlines(keepends=True)))) == [
        ("7", "job.progress", '{"a":\n 1}'), (None, "queue", '{"job_id": "x"}'),
        ("8", "message", "x")]


def test_demo_runs_every_job_type_to_the_end(stack: Stack, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--url", stack.base_url,
         "--per-type", "1", "--timeout", "240", "--summary-json", str(summary)],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "10/10 completed" in out
    assert ("progress from: live" if _stream_served(stack, stack.user()[1])
            else "progress from: polling") in out
    result = json.loads(summary.read_text())
    jobs = result["jobs"]
    assert sorted(j["job_type"] for j in jobs) == sorted(JOB_TYPES)
    for job in jobs:
        assert job["status"] == "completed"
        assert len(job["assets"]) == JOB_TYPES[job["job_type"]].outputs
        assert all(a["url"] in out for a in job["assets"])  # the summary prints every link
    first = requests.get(jobs[0]["assets"][0]["url"], timeout=10)
    assert first.status_code == 200 and first.content
    assert time.monotonic() - started < 240
