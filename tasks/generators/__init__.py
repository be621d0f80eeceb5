"""Generators turn a job spec into files. ``procedural`` is the default and
the only backend without model weights; model backends plug in behind the
same :class:`~tasks.generators.base.Generator` protocol."""
from __future__ import annotations

from orchestrator.config import Settings
from orchestrator.jobtypes import Family
from tasks.generators.base import Generator


def get_generator(family: Family, settings: Settings) -> Generator:
    """The configured generator of a family (procedural for now)."""
    from tasks.generators.procedural import ProceduralGenerator

    return ProceduralGenerator()
