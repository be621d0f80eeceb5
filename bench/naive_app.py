"""The baselines ``make bench`` runs under the Procfile's gunicorn settings.

- ``create_hello()``: a Flask hello-world JSON endpoint (a raw limit: what
  Flask and gunicorn cost on their own).
- ``create_naive()``: the naive reference, the simplest possible submission
  endpoint: parse the JSON body, insert one row with the SQLAlchemy ORM,
  commit, ``apply_async`` on a Redis broker, answer JSON. No authentication,
  validation, credits, events, idempotency or rate limits.

    gunicorn 'bench.naive_app:create_naive()'   # NAIVE_DATABASE_URL, NAIVE_BROKER_URL

The naive endpoint publishes to a queue nobody consumes (``naive``); the bench
drops the database and the private Redis afterwards.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
from typing import Any

from flask import Flask, jsonify, request
from sqlalchemy import JSON, DateTime, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def create_hello() -> Flask:
    app = Flask("hello")

    @app.get("/hello")
    def hello() -> Any:
        return jsonify({"hello": "world"})

    return app


class Base(DeclarativeBase):
    pass


class NaiveJob(Base):
    __tablename__ = "naive_jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def create_schema(url: str) -> None:
    """Create the naive table (the bench calls it once, before gunicorn starts)."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


def create_naive() -> Flask:
    from celery import Celery

    # The service's pool size (a web process's DB_POOL_SIZE and DB_MAX_OVERFLOW defaults)
    # with SQLAlchemy's usual pre-ping (the service pings only connections idle for 2 s,
    # orchestrator.db: one of the round trips it saved).
    engine = create_engine(os.environ["NAIVE_DATABASE_URL"], pool_pre_ping=True, pool_size=10,
                           max_overflow=20)
    sessions = sessionmaker(engine, expire_on_commit=False)
    celery = Celery("naive", broker=os.environ["NAIVE_BROKER_URL"])
    celery.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

    @celery.task(name="naive.run")
    def run(job_id: str) -> None:  # never consumed: only published
        pass

    app = Flask("naive")

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"ok": True})

    @app.post("/submit")
    def submit() -> Any:
        body = request.get_json()
        job = NaiveJob(id=str(uuid.uuid4()), job_type=str(body.get("jobType", "")), status="queued",
                       payload=body.get("metadata") or {},
                       created_at=dt.datetime.now(dt.timezone.utc))
        with sessions() as session, session.begin():
            session.add(job)
        run.apply_async(args=(job.id,), task_id=job.id, queue="naive")
        return jsonify({"success": True, "job": {"id": job.id, "status": job.status,
                                                 "jobType": job.job_type}})

    return app
