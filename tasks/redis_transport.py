"""kombu's Redis transport, with one Redis client per channel instead of one per command,
and a way to record a message instead of sending it.

kombu's Redis channel builds a new ``redis.Redis`` for every message it publishes
(``Channel.conn_or_acquire``); redis-py 7 fills two response-callback tables in each
constructor, about 200 µs of Python per job submitted, the largest single cost of a
publish. A client is only a handle on the channel's connection pool (thread-safe), so
this channel keeps one per pool and otherwise is kombu's own. ``tasks.config`` selects
it for ``redis://`` and ``rediss://`` broker URLs; every other transport is untouched.

:func:`recording` makes this thread's publishes stop at the last step: instead of the
``LPUSH``, the channel hands over the Redis key, the message exactly as kombu serialized
it, and its client (``tasks.publish`` builds its message templates so).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

_recording = threading.local()


@dataclass(frozen=True)
class Recorded:
    """A message this channel would have sent: ``client.lpush(key, payload)``."""

    key: str
    payload: str
    client: Any


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded | None]]:
    """Within: this thread's messages on a channel of this transport are not sent but
    recorded in the yielded list, or None for one that is not a single ``LPUSH`` (a batch,
    a queue with an expiry). Messages on other transports are sent as usual."""
    found: list[Recorded | None] = []
    _recording.into = found
    try:
        yield found
    finally:
        _recording.into = None


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

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        into = getattr(_recording, "into", None)
        if into is None:
            super()._put(queue, message, **kwargs)
        elif kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            into.append(None)  # more than one LPUSH
        else:
            key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
            with self.conn_or_acquire() as client:
                into.append(Recorded(key, dumps(message), client))


class Transport(kombu_redis.Transport):
    Channel = Channel
