"""Rate limits on job submission, per authenticated user: one Redis round trip.

``SUBMIT_RATE_LIMIT`` (default ``30/minute;5/second``, the limits library's
syntax, parsed once at start) is one budget shared by every route that creates
a run (queue-job, POST /v1/jobs, retry, the admin image), counted per user id,
in Redis when ``REDIS_URL`` is set (all web processes share it) and in process
memory otherwise. The per-user cap on queued+processing jobs
(``MAX_ACTIVE_JOBS``) is enforced by the database in the submitting transaction
(``orchestrator.credits.debit``), not here.

The algorithm is a sliding log (the limits library's "moving window"), exact:
a request is allowed when, for every ``N per W`` of the setting, fewer than N
earlier requests were allowed in the last W. One sorted set per user holds the
allowed requests' times (the longest window bounds it); one Lua script reads
the server's clock, drops what left the longest window, counts every window,
and records the request only if all of them allow it: one EVALSHA per request
whatever the number of windows, atomic, on Redis's clock (web processes with
skewed clocks agree). A refused request is not recorded in any window, so
hammering a full budget does not push the next allowed request further away.
A refusal is a 429 (``rate_limited``, ``details.limit`` the breached limit,
the shortest-granularity one first as before) with ``Retry-After``: the whole
seconds until every window would allow one more request. (GCRA would keep one
number per user instead of a set, but it spaces requests out rather than
allowing N in any W, and needs one state per window anyway.) Needs Redis >= 5
(scripts replicated by effects: TIME before writes).

A Redis that is down or slow (0.5 s socket timeouts, no client retries) never
fails a request: the same limits are counted in per-process memory, one
warning per outage is logged, and Redis is tried again after 1 s, then 2, 4 …
at most 30 s between tries, until it answers.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import threading
import time
from bisect import bisect_left
from typing import Any, Callable, TypeVar

import redis
from flask import Flask, current_app, g, request
from limits import parse_many
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.errors import RateLimited

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

MESSAGE = "Too many job submissions; slow down"
KEY_PREFIX = "orchestrator:job-submission:user:"
SOCKET_TIMEOUT = 0.5
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between tries of a Redis that failed

# KEYS[1]: the user's sorted set (member: a unique id per allowed request, score: its time
# in microseconds of the server's clock). ARGV[1]: this request's member; ARGV[2]: the limits,
# one string of integers fixed at start (fewer arguments, less encoding per call): the longest
# window (µs), the set's lifetime (ms), then amount and window (µs) per limit, in the order a
# breach is reported. Answers 0 (allowed, recorded) or {the breached limit's 1-based index,
# whole seconds until every window allows one more}. A time is in a window W when
# time >= now - W (inclusive, as in the limits library); scores and bounds are integers, passed
# to redis.call as numbers (exact), never concatenated into strings (Lua 5.1's %.14g).
_SCRIPT = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local c = {}
for n in string.gmatch(ARGV[2], '%d+') do c[#c + 1] = tonumber(n) end
local longest = c[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - longest - 1)
local breached, wait = 0, 0
for i = 3, #c, 2 do
  local amount, window = c[i], c[i + 1]
  local count
  if window == longest then
    count = redis.call('ZCARD', key)
  else
    count = redis.call('ZCOUNT', key, now - window, '+inf')
  end
  if count >= amount then
    if breached == 0 then breached = (i - 1) / 2 end
    -- one more fits once the (count - amount + 1)-th oldest entry of the window has left it
    local w = window
    local e = redis.call('ZRANGEBYSCORE', key, now - window, '+inf', 'WITHSCORES',
                         'LIMIT', count - amount, 1)
    if e[2] then w = tonumber(e[2]) + window - now + 1 end
    if w > wait then wait = w end
  end
end
if breached > 0 then
  return {breached, math.max(1, math.ceil(wait / 1000000))}
end
redis.call('ZADD', key, now, ARGV[1])
redis.call('PEXPIRE', key, c[2])
return 0
"""


def _new_tag() -> None:
    """Members of the sorted sets: this process's random tag + a counter, unique per request
    across threads and processes (a new tag in a forked child: gunicorn --preload)."""
    global _tag
    _tag = os.urandom(8).hex() + ":"


_tag = ""
_new_tag()
os.register_at_fork(after_in_child=_new_tag)
_seq = itertools.count()


class _MemoryLog:
    """The same sliding log in this process's memory (no Redis, or Redis down)."""

    def __init__(self, limits: list[tuple[int, float]]) -> None:
        self._limits = limits
        self._longest = max(window for _, window in limits)
        self._logs: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def hit(self, key: str) -> tuple[int, int] | None:
        """None when allowed (and recorded), else (breached index, seconds to wait)."""
        now = time.monotonic()
        with self._lock:
            if now >= self._sweep_at:
                self._sweep(now)
            entries = self._logs.setdefault(key, [])
            gone = bisect_left(entries, now - self._longest)
            if gone:
                del entries[:gone]
            breached, wait = 0, 0.0
            for index, (amount, window) in enumerate(self._limits, 1):
                count = len(entries) - bisect_left(entries, now - window)
                if count >= amount:
                    breached = breached or index
                    # entries are sorted: the one whose leaving makes room is len - amount
                    w = entries[len(entries) - amount] + window - now if amount else window
                    wait = max(wait, w)
            if breached:
                return breached, max(1, math.ceil(wait))
            entries.append(now)
            return None

    def _sweep(self, now: float) -> None:
        """Forget users with nothing left in the longest window (once per longest window)."""
        horizon = now - self._longest
        for key in [k for k, v in self._logs.items() if not v or v[-1] < horizon]:
            del self._logs[key]
        self._sweep_at = now + self._longest


class SubmissionLimiter:
    """One budget per user over every route decorated with :func:`submission_limit`."""

    def __init__(self, setting: str, redis_url: str | None) -> None:
        # The order a breach is reported in: shortest granularity first, as flask-limiter did.
        items = sorted(parse_many(setting))
        self.limits = [str(item) for item in items]
        windows = [(item.amount, float(item.get_expiry())) for item in items]
        self._memory = _MemoryLog(windows)
        self._redis: redis.Redis | None = None
        self._down = False
        self._failures = 0
        self._retry_at = 0.0
        self._state = threading.Lock()
        if redis_url:
            self._redis = redis.Redis.from_url(
                redis_url, socket_connect_timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0))  # a failed call falls back at once, not after retries
            self._script = self._redis.register_script(_SCRIPT)
            longest_us = max(round(window * 1_000_000) for _, window in windows)
            config = [longest_us, math.ceil(longest_us / 1000) + 1]
            for amount, window in windows:
                config += [amount, round(window * 1_000_000)]
            self._config = " ".join(map(str, config)).encode()

    def hit(self, user: str) -> None:
        """Count one submission of ``user``; :class:`RateLimited` when over budget."""
        refused: Any = None
        if self._redis is not None and (not self._down or self._retry_due()):
            try:
                refused = self._script(keys=(KEY_PREFIX + user,),
                                       args=(_tag + str(next(_seq)), self._config))
            except redis.RedisError as e:
                self._failed(e)
                refused = self._memory.hit(user)
            else:
                if self._down:
                    self._recovered()
        else:
            refused = self._memory.hit(user)
        if refused:
            index, seconds = refused
            raise RateLimited(MESSAGE, retry_after=int(seconds),
                              details={"limit": self.limits[int(index) - 1]})

    def _retry_due(self) -> bool:
        """While Redis is down: whether this request is the one to try it again."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        with self._state:
            if now < self._retry_at:
                return False
            # Claimed: the other threads keep counting in memory while this one tries.
            self._retry_at = now + min(RETRY_MAX, RETRY_FIRST * 2 ** self._failures)
            return True

    def _failed(self, error: Exception) -> None:
        with self._state:
            if not self._down:
                self._down, self._failures = True, 0
                log.warning("submission rate limit store (Redis) unavailable (%s: %s); falling "
                            "back to in-memory per-process limits until it answers",
                            type(error).__name__, error)
            else:
                self._failures = min(self._failures + 1, 5)  # 2**5 s > RETRY_MAX: no overflow
            self._retry_at = time.monotonic() + min(RETRY_MAX, RETRY_FIRST * 2 ** self._failures)

    def _recovered(self) -> None:
        with self._state:
            if self._down:
                self._down, self._failures, self._retry_at = False, 0, 0.0
                log.info("submission rate limit store (Redis) answers again; limits are "
                         "shared by every web process again")


def submission_limit(view: F) -> F:
    """Decorate every view that creates a run, *under* its authentication decorator."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        limiter = current_app.extensions["submission_limit"]
        if limiter is not None:
            # Submission routes authenticate before the limit is checked, so the key is
            # the user, not an address.
            limiter.hit(g.get("user_id") or request.remote_addr)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def init_app(app: Flask) -> None:
    """One limiter per app (its own Redis pool and fallback state); None: unlimited."""
    settings = app.extensions["orchestrator"].settings
    app.extensions["submission_limit"] = (
        SubmissionLimiter(settings.submit_rate_limit, settings.redis_url)
        if settings.submit_rate_limit else None)
