"""The OpenAPI document: complete (every route), valid (OpenAPI 3.0), and true
(schemathesis runs every check against the in-process app and finds nothing).

The schemathesis run uses the engine behind ``schemathesis run`` (examples,
coverage, fuzzing and stateful phases, all checks enabled) against the WSGI app
with a publisher that does nothing (no broker), a user with a large balance who
also holds the admin role (``queries.grant_role``, what ``orchestrator
grant-admin`` does) and the worker token.
"""
from __future__ import annotations

import dataclasses

import datetime as dt
import time
import uuid
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.engine import events, from_schema
from schemathesis.transport.wsgi import WSGITransport

from orchestrator import credits, queries
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.records import asset_record, image_row, video_row
from orchestrator.tokens import mint_user_token
from tests.conftest import wipe
from tests.helpers import submit
from web import create_app
from web import schemas
from web.openapi import HIDDEN, openapi_path, operation_methods

#: Per backend, the schemathesis run must stay well under a minute.
RUN_BUDGET_S = 60


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        # Nothing runs the jobs (the publisher below drops them): the admin image waits
        # this long and answers its documented 504.
        admin_image_timeout=0.2,
        # Thousands of requests from one user: limits would turn most answers into 429s.
        submit_rate_limit="", max_active_jobs=0,
        # Event streams end after this long (clients reconnect): schemathesis reads them whole.
        sse_max_seconds=0.3, sse_heartbeat_seconds=0.1)


@pytest.fixture
def api(api_settings: Settings) -> Iterator[Any]:
    database = Database(api_settings.database_url)
    wipe(database)
    database.dispose()
    app = create_app(api_settings, publisher=lambda job_id, job_type: None)
    app.config["TESTING"] = True
    yield app
    app.extensions["orchestrator"].db.dispose()


def _rules(app: Any) -> list[Any]:
    return [r for r in app.url_map.iter_rules() if r.endpoint != "static"]


# --- complete ---------------------------------------------------------------------------------


def test_every_route_is_documented_with_its_methods(api: Any) -> None:
    doc = api.test_client().get("/openapi.json").get_json()
    missing = []
    hidden = set()
    for rule in _rules(api):
        if getattr(api.view_functions[rule.endpoint], HIDDEN, False):
            hidden.add(rule.endpoint)
            continue
        documented = doc["paths"].get(openapi_path(rule), {})
        for method in operation_methods(rule):
            if method.lower() not in documented:
                missing.append(f"{method} {rule.rule}")
    assert missing == []
    # Only the documentation's own static files are left out.
    assert hidden == {"openapi.docs_asset", "openapi.docs_initializer"}
    served = {(openapi_path(r), m.lower()) for r in _rules(api) for m in operation_methods(r)}
    listed = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert listed <= served


def test_document_is_valid_openapi_and_self_consistent(api: Any) -> None:
    doc = api.test_client().get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.0.")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # the OpenAPI 3.0 meta-schema
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    op_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids))
    for item in doc["paths"].values():
        for op in item.values():
            for link in (link for r in op["responses"].values() for link in r.get("links", {}).values()):
                assert link["operationId"] in op_ids


def test_schemas_come_from_the_validating_models(api: Any) -> None:
    """The request schemas are the models' own (not a copy), and the record builders
    return exactly the fields their answer models declare."""
    doc = api.test_client().get("/openapi.json").get_json()
    components = doc["components"]["schemas"]
    body = doc["paths"]["/functions/v1/queue-job"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/QueueJobBody"}
    assert set(components["SdxlJobBody"]["properties"]) == {
        f.alias or name for name, f in schemas.SdxlJobBody.model_fields.items()}
    job_types = {t for name in ("SdxlJobBody", "WanImageJobBody", "VideoJobBody")
                 for t in components[name]["properties"]["jobType"]["enum"]}
    assert len(job_types) == 10
    params = {p["name"]: p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert set(params) == set(schemas.ListJobsQuery.model_fields)
    assert params["limit"]["schema"]["maximum"] == queries.MAX_PAGE


def test_records_match_their_answer_models(api: Any, api_settings: Settings) -> None:
    db = api.extensions["orchestrator"].db
    user_id = str(uuid.uuid4())
    image_job = submit(db, user_id, "sdxl_image_fast")
    video_job = submit(db, user_id, "video_fast")

    def url(bucket: str, path: str) -> str:
        return f"http://x/{bucket}/{path}"

    with api.test_request_context():  # what the API answers: the record, placed in its queue
        record = api.extensions["orchestrator"].job_answer(image_job)
    assert set(record) == set(schemas.JobRecord.model_fields)
    assert record["queue_position"] == 1
    schemas.JobRecord.model_validate(record)
    image = queries.get_image(db, user_id, image_job.image_id)
    video = queries.get_video(db, user_id, video_job.video_id)
    for row, row_model, rec_model, asset in (
            (image_row(image), schemas.ImageRow, schemas.ImageRecord, image),
            (video_row(video), schemas.VideoRow, schemas.VideoRecord, video)):
        assert set(row) == set(row_model.model_fields)
        full = asset_record(row, asset.metadata_["bucket"], url)
        assert set(full) == set(rec_model.model_fields)
        rec_model.model_validate(full)


def test_docs_page_runs_no_inline_script(api: Any) -> None:
    client = api.test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<script>" not in html and "<script src=" in html  # every script is a file of ours
    csp = page.headers.get("Content-Security-Policy", "")
    assert "unsafe-inline" not in csp.split("script-src", 1)[-1].split(";", 1)[0]
    init = client.get("/docs/initializer.js")
    assert init.status_code == 200 and "openapi.json" in init.get_data(as_text=True)
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        assert client.get(f"/docs/{asset}").status_code == 200, asset
    assert client.get("/docs/index.html").status_code == 404  # the bundle's petstore page is not served


def test_method_not_allowed_keeps_allow_header(api: Any) -> None:
    resp = api.test_client().delete("/v1/jobs")
    assert resp.status_code == 405 and resp.is_json
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


# --- true: schemathesis -----------------------------------------------------------------------


def _cursor(when: dt.datetime, job_id: uuid.UUID) -> str:
    return queries.encode_cursor(SimpleNamespace(created_at=when, id=str(job_id)))  # type: ignore[arg-type]


# `cursor` is opaque (`format: job-cursor`): teach schemathesis what a well-formed one is.
schemathesis.openapi.format("job-cursor", st.builds(
    _cursor, st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(8999, 1, 1),
                          timezones=st.just(dt.timezone.utc)), st.uuids()))


def _keyed_operations(doc: dict[str, Any]) -> list[str]:
    """operationIds of the writes that take an Idempotency-Key."""
    return sorted(op["operationId"] for item in doc["paths"].values() for op in item.values()
                  if any(p["name"] == "Idempotency-Key" for p in op.get("parameters", ())))


def _config(doc: dict[str, Any], user_token: str, worker_token: str) -> Any:
    # Statuses a documented, correct answer can have that not_a_server_error would call a
    # server error: the admin image outlives its wait here (nothing runs jobs: 504, "it
    # continues") or fails (502); readiness reports a dependency down with 503. Nothing else.
    admin_statuses = ["2xx", "3xx", "4xx", "502", "504"]
    ready_statuses = ["2xx", "3xx", "4xx", "503"]
    # A well-formed Idempotency-Key that this user already sent with another body is a 422
    # (the contract): schemathesis draws keys from a small pool ("0", boundary strings), so
    # valid requests meet used keys. Only for the writes that take the header, and only 422
    # is added to what positive_data_acceptance allows.
    keyed_statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
    return schemathesis.Config.from_dict({
        "seed": 20261128,
        "generation": {
            "max-examples": 15,
            "deterministic": True,
            # The service refuses NUL anywhere in a JSON body (the databases cannot store
            # it; tests/test_input_edges.py covers that 400). OpenAPI 3.0 cannot say "no NUL
            # in any key of a free-form object", so do not generate it.
            "allow-x00": False,
        },
        "phases": {"stateful": {"max-steps": 6}},
        "auth": {"openapi": {"userJWT": {"bearer": user_token},
                             "workerToken": {"bearer": worker_token}}},
        "operations": [
            *({"include-operation-id": op_id,
               "checks": {"positive_data_acceptance": {"expected-statuses": keyed_statuses}}}
              for op_id in _keyed_operations(doc)),
            {"include-path": "/functions/v1/generate-admin-image",
             "checks": {"not_a_server_error": {"expected-statuses": admin_statuses}}},
            {"include-path": "/readyz",
             "checks": {"not_a_server_error": {"expected-statuses": ready_statuses}}},
        ],
    })


def _failures(stream: Any) -> tuple[list[str], list[str], int]:
    failures: list[str] = []
    errors: list[str] = []
    calls = 0
    for event in stream:
        if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            calls += len(event.recorder.interactions)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        status = getattr(failure, "status_code", None)
                        text = (f"[{check.name}] {failure.operation}: {failure.title}"
                                f"{f' (status {status})' if status else ''}\n"
                                f"{failure.message}\n{check.failure_info.code_sample}")
                        if text not in failures:
                            failures.append(text)
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}")
    return failures, errors, calls


@pytest.fixture
def wsgi_probe_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis 4.32.5 bug: the probes of the ``ignored_auth`` check drop the run's
    session but keep its socket-level options, which the WSGI transport only strips when
    it is given a session, so Werkzeug's test client gets ``max_redirects`` and raises.
    Strip them the same way for every call (they mean nothing in-process)."""
    original = WSGITransport.send

    def send(self: Any, case: Any, **kwargs: Any) -> Any:
        if kwargs.get("session") is None:
            for name in ("max_redirects", "verify", "cert", "proxies"):
                kwargs.pop(name, None)
        return original(self, case, **kwargs)

    monkeypatch.setattr(WSGITransport, "send", send)


# On PostgreSQL only (the production database; the SQLite run took as long again and found
# the same): the rest of this file, and every other HTTP test, covers both databases.
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.usefixtures("wsgi_probe_fix")
def test_schemathesis_finds_nothing(api: Any, api_settings: Settings, backend: str) -> None:
    db = api.extensions["orchestrator"].db
    user_id = str(uuid.uuid4())
    with db.transaction() as session:
        credits.grant(session, user_id, 10_000_000)
    queries.grant_role(db, user_id)  # what `orchestrator grant-admin` does
    token = mint_user_token(api_settings, user_id, ttl_seconds=3600)
    doc = api.test_client().get("/openapi.json").get_json()
    schema = schemathesis.openapi.from_wsgi(
        "/openapi.json", api, config=_config(doc, token, api_settings.worker_token))
    started = time.monotonic()
    failures, errors, calls = _failures(from_schema(schema).execute())
    elapsed = time.monotonic() - started
    print(f"schemathesis on {backend}: {calls} requests in {elapsed:.1f} s")
    problems = errors + failures
    assert problems == [], f"{len(problems)} problems:\n\n" + "\n\n".join(problems)
    assert calls > 500
    assert elapsed < RUN_BUDGET_S
