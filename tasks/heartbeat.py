"""Worker heartbeats: a GPU worker says every few seconds which family it
serves and how many jobs it runs at once (``orchestrator.queues``: workers
seen, ETAs). A clean shutdown removes the row; a dead worker ages out."""
from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals
from sqlalchemy.exc import DBAPIError

from orchestrator import queues
from orchestrator.config import get_settings
from orchestrator.db import Database

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
_stop = threading.Event()
_state: dict[str, Any] = {}


def _families(consumer: Any) -> list[str]:
    try:
        names = list(consumer.app.amqp.queues.consume_from or consumer.app.amqp.queues)
    except AttributeError:
        return []
    return [n for n in names if n in queues.FAMILIES]


def _concurrency(consumer: Any) -> int:
    for path in (("controller", "concurrency"), ("pool", "limit")):
        obj: Any = consumer
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, int) and obj > 0:
            return obj
    return 1


def _run(db: Database, names: dict[str, str], concurrency: int) -> None:
    while not _stop.is_set():
        for family, name in names.items():
            try:
                queues.beat(db, name, family, concurrency)
            except DBAPIError as e:
                log.warning("worker heartbeat not recorded (%s)", type(e).__name__)
        _stop.wait(INTERVAL_S)


@signals.worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    families = _families(sender)
    if not families:
        return  # the maintenance worker serves no generation family
    db = Database(get_settings().database_url)
    hostname = getattr(sender, "hostname", None) or "worker"
    names = {family: f"{hostname}/{family}" for family in families}
    _state.update(db=db, names=names)
    _stop.clear()
    threading.Thread(target=_run, args=(db, names, _concurrency(sender)), name="heartbeat",
                     daemon=True).start()


@signals.worker_shutdown.connect
def _stop_beating(**_: Any) -> None:
    _stop.set()
    db, names = _state.get("db"), _state.get("names", {})
    for name in names.values():
        try:
            queues.forget(db, name)
        except DBAPIError:
            pass
