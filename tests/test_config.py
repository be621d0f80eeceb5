from __future__ import annotations

import pytest

from orchestrator.config import DEV_JWT_SECRET, ConfigurationError, Settings
from orchestrator.jobtypes import LONGEST_HARD_TIME_LIMIT
from tasks.config import celery_config, check_consistency


def test_embedded_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url == "sqlite:///var/orchestrator.sqlite"
    assert s.broker_url == "sqla+sqlite:///var/broker.sqlite"
    assert str(s.storage_root) == "var/storage"
    assert s.port == 8000 and s.generation_time_scale == 0.0
    assert s.jwt_secret == DEV_JWT_SECRET
    assert set(s.dev_secrets) == {"JWT_SECRET", "WORKER_TOKEN", "WORKER_SECRET"}


def test_production_refuses_development_secrets() -> None:
    with pytest.raises(ConfigurationError, match="JWT_SECRET"):
        Settings.from_env({"ORCHESTRATOR_ENV": "production", "WORKER_TOKEN": "t", "WORKER_SECRET": "s"})
    s = Settings.from_env({"ORCHESTRATOR_ENV": "production", "JWT_SECRET": "j" * 40,
                           "WORKER_TOKEN": "t", "WORKER_SECRET": "a b"})
    assert s.dev_secrets == () and s.worker_secrets == ("a", "b")


def test_dev_secret_banner_is_loud(capsys: pytest.CaptureFixture[str]) -> None:
    Settings.from_env({}).warn_dev_secrets()
    err = capsys.readouterr().err
    assert "DEVELOPMENT SECRETS IN USE" in err and DEV_JWT_SECRET not in err


@pytest.mark.parametrize("name,value", [("PORT", "eighty"), ("GENERATION_TIME_SCALE", "-1"),
                                        ("MAX_ATTEMPTS", "0"), ("MAX_ACTIVE_JOBS", "-1"),
                                        ("SUBMIT_RATE_LIMIT", "lots"),
                                        ("SUBMIT_RATE_LIMIT", "5 per fortnight"),
                                        ("REVOCATION_REFRESH_SECONDS", "soon")])
def test_bad_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env({name: value})


def test_celery_settings_for_long_tasks_on_redis() -> None:
    conf = celery_config(Settings.from_env({"BROKER_URL": "redis://127.0.0.1:6379/0"}))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["task_track_started"]
    assert conf["broker_transport_options"]["visibility_timeout"] > LONGEST_HARD_TIME_LIMIT
    assert conf["result_backend_transport_options"]["visibility_timeout"] > LONGEST_HARD_TIME_LIMIT
    assert {q.name for q in conf["task_queues"]} == {"sdxl", "wan", "maintenance"}
    assert conf["beat_schedule"]["reconcile"]["options"]["queue"] == "maintenance"


def test_inconsistent_celery_settings_are_refused() -> None:
    conf = celery_config(Settings.from_env({"BROKER_URL": "redis://127.0.0.1:6379/0"}))
    conf["broker_transport_options"] = {"visibility_timeout": 60}
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        check_consistency(conf)
    conf = celery_config(Settings.from_env({}))
    conf["worker_prefetch_multiplier"] = 4
    with pytest.raises(ConfigurationError, match="prefetch"):
        check_consistency(conf)
