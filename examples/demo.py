#!/usr/bin/env python3
"""The demo: a fresh user submits a mix of jobs and watches them to the end.

    make demo                               # against `make run` on $PORT (default 8000)
    python examples/demo.py --url http://127.0.0.1:8000 [--per-type 2] [--types a,b] [--token JWT]

It runs on the service's machine: without ``--token`` it mints a token for a
new user with the local settings (``JWT_SECRET``…, as ``orchestrator token``
does) and, when the mix costs more than the 100 starting credits, grants the
difference in the local database (as ``orchestrator grant-credits``). Then it
submits every chosen job type ``--per-type`` times over the public API and
draws one progress bar per job (status, progress, queue position and ETA)
until all have ended, and prints each job's download links. Progress comes
from the live stream ``GET /v1/events`` (Server-Sent Events, resumed with
``Last-Event-ID`` after a drop); where the service does not serve it, the demo
polls. Standard library only (plus this repository's ``orchestrator`` package
to mint the token). Exit status 0 only when every job completed.

Run ``GENERATION_TIME_SCALE=0.05 make run`` to see the bars move.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.jobtypes import JOB_TYPES  # noqa: E402  (the table; no dependencies)

TERMINAL = {"completed", "failed", "cancelled"}
STARTING_CREDITS = 100
POLL_S = 1.0
STREAM_RETRY_WHILE_POLLING_S = 15.0
STREAM_SILENCE_S = 60.0
BACKOFF_MAX_S = 30.0
PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in fresh snow", "a city street in the rain",
           "a bowl of ripe cherries on a wooden table", "a hot-air balloon over green hills")


class ApiError(Exception):
    def __init__(self, status: int, body: Any, headers: Any = None) -> None:
        message = body.get("error") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status, self.body, self.headers = status, body, headers or {}


class Api:
    """The public HTTP API with one user's token (urllib: no third-party client)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **(extra or {})}

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        extra = dict(headers or {})
        if data is not None:
            extra["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=self.headers(extra))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")[:200]
            raise ApiError(e.code, parsed, e.headers) from None

    def open_stream(self, last_event_id: str | None) -> Any:
        """``GET /v1/events``; None when the service does not serve a stream."""
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id is not None:
            extra["Last-Event-ID"] = last_event_id
        request = urllib.request.Request(self.url + "/v1/events", headers=self.headers(extra))
        try:
            response = urllib.request.urlopen(request, timeout=STREAM_SILENCE_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 401:
                raise ApiError(401, "token refused") from None
            return None
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            response.close()
            return None
        return response


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[str | None, str, str]]:
    """(id, event type, data) for each event of a Server-Sent Events byte stream.

    Lines end in LF or CRLF; a blank line dispatches; ``:`` lines are comments
    (keepalives); one space after the colon is dropped; data lines join with LF.
    """
    event_id: str | None = None
    event_type, data = "", []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line == "":
            if data != [""] and data:  # an empty data buffer dispatches nothing
                yield event_id, event_type or "message", "\n".join(data)
            event_id, event_type, data = None, "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            event_id = value


class Tracker:
    """What the demo knows of its jobs, fed by the stream or by polling."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.jobs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.mode = "connecting"
        self.ready = threading.Event()  # the stream is open, or the demo polls
        self.last_event_id: str | None = None
        self.early: dict[str, dict[str, Any]] = {}  # events of jobs not added yet

    # --- state ---------------------------------------------------------------------------
    def add(self, job: dict[str, Any]) -> None:
        with self.lock:
            self.jobs[job["id"]] = {**job, "eta_at": _eta_at(job.get("eta_seconds"))}
            early = self.early.pop(job["id"], None)
        if early is not None:  # its events outran the submission's answer
            self.update(early)

    def update(self, job: dict[str, Any]) -> None:
        with self.lock:
            old = self.jobs.get(job.get("id", ""))
            if old is None:
                if _stamp(job) >= _stamp(self.early.get(job.get("id", ""), {})):
                    self.early[job.get("id", "")] = job
                return
            if _stamp(job) < _stamp(old):
                return  # older than what we know
            moved = job.get("status", old["status"]) != old["status"]
            old.update({k: v for k, v in job.items() if k != "assets" or v})
            if "eta_seconds" in job or moved:  # a queued job's ETA says nothing once it runs
                old["eta_at"] = _eta_at(job.get("eta_seconds"))

    def queue_update(self, data: dict[str, Any]) -> None:
        with self.lock:
            job = self.jobs.get(data.get("job_id", ""))
            if job is not None:
                job["queue_position"] = data.get("queue_position")
                job["eta_seconds"] = data.get("eta_seconds")
                job["eta_at"] = _eta_at(data.get("eta_seconds"))

    def unfinished(self) -> list[str]:
        with self.lock:
            return [i for i, j in self.jobs.items() if j["status"] not in TERMINAL]

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(j) for j in self.jobs.values()]

    # --- following --------------------------------------------------------------------------
    def follow(self) -> None:
        """Stream when the service has a stream, else poll (asking for the stream again now and
        then); reconnect after a drop with Last-Event-ID and exponential backoff."""
        backoff = 1.0
        while not self.stop.is_set():
            try:
                response = self.api.open_stream(self.last_event_id)
            except ApiError:
                self.mode = "token refused"
                self.ready.set()
                return
            except (OSError, urllib.error.URLError):
                response = None
                self.mode = "reconnecting"
                self.stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if response is None:
                self.mode = "polling"
                self.ready.set()
                deadline = time.monotonic() + STREAM_RETRY_WHILE_POLLING_S
                while not self.stop.is_set() and time.monotonic() < deadline:
                    self.poll()
                    self.stop.wait(POLL_S)
                continue
            self.mode = "live"
            self.ready.set()
            backoff = 1.0
            self.poll()  # anything that changed before the stream was open
            try:
                with response:
                    for event_id, event_type, data in sse_events(iter(response.readline, b"")):
                        self.handle(event_id, event_type, data)
                        if self.stop.is_set():
                            return
            except (OSError, socket.timeout, ValueError):
                pass  # dropped or silent: reconnect
            if self.stop.is_set():
                return
            self.mode = "reconnecting"
            self.stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def handle(self, event_id: str | None, event_type: str, data: str) -> None:
        if event_id:
            self.last_event_id = event_id
        try:
            body = json.loads(data)
        except ValueError:
            return
        if event_type == "queue":
            self.queue_update(body)
        elif body.get("entity", event_type.split(".")[0]) == "job" and isinstance(body.get("payload"), dict):
            self.update(body["payload"])

    def poll(self) -> None:
        for job_id in self.unfinished():
            try:
                self.update(self.api.call("GET", f"/v1/jobs/{job_id}", timeout=10))
            except (ApiError, OSError, urllib.error.URLError):
                pass


def _stamp(job: dict[str, Any]) -> str:
    """``updated_at`` comparable as text: ISO 8601 UTC, microseconds padded."""
    value = str(job.get("updated_at") or "").removesuffix("Z").removesuffix("+00:00")
    head, _, fraction = value.partition(".")
    return f"{head}.{fraction:0<6}" if head else ""


def _eta_at(eta: Any) -> float | None:
    return time.monotonic() + float(eta) if isinstance(eta, (int, float)) else None


# --- drawing -------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    value = max(0, round(value))
    return f"{value}s" if value < 90 else f"{value // 60}m{value % 60:02d}s"


def bar_line(job: dict[str, Any], width: int = 24) -> str:
    status = job["status"]
    progress = 100 if status == "completed" else int(job.get("progress") or 0)
    filled = round(width * progress / 100)
    bar = "#" * filled + "." * (width - filled)
    extra = []
    if status == "queued" and job.get("queue_position") is not None:
        extra.append(f"position {job['queue_position']}")
    if status not in TERMINAL and job.get("eta_at") is not None:
        extra.append(f"ETA {_seconds(job['eta_at'] - time.monotonic())}")
    if status == "failed" and job.get("error_message"):
        extra.append(str(job["error_message"])[:60])
    return (f"{job['job_type']:<22} {job['id'][:8]} [{bar}] {progress:>3}% {status:<10} "
            + " · ".join(extra)).rstrip()


class Screen:
    """One line per job, redrawn in place on a terminal; changes only, otherwise."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.seen: dict[str, tuple[str, int]] = {}

    def draw(self, jobs: list[dict[str, Any]], mode: str) -> None:
        if self.tty:
            columns = shutil.get_terminal_size((120, 20)).columns
            lines = [f"{len(jobs)} jobs, {sum(j['status'] in TERMINAL for j in jobs)} ended ({mode})"]
            lines += [bar_line(j)[:columns - 1] for j in jobs]
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            self.out.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            for job in jobs:
                key = (job["status"], int(job.get("progress") or 0) // 25)
                if self.seen.get(job["id"]) != key:
                    self.seen[job["id"]] = key
                    self.out.write(bar_line(job) + "\n")
        self.out.flush()


# --- the run ------------------------------------------------------------------------------------


def mint_local_token(user_id: str) -> str:
    from orchestrator.config import get_settings
    from orchestrator.tokens import mint_user_token

    return mint_user_token(get_settings(), user_id, ttl_seconds=4 * 3600)


def grant_local_credits(user_id: str, amount: int) -> None:
    from orchestrator import credits
    from orchestrator.config import get_settings
    from orchestrator.db import Database

    database = Database(get_settings().database_url)
    try:
        with database.transaction() as session:
            credits.grant(session, user_id, amount)
    finally:
        database.dispose()


def submit(api: Api, job_type: str, prompt: str, deadline: float) -> dict[str, Any]:
    """POST /v1/jobs, waiting out 429s (rate limit, active-job cap) with the same key."""
    key = str(uuid.uuid4())
    while True:
        try:
            return api.call("POST", "/v1/jobs", {"jobType": job_type, "metadata": {"prompt": prompt}},
                            headers={"Idempotency-Key": key})["job"]
        except ApiError as e:
            if e.status not in (429, 503) or time.monotonic() > deadline:
                raise
            try:
                wait = float(e.headers.get("Retry-After") or 1)
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.2), 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("DEMO_URL") or
                        f"http://127.0.0.1:{os.environ.get('PORT') or 8000}")
    parser.add_argument("--token", default=os.environ.get("DEMO_TOKEN"),
                        help="a user JWT (default: mint one for a new user with the local settings)")
    parser.add_argument("--types", default=",".join(JOB_TYPES),
                        help="comma-separated job types (default: all ten)")
    parser.add_argument("--per-type", type=int, default=2, help="jobs of each type (default 2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the end")
    parser.add_argument("--summary-json", type=Path, help="also write the final records here")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(JOB_TYPES))
    if unknown or not types or args.per_type < 1:
        parser.error(f"unknown job types {unknown}" if unknown else "nothing to submit")
    out = sys.stdout
    deadline = time.monotonic() + args.timeout

    if args.token:
        api = Api(args.url, args.token)
        me = api.call("GET", "/v1/me")
    else:
        user_id = str(uuid.uuid4())
        api = Api(args.url, mint_local_token(user_id))
        me = api.call("GET", "/v1/me")  # creates the profile (100 credits)
        needed = _price(types) * args.per_type
        if needed > me["token_balance"]:
            grant_local_credits(user_id, needed - me["token_balance"])
            me = api.call("GET", "/v1/me")
    out.write(f"demo user {me['user_id']} ({me['token_balance']} credits) at {args.url}\n")

    tracker = Tracker(api)
    follower = threading.Thread(target=tracker.follow, name="follow", daemon=True)
    follower.start()
    tracker.ready.wait(10)  # the stream open before the jobs exist: no event missed
    out.write(f"progress from: {tracker.mode}\n")

    mix = [(t, n) for n in range(args.per_type) for t in types]
    for i, (job_type, _) in enumerate(mix):
        tracker.add(submit(api, job_type, PROMPTS[i % len(PROMPTS)], deadline))
    out.write(f"submitted {len(mix)} jobs\n")

    screen = Screen(out)
    started = time.monotonic()
    checked = time.monotonic()
    while tracker.unfinished() and time.monotonic() < deadline:
        screen.draw(tracker.snapshot(), tracker.mode)
        time.sleep(0.25)
        if tracker.mode != "polling" and time.monotonic() - checked > 15:
            tracker.poll()  # belt and braces beside the stream: a slow look at the API
            checked = time.monotonic()
    tracker.poll()  # the final word from the API (and nothing left to a lost last event)
    screen.draw(tracker.snapshot(), tracker.mode)
    tracker.stop.set()

    finals = []
    for job in tracker.snapshot():
        try:
            finals.append(api.call("GET", f"/v1/jobs/{job['id']}"))
        except (ApiError, OSError) as e:
            finals.append({**job, "error_message": f"could not read the job: {e}"})
    elapsed = time.monotonic() - started
    done = [j for j in finals if j["status"] == "completed"]
    out.write(f"\n{len(done)}/{len(finals)} completed in {elapsed:.1f} s "
              f"(progress from: {tracker.mode})\n")
    for job in finals:
        out.write(f"{job['job_type']:<22} {job['id']} {job['status']}\n")
        for asset in job.get("assets") or []:
            out.write(f"    {asset.get('url') or asset.get('path')}\n")
        if job["status"] != "completed" and job.get("error_message"):
            out.write(f"    error: {job['error_message']}\n")
    balance = api.call("GET", "/v1/me")["token_balance"]
    out.write(f"balance now {balance} credits\n")
    if args.summary_json:
        args.summary_json.write_text(json.dumps({"mode": tracker.mode, "jobs": finals}, indent=2))
    return 0 if len(done) == len(finals) else 1


def _price(types: list[str]) -> int:
    return sum(JOB_TYPES[t].credits for t in types)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except (ApiError, urllib.error.URLError, OSError) as e:
        sys.stderr.write(f"demo: {e}\n")
        sys.exit(2)
