"""gunicorn settings of the Procfile's ``web`` (``gunicorn -c web/gunicorn_conf.py``).

- Logs: gunicorn's own and access lines, and the app's, in ``LOG_FORMAT``
  (``orchestrator.logs``); JSON access lines carry method, path (never the
  query string), status, duration and the request id as fields.
- Metrics: the master clears the files of dead processes from
  ``PROMETHEUS_MULTIPROC_DIR`` once, before any worker starts (values of an
  earlier run go; a Celery worker that started first keeps its open file),
  and tells prometheus_client when a worker exits.

Everything else (bind, workers, threads) stays on the Procfile's command line.
"""
from __future__ import annotations

import logging
from typing import Any

from gunicorn.glogging import Logger as _GunicornLogger

from orchestrator import logs, metrics
from orchestrator.config import Settings
from web.logs import access_context

_log_format = Settings.from_env().log_format


class Logger(_GunicornLogger):
    """gunicorn's logger, its handlers formatted as ours when ``LOG_FORMAT=json``."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if _log_format == "json":
            for log in (self.error_log, self.access_log):
                logs.reformat(log, "json")


logger_class = Logger


def on_starting(server: Any) -> None:
    logs.add_context(access_context)
    logs.configure(_log_format, logging.INFO)
    directory = metrics.multiprocess_dir()
    if directory is not None:
        removed = metrics.clear_stale(directory)
        server.log.info("metrics directory %s ready (%d stale files removed)", directory, removed)


def child_exit(_server: Any, worker: Any) -> None:
    metrics.mark_process_dead(worker.pid)


def post_worker_init(worker: Any) -> None:
    """On SIGTERM/SIGQUIT, end this worker's event streams first: otherwise each open
    stream holds the graceful shutdown for up to its whole lifetime (clients reconnect
    with ``Last-Event-ID`` to another worker).

    Then freeze what the worker holds now (the app, its libraries, their module state:
    ~130,000 objects) out of the garbage collector's reach: they live as long as the
    process, and every full collection walked them all (~45 ms, one request stalled).
    """
    import gc
    import signal

    from web import live

    for sig, handler in ((signal.SIGTERM, worker.handle_exit), (signal.SIGQUIT, worker.handle_quit)):
        def ending(signum: int, frame: Any, _then: Any = handler) -> None:
            live.close_streams()
            _then(signum, frame)

        signal.signal(sig, ending)

    gc.collect()
    gc.freeze()
