"""Issue 4, hostile input: oversized, deep, mistyped and unstorable bodies,
traversal through every route that names a stored file, and URLs the service
must never fetch. Each is a clean 4xx JSON answer that changes nothing.

Hostile asset paths of the current callback dialect are in
tests/test_callback.py (``HOSTILE``); here the same list (and more spellings)
goes through the legacy fields, asset objects and thumbnails.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import http.server
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import pytest
from sqlalchemy import func, select

from orchestrator import queries
from orchestrator.jobtypes import JOB_TYPES
from orchestrator.models import Image, Job, Project, Video
from tests.helpers import assert_json_error, balance
from tests.test_callback import HOSTILE, signed_headers, snapshot
from web import MAX_BODY_BYTES

QUEUE = "/functions/v1/queue-job"
REST = "/v1/jobs"
CALLBACK = "/functions/v1/job-callback"
ADMIN = "/functions/v1/generate-admin-image"
UPLOAD = "/storage/v1/object"
MAX_DEPTH = 32  # web/schemas.py MAX_JSON_DEPTH
MAX_PROMPT = 4000  # orchestrator/submission.py MAX_PROMPT_CHARS
MAX_METADATA = 16 * 1024  # web/schemas.py MAX_METADATA_BYTES
SENTINEL = b"SENTINEL-outside-the-storage-root-" + uuid.uuid4().hex.encode()
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def make_client(settings: Any, db: Any, redis_client: Any) -> Iterator[Callable[..., Any]]:
    """Another app on the test databases with some settings changed (jobs are not published)."""
    from web import create_app

    apps: list[Any] = []

    def _make(**overrides: Any) -> tuple[Any, Any]:
        app = create_app(dataclasses.replace(settings, **overrides), publisher=lambda *_: None)
        app.config["TESTING"] = True
        apps.append(app)
        return app, app.test_client()

    yield _make
    for app in apps:
        app.extensions["orchestrator"].db.dispose()


@pytest.fixture
def external(make_client: Callable[..., Any]) -> tuple[Any, Any]:
    """(app, client) with both families served to external workers (rpop, upload)."""
    return make_client(external_families=frozenset({"sdxl", "wan"}))


def queue(client: Any, headers: dict[str, str], job_type: str = "image_fast",
          **metadata: Any) -> dict[str, Any]:
    resp = client.post(QUEUE, json={"jobType": job_type, "metadata": {"prompt": "a red fox", **metadata}},
                       headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["job"]


def leased(client: Any, headers: dict[str, str], worker_headers: dict[str, str],
           job_type: str = "image_fast") -> dict[str, Any]:
    """A job of ``job_type`` leased to an external worker (so uploads for it are allowed)."""
    job = queue(client, headers, job_type)
    queue_name = JOB_TYPES[job_type].family.legacy_list
    resp = client.post(f"/rpop/{queue_name}", headers=worker_headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert json.loads(resp.get_json()["result"])["id"] == job["id"]
    return job


def rows(db: Any) -> tuple[int, ...]:
    with db.session() as s:
        return tuple(s.execute(select(func.count()).select_from(m)).scalar_one()
                     for m in (Job, Image, Video, Project))


def names_field(body: dict[str, Any], field: str) -> bool:
    """The error's details name ``field`` (a dict or a list of per-field entries)."""
    details = body.get("details")
    entries = details if isinstance(details, list) else [details]
    return any(isinstance(e, dict) and e.get("field") == field for e in entries)


def tree(base: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``base`` with its kind, size and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in sorted(base.rglob("*")):
        rel = str(p.relative_to(base))
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()))
        elif p.is_file():
            out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir",)
    return out


@dataclasses.dataclass
class Planted:
    root: Path          # the storage root
    around: Path        # the folder that holds it (everything here but the root is "outside")
    sentinels: list[Path]

    def outside(self) -> dict[str, tuple[Any, ...]]:
        return {k: v for k, v in tree(self.around).items()
                if not (k == self.root.name or k.startswith(self.root.name + "/"))}


@pytest.fixture
def planted(settings: Any) -> Planted:
    """Sentinel files next to the storage root, at its top and at a bucket's top:
    places a traversal would reach, none of them an object any key may name."""
    root = Path(settings.storage_root)
    around = root.parent
    sentinels = [around / "sentinel.png", root / "sentinel.png", root / "image_fast" / "sentinel.png"]
    for path in sentinels:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(SENTINEL)
    return Planted(root=root, around=around, sentinels=sentinels)


def assert_no_sentinel(resp: Any, label: Any = "") -> None:
    assert SENTINEL not in resp.get_data(), label


# --- bodies over the cap --------------------------------------------------------------------

OVER = MAX_BODY_BYTES + 1


def _big_json(**fields: Any) -> bytes:
    body = json.dumps({**fields, "pad": ""}).encode()
    return body[:-2] + b"x" * (OVER - len(body) + 2) + b'"}'


POST_ROUTES = ["queue-job", "rest jobs", "cancel", "retry", "images", "videos", "projects", "admin",
               "callback bearer", "callback signed", "rpop", "llen", "lpush", "lpush with value",
               "upload raw", "upload multipart"]


@pytest.mark.parametrize("route", POST_ROUTES)
def test_body_over_the_cap_is_413_on_every_post_route(external: tuple[Any, Any], db: Any, settings: Any,
                                                      worker_headers: dict[str, str],
                                                      make_user: Callable[..., Any],
                                                      planted: Planted, route: str) -> None:
    app, client = external
    user_id, headers = make_user()
    admin_id, admin = make_user()
    queries.grant_role(db, admin_id)
    job = leased(client, headers, worker_headers)
    before_rows, before_job = rows(db), snapshot(db, job["id"])
    before_files, before_balance = tree(planted.around), balance(client, headers)
    bucket_cap = JOB_TYPES["image_fast"].bucket_cap
    json_headers = {"Content-Type": "application/json"}
    big = _big_json(jobType="image_fast", metadata={"prompt": "x"}, job_id=job["id"], status="failed")
    upload = f"{UPLOAD}/image_fast/{user_id}/big.png"
    send: dict[str, Callable[[], Any]] = {
        "queue-job": lambda: client.post(QUEUE, data=big, headers={**headers, **json_headers}),
        "rest jobs": lambda: client.post(REST, data=big, headers={**headers, **json_headers}),
        "cancel": lambda: client.post(f"{REST}/{job['id']}/cancel", data=big,
                                      headers={**headers, **json_headers}),
        "retry": lambda: client.post(f"{REST}/{job['id']}/retry", data=big,
                                     headers={**headers, **json_headers}),
        "images": lambda: client.post("/v1/images", data=big, headers={**headers, **json_headers}),
        "videos": lambda: client.post("/v1/videos", data=big, headers={**headers, **json_headers}),
        "projects": lambda: client.post("/v1/projects", data=big, headers={**headers, **json_headers}),
        "admin": lambda: client.post(ADMIN, data=big, headers={**admin, **json_headers}),
        "callback bearer": lambda: client.post(CALLBACK, data=big,
                                               headers={**worker_headers, **json_headers}),
        "callback signed": lambda: client.post(
            CALLBACK, data=big, headers=signed_headers(settings.worker_secrets[0], big)),
        "rpop": lambda: client.post("/rpop/wan_queue", data=big,
                                    headers={**worker_headers, **json_headers}),
        "llen": lambda: client.post("/llen/wan_queue", data=big,
                                    headers={**worker_headers, **json_headers}),
        "lpush": lambda: client.post("/lpush/wan_queue", data=big,
                                     headers={**worker_headers, **json_headers}),
        "lpush with value": lambda: client.post(f"/lpush/wan_queue/{job['id']}", data=big,
                                                headers={**worker_headers, **json_headers}),
        "upload raw": lambda: client.post(upload, data=b"x" * (bucket_cap + 1),
                                          headers={**worker_headers, "Content-Type": "image/png"}),
        "upload multipart": lambda: client.post(
            upload, headers=worker_headers, content_type="multipart/form-data",
            data={"file": (io.BytesIO(b"x" * (bucket_cap + 1)), "big.png")}),
    }
    resp = send[route]()
    body = assert_json_error(resp, 413)
    assert body["code"] in ("payload_too_large", "request_entity_too_large")
    assert rows(db) == before_rows
    assert snapshot(db, job["id"]) == before_job
    assert tree(planted.around) == before_files
    assert balance(client, headers) == before_balance


# --- prompt and metadata caps ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["queue-job prompt", "rest prompt", "sdxl negative prompt",
                                  "project original", "project enhanced", "image prompt",
                                  "admin prompt"])
def test_prompt_over_its_cap_is_400_naming_the_field(client: Any, db: Any, make_user: Callable[..., Any],
                                                     case: str) -> None:
    user_id, headers = make_user()
    queries.grant_role(db, user_id)  # so the admin route reaches its validation
    route, field, make = {
        "queue-job prompt": (QUEUE, "metadata.prompt",
                             lambda n: {"jobType": "image_fast", "metadata": {"prompt": "a" * n}}),
        "rest prompt": (REST, "metadata.prompt",
                        lambda n: {"jobType": "video_fast", "metadata": {"prompt": "a" * n}}),
        "sdxl negative prompt": (QUEUE, "metadata.negative_prompt",
                                 lambda n: {"jobType": "sdxl_image_fast",
                                            "metadata": {"prompt": "a cat", "negative_prompt": "b" * n}}),
        "project original": ("/v1/projects", "original_prompt", lambda n: {"original_prompt": "a" * n}),
        "project enhanced": ("/v1/projects", "enhanced_prompt", lambda n: {"enhanced_prompt": "a" * n}),
        "image prompt": ("/v1/images", "prompt", lambda n: {"prompt": "a" * n}),
        "admin prompt": (ADMIN, "prompt", lambda n: {"prompt": "a" * n}),
    }[case]
    before = rows(db)
    resp = client.post(route, json=make(MAX_PROMPT + 1), headers=headers)
    body = assert_json_error(resp, 400)
    assert names_field(body, field), body
    assert rows(db) == before
    assert balance(client, headers) == 100
    if route != ADMIN:  # the admin route would wait for a generation
        ok = client.post(route, json=make(MAX_PROMPT), headers=headers)
        assert ok.status_code in (200, 201), ok.get_data(as_text=True)


@pytest.mark.parametrize("route", ["queue-job", "rest", "callback", "admin"])
def test_metadata_over_its_cap_is_400_naming_the_field(client: Any, db: Any,
                                                       worker_headers: dict[str, str],
                                                       make_user: Callable[..., Any], route: str) -> None:
    user_id, headers = make_user()
    queries.grant_role(db, user_id)
    job = queue(client, headers)
    before_rows, before_job = rows(db), snapshot(db, job["id"])

    def meta(size: int) -> dict[str, Any]:
        pad = size - len(json.dumps({"prompt": "a cat", "pad": ""}))
        return {"prompt": "a cat", "pad": "x" * pad}

    assert len(json.dumps(meta(MAX_METADATA + 1))) == MAX_METADATA + 1
    path, hdrs, make = {
        "queue-job": (QUEUE, headers, lambda m: {"jobType": "image_fast", "metadata": m}),
        "rest": (REST, headers, lambda m: {"jobType": "image_fast", "metadata": m}),
        "callback": (CALLBACK, worker_headers,
                     lambda m: {"job_id": job["id"], "status": "completed",
                                "assets": [f"{user_id}/a.png"], "metadata": m}),
        "admin": (ADMIN, headers, lambda m: {"prompt": "a cat", "metadata": m}),
    }[route]
    body = assert_json_error(client.post(path, json=make(meta(MAX_METADATA + 1)), headers=hdrs), 400)
    assert names_field(body, "metadata"), body
    assert rows(db) == before_rows and snapshot(db, job["id"]) == before_job
    assert balance(client, headers) == 99
    if route in ("queue-job", "rest"):  # exactly at the cap is fine
        ok = client.post(path, json=make(meta(MAX_METADATA)), headers=hdrs)
        assert ok.status_code in (200, 201), ok.get_data(as_text=True)


# --- nesting depth --------------------------------------------------------------------------


def _nest(levels: int) -> Any:
    """``levels`` nested containers (objects and arrays alternating)."""
    value: Any = "leaf"
    for i in range(levels):
        value = {"n": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("route", ["queue-job", "callback"])
def test_nesting_deeper_than_32_is_400(client: Any, db: Any, worker_headers: dict[str, str],
                                       make_user: Callable[..., Any], route: str) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)

    def send(levels: int) -> Any:
        # The body is depth 1 and metadata depth 2: metadata holds ``levels - 2`` more.
        meta = {"prompt": "a cat", "deep": _nest(levels - 2)}
        if route == "queue-job":
            return client.post(QUEUE, json={"jobType": "image_fast", "metadata": meta}, headers=headers)
        return client.post(CALLBACK, json={"job_id": job["id"], "status": "completed",
                                           "assets": [f"{user_id}/a.png"], "metadata": meta},
                           headers=worker_headers)

    before_rows, before_job = rows(db), snapshot(db, job["id"])
    for levels in (MAX_DEPTH + 1, MAX_DEPTH + 2, 500):
        assert_json_error(send(levels), 400)
    # Far deeper than Python's recursion limit: still a 400, not a 500.
    raw = b'{"job_id": "%s", "status": "failed", "metadata": ' % job["id"].encode()
    raw += b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}"
    path, hdrs = (QUEUE, headers) if route == "queue-job" else (CALLBACK, worker_headers)
    assert_json_error(client.post(path, data=raw, headers={**hdrs, "Content-Type": "application/json"}), 400)
    assert_json_error(client.post(path, data=b"[" * 200_000 + b"]" * 200_000,
                                  headers={**hdrs, "Content-Type": "application/json"}), 400)
    assert rows(db) == before_rows and snapshot(db, job["id"]) == before_job

    ok = send(MAX_DEPTH)  # exactly at the limit is accepted, stored and read back
    assert ok.status_code == 200, ok.get_data(as_text=True)
    got = client.get(f"/v1/jobs/{job['id'] if route == 'callback' else ok.get_json()['job']['id']}",
                     headers=headers)
    assert got.status_code == 200


# --- wrong types ----------------------------------------------------------------------------

_ANY_WRONG = [5, 1.5, True, [], {}]
QUEUE_JOB_WRONG: list[tuple[str, str, Any]] = (
    [("image_fast", "jobType", v) for v in [None, *_ANY_WRONG, ["image_fast"], {"name": "image_fast"}]]
    + [("image_fast", "metadata", v) for v in [5, 1.5, True, "x", ["prompt"]]]
    + [("image_fast", "projectId", v) for v in [*_ANY_WRONG, "not-a-uuid", [str(uuid.uuid4())]]]
    + [("image_fast", "imageId", v) for v in [*_ANY_WRONG, "not-a-uuid"]]
    + [("video_fast", "videoId", v) for v in [*_ANY_WRONG, "not-a-uuid"]]
    + [("image_fast", "metadata.prompt", v) for v in [None, *_ANY_WRONG, ["a cat"], "   "]]
    + [("sdxl_image_fast", "metadata.num_images", v)
       for v in ["3", 1.5, True, -1, 0, 7, 10**20, [], {}]]
    + [("image_fast", "metadata.seed", v) for v in ["1", 1.5, True, -1, 2**32, 10**30, [], {}]]
    + [("sdxl_image_fast", "metadata.negative_prompt", v) for v in _ANY_WRONG]
)


@pytest.mark.parametrize("route", [QUEUE, REST])
def test_wrong_types_in_queue_job_are_400(client: Any, db: Any, make_user: Callable[..., Any],
                                          route: str) -> None:
    """Every case in one test (they share one user; nothing may change for any of them)."""
    _, headers = make_user()
    before = rows(db)
    for job_type, field, value in QUEUE_JOB_WRONG:
        body: dict[str, Any] = {"jobType": job_type, "metadata": {"prompt": "a cat"}}
        if field.startswith("metadata."):
            body["metadata"][field.split(".", 1)[1]] = value
        else:
            body[field] = value
        resp = client.post(route, json=body, headers=headers)
        assert resp.status_code == 400, (field, value, resp.get_data(as_text=True))
        assert_json_error(resp, 400)
    assert rows(db) == before
    assert balance(client, headers) == 100


_CURRENT = {"status": "completed", "assets": ["{user}/ok.png"]}
CALLBACK_WRONG: list[tuple[dict[str, Any], str, Any]] = (
    [({"status": "completed"}, "job_id", v) for v in _ANY_WRONG]
    + [({"status": "completed"}, "jobId", v) for v in _ANY_WRONG]
    + [({}, "status", v) for v in [None, *_ANY_WRONG, ["completed"]]]
    + [({"status": "completed"}, "assets", v) for v in [5, 1.5, True, "{user}/ok.png", {}]]
    + [({"status": "completed"}, "assets", [v]) for v in [5, 1.5, True, None, [], {}, {"url": 5},
                                                          {"path": ["{user}/ok.png"]}, ["{user}/ok.png"]]]
    + [({"status": "completed"}, "imageUrls", v) for v in [5, True, "{user}/ok.png", {}, [5], [None]]]
    + [({"status": "completed"}, name, v) for name in ("filePath", "outputUrl")
       for v in [5, 1.5, True, False, 0, [], {}, ["{user}/ok.png"]]]
    + [({"status": "failed"}, name, v) for name in ("error_message", "errorMessage", "error")
       for v in _ANY_WRONG]
    + [(_CURRENT, name, v) for name in ("enhanced_prompt", "enhancedPrompt") for v in _ANY_WRONG]
    + [(_CURRENT, "metadata", v) for v in [5, 1.5, True, False, 0, "x", "", [], [1]]]
    + [(_CURRENT, "attempt", v) for v in ["1", 1.5, True, [], {}]]
    + [(_CURRENT, name, v) for name in ("thumbnail", "thumbnail_url", "thumbnailUrl")
       for v in [5, 1.5, True, False, 0, [], {}]]
)


def test_wrong_types_in_the_callback_are_400(client: Any, db: Any, worker_headers: dict[str, str],
                                             make_user: Callable[..., Any]) -> None:
    """Every case in one test, against one image job and one video job that must not change."""
    user_id, headers = make_user()
    jobs = {kind: queue(client, headers, kind) for kind in ("image_fast", "video_fast")}
    before = {kind: snapshot(db, job["id"]) for kind, job in jobs.items()}
    for base, field, value in CALLBACK_WRONG:
        job = jobs["video_fast" if field in ("filePath", "outputUrl") else "image_fast"]
        body = json.loads(json.dumps({**base, field: value}).replace("{user}", user_id))
        if field not in ("job_id", "jobId"):
            body["jobId" if field in ("filePath", "outputUrl", "imageUrls") else "job_id"] = job["id"]
        resp = client.post(CALLBACK, json=body, headers=worker_headers)
        assert resp.status_code == 400, (field, value, resp.get_data(as_text=True))
        assert_json_error(resp, 400)
    assert {kind: snapshot(db, job["id"]) for kind, job in jobs.items()} == before


# --- values the databases cannot store ------------------------------------------------------

UNSTORABLE_QUEUE = {
    "huge float": (b'{"jobType":"image_fast","metadata":{"prompt":"cat","x":1e400}}', "metadata.x"),
    "huge negative float": (b'{"jobType":"image_fast","metadata":{"prompt":"cat","x":[-1e999]}}',
                            "metadata.x[0]"),
    "lone surrogate prompt": (b'{"jobType":"image_fast","metadata":{"prompt":"cat \\ud800"}}',
                              "metadata.prompt"),
    "lone low surrogate value": (b'{"jobType":"image_fast","metadata":{"prompt":"cat","x":{"y":"\\udcff"}}}',
                                 "metadata.x.y"),
    "lone surrogate key": (b'{"jobType":"image_fast","metadata":{"prompt":"cat","\\udc80":1}}', "metadata"),
    "surrogate negative prompt": (
        b'{"jobType":"sdxl_image_fast","metadata":{"prompt":"cat","negative_prompt":"\\ud83d"}}',
        "metadata.negative_prompt"),
}


@pytest.mark.parametrize("route", [QUEUE, REST])
@pytest.mark.parametrize("case", list(UNSTORABLE_QUEUE))
def test_unstorable_metadata_is_400_naming_the_field(client: Any, db: Any, make_user: Callable[..., Any],
                                                     route: str, case: str) -> None:
    _, headers = make_user()
    raw, field = UNSTORABLE_QUEUE[case]
    before = rows(db)
    resp = client.post(route, data=raw, headers={**headers, "Content-Type": "application/json"})
    body = assert_json_error(resp, 400)
    assert names_field(body, field) or case == "lone surrogate prompt", body
    assert rows(db) == before
    assert balance(client, headers) == 100
    # A real surrogate pair (one emoji) is fine.
    ok = client.post(route, data=b'{"jobType":"image_fast","metadata":{"prompt":"cat \\ud83d\\ude00"}}',
                     headers={**headers, "Content-Type": "application/json"})
    assert ok.status_code in (200, 201), ok.get_data(as_text=True)
    job = ok.get_json()["job"]
    assert job["prompt"] == "cat \U0001f600"


UNSTORABLE_CALLBACK = {
    "metadata huge float": (b'"status":"completed","assets":["{user}/a.png"],"metadata":{"x":1e400}',
                            "metadata.x"),
    "metadata surrogate": (b'"status":"completed","assets":["{user}/a.png"],"metadata":{"x":"\\ud800"}',
                           "metadata.x"),
    "error_message surrogate": (b'"status":"failed","error_message":"oom \\udfff"', "error_message"),
    "enhanced_prompt surrogate": (b'"status":"completed","assets":["{user}/a.png"],'
                                  b'"enhanced_prompt":"\\ud800"', "enhanced_prompt"),
    "asset surrogate": (b'"status":"completed","assets":["{user}/\\ud800.png"]', None),
    "legacy filePath surrogate": (b'"status":"completed","filePath":"{user}/\\udc00.mp4"', None),
    "thumbnail surrogate": (b'"status":"completed","assets":["{user}/a.png"],'
                            b'"thumbnail_url":"{user}/\\ud800.png"', None),
}


@pytest.mark.parametrize("case", list(UNSTORABLE_CALLBACK))
def test_unstorable_callback_values_are_400(client: Any, db: Any, worker_headers: dict[str, str],
                                            make_user: Callable[..., Any], case: str) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    fields, field = UNSTORABLE_CALLBACK[case]
    id_field = b"jobId" if b"filePath" in fields else b"job_id"
    raw = b'{"%s":"%s",' % (id_field, job["id"].encode()) + fields.replace(b"{user}", user_id.encode()) + b"}"
    before = snapshot(db, job["id"])
    resp = client.post(CALLBACK, data=raw, headers={**worker_headers, "Content-Type": "application/json"})
    body = assert_json_error(resp, 400)
    if field:
        assert names_field(body, field), body
    assert snapshot(db, job["id"]) == before


# --- hostile asset references in every callback form -----------------------------------------

EXTRA_HOSTILE = [
    "{user}/%c0%ae%c0%ae/x.png",             # overlong UTF-8 for "."
    "{user}/%25%32%65%25%32%65/x.png",        # triple-encoded ".."
    "{user}/..%5c..%5cx.png",
    "{user}/%2fetc%2fpasswd",
    "{user}/\ufffd.png",                      # what invalid UTF-8 in a URL decodes to
    "{user}/x.png\n",
    "{user}/x\t.png",
    "{user}/" + "a" * 256,
    "{user}/" + "a/" * 600 + "x.png",
    "file:///etc/passwd",
    "file://{user}/x.png",
    "//evil.example/{user}/x.png",
    "http://127.0.0.1/other_bucket/{user}/x.png",
    "https://x.example/storage/v1/object/public/sdxl_image_fast/{user}/%252e%252e/x.png",
    "https://x.example/storage/v1/object/public/sdxl_image_fast/{user}%2f..%2f{other}/x.png",
]


@pytest.mark.parametrize("form", ["filePath", "outputUrl", "imageUrls", "url object", "path object",
                                  "thumbnail_url", "thumbnail object"])
def test_hostile_asset_references_in_every_form_are_400(client: Any, db: Any, planted: Planted,
                                                        worker_headers: dict[str, str],
                                                        make_user: Callable[..., Any], form: str) -> None:
    user_id, headers = make_user()
    other = str(uuid.uuid4())
    job = queue(client, headers, "sdxl_image_fast")
    before, files = snapshot(db, job["id"]), tree(planted.around)
    ok = f"{user_id}/ok.png"
    for template in [*HOSTILE, *EXTRA_HOSTILE]:
        ref = template.format(user=user_id, other=other)
        if ref == "" and form in ("filePath", "outputUrl", "thumbnail_url"):
            continue  # an empty legacy field means "absent"
        body: dict[str, Any] = {
            "filePath": {"jobId": job["id"], "filePath": ref},
            "outputUrl": {"jobId": job["id"], "outputUrl": ref},
            "imageUrls": {"jobId": job["id"], "imageUrls": [ok, ref]},
            "url object": {"job_id": job["id"], "assets": [{"url": ok}, {"url": ref}]},
            "path object": {"job_id": job["id"], "assets": [{"path": ref}]},
            "thumbnail_url": {"job_id": job["id"], "assets": [ok], "thumbnail_url": ref},
            "thumbnail object": {"job_id": job["id"], "assets": [ok], "thumbnail": {"url": ref}},
        }[form]
        resp = client.post(CALLBACK, json={**body, "status": "completed"}, headers=worker_headers)
        assert resp.status_code == 400, (ref, resp.status_code, resp.get_data(as_text=True))
        assert_json_error(resp, 400)
        assert snapshot(db, job["id"]) == before, ref
    assert tree(planted.around) == files
    assert balance(client, headers) == 99


# --- storage keys on the worker upload route ------------------------------------------------

#: key (as sent in the URL) → status; "{user}" is the leased job's owner.
UPLOAD_KEYS: dict[str, int] = {
    "{user}/../x.png": 400,
    "{user}/../sentinel.png": 400,
    "{user}/../../sentinel.png": 400,
    "{user}/../../../sentinel.png": 400,
    "{user}/%2e%2e/%2e%2e/%2e%2e/sentinel.png": 400,
    "{user}/%2E%2E/sentinel.png": 400,
    "{user}/..%2f..%2f..%2fsentinel.png": 400,
    "{user}/%252e%252e%252f%252e%252e%252fsentinel.png": 400,
    "{user}/%25252e%25252e/sentinel.png": 400,
    "{user}/..%5c..%5c..%5csentinel.png": 400,
    "{user}/a%5cb.png": 400,
    "{user}/x%00.png": 400,
    "{user}/x%2500.png": 400,
    "{user}/x%0a.png": 404,  # the router's path converter does not match a newline
    "{user}/%c0%ae%c0%ae/sentinel.png": 400,
    "{user}/%ed%a0%80.png": 400,
    "/{user}/x.png": 404,  # no route: a path never starts with "/" (and is no redirect)
    "%2f{user}/x.png": 404,
    "{user}//x.png": 400,
    "{user}/./x.png": 400,
    "{user}/.hidden.png": 400,
    "{user}/.tmp-0123": 400,
    "{user}": 400,
    "x.png": 400,
    "..": 400,
    "../{user}/x.png": 400,
    "{user}/" + "a" * 256: 400,
    "{user}/" + "a/" * 520 + "x.png": 400,
    "{other}/x.png": 403,
}


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_hostile_upload_keys_write_nothing_anywhere(external: tuple[Any, Any], db: Any, planted: Planted,
                                                    worker_headers: dict[str, str],
                                                    make_user: Callable[..., Any], method: str) -> None:
    app, client = external
    user_id, headers = make_user()
    other = str(uuid.uuid4())
    leased(client, headers, worker_headers)
    before_out, before_root = planted.outside(), tree(planted.root)
    for template, status in UPLOAD_KEYS.items():
        key = template.format(user=user_id, other=other)
        for extra in ({}, {"x-upsert": "true"}):
            resp = client.open(f"{UPLOAD}/image_fast/{key}", method=method, data=PNG,
                               headers={**worker_headers, "Content-Type": "image/png", **extra})
            assert resp.status_code == status, (key, resp.status_code, resp.get_data(as_text=True))
            assert_json_error(resp, status)
            assert_no_sentinel(resp, key)
        multipart = client.open(f"{UPLOAD}/image_fast/{key}", method=method, headers=worker_headers,
                                content_type="multipart/form-data",
                                data={"file": (io.BytesIO(PNG), "../../../sentinel.png")})
        assert multipart.status_code == status, (key, multipart.get_data(as_text=True))
    # Unknown or hostile buckets, and a bucket the worker holds no lease in.
    for bucket, status in (("no_such_bucket", 400), ("..", 400), ("%2e%2e", 400), ("IMAGE_FAST", 400),
                           ("image_fast%00", 400), ("video_fast", 403), ("sdxl_image_fast", 403)):
        resp = client.post(f"{UPLOAD}/{bucket}/{user_id}/x.png", data=PNG,
                           headers={**worker_headers, "Content-Type": "image/png"})
        assert resp.status_code in (status, 404) if bucket in ("..", "%2e%2e") else resp.status_code == status, \
            (bucket, resp.status_code, resp.get_data(as_text=True))
        assert resp.is_json
    assert planted.outside() == before_out
    assert tree(planted.root) == before_root
    for sentinel in planted.sentinels:
        assert sentinel.read_bytes() == SENTINEL
    # The legitimate upload still works, and a traversing multipart file name is ignored.
    ok = client.open(f"{UPLOAD}/image_fast/{user_id}/ok.png", method=method, headers=worker_headers,
                     content_type="multipart/form-data",
                     data={"file": (io.BytesIO(PNG), "../../../sentinel.png")})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert (planted.root / "image_fast" / user_id / "ok.png").read_bytes() == PNG
    assert planted.outside() == before_out
    for sentinel in planted.sentinels:
        assert sentinel.read_bytes() == SENTINEL


# --- the download route ---------------------------------------------------------------------


def _download_keys(user_id: str, around: Path) -> list[tuple[str, str]]:
    return [(b, k.format(user=user_id)) for b, k in [
        ("image_fast", "{user}/../../../sentinel.png"),
        ("image_fast", "{user}/../../sentinel.png"),
        ("image_fast", "{user}/../sentinel.png"),
        ("image_fast", "../sentinel.png"),
        ("image_fast", "../../sentinel.png"),
        ("image_fast", "sentinel.png"),
        ("image_fast", str(around / "sentinel.png")),
        ("image_fast", "/" + str(around / "sentinel.png")),
        ("image_fast", "{user}/%2e%2e/%2e%2e/%2e%2e/sentinel.png"),
        ("image_fast", "{user}/%252e%252e/%252e%252e/%252e%252e/sentinel.png"),
        ("image_fast", "{user}/..%2f..%2f..%2fsentinel.png"),
        ("image_fast", "{user}\\..\\..\\..\\sentinel.png"),
        ("image_fast", "{user}/..\\..\\..\\sentinel.png"),
        ("image_fast", "{user}/x\x00.png"),
        ("image_fast", "{user}/link.png"),            # a symlink to the outside sentinel
        ("image_fast", "{user}/dirlink/sentinel.png"),  # through a symlinked folder
        ("..", "sentinel.png"),
        ("..", "storage/sentinel.png"),
        ("no_such_bucket", "{user}/x.png"),
    ]]


def test_download_route_never_serves_a_file_outside_the_root(client: Any, app: Any, planted: Planted,
                                                             make_user: Callable[..., Any]) -> None:
    user_id, _ = make_user()
    signer = app.extensions["orchestrator"].signer
    user_dir = planted.root / "image_fast" / user_id
    user_dir.mkdir(parents=True)
    (user_dir / "link.png").symlink_to(planted.around / "sentinel.png")
    (user_dir / "dirlink").symlink_to(planted.around, target_is_directory=True)
    (user_dir / "ok.png").write_bytes(PNG)
    before = tree(planted.around)
    for bucket, key in _download_keys(user_id, planted.around):
        url = f"/v1/files/{quote(bucket, safe='')}/{quote(key, safe='/')}"
        unsigned = client.get(url)
        assert_json_error(unsigned, 404)
        assert_no_sentinel(unsigned, key)
        bogus = client.get(url, query_string={"expires": "9999999999", "sig": "0" * 64})
        assert_json_error(bogus, 404)
        # Even a link the service itself signed cannot leave the root.
        expires, sig = signer.sign(bucket, key)
        signed = client.get(url, query_string={"expires": str(expires), "sig": sig})
        assert signed.status_code in (400, 404), (bucket, key, signed.status_code)
        assert_json_error(signed, signed.status_code)
        assert_no_sentinel(signed, key)
    # Merged slashes are a key like any other, not a redirect.
    resp = client.get(f"/v1/files/image_fast//{planted.around}/sentinel.png")
    assert_json_error(resp, 404)
    assert tree(planted.around) == before
    # The control: a signed link to a real object inside the root works.
    expires, sig = signer.sign("image_fast", f"{user_id}/ok.png")
    ok = client.get(f"/v1/files/image_fast/{user_id}/ok.png", query_string={"expires": str(expires), "sig": sig})
    assert ok.status_code == 200 and ok.get_data() == PNG


# --- the service never fetches a URL it is given --------------------------------------------


@pytest.fixture
def trap() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _hit(self) -> None:
            hits.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(PNG)

        do_GET = do_POST = do_HEAD = do_PUT = _hit

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_urls_in_jobs_and_callbacks_are_never_fetched(client: Any, db: Any, worker_headers: dict[str, str],
                                                      make_user: Callable[..., Any],
                                                      make_client: Callable[..., Any], worker_runtime: Any,
                                                      trap: tuple[str, list[str]]) -> None:
    from tasks.generation import run_generation

    base, hits = trap
    user_id, headers = make_user()
    urls = {name: f"{base}/{name}.png" for name in (
        "image_url", "init_image", "url", "reference_image", "mask_url", "imageUrl", "input_image",
        "callback_url", "webhook_url", "webhook", "notify_url", "thumbnail_url", "video_url")}
    meta = {"prompt": "a lighthouse", **urls, "assets": [{"url": f"{base}/asset.png"}],
            "nested": {"url": f"{base}/nested.png", "list": [f"{base}/in-list.png"]}}
    jobs = []
    for job_type in ("sdxl_image_fast", "image_fast", "video_fast", "image7b_fast_enhanced"):
        resp = client.post(QUEUE, json={"jobType": job_type, "metadata": meta, **urls}, headers=headers)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        jobs.append(resp.get_json()["job"])
    rest = client.post(REST, json={"jobType": "image_fast", "metadata": meta}, headers=headers)
    assert rest.status_code == 201
    jobs.append(rest.get_json()["job"])
    for route in ("/v1/images", "/v1/videos", "/v1/projects"):
        assert client.post(route, json={"title": "t", **urls}, headers=headers).status_code == 201

    sdxl, image, video, enhanced, rest_job = jobs
    bucket_url = f"{base}/storage/v1/object/public/sdxl_image_fast/{user_id}"
    # A storage URL on the trap server is only parsed for its path.
    done = client.post(CALLBACK, headers=worker_headers, json={
        "job_id": sdxl["id"], "status": "completed", "metadata": urls,
        "assets": [{"url": f"{bucket_url}/a.png"}, f"{bucket_url}/b.png"],
        "thumbnail_url": f"{bucket_url}/thumb.png"})
    assert done.status_code == 200, done.get_data(as_text=True)
    record = client.get(f"/v1/jobs/{sdxl['id']}", headers=headers).get_json()
    assert [a["path"] for a in record["assets"]] == [f"{user_id}/a.png", f"{user_id}/b.png"]
    assert client.get(f"/v1/images/{sdxl['image_id']}", headers=headers).status_code == 200
    # Foreign URLs are refused without being fetched.
    for body in ({"job_id": image["id"], "assets": [{"url": f"{base}/x.png"}]},
                 {"job_id": image["id"], "assets": [f"{base}/x.png"]},
                 {"jobId": video["id"], "outputUrl": f"{base}/x.mp4"},
                 {"jobId": video["id"], "imageUrls": [f"{base}/x.mp4"]},
                 {"job_id": image["id"], "assets": [f"{user_id}/ok.png"], "thumbnail_url": f"{base}/t.png"}):
        resp = client.post(CALLBACK, json={**body, "status": "completed"}, headers=worker_headers)
        assert_json_error(resp, 400)
    # A worker that fails the job with URLs in its message: stored as text only.
    assert client.post(CALLBACK, headers=worker_headers, json={
        "jobId": video["id"], "status": "failed", "errorMessage": f"could not fetch {base}/x.png",
        "enhancedPrompt": f"see {base}/y.png"}).status_code == 200

    # The generation task runs the job's metadata without fetching anything.
    for job in (rest_job, enhanced):
        result = run_generation.apply(args=(job["id"],), task_id=job["id"])
        assert result.successful(), result.traceback
    assert client.get(f"/v1/jobs/{rest_job['id']}", headers=headers).get_json()["status"] == "completed"

    # External workers get the metadata as it was given; the service fetches nothing.
    _, ext = make_client(external_families=frozenset({"sdxl", "wan"}))
    queue(ext, headers, "image_fast", **urls)
    popped = ext.post("/rpop/wan_queue", headers=worker_headers)
    assert popped.status_code == 200 and popped.get_json()["result"]
    # The admin route with URLs in its metadata (nothing generates it here: a 504).
    admin_id, admin = make_user()
    queries.grant_role(db, admin_id)
    _, quick = make_client(admin_image_timeout=0.3)
    resp = quick.post(ADMIN, json={"prompt": "a castle", "metadata": meta}, headers=admin)
    assert resp.status_code == 504 and resp.is_json

    time.sleep(0.5)
    assert hits == []
    # The control: the trap does count a real request.
    with urllib.request.urlopen(f"{base}/control.png", timeout=5) as r:
        assert r.read() == PNG
    assert hits == ["GET /control.png"]
