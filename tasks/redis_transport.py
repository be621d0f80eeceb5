"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` for every message it publishes
(``Channel.conn_or_acquire``); redis-py 7 fills two response-callback tables in each
constructor, about 200 µs of Python per job submitted, the largest single cost of a
publish. A client is only a handle on the channel's connection pool (thread-safe), so
this channel keeps one per pool and otherwise is kombu's own. ``tasks.config`` selects
it for ``redis://`` and ``rediss://`` broker URLs; every other transport is untouched.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:  # a new pool: reconnected
            cached = self._sync_client = self._create_client()
        yield cached


class Transport(kombu_redis.Transport):
    Channel = Channel
