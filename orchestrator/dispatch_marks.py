"""Marking published jobs ``dispatched_at`` in batches, off the request path.

``dispatched_at`` tells the reconciler that a queued job's message reached the
broker: jobs committed more than ``PUBLISH_GRACE`` seconds ago (10 s) without it
are published again. The mark is bookkeeping, not the job: a mark that is late
or lost costs at most one extra message, which the claim skips (a job is
started once). So instead of a second transaction per submission, each web
process collects the ids it published and marks them in one UPDATE every
``interval`` seconds (50 ms by default: far inside the grace), and once more
when the process exits.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

from sqlalchemy import bindparam, update
from sqlalchemy.exc import DBAPIError

from orchestrator.db import Database
from orchestrator.models import Job, utcnow

log = logging.getLogger(__name__)

#: Ids per UPDATE (bounded IN lists).
BATCH = 500
#: The thread ends after this many idle seconds (and starts again with the next id), so
#: an unused instance holds no thread, and nothing keeps its database alive.
IDLE_EXIT_S = 1.0

#: Every instance with a thread started, flushed at process exit (weakly held).
_LIVE: "weakref.WeakSet[DispatchMarks]" = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for marks in list(_LIVE):
        marks.close()


_JOBS = Job.__table__
#: Built once: bookkeeping, not a change a client sees, so updated_at stays.
_MARK = (update(_JOBS)
         .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)), _JOBS.c.dispatched_at.is_(None))
         .values(dispatched_at=bindparam("now", type_=_JOBS.c.dispatched_at.type),
                 updated_at=_JOBS.c.updated_at))  # (or its onupdate default would set it)


class DispatchMarks:
    """Collects published job ids; a daemon thread marks them dispatched."""

    def __init__(self, db: Database, interval: float = 0.05) -> None:
        self.db = db
        self.interval = interval
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def add(self, job_id: str) -> None:
        """Mark soon (a published job)."""
        with self._lock:
            self._pending.append(job_id)
            if self._thread is None or self._pid != os.getpid():  # first use, or a forked child
                self._start()
        self._wake.set()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dispatch-marks", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _run(self) -> None:
        while not self._closed:
            if not self._wake.wait(IDLE_EXIT_S):
                with self._lock:
                    if not self._pending:  # idle: end (add() starts a new thread)
                        self._thread = None
                        return
                continue  # an id came in as the wait ended: its wake is set
            self._wake.clear()
            # Let a burst gather, then one statement for all of it.
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> int:
        """Mark every pending id now; return how many rows changed."""
        with self._lock:
            ids, self._pending = self._pending, []
        changed = 0
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            try:
                with self.db.writer() as conn:
                    changed += conn.execute(_MARK, {"ids": chunk, "now": utcnow()}).rowcount or 0
            except DBAPIError as e:
                # Unmarked jobs are published again by the reconciler after the grace;
                # the duplicate message is skipped at claim.
                log.warning("could not mark %d jobs dispatched (%s)", len(chunk), type(e).__name__)
        return changed

    def close(self) -> None:
        """Stop the thread and mark what is pending (process exit)."""
        self._closed = True
        self._wake.set()
        if self._pid == os.getpid():
            self.flush()
        with self._lock:
            self._thread = None  # a later add() starts a new one
