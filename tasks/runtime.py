"""What a worker process holds for its whole life: database, storage,
generators and enhancer, built once per process (after the prefork fork, so
no connection is shared between processes) and kept warm between jobs."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from orchestrator import events
from orchestrator.config import Settings, get_settings
from orchestrator.db import Database
from orchestrator.enhancer import PromptEnhancer, get_enhancer
from orchestrator.jobtypes import BUCKETS, Family
from orchestrator.storage import LocalStorage
from tasks.generators import get_generator
from tasks.generators.base import Generator


@dataclass
class Runtime:
    settings: Settings
    db: Database
    storage: LocalStorage
    enhancer: PromptEnhancer
    generators: dict[Family, Generator] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def generator(self, family: Family) -> Generator:
        if family not in self.generators:
            self.generators[family] = get_generator(family, self.settings)
        return self.generators[family]


_runtime: Runtime | None = None

#: task id → the attempt this process claimed; the signal handlers fence with it.
CLAIMED: dict[str, int] = {}


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        settings = get_settings()
        events.configure_push(settings.database_url, settings.redis_url)
        _runtime = Runtime(
            settings=settings,
            db=Database(settings.database_url),
            storage=LocalStorage(settings.storage_root, buckets=BUCKETS),
            enhancer=get_enhancer(settings.enhancer_backend, settings),
        )
    return _runtime


def preload(queues: set[str] | None = None) -> list[dict[str, object]]:
    """Load the model backends this worker process serves, once, before any job.

    ``queues``: the queues the worker consumes (None: every family). Returns
    what each loaded model reports (device, model, memory) and logs it.
    """
    import logging

    rt = runtime()
    loaded: list[dict[str, object]] = []
    families = [f for f in Family if queues is None or f.value in queues]
    for family in families:
        gen = rt.generator(family)
        describe = getattr(gen, "describe", None)
        if describe is not None:
            loaded.append(describe())
    if Family.WAN in families:
        warm = getattr(rt.enhancer, "load", None)
        if warm is not None:
            loaded.append(warm())
    from orchestrator import metrics

    for info in loaded:
        logging.getLogger(__name__).info("model ready: %s", info)
        metrics.model_loaded(info)
    MODELS[:] = loaded
    return loaded


#: What :func:`preload` loaded in this process (device, model, memory per model).
MODELS: list[dict[str, object]] = []


def reset() -> None:
    """Drop inherited connections (called in each new worker child process)."""
    global _runtime
    if _runtime is not None:
        _runtime.db.engine.dispose(close=False)
    _runtime = None
