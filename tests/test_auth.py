"""Authentication matrix: user JWTs on the user routes, worker credentials on
the callback. Every rejection is a 401 JSON body, never a 422 or a 500."""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import jwt
import pytest

from orchestrator.models import Image, Job

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

QUEUE_BODY = {"jobType": "sdxl_image_fast", "metadata": {"prompt": "a lighthouse at dusk"}}


def _claims(settings: Any, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(uuid.uuid4()), "aud": settings.jwt_audience,
                              "role": "authenticated", "iat": now, "exp": now + 3600}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key=None, algorithm="none")


def bad_auth_cases(settings: Any) -> dict[str, tuple[dict[str, str], str]]:
    """name → (headers, query string) of a request that must be refused."""
    s = settings.jwt_secret
    good_token = jwt.encode(_claims(settings), s, algorithm="HS256")
    return {
        "missing header": ({}, ""),
        "bearer with nothing": ({"Authorization": "Bearer"}, ""),
        "bearer with blank": ({"Authorization": "Bearer   "}, ""),
        "wrong scheme": ({"Authorization": f"Basic {good_token}"}, ""),
        "malformed token": (_bearer("not-a.jwt.token"), ""),
        "garbage token": (_bearer("abc"), ""),
        "alg none": (_bearer(_unsigned(_claims(settings))), ""),
        "wrong secret": (_bearer(jwt.encode(_claims(settings), s + "-nope", algorithm="HS256")), ""),
        "hs512 right secret": (_bearer(jwt.encode(_claims(settings), s, algorithm="HS512")), ""),
        "expired": (_bearer(jwt.encode(_claims(settings, iat=int(time.time()) - 7200,
                                                exp=int(time.time()) - 60), s, algorithm="HS256")), ""),
        "no exp": (_bearer(jwt.encode(_claims(settings, exp=_DROP), s, algorithm="HS256")), ""),
        "no aud": (_bearer(jwt.encode(_claims(settings, aud=_DROP), s, algorithm="HS256")), ""),
        "wrong aud": (_bearer(jwt.encode(_claims(settings, aud="anon"), s, algorithm="HS256")), ""),
        "role anon": (_bearer(jwt.encode(_claims(settings, role="anon"), s, algorithm="HS256")), ""),
        "role service_role": (_bearer(jwt.encode(_claims(settings, role="service_role"), s,
                                                 algorithm="HS256")), ""),
        "no role": (_bearer(jwt.encode(_claims(settings, role=_DROP), s, algorithm="HS256")), ""),
        "non-uuid sub": (_bearer(jwt.encode(_claims(settings, sub="alice"), s, algorithm="HS256")), ""),
        "integer sub": (_bearer(jwt.encode(_claims(settings, sub=12345), s, algorithm="HS256")), ""),
        "no sub": (_bearer(jwt.encode(_claims(settings, sub=_DROP), s, algorithm="HS256")), ""),
        "token only in query string": ({}, f"jwt={good_token}&access_token={good_token}&token={good_token}"),
        "worker token as user token": (_bearer(settings.worker_token), ""),
    }


CASE_NAMES = [
    "missing header", "bearer with nothing", "bearer with blank", "wrong scheme", "malformed token",
    "garbage token", "alg none", "wrong secret", "hs512 right secret", "expired", "no exp", "no aud",
    "wrong aud", "role anon", "role service_role", "no role", "non-uuid sub", "integer sub", "no sub",
    "token only in query string", "worker token as user token",
]


def assert_unauthorized(resp: Any) -> None:
    assert resp.status_code == 401, (resp.status_code, resp.get_data(as_text=True))
    assert resp.is_json, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is False
    assert body["code"] == "unauthorized"
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in resp.get_data(as_text=True)


def _job_count(db: Any) -> int:
    from sqlalchemy import func, select

    with db.session() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def test_case_table_is_complete(settings: Any) -> None:
    assert sorted(bad_auth_cases(settings)) == sorted(CASE_NAMES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_me_rejects_bad_user_credentials(client: Any, settings: Any, case: str) -> None:
    headers, query = bad_auth_cases(settings)[case]
    resp = client.get("/v1/me" + (f"?{query}" if query else ""), headers=headers)
    assert_unauthorized(resp)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_queue_job_rejects_bad_user_credentials(client: Any, settings: Any, db: Any, case: str) -> None:
    headers, query = bad_auth_cases(settings)[case]
    resp = client.post("/functions/v1/queue-job" + (f"?{query}" if query else ""),
                       json=QUEUE_BODY, headers=headers)
    assert_unauthorized(resp)
    assert _job_count(db) == 0


def test_valid_token_is_accepted(client: Any, settings: Any, db: Any) -> None:
    user_id = str(uuid.uuid4())
    token = jwt.encode(_claims(settings, sub=user_id), settings.jwt_secret, algorithm="HS256")
    me = client.get("/v1/me", headers=_bearer(token))
    assert me.status_code == 200, me.get_data(as_text=True)
    assert me.get_json()["user_id"] == user_id
    queued = client.post("/functions/v1/queue-job", json=QUEUE_BODY, headers=_bearer(token))
    assert queued.status_code == 200, queued.get_data(as_text=True)
    assert queued.get_json()["job"]["user_id"] == user_id
    assert _job_count(db) == 1


def test_make_user_fixture_token_is_accepted(client: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    resp = client.get("/v1/me", headers=headers)
    assert resp.status_code == 200
    assert resp.get_json()["user_id"] == user_id


# --- worker side -----------------------------------------------------------------------------


def _queued_job(client: Any, make_user: Callable[..., Any]) -> tuple[str, str]:
    user_id, headers = make_user()
    resp = client.post("/functions/v1/queue-job", json=QUEUE_BODY, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return user_id, resp.get_json()["job"]["id"]


def _snapshot(db: Any, job_id: str) -> tuple[Any, ...]:
    with db.session() as s:
        job = s.get(Job, job_id)
        image = s.get(Image, job.image_id)
        return (job.status, job.progress, job.attempts, job.started_at, job.completed_at,
                job.error_message, job.result, job.metadata_, job.updated_at,
                image.status, image.image_url, image.updated_at)


@pytest.mark.parametrize("case", ["no auth", "wrong bearer", "user jwt", "empty bearer",
                                  "worker token wrong scheme", "worker token in query"])
@pytest.mark.parametrize("status", ["completed", "failed", "processing"])
def test_callback_rejects_bad_worker_credentials(client: Any, db: Any, settings: Any,
                                                 make_user: Callable[..., Any], case: str,
                                                 status: str) -> None:
    user_id, job_id = _queued_job(client, make_user)
    before = _snapshot(db, job_id)
    _, user_headers = make_user()
    headers = {
        "no auth": {},
        "wrong bearer": _bearer(settings.worker_token + "x"),
        "user jwt": user_headers,
        "empty bearer": {"Authorization": "Bearer "},
        "worker token wrong scheme": {"Authorization": f"Token {settings.worker_token}"},
        "worker token in query": {},
    }[case]
    url = "/functions/v1/job-callback"
    if case == "worker token in query":
        url += f"?token={settings.worker_token}&apikey={settings.worker_token}"
    body = {"job_id": job_id, "status": status, "assets": [f"{user_id}/out_0.png"],
            "error_message": "nope"}
    resp = client.post(url, json=body, headers=headers)
    assert_unauthorized(resp)
    assert _snapshot(db, job_id) == before
    assert before[0] == "queued"
    # and the balance was not refunded by the refused "failed" callback
    me = client.get("/v1/me", headers=_user_headers_for(settings, user_id)).get_json()
    assert me["token_balance"] == 99


def _user_headers_for(settings: Any, user_id: str) -> dict[str, str]:
    from orchestrator.tokens import mint_user_token

    return _bearer(mint_user_token(settings, user_id))


def test_callback_accepts_worker_bearer(client: Any, db: Any, worker_headers: dict[str, str],
                                        make_user: Callable[..., Any]) -> None:
    """The control for the matrix above: the same request with the worker token works."""
    _, job_id = _queued_job(client, make_user)
    resp = client.post("/functions/v1/job-callback", json={"job_id": job_id, "status": "processing"},
                       headers=worker_headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert _snapshot(db, job_id)[0] == "processing"


def test_worker_token_not_accepted_on_user_route_with_lowercase_scheme(client: Any,
                                                                       settings: Any) -> None:
    resp = client.get("/v1/me", headers={"Authorization": f"bearer {settings.worker_token}"})
    assert_unauthorized(resp)
