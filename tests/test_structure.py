"""Structural tests: the architecture's rules, checked mechanically."""
from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from orchestrator.db import make_engine
from orchestrator.migrations import alembic_config
from orchestrator.models import Base
from tasks.routing import QueueNames

ROOT = Path(__file__).resolve().parent.parent


def test_single_alembic_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_models_match_migrations(database_url: str) -> None:
    """Autogenerate against the migrated database finds nothing to change."""
    engine = make_engine(database_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
        # Storage parameters are not compared by autogenerate: the one the models declare.
        fillfactor = (conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
                      .scalar() if engine.dialect.name == "postgresql" else None)
    engine.dispose()
    assert diff == []
    if engine.dialect.name == "postgresql":
        assert fillfactor == ["fillfactor=70"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_domain_imports_no_framework() -> None:
    forbidden = {"flask", "flask_jwt_extended", "celery", "kombu", "web", "tasks"}
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden)
                 for p in (ROOT / "orchestrator").rglob("*.py") if _imports(p) & forbidden}
    assert offenders == {}


def test_tasks_do_not_import_web() -> None:
    offenders = [str(p) for p in (ROOT / "tasks").rglob("*.py") if "web" in _imports(p)]
    assert offenders == []


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_procfile_has_the_processes() -> None:
    procs = _procfile()
    assert {"web", "worker_sdxl", "worker_wan", "beat", "flower"} <= set(procs)
    assert "gunicorn" in procs["web"]


def test_every_routed_queue_is_consumed() -> None:
    consumed: set[str] = set()
    for command in _procfile().values():
        for match in re.finditer(r"-Q\s+([\w,]+)", command):
            consumed.update(match.group(1).split(","))
    assert set(QueueNames.all()) <= consumed


def test_console_script_declared() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "orchestrator = orchestrator.cli:main" in cfg["options.entry_points"]["console_scripts"]
