"""Issue 4, isolation: one user never reaches, learns about or changes another
user's rows, and no request body or token claim grants roles or credits.

User B sends every per-user route user A's real ids; the answer must be the
same bytes (status and body) as for an id that does not exist. Only the
X-Request-Id header may differ.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, select

from orchestrator import queries
from orchestrator.jobtypes import JOB_TYPES
from orchestrator.models import Image, Job, Profile, Project, UserRole, Video
from orchestrator.status import JobStatus
from tests.helpers import assert_json_error, balance

QUEUE = "/functions/v1/queue-job"
CALLBACK = "/functions/v1/job-callback"
ADMIN = "/functions/v1/generate-admin-image"
PNG = b"\x89PNG\r\n\x1a\n" + b"A's private pixels" * 16


@dataclass
class World:
    """User A's rows in every state, and user B who owns nothing yet."""

    a_id: str
    a: dict[str, str]
    b_id: str
    b: dict[str, str]
    queued: dict[str, Any]        # sdxl image job, queued
    video: dict[str, Any]         # video job, queued
    failed: dict[str, Any]        # image job failed through the worker callback
    done: dict[str, Any]          # image job completed with a real file on disk
    project_id: str
    idle_image_id: str
    idle_video_id: str
    a_balance: int
    extra: dict[str, Any] = field(default_factory=dict)


def _queue(client: Any, headers: dict[str, str], job_type: str, **body: Any) -> dict[str, Any]:
    resp = client.post(QUEUE, json={"jobType": job_type, "metadata": {"prompt": "A's secret prompt"},
                                    **body}, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["job"]


def _callback(client: Any, worker_headers: dict[str, str], body: dict[str, Any]) -> None:
    resp = client.post(CALLBACK, json=body, headers=worker_headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)


@pytest.fixture
def world(client: Any, app: Any, worker_headers: dict[str, str],
          make_user: Callable[..., Any]) -> World:
    a_id, a = make_user()
    b_id, b = make_user()
    queued = _queue(client, a, "sdxl_image_fast")
    video = _queue(client, a, "video_fast")
    failed = _queue(client, a, "image_fast")
    _callback(client, worker_headers, {"job_id": failed["id"], "status": "failed",
                                       "error_message": "out of memory"})
    done = _queue(client, a, "image_fast")
    path = f"{a_id}/{done['id']}_0.png"
    app.extensions["orchestrator"].storage.write("image_fast", path, PNG, owner=a_id)
    _callback(client, worker_headers, {"job_id": done["id"], "status": "completed", "assets": [path]})
    done = client.get(f"/v1/jobs/{done['id']}", headers=a).get_json()
    assert done["status"] == "completed" and done["assets"][0]["path"] == path
    project = client.post("/v1/projects", json={"title": "A's", "original_prompt": "A's project"},
                          headers=a)
    idle_image = client.post("/v1/images", json={"title": "A's image"}, headers=a)
    idle_video = client.post("/v1/videos", json={"title": "A's video"}, headers=a)
    assert {project.status_code, idle_image.status_code, idle_video.status_code} == {201}
    return World(a_id=a_id, a=a, b_id=b_id, b=b, queued=queued, video=video, failed=failed,
                 done=done, project_id=project.get_json()["id"],
                 idle_image_id=idle_image.get_json()["id"],
                 idle_video_id=idle_video.get_json()["id"], a_balance=balance(client, a))


def a_state(db: Any, user_id: str) -> tuple[Any, ...]:
    """Every row of user A that a request of B could change."""
    with db.session() as s:
        def rows(model: Any, *cols: str) -> list[tuple[Any, ...]]:
            found = s.execute(select(model).where(model.user_id == user_id).order_by(model.id)).scalars()
            return [tuple(getattr(r, c) for c in cols) for r in found]

        return (
            rows(Job, "id", "status", "attempts", "charges", "credits", "error_message", "metadata_",
                 "result", "image_id", "video_id", "project_id", "updated_at"),
            rows(Image, "id", "status", "image_url", "prompt", "metadata_", "updated_at"),
            rows(Video, "id", "status", "video_url", "prompt", "metadata_", "updated_at"),
            rows(Project, "id", "title", "original_prompt", "enhanced_prompt", "updated_at"),
            s.execute(select(Profile.token_balance).where(Profile.id == user_id)).scalar_one(),
            s.execute(select(UserRole.role).where(UserRole.user_id == user_id)).scalars().all(),
        )


def job_count(db: Any, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(Job).where(Job.user_id == user_id)).scalar_one()


def assert_same_as_missing(theirs: Any, missing: Any, label: str = "") -> None:
    """A 404 JSON error with status, body and headers (but X-Request-Id) identical."""
    assert theirs.status_code == 404, (label, theirs.status_code, theirs.get_data(as_text=True))
    assert_json_error(theirs, 404)
    assert (theirs.status_code, theirs.get_data()) == (missing.status_code, missing.get_data()), label
    names = ({k for k, _ in theirs.headers} | {k for k, _ in missing.headers}) - {"X-Request-Id"}
    for name in names:
        assert theirs.headers.get(name) == missing.headers.get(name), (label, name)


# --- every per-user route with A's ids ------------------------------------------------------

#: name → (method, path template, body template); "{id}" is A's id or a random one.
ROUTES: dict[str, tuple[str, str, Any]] = {
    "get queued job": ("get", "/v1/jobs/{id}", None),
    "get completed job": ("get", "/v1/jobs/{id}", None),
    "cancel queued job": ("post", "/v1/jobs/{id}/cancel", None),
    "cancel completed job": ("post", "/v1/jobs/{id}/cancel", None),
    "retry failed job": ("post", "/v1/jobs/{id}/retry", None),
    "retry queued job": ("post", "/v1/jobs/{id}/retry", None),
    "get image": ("get", "/v1/images/{id}", None),
    "get completed image": ("get", "/v1/images/{id}", None),
    "get video": ("get", "/v1/videos/{id}", None),
    "get project": ("get", "/v1/projects/{id}", None),
    "queue-job projectId": ("post", QUEUE, {"jobType": "image_fast", "projectId": "{id}"}),
    "queue-job idle imageId": ("post", QUEUE, {"jobType": "image_fast", "imageId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "queue-job busy imageId": ("post", QUEUE, {"jobType": "sdxl_image_fast", "imageId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "queue-job idle videoId": ("post", QUEUE, {"jobType": "video_fast", "videoId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "queue-job busy videoId": ("post", QUEUE, {"jobType": "video_fast", "videoId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "rest projectId": ("post", "/v1/jobs", {"jobType": "video_fast", "projectId": "{id}"}),
    "rest busy imageId": ("post", "/v1/jobs", {"jobType": "sdxl_image_high", "imageId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "rest busy videoId": ("post", "/v1/jobs", {"jobType": "video_high", "videoId": "{id}",
                                               "metadata": {"prompt": "b"}}),
    "new image in project": ("post", "/v1/images", {"title": "b", "project_id": "{id}"}),
    "new video in project": ("post", "/v1/videos", {"title": "b", "project_id": "{id}"}),
}


def _a_id(world: World, route: str) -> str:
    return {
        "get queued job": world.queued["id"], "get completed job": world.done["id"],
        "cancel queued job": world.queued["id"], "cancel completed job": world.done["id"],
        "retry failed job": world.failed["id"], "retry queued job": world.queued["id"],
        "get image": world.idle_image_id, "get completed image": world.done["image_id"],
        "get video": world.video["video_id"], "get project": world.project_id,
        "queue-job projectId": world.project_id, "queue-job idle imageId": world.idle_image_id,
        "queue-job busy imageId": world.queued["image_id"],
        "queue-job idle videoId": world.idle_video_id,
        "queue-job busy videoId": world.video["video_id"], "rest projectId": world.project_id,
        "rest busy imageId": world.queued["image_id"], "rest busy videoId": world.video["video_id"],
        "new image in project": world.project_id, "new video in project": world.project_id,
    }[route]


def _fill(template: Any, value: str) -> Any:
    if isinstance(template, dict):
        return {k: _fill(v, value) for k, v in template.items()}
    return value if template == "{id}" else template


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "idempotency-key"])
def test_other_users_ids_answer_like_missing_ones(client: Any, db: Any, world: World,
                                                  route: str, keyed: bool) -> None:
    method, path, body = ROUTES[route]
    theirs_id = _a_id(world, route)
    before = a_state(db, world.a_id)

    def call(row_id: str, key: str) -> Any:
        headers = {**world.b, **({"Idempotency-Key": key} if keyed else {})}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = _fill(body, row_id)
        return getattr(client, method)(path.replace("{id}", row_id), **kwargs)

    theirs = call(theirs_id, "k-theirs")
    missing = call(str(uuid.uuid4()), "k-missing")
    assert_same_as_missing(theirs, missing, route)
    assert theirs.get_json()["code"] == "not_found"
    assert theirs_id not in theirs.get_data(as_text=True)
    assert world.a_id not in theirs.get_data(as_text=True)
    # Another spelling of A's id (upper case is canonicalised) is still not B's.
    upper = call(theirs_id.upper(), "k-upper")
    assert_same_as_missing(upper, missing)

    assert a_state(db, world.a_id) == before
    assert job_count(db, world.b_id) == 0
    assert balance(client, world.b) == 100
    assert balance(client, world.a) == world.a_balance


def test_idempotency_keys_are_per_user(client: Any, db: Any, world: World) -> None:
    """B reusing A's key and body gets B's own answer, never a replay of A's."""
    body = {"jobType": "image_fast", "metadata": {"prompt": "same body"}}
    first = client.post(QUEUE, json=body, headers={**world.a, "Idempotency-Key": "shared-key"})
    assert first.status_code == 200
    again = client.post(QUEUE, json=body, headers={**world.b, "Idempotency-Key": "shared-key"})
    assert again.status_code == 200, again.get_data(as_text=True)
    assert "Idempotent-Replayed" not in again.headers
    assert again.get_json()["job"]["user_id"] == world.b_id
    assert again.get_json()["job"]["id"] != first.get_json()["job"]["id"]
    assert world.a_id not in again.get_data(as_text=True)

    # A cancels with a key; B sending that key for A's job learns nothing.
    cancel = f"/v1/jobs/{world.queued['id']}/cancel"
    assert client.post(cancel, headers={**world.a, "Idempotency-Key": "c-1"}).status_code == 200
    theirs = client.post(cancel, headers={**world.b, "Idempotency-Key": "c-1"})
    missing = client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers={**world.b, "Idempotency-Key": "c-2"})
    assert_same_as_missing(theirs, missing)


# --- signed downloads are capabilities ------------------------------------------------------


def _split(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def _get(client: Any, path: str, query: dict[str, str], headers: dict[str, str] | None = None) -> Any:
    return client.get(path, query_string=query, headers=headers or {})


def test_signed_url_opens_only_its_own_file(client: Any, app: Any, world: World,
                                            make_user: Callable[..., Any]) -> None:
    signer = app.extensions["orchestrator"].signer
    storage = app.extensions["orchestrator"].storage
    asset = world.done["assets"][0]
    path, query = _split(asset["url"])
    # The link works, for anyone holding it (that is what a signed URL is).
    ok = _get(client, path, query, world.b)
    assert ok.status_code == 200 and ok.get_data() == PNG

    # Another user's real file, and B's own real file: A's signature opens neither.
    c_id, _ = make_user()
    storage.write("image_fast", f"{c_id}/c.png", b"C's file", owner=c_id)
    storage.write("image_fast", f"{world.b_id}/b.png", b"B's file", owner=world.b_id)
    # What a valid link to a file that does not exist answers: the reference.
    ghost = f"{world.a_id}/ghost.png"
    expires, sig = signer.sign("image_fast", ghost)
    missing = _get(client, f"/v1/files/image_fast/{ghost}", {"expires": str(expires), "sig": sig})
    assert_json_error(missing, 404)

    bad_sig = ("0" if query["sig"][0] != "0" else "1") + query["sig"][1:]
    attempts = {
        "other user's file": (f"/v1/files/image_fast/{c_id}/c.png", query),
        "own file": (f"/v1/files/image_fast/{world.b_id}/b.png", query),
        "other name": (path.replace(".png", "_1.png"), query),
        "other bucket": (path.replace("/image_fast/", "/image_high/"), query),
        "prefix of path": (path.rsplit("/", 1)[0], query),
        "path plus suffix": (path + ".png", query),
        "tampered signature": (path, {**query, "sig": bad_sig}),
        "shortened signature": (path, {**query, "sig": query["sig"][:-1]}),
        "no signature": (path, {"expires": query["expires"]}),
        "no expiry": (path, {"sig": query["sig"]}),
        "later expiry": (path, {**query, "expires": str(int(query["expires"]) + 1)}),
        "past expiry": (path, {**query, "expires": "1"}),
        "traversal to other user": (f"/v1/files/image_fast/{world.a_id}/../{c_id}/c.png", query),
    }
    for name, (p, q) in attempts.items():
        resp = _get(client, p, q, world.b)
        assert_same_as_missing(resp, missing, name)
        assert b"C's file" not in resp.get_data() and b"B's file" not in resp.get_data()
        assert PNG not in resp.get_data()


# --- lists and /v1/me -----------------------------------------------------------------------


def test_lists_never_include_other_users_rows(client: Any, world: World,
                                              worker_headers: dict[str, str]) -> None:
    b_job = _queue(client, world.b, "image_fast")
    a_ids = {world.queued["id"], world.video["id"], world.failed["id"], world.done["id"]}
    assert client.post(f"/v1/jobs/{world.video['id']}/cancel", headers=world.a).status_code == 200
    _callback(client, worker_headers, {"job_id": world.queued["id"], "status": "processing"})
    # A's jobs now span every status.
    a_listing = client.get("/v1/jobs?limit=1", headers=world.a).get_json()
    a_cursor = a_listing["next_cursor"]
    assert a_cursor
    statuses = {j["status"] for j in client.get("/v1/jobs", headers=world.a).get_json()["jobs"]}
    assert statuses == {"processing", "cancelled", "failed", "completed"}

    queries_ = ["", "?limit=1", "?limit=100", f"?cursor={a_cursor}", f"?limit=1&cursor={a_cursor}"]
    queries_ += [f"?status={s.value}" for s in JobStatus]
    queries_ += [f"?job_type={t}" for t in JOB_TYPES]
    queries_ += [f"?status={s.value}&job_type={t}&limit=5" for s in JobStatus
                 for t in ("image_fast", "sdxl_image_fast", "video_fast")]
    for q in queries_:
        resp = client.get(f"/v1/jobs{q}", headers=world.b)
        assert resp.status_code == 200, (q, resp.get_data(as_text=True))
        listed = resp.get_json()["jobs"]
        assert {j["id"] for j in listed} <= {b_job["id"]}, q
        assert all(j["user_id"] == world.b_id for j in listed), q
        text = resp.get_data(as_text=True)
        assert world.a_id not in text and not any(i in text for i in a_ids), q
    # Following B's own cursor never crosses into A's rows either.
    page = client.get("/v1/jobs?limit=1", headers=world.b).get_json()
    assert [j["id"] for j in page["jobs"]] == [b_job["id"]] and page["next_cursor"] is None

    me = client.get("/v1/me", headers=world.b)
    assert me.status_code == 200
    assert me.get_json() == {"user_id": world.b_id, "token_balance": 99, "roles": []}
    assert world.a_id not in me.get_data(as_text=True)


# --- admin ----------------------------------------------------------------------------------


def test_admin_endpoint_is_403_json_for_non_admins(client: Any, db: Any, world: World,
                                                   make_user: Callable[..., Any]) -> None:
    forged_id, forged = make_user(user_role="admin", app_metadata={"role": "admin"},
                                  user_metadata={"role": "admin"}, roles=["admin"], is_admin=True,
                                  admin=True)
    queries.grant_role(db, world.a_id)  # A is an admin; B naming A changes nothing
    for headers in (world.b, forged):
        for body in ({"prompt": "a castle"},
                     {"prompt": "a castle", "user_id": world.a_id, "userId": world.a_id,
                      "role": "admin", "metadata": {"user_id": world.a_id}}):
            resp = client.post(ADMIN, json=body, headers=headers)
            assert assert_json_error(resp, 403)["code"] == "forbidden"
    assert job_count(db, world.b_id) == job_count(db, forged_id) == 0
    me = client.get("/v1/me", headers=forged).get_json()
    assert me["roles"] == [] and me["token_balance"] == 100
    assert not queries.is_admin(db, forged_id) and not queries.is_admin(db, world.b_id)
    # A forged-claims token is still just its own user: A's rows stay A's.
    theirs = client.get(f"/v1/jobs/{world.done['id']}", headers=forged)
    missing = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=forged)
    assert_same_as_missing(theirs, missing)
    listed = client.get("/v1/jobs", headers=forged).get_json()["jobs"]
    assert listed == []


# --- no body field changes roles, balances or owners ----------------------------------------

PRIVILEGED: dict[str, Any] = {
    "role": "admin", "roles": ["admin"], "is_admin": True, "isAdmin": True, "admin": True,
    "user_role": "admin", "app_metadata": {"role": "admin"},
    "token_balance": 1_000_000, "tokenBalance": 1_000_000, "credits": 0, "balance": 1_000_000,
    "charges": 0, "cost": 0, "price": 0,
}


def _privileged(a_id: str) -> dict[str, Any]:
    return {**PRIVILEGED, "user_id": a_id, "userId": a_id, "owner": a_id, "sub": a_id}


def _db_balance(db: Any, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(Profile.token_balance).where(Profile.id == user_id)).scalar_one()


def _roles(db: Any) -> list[tuple[str, str]]:
    with db.session() as s:
        return [tuple(r) for r in s.execute(select(UserRole.user_id, UserRole.role)).all()]


def test_no_post_route_changes_roles_balances_or_owners(client: Any, db: Any, world: World,
                                                        worker_headers: dict[str, str]) -> None:
    b, b_id, a_id = world.b, world.b_id, world.a_id
    evil = _privileged(a_id)
    roles_before = _roles(db)
    a_before = a_state(db, a_id)
    expected = 100

    def check() -> None:
        me = client.get("/v1/me", headers=b).get_json()
        assert me == {"user_id": b_id, "token_balance": expected, "roles": []}
        assert _db_balance(db, b_id) == expected
        assert _roles(db) == roles_before
        assert not queries.is_admin(db, b_id)
        assert a_state(db, a_id) == a_before

    # queue-job: privileged fields at the top level and in metadata.
    resp = client.post(QUEUE, json={**evil, "jobType": "sdxl_image_fast",
                                    "metadata": {**evil, "prompt": "b's job"}}, headers=b)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    sdxl = resp.get_json()["job"]
    expected -= JOB_TYPES["sdxl_image_fast"].credits
    assert sdxl["user_id"] == b_id and sdxl["credits"] == JOB_TYPES["sdxl_image_fast"].credits
    assert resp.get_json()["tokenBalance"] == expected and resp.get_json()["creditsCharged"] == 1
    check()

    # POST /v1/jobs likewise.
    resp = client.post("/v1/jobs", json={**evil, "jobType": "video_fast",
                                         "metadata": {**evil, "prompt": "b's video"}}, headers=b)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    video = resp.get_json()["job"]
    expected -= JOB_TYPES["video_fast"].credits
    assert video["user_id"] == b_id and video["credits"] == JOB_TYPES["video_fast"].credits
    assert resp.get_json()["token_balance"] == expected
    check()

    # Pre-created rows and projects belong to the caller whatever the body says.
    for route in ("/v1/images", "/v1/videos", "/v1/projects"):
        resp = client.post(route, json={**evil, "title": "b's"}, headers=b)
        assert resp.status_code == 201, (route, resp.get_data(as_text=True))
        assert resp.get_json()["user_id"] == b_id
    check()

    # Cancel refunds exactly the job's credits, once, whatever the body claims.
    resp = client.post(f"/v1/jobs/{video['id']}/cancel", json=evil, headers=b)
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"
    expected += JOB_TYPES["video_fast"].credits
    check()
    again = client.post(f"/v1/jobs/{video['id']}/cancel", json=evil, headers=b)
    assert again.status_code in (200, 409) and again.get_json().get("status", "cancelled") == "cancelled"
    check()  # no second refund

    # A worker callback naming A as owner or claiming credits changes neither.
    resp = client.post(CALLBACK, json={**evil, "job_id": sdxl["id"], "status": "failed",
                                       "error_message": "boom", "metadata": evil},
                       headers=worker_headers)
    assert resp.status_code == 200 and resp.get_json()["status"] == "failed"
    expected += JOB_TYPES["sdxl_image_fast"].credits
    check()

    # Retry charges the job's price again, not the body's.
    resp = client.post(f"/v1/jobs/{sdxl['id']}/retry", json=evil, headers=b)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    expected -= JOB_TYPES["sdxl_image_fast"].credits
    assert resp.get_json()["token_balance"] == expected
    assert resp.get_json()["job"]["user_id"] == b_id
    check()

    # The admin route stays closed, with or without such fields.
    assert_json_error(client.post(ADMIN, json={**evil, "prompt": "x"}, headers=b), 403)
    check()

    with db.session() as s:
        owners = set(s.execute(select(Job.user_id).where(Job.id.in_([sdxl["id"], video["id"]])))
                     .scalars())
        credits = dict(s.execute(select(Job.id, Job.credits).where(Job.user_id == b_id)).all())
    assert owners == {b_id}
    assert credits == {sdxl["id"]: 1, video["id"]: 3}
    assert job_count(db, a_id) == 4
