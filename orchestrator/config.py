"""Settings: read from the environment once, into one immutable object.

Nothing in the service reads ``os.environ`` elsewhere. ``get_settings()`` builds
the object on first use and caches it for the life of the process; tests build
their own with ``Settings.from_env({...})``.

With no environment at all the service runs on embedded defaults: a SQLite
database and a SQLAlchemy-backed Celery broker under ``./var/``, files under
``./var/storage``. Production changes configuration only, never code paths.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

# Development secrets: usable on a laptop, refused in production.
DEV_JWT_SECRET = "dev-jwt-secret-change-me-0123456789abcdef"
DEV_WORKER_TOKEN = "dev-worker-token-change-me"
DEV_WORKER_SECRET = "dev-worker-secret-change-me"

_SECRETS = {
    "JWT_SECRET": DEV_JWT_SECRET,
    "WORKER_TOKEN": DEV_WORKER_TOKEN,
    "WORKER_SECRET": DEV_WORKER_SECRET,
}


class ConfigurationError(RuntimeError):
    """The environment describes a configuration the service refuses to run."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from e


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from e


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the embedded defaults."""

    env: str = "development"
    var_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    result_backend: str = ""
    redis_url: str | None = None
    storage_root: Path = Path("var/storage")
    jwt_secret: str = DEV_JWT_SECRET
    jwt_audience: str = "authenticated"
    jwt_issuer: str | None = None
    worker_token: str = DEV_WORKER_TOKEN
    worker_secrets: tuple[str, ...] = (DEV_WORKER_SECRET,)
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    generation_time_scale: float = 0.0
    max_attempts: int = 3
    url_ttl_seconds: int = 3600
    admin_image_timeout: float = 60.0
    publish_timeout: float = 1.0
    lease_seconds: int = 60
    reconcile_interval: float = 10.0
    publish_grace: float = 10.0
    reoffer_after: float = 900.0
    #: Each web process's PostgreSQL pool: connections kept open, and extra ones
    #: opened under bursts (and closed after). Above the requests one process
    #: usually has in flight, or connections are opened and closed per request.
    db_pool_size: int = 10
    db_max_overflow: int = 20
    #: Celery "task-sent" events from the web (Flower's "sent" state): a Redis
    #: PUBLISH per submission; off by default (workers' events stay on).
    task_sent_events: bool = False
    #: Celery task events from the workers (received/started/succeeded: Redis PUBLISHes per
    #: task); off by default: Flower turns them on in every worker it sees
    #: (``enable_events``), so they cost nothing while no monitor listens.
    worker_task_events: bool = False
    max_queue_wait: float = 6 * 3600.0
    faults: bool = False
    external_families: frozenset[str] = frozenset()
    external_lease_seconds: int | None = None
    queue_base_path: str = ""
    #: A JSON Web Key Set (inline JSON or a file path) of public keys for
    #: asymmetric user tokens (ES256/RS256/EdDSA, chosen by ``kid``), beside HS256.
    jwt_jwks: str | None = None
    #: Seconds a web process trusts its copy of the revocation list.
    revocation_refresh_seconds: float = 2.0
    #: Verified user tokens each web process keeps (least recently used dropped), so a
    #: token seen before is not verified again; exp, nbf and revocation are still
    #: checked on every request (0: no cache, every request verifies its token).
    jwt_cache_size: int = 10000
    #: Rate limit per user on job submission, every window in one budget ("" disables).
    submit_rate_limit: str = "30/minute;5/second"
    #: Most queued+processing jobs one user may have (0: no cap).
    max_active_jobs: int = 20
    #: A submission's answer counts its family's queued jobs at most this often per web
    #: process (seconds); in between it adds the jobs the process queued since (0: count
    #: every time; see orchestrator.submission.QueueLengths).
    queue_length_max_age: float = 1.0
    #: Server-Sent Events: idle heartbeat, streams per web process, a stream's lifetime.
    sse_heartbeat_seconds: float = 15.0
    sse_max_streams: int = 48
    sse_max_seconds: float = 900.0
    #: ``json`` (one object per line, the default) or ``text`` (for humans; ``make run``).
    log_format: str = "json"
    #: When set, ``GET /metrics`` wants ``Authorization: Bearer <METRICS_TOKEN>``.
    metrics_token: str | None = None
    #: Model backends per family (README "GPU workers"); procedural/rules need no weights.
    sdxl_backend: str = "procedural"
    sdxl_model_path: Path | None = None
    #: For a single-file SDXL checkpoint: a diffusers SDXL folder's configs and tokenizers
    #: (model_index.json and the component folders; no weights needed).
    sdxl_config_path: Path | None = None
    wan_backend: str = "procedural"
    wan_model_path: Path | None = None
    enhancer_backend: str = "rules"
    enhancer_model_path: Path | None = None
    #: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
    model_device: str = "auto"
    #: ``auto`` (CUDA: bfloat16 if supported else float16; CPU: float32), or a torch dtype name.
    model_dtype: str = "auto"
    #: Bounds on the language-model enhancer: new tokens and wall seconds per prompt.
    enhancer_max_new_tokens: int = 120
    enhancer_timeout_seconds: float = 20.0
    #: Caps every model job's denoising steps (0: the job type's steps). For CPU smoke
    #: tests and benches of the model backends only; refused in production.
    model_max_steps: int = 0
    dev_secrets: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from an environment mapping (``os.environ`` by default).

        Raises:
            ConfigurationError: a value is malformed, or production runs on a
                development secret.
        """
        env = os.environ if env is None else env
        var_dir = Path(env.get("VAR_DIR", "var"))
        database_url = env.get("DATABASE_URL") or f"sqlite:///{var_dir / 'orchestrator.sqlite'}"
        broker_url = env.get("BROKER_URL") or f"sqla+sqlite:///{var_dir / 'broker.sqlite'}"
        redis_url = env.get("REDIS_URL") or None
        result_backend = env.get("RESULT_BACKEND") or _default_result_backend(broker_url, var_dir)
        dev = tuple(name for name in _SECRETS if not env.get(name))
        mode = env.get("ORCHESTRATOR_ENV", "development").strip().lower() or "development"
        if mode == "production" and dev:
            raise ConfigurationError(
                "ORCHESTRATOR_ENV=production refuses development secrets; set " + ", ".join(dev)
            )
        secrets = env.get("WORKER_SECRET") or DEV_WORKER_SECRET
        settings = cls(
            env=mode,
            var_dir=var_dir,
            database_url=database_url,
            broker_url=broker_url,
            result_backend=result_backend,
            redis_url=redis_url,
            storage_root=Path(env.get("STORAGE_ROOT") or var_dir / "storage"),
            jwt_secret=env.get("JWT_SECRET") or DEV_JWT_SECRET,
            jwt_audience=env.get("JWT_AUDIENCE", "authenticated"),
            jwt_issuer=env.get("JWT_ISSUER") or None,
            worker_token=env.get("WORKER_TOKEN") or DEV_WORKER_TOKEN,
            # Several secrets, space or comma separated, so a rotation can overlap.
            worker_secrets=tuple(s for s in secrets.replace(",", " ").split() if s),
            host=env.get("HOST", "127.0.0.1"),
            port=_int(env, "PORT", 8000),
            public_url=(env.get("PUBLIC_URL") or "").rstrip("/") or None,
            generation_time_scale=_float(env, "GENERATION_TIME_SCALE", 0.0),
            max_attempts=_int(env, "MAX_ATTEMPTS", 3),
            url_ttl_seconds=_int(env, "URL_TTL_SECONDS", 3600),
            admin_image_timeout=_float(env, "ADMIN_IMAGE_TIMEOUT", 60.0),
            publish_timeout=_float(env, "PUBLISH_TIMEOUT", 1.0),
            lease_seconds=_int(env, "LEASE_SECONDS", 60),
            reconcile_interval=_float(env, "RECONCILE_INTERVAL", 10.0),
            publish_grace=_float(env, "PUBLISH_GRACE", 10.0),
            reoffer_after=_float(env, "REOFFER_AFTER", 900.0),
            task_sent_events=env.get("TASK_SENT_EVENTS", "") == "1",
            worker_task_events=env.get("WORKER_TASK_EVENTS", "") == "1",
            db_pool_size=_int(env, "DB_POOL_SIZE", 10),
            db_max_overflow=_int(env, "DB_MAX_OVERFLOW", 20),
            max_queue_wait=_float(env, "MAX_QUEUE_WAIT", 6 * 3600.0),
            faults=env.get("ORCHESTRATOR_FAULTS", "") == "1",
            external_families=frozenset(_list(env, "EXTERNAL_FAMILIES")),
            external_lease_seconds=_int(env, "EXTERNAL_LEASE_SECONDS", 0) or None,
            queue_base_path=_base_path(env.get("QUEUE_BASE_PATH", "")),
            jwt_jwks=env.get("JWT_JWKS") or None,
            revocation_refresh_seconds=_float(env, "REVOCATION_REFRESH_SECONDS", 2.0),
            jwt_cache_size=_int(env, "JWT_CACHE_SIZE", 10000),
            submit_rate_limit=env.get("SUBMIT_RATE_LIMIT", "30/minute;5/second").strip(),
            max_active_jobs=_int(env, "MAX_ACTIVE_JOBS", 20),
            queue_length_max_age=_float(env, "QUEUE_LENGTH_MAX_AGE", 1.0),
            sse_heartbeat_seconds=_float(env, "SSE_HEARTBEAT_SECONDS", 15.0),
            sse_max_streams=_int(env, "SSE_MAX_STREAMS", 48),
            sse_max_seconds=_float(env, "SSE_MAX_SECONDS", 900.0),
            log_format=(env.get("LOG_FORMAT") or "json").strip().lower(),
            metrics_token=env.get("METRICS_TOKEN") or None,
            sdxl_backend=_choice(env, "SDXL_BACKEND", ("procedural", "diffusers")),
            sdxl_model_path=_model_path(env, "SDXL_MODEL_PATH"),
            sdxl_config_path=_model_path(env, "SDXL_CONFIG_PATH"),
            wan_backend=_choice(env, "WAN_BACKEND", ("procedural", "diffusers")),
            wan_model_path=_model_path(env, "WAN_MODEL_PATH"),
            enhancer_backend=_choice(env, "ENHANCER_BACKEND", ("rules", "transformers")),
            enhancer_model_path=_model_path(env, "ENHANCER_MODEL_PATH"),
            model_device=(env.get("MODEL_DEVICE") or "auto").strip().lower(),
            model_dtype=(env.get("MODEL_DTYPE") or "auto").strip().lower(),
            enhancer_max_new_tokens=_int(env, "ENHANCER_MAX_NEW_TOKENS", 120),
            enhancer_timeout_seconds=_float(env, "ENHANCER_TIMEOUT_SECONDS", 20.0),
            model_max_steps=_int(env, "MODEL_MAX_STEPS", 0),
            dev_secrets=dev,
        )
        if settings.faults and mode == "production":
            raise ConfigurationError("ORCHESTRATOR_FAULTS (fault injection) is refused in production")
        unknown = settings.external_families - {"sdxl", "wan"}
        if unknown:
            raise ConfigurationError(f"EXTERNAL_FAMILIES: unknown families {sorted(unknown)}; "
                                     "use sdxl and/or wan")
        if settings.lease_seconds < 2:
            raise ConfigurationError("LEASE_SECONDS must be >= 2")
        if settings.generation_time_scale < 0:
            raise ConfigurationError("GENERATION_TIME_SCALE must be >= 0")
        if settings.max_attempts < 1:
            raise ConfigurationError("MAX_ATTEMPTS must be >= 1")
        if settings.sse_heartbeat_seconds <= 0 or settings.sse_max_streams < 1:
            raise ConfigurationError("SSE_HEARTBEAT_SECONDS must be > 0 and SSE_MAX_STREAMS >= 1")
        if settings.log_format not in ("json", "text"):
            raise ConfigurationError(f"LOG_FORMAT must be json or text, got {settings.log_format!r}")
        if settings.max_active_jobs < 0:
            raise ConfigurationError("MAX_ACTIVE_JOBS must be >= 0 (0: no cap)")
        if settings.queue_length_max_age < 0:
            raise ConfigurationError("QUEUE_LENGTH_MAX_AGE must be >= 0 (0: count every time)")
        if settings.jwt_cache_size < 0:
            raise ConfigurationError("JWT_CACHE_SIZE must be >= 0 (0: no cache)")
        _check_rate_limit(settings.submit_rate_limit)
        _check_models(settings)
        return settings

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def warn_dev_secrets(self) -> None:
        """Say loudly, once per process, which secrets are development defaults."""
        if not self.dev_secrets:
            return
        if self.log_format == "json":  # one line a log collector can parse, like every other
            from orchestrator.logs import json_line

            print(json_line("WARNING", __name__, (
                f"DEVELOPMENT SECRETS IN USE: {', '.join(self.dev_secrets)}; anyone who reads the "
                "source can mint tokens for this service; set them (and "
                "ORCHESTRATOR_ENV=production) before exposing it")), file=sys.stderr, flush=True)
            return
        banner = (
            "\n" + "!" * 72 + "\n"
            f"!! DEVELOPMENT SECRETS IN USE: {', '.join(self.dev_secrets)}\n"
            "!! Anyone who reads the source can mint tokens for this service.\n"
            "!! Set them (and ORCHESTRATOR_ENV=production) before exposing it.\n" + "!" * 72
        )
        print(banner, file=sys.stderr, flush=True)


def _check_rate_limit(raw: str) -> None:
    """``SUBMIT_RATE_LIMIT`` in the limits library's syntax (``30/minute;5/second``)."""
    if not raw:
        return
    from limits import parse_many

    try:
        parse_many(raw)
    except ValueError:
        raise ConfigurationError(
            f"SUBMIT_RATE_LIMIT must look like '30/minute;5/second', got {raw!r}") from None


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default)."""
    raw = (env.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _model_path(env: Mapping[str, str], name: str) -> Path | None:
    """A local weights path: it must exist and be readable (nothing is ever downloaded)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigurationError(f"{name}: {raw!r} does not exist (weights are read from local "
                                 "paths only, never downloaded)")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise ConfigurationError(f"{name}: {raw!r} is not readable")
    return path


def _check_models(settings: Settings) -> None:
    """A model backend needs its weights; device and dtype must be ones torch knows."""
    for backend, path, var, default in (
            (settings.sdxl_backend, settings.sdxl_model_path, "SDXL_MODEL_PATH", "procedural"),
            (settings.wan_backend, settings.wan_model_path, "WAN_MODEL_PATH", "procedural"),
            (settings.enhancer_backend, settings.enhancer_model_path, "ENHANCER_MODEL_PATH", "rules")):
        if backend != default and path is None:
            raise ConfigurationError(f"{var} must be set when the backend is {backend!r}")
    if settings.sdxl_backend == "diffusers" and settings.sdxl_model_path is not None \
            and settings.sdxl_model_path.is_file():
        config = settings.sdxl_config_path
        if config is None:
            raise ConfigurationError(
                "SDXL_CONFIG_PATH must be set when SDXL_MODEL_PATH is a single-file checkpoint: "
                "a diffusers SDXL folder with model_index.json, the component configs and the "
                "tokenizers (no weights needed); nothing is downloaded")
        index = config / "model_index.json"
        if not index.is_file() or not os.access(index, os.R_OK):
            raise ConfigurationError(f"SDXL_CONFIG_PATH: {str(config)!r} is not a diffusers folder "
                                     "(no readable model_index.json)")
    if settings.wan_model_path is not None and settings.wan_backend == "diffusers" \
            and not settings.wan_model_path.is_dir():
        raise ConfigurationError("WAN_MODEL_PATH must be a diffusers folder (model_index.json)")
    if settings.enhancer_model_path is not None and settings.enhancer_backend == "transformers" \
            and not settings.enhancer_model_path.is_dir():
        raise ConfigurationError("ENHANCER_MODEL_PATH must be a folder (config + tokenizer)")
    device = settings.model_device
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:")
                                                       and device[5:].isdigit()):
        raise ConfigurationError(f"MODEL_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")
    if settings.model_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigurationError("MODEL_DTYPE must be auto, float32, float16 or bfloat16, "
                                 f"got {settings.model_dtype!r}")
    if settings.enhancer_max_new_tokens < 1 or settings.enhancer_timeout_seconds <= 0:
        raise ConfigurationError("ENHANCER_MAX_NEW_TOKENS must be >= 1 and ENHANCER_TIMEOUT_SECONDS > 0")
    if settings.model_max_steps < 0:
        raise ConfigurationError("MODEL_MAX_STEPS must be >= 0 (0: the job type's steps)")
    if settings.model_max_steps and settings.env == "production":
        raise ConfigurationError("MODEL_MAX_STEPS (a test and bench cap) is refused in production")


def _base_path(raw: str) -> str:
    """``QUEUE_BASE_PATH`` as ``/a/b`` (or empty for the service root)."""
    parts = [p for p in raw.strip().split("/") if p]
    if any(not p.replace("-", "").replace("_", "").isalnum() for p in parts):
        raise ConfigurationError(f"QUEUE_BASE_PATH must be a plain path, got {raw!r}")
    return "/" + "/".join(parts) if parts else ""


def _default_result_backend(broker_url: str, var_dir: Path) -> str:
    """Celery results are never consulted for job state; keep them beside the broker."""
    if broker_url.startswith(("redis://", "rediss://")):
        return broker_url
    return f"db+sqlite:///{var_dir / 'celery-results.sqlite'}"


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first call."""
    settings = Settings.from_env()
    settings.warn_dev_secrets()
    return settings
