"""Publishing a committed job to its family's queue (the web's one use of Celery)."""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals

from orchestrator.jobtypes import JOB_TYPES
from tasks import redis_transport
from tasks.generation import run_generation
from tasks.routing import GENERATION_TASK, route_for

log = logging.getLogger(__name__)

#: Bounded publish retries: a request never hangs on a dead broker.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def publish_job(job_id: str, job_type: str) -> None:
    """Send ``generation.run(job_id)`` with the job id as task id: the message
    ``run_generation.apply_async(args=(job_id,), task_id=job_id, retry=True,
    retry_policy=RETRY_POLICY, **route_for(spec))`` sends (a test compares the two).

    On a Redis broker it is the message Celery built for the route's first job of this
    process with this job's id, task id, reply-to and delivery tag put in, and one
    ``LPUSH`` (:class:`_Template`): about a third of Celery's CPU time. Every other
    broker, a failed ``LPUSH``, and anything that must see each message (publish
    signals' receivers, task-sent events) go through Celery (:func:`_publish_with_celery`),
    except an ``LPUSH`` that timed out: a broker that stopped answering would only make
    the request wait a second time (the caller leaves the job to the reconciler).

    Raises:
        Exception: whatever kombu raises when the broker cannot take it; redis-py's
        ``TimeoutError`` when the ``LPUSH`` timed out.
    """
    route = route_for(JOB_TYPES[job_type])
    app = run_generation.app
    if signals.before_task_publish.receivers or signals.after_task_publish.receivers \
            or not _CANONICAL_ID.fullmatch(job_id):
        _publish_with_celery(job_id, route)
        return
    key = (os.getpid(), route["queue"], route["time_limit"], route["soft_time_limit"])
    template = _templates.get(key, _UNKNOWN)
    if template is _UNKNOWN:
        template = _templates[key] = _Template.build(route)
    if template is not None:
        try:
            template.send(job_id, app.thread_oid)
            return
        except Exception as e:  # noqa: BLE001 - Celery's path retries, reconnects or raises
            _templates.pop(key, None)  # built again, on a fresh client, by the next job
            if isinstance(e, redis.TimeoutError):
                raise  # a broker that stopped answering: no second wait through Celery
            log.info("broker LPUSH failed (%s); publishing job %s through Celery",
                     type(e).__name__, job_id)
    _publish_with_celery(job_id, route)


def _publish_with_celery(job_id: str, route: dict[str, Any]) -> None:
    """The message built and sent with the Celery calls ``send_task`` makes, without what
    a web process never needs: a router (the queue is known), a parent task to inherit
    from, a result backend to tell (results are ignored) and an ``AsyncResult``."""
    app = run_generation.app
    message = app.amqp.create_task_message(
        job_id, GENERATION_TASK, (job_id,), {}, reply_to=app.thread_oid,
        time_limit=route["time_limit"], soft_time_limit=route["soft_time_limit"],
        create_sent_event=app.conf.task_send_sent_event, ignore_result=run_generation.ignore_result)
    with app.producer_or_acquire() as producer:
        with producer.connection._reraise_as_library_errors():
            app.amqp.send_task_message(producer, GENERATION_TASK, message, queue=route["queue"],
                                       retry=True, retry_policy=RETRY_POLICY)


_UNKNOWN: Any = object()
#: (pid, queue, time limit, soft time limit) → the route's template, None where there is
#: none (not a Redis broker, or Celery would send more than one LPUSH).
_templates: dict[tuple[Any, ...], "_Template | None"] = {}


@dataclass(frozen=True)
class _Template:
    """One route's message as Celery and kombu serialize it, made by publishing a job with
    a placeholder id through Celery on a channel that records instead of sending
    (:func:`tasks.redis_transport.recording`). A job's message is the template with four
    values replaced: the id (task id, root id, correlation id, argsrepr and, inside the
    base64 body, the task's argument), the reply-to (Celery's id of the publishing
    thread), and the delivery tag (a new uuid per message, as kombu draws one)."""

    key: str
    client: Any
    payload: str
    placeholder: str
    body: str
    encoded_body: str
    reply_to: str
    delivery_tag: str

    @classmethod
    def build(cls, route: dict[str, Any]) -> "_Template | None":
        app = run_generation.app
        if app.conf.task_send_sent_event:
            return None  # each message is followed by an event only Celery sends
        with app.connection_for_write() as conn:
            if not issubclass(conn.get_transport_cls(), redis_transport.Transport):
                return None  # would really be sent: recording is this transport's
        placeholder = str(uuid.uuid4())
        with redis_transport.recording() as recorded:
            _publish_with_celery(placeholder, route)
        if len(recorded) != 1 or recorded[0] is None:
            return None
        sent = recorded[0]
        message = json.loads(sent.payload)
        properties = message["properties"]
        if properties.get("body_encoding") != "base64":
            return None
        template = cls(key=sent.key, client=sent.client, payload=sent.payload,
                       placeholder=placeholder,
                       body=base64.b64decode(message["body"]).decode(),
                       encoded_body=message["body"], reply_to=properties["reply_to"],
                       delivery_tag=properties["delivery_tag"])
        # Each value to replace is in the message once (the id: in the body and elsewhere).
        once = (template.encoded_body, template.reply_to, template.delivery_tag)
        if placeholder not in template.body or placeholder not in sent.payload or any(
                sent.payload.count(value) != 1 for value in once):
            return None
        return template

    def send(self, job_id: str, reply_to: str) -> None:
        body = base64.b64encode(self.body.replace(self.placeholder, job_id).encode()).decode()
        payload = (self.payload.replace(self.encoded_body, body)
                   .replace(self.placeholder, job_id).replace(self.reply_to, reply_to)
                   .replace(self.delivery_tag, str(uuid.uuid4())))
        self.client.lpush(self.key, payload)


def broker_ready(timeout: float = 1.0) -> None:
    """Raise unless the broker accepts a connection within ``timeout`` seconds."""
    with run_generation.app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
