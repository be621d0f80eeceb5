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


def _rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ec_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


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
        "rs256 unknown key": (_bearer(jwt.encode(_claims(settings), _rsa_key(), algorithm="RS256")), ""),
        "es256 unknown key": (_bearer(jwt.encode(_claims(settings), _ec_key(), algorithm="ES256",
                                                 headers={"kid": "k1"})), ""),
        "future nbf": (_bearer(jwt.encode(_claims(settings, nbf=int(time.time()) + 300), s,
                                          algorithm="HS256")), ""),
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
    "garbage token", "alg none", "wrong secret", "hs512 right secret", "rs256 unknown key",
    "es256 unknown key", "future nbf", "expired", "no exp", "no aud",
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


# --- issuer, asymmetric keys, revocation -------------------------------------------------------


def _app_with(settings: Any, **env: str) -> Any:
    """A second app on the same database with extra configuration."""
    import dataclasses

    from web import create_app

    changed = dataclasses.replace(settings, **env)
    return create_app(changed, publisher=lambda job_id, job_type: None)


@pytest.mark.parametrize("case", ["wrong iss", "no iss", "right iss"])
def test_issuer_checked_when_configured(settings: Any, db: Any, case: str) -> None:
    app = _app_with(settings, jwt_issuer="https://auth.example.test/auth/v1")
    claims = _claims(settings, iss={"wrong iss": "https://evil.example/auth/v1", "no iss": _DROP,
                                    "right iss": "https://auth.example.test/auth/v1"}[case])
    resp = app.test_client().get("/v1/me", headers=_bearer(jwt.encode(claims, settings.jwt_secret,
                                                                       algorithm="HS256")))
    if case == "right iss":
        assert resp.status_code == 200, resp.get_data(as_text=True)
    else:
        assert_unauthorized(resp)


def _jwks(*pairs: tuple[str, Any]) -> str:
    import json

    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    keys = []
    for kid, private in pairs:
        algo = ECAlgorithm if hasattr(private, "curve") else RSAAlgorithm
        jwk = json.loads(algo.to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig"})
    return json.dumps({"keys": keys})


def test_jwks_keys_accepted_each_with_its_own_algorithm(settings: Any, db: Any) -> None:
    """JWT_JWKS adds public keys chosen by kid; HS256 under JWT_SECRET keeps working;
    a token cannot pick another algorithm or another key's kid."""
    from cryptography.hazmat.primitives import serialization

    ec_key, rsa_key = _ec_key(), _rsa_key()
    app = _app_with(settings, jwt_jwks=_jwks(("ec-1", ec_key), ("rsa-1", rsa_key)))
    client = app.test_client()

    def me(token: str) -> Any:
        return client.get("/v1/me", headers=_bearer(token))

    good = _claims(settings)
    assert me(jwt.encode(good, ec_key, algorithm="ES256", headers={"kid": "ec-1"})).status_code == 200
    assert me(jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})).status_code == 200
    assert me(jwt.encode(good, settings.jwt_secret, algorithm="HS256")).status_code == 200
    # the EC key named as the RSA key's kid, an unknown kid, no kid, another curve's key:
    assert_unauthorized(me(jwt.encode(good, ec_key, algorithm="ES256", headers={"kid": "rsa-1"})))
    assert_unauthorized(me(jwt.encode(good, ec_key, algorithm="ES256", headers={"kid": "nope"})))
    assert_unauthorized(me(jwt.encode(good, ec_key, algorithm="ES256")))
    assert_unauthorized(me(jwt.encode(good, _ec_key(), algorithm="ES256", headers={"kid": "ec-1"})))
    # algorithm confusion: HMAC over the published public key
    public_pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    # (PyJWT refuses to HMAC with a PEM key, so the token is built by hand)
    import base64
    import hashlib
    import hmac as hmac_lib
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode()) + "."
                     + b64(json.dumps(good).encode()))
    sig = hmac_lib.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert_unauthorized(me(signing_input + "." + b64(sig)))
    # the role and subject rules hold for asymmetric tokens too
    assert_unauthorized(me(jwt.encode(_claims(settings, role="service_role"), ec_key,
                                      algorithm="ES256", headers={"kid": "ec-1"})))


@pytest.mark.parametrize("raw", ["{not json", '{"keys": "x"}', "/nonexistent/jwks.json",
                                 '{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}'])
def test_bad_jwks_is_a_startup_error(settings: Any, raw: str) -> None:
    from orchestrator.config import ConfigurationError

    with pytest.raises(ConfigurationError, match="JWT_JWKS"):
        _app_with(settings, jwt_jwks=raw)


def _revoke(settings: Any, *args: str) -> str:
    """Run ``orchestrator revoke`` against the test database."""
    from click.testing import CliRunner

    from orchestrator import cli
    from orchestrator.config import get_settings

    get_settings.cache_clear()
    env = {"DATABASE_URL": settings.database_url, "REVOCATION_REFRESH_SECONDS": "0"}
    try:
        result = CliRunner().invoke(cli.main, ["revoke", *args], env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return result.output


def test_revoked_session_is_refused_and_survives_restart(settings: Any, db: Any) -> None:
    app = _app_with(settings, revocation_refresh_seconds=0.0)
    user_id = str(uuid.uuid4())
    revoked = jwt.encode(_claims(settings, sub=user_id, session_id="sess-a"), settings.jwt_secret,
                         algorithm="HS256")
    other = jwt.encode(_claims(settings, sub=user_id, session_id="sess-b"), settings.jwt_secret,
                       algorithm="HS256")
    by_jti = jwt.encode(_claims(settings, sub=user_id, jti="jti-c"), settings.jwt_secret,
                        algorithm="HS256")
    client = app.test_client()
    assert client.get("/v1/me", headers=_bearer(revoked)).status_code == 200
    assert "revoked session sess-a" in _revoke(settings, "--session", "sess-a")
    _revoke(settings, "--session", "jti-c")
    assert_unauthorized(client.get("/v1/me", headers=_bearer(revoked)))
    assert_unauthorized(client.get("/v1/me", headers=_bearer(by_jti)))
    assert client.get("/v1/me", headers=_bearer(other)).status_code == 200
    # a new process (a fresh app, nothing cached) still refuses it: it is in the database
    restarted = _app_with(settings).test_client()
    assert_unauthorized(restarted.get("/v1/me", headers=_bearer(revoked)))
    assert_unauthorized(restarted.post("/functions/v1/queue-job", json=QUEUE_BODY,
                                       headers=_bearer(revoked)))
    assert _job_count(db) == 0


def test_revoked_user_refuses_older_tokens_only(settings: Any, db: Any) -> None:
    app = _app_with(settings, revocation_refresh_seconds=0.0)
    client = app.test_client()
    user_id, bystander = str(uuid.uuid4()), str(uuid.uuid4())
    old = jwt.encode(_claims(settings, sub=user_id, iat=int(time.time()) - 10), settings.jwt_secret,
                     algorithm="HS256")
    no_iat = jwt.encode(_claims(settings, sub=user_id, iat=_DROP), settings.jwt_secret,
                        algorithm="HS256")
    theirs = jwt.encode(_claims(settings, sub=bystander), settings.jwt_secret, algorithm="HS256")
    _revoke(settings, "--user", user_id.upper(), "--reason", "stolen laptop")
    assert_unauthorized(client.get("/v1/me", headers=_bearer(old)))
    assert_unauthorized(client.get("/v1/me", headers=_bearer(no_iat)))
    assert client.get("/v1/me", headers=_bearer(theirs)).status_code == 200
    # signing in again after the revocation works (iat has whole seconds)
    time.sleep(1.1)
    fresh = jwt.encode(_claims(settings, sub=user_id, iat=int(time.time())), settings.jwt_secret,
                       algorithm="HS256")
    assert client.get("/v1/me", headers=_bearer(fresh)).status_code == 200


def test_revoke_command_needs_exactly_one_target(settings: Any, db: Any) -> None:
    from click.testing import CliRunner

    from orchestrator import cli

    runner = CliRunner()
    env = {"DATABASE_URL": settings.database_url}
    assert runner.invoke(cli.main, ["revoke"], env=env).exit_code != 0
    assert runner.invoke(cli.main, ["revoke", "--session", "a", "--user", str(uuid.uuid4())],
                         env=env).exit_code != 0
    assert runner.invoke(cli.main, ["revoke", "--user", "alice"], env=env).exit_code != 0


# --- the cache of verified tokens -----------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times PyJWT verified a token's signature (one entry per call): the
    cache's misses. (flask-jwt-extended also decodes each token once unverified, to
    read its header and claims before choosing the key; those are not counted.)"""
    calls: list[int] = []
    real = jwt.api_jwt.PyJWT.decode_complete

    def counting(self: Any, token: Any, key: Any = "", algorithms: Any = None,
                 options: Any = None, *args: Any, **kwargs: Any) -> Any:
        if (options or {}).get("verify_signature", True):
            calls.append(1)
        return real(self, token, key, algorithms, options, *args, **kwargs)

    monkeypatch.setattr(jwt.api_jwt.PyJWT, "decode_complete", counting)
    return calls


def _cache_of(app: Any) -> Any:
    from web.auth import CACHE_KEY

    return app.extensions.get(CACHE_KEY)


def _error(resp: Any) -> str:
    assert_unauthorized(resp)
    return resp.get_json()["error"]


def _hs256(settings: Any, **overrides: Any) -> str:
    return jwt.encode(_claims(settings, **overrides), settings.jwt_secret, algorithm="HS256")


def test_seen_token_is_not_decoded_again(settings: Any, db: Any, decodes: list[int]) -> None:
    app = _app_with(settings)
    client = app.test_client()
    user_id = str(uuid.uuid4())
    token = _hs256(settings, sub=user_id)
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert len(decodes) == 1 and len(_cache_of(app)) == 1
    for _ in range(3):
        me = client.get("/v1/me", headers=_bearer(token))
        assert me.status_code == 200 and me.get_json()["user_id"] == user_id
    queued = client.post("/functions/v1/queue-job", json=QUEUE_BODY, headers=_bearer(token))
    assert queued.status_code == 200, queued.get_data(as_text=True)
    assert queued.get_json()["job"]["user_id"] == user_id
    assert len(decodes) == 1  # every later request was a hit


def test_cached_token_is_refused_once_expired(settings: Any, db: Any, decodes: list[int]) -> None:
    app = _app_with(settings)
    client = app.test_client()
    exp = int(time.time()) + 2
    token = _hs256(settings, exp=exp)
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert len(decodes) == 1
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    assert _error(client.get("/v1/me", headers=_bearer(token))) == "Token expired"
    assert len(decodes) == 1  # refused by the cache's own clock check, not by PyJWT
    assert len(_cache_of(app)) == 0  # and dropped
    assert _error(client.get("/v1/me", headers=_bearer(token))) == "Token expired"
    assert len(decodes) > 1  # a miss now: PyJWT refuses it


def test_cached_token_not_yet_valid_is_refused(settings: Any, db: Any) -> None:
    """``nbf`` is checked on a hit too (as if the clock had stepped back since)."""
    app = _app_with(settings)
    client = app.test_client()
    user_id = str(uuid.uuid4())
    token = _hs256(settings, sub=user_id)
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    claims = jwt.decode(token, options={"verify_signature": False})
    _cache_of(app).put(token, {**claims, "nbf": int(time.time()) + 300},
                       jwt.get_unverified_header(token), user_id)
    assert _error(client.get("/v1/me", headers=_bearer(token))) == "Invalid token"


@pytest.mark.parametrize("kind", ["session", "user"])
def test_cached_token_is_refused_once_revoked(settings: Any, db: Any, decodes: list[int],
                                              kind: str) -> None:
    app = _app_with(settings, revocation_refresh_seconds=0.0)
    client = app.test_client()
    user_id = str(uuid.uuid4())
    token = _hs256(settings, sub=user_id, session_id="sess-cached", iat=int(time.time()) - 5)
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    _revoke(settings, *(["--session", "sess-cached"] if kind == "session" else ["--user", user_id]))
    assert _error(client.get("/v1/me", headers=_bearer(token))) == "Token revoked"
    assert _error(client.post("/functions/v1/queue-job", json=QUEUE_BODY,
                              headers=_bearer(token))) == "Token revoked"
    assert len(decodes) == 1  # refused on hits: revocation is checked on every request
    assert _job_count(db) == 0


def test_revoked_token_is_not_cached(settings: Any, db: Any) -> None:
    app = _app_with(settings, revocation_refresh_seconds=0.0)
    token = _hs256(settings, session_id="sess-gone")
    _revoke(settings, "--session", "sess-gone")
    assert _error(app.test_client().get("/v1/me", headers=_bearer(token))) == "Token revoked"
    assert len(_cache_of(app)) == 0


def test_altered_copies_of_a_cached_token_are_refused(settings: Any, db: Any) -> None:
    app = _app_with(settings)
    client = app.test_client()
    token = _hs256(settings)
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    head, payload, sig = token.split(".")
    flipped = sig[:5] + ("A" if sig[5] != "A" else "B") + sig[6:]
    other_payload = _hs256(settings).split(".")[1]  # another user's claims, this signature
    for bad in (f"{head}.{payload}.{flipped}", f"{head}.{other_payload}.{sig}",
                f"{head}.{payload}.", f"{head}.{payload}"):
        assert _error(client.get("/v1/me", headers=_bearer(bad))) == "Invalid token", bad
    # the header must hold exactly one bearer token, spelt "Bearer", as without a cache
    for header in (f"bearer {token}", f"Bearer {token}, Bearer {token}", f"Bearer  {token} x",
                   f"Bearer {token}.", f"Basic {token}"):
        assert_unauthorized(client.get("/v1/me", headers={"Authorization": header}))
    assert len(_cache_of(app)) == 1
    assert client.get("/v1/me", headers=_bearer(token)).status_code == 200


def test_failures_are_not_cached(settings: Any, db: Any) -> None:
    app = _app_with(settings)
    client = app.test_client()
    for name, (headers, query) in bad_auth_cases(settings).items():
        assert_unauthorized(client.get("/v1/me" + (f"?{query}" if query else ""), headers=headers))
        assert len(_cache_of(app)) == 0, name


def test_cache_keeps_the_most_recently_used_within_its_size(settings: Any, db: Any,
                                                            decodes: list[int]) -> None:
    app = _app_with(settings, jwt_cache_size=3)
    client = app.test_client()
    tokens = [_hs256(settings) for _ in range(4)]
    for token in tokens[:3]:
        assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert client.get("/v1/me", headers=_bearer(tokens[0])).status_code == 200  # now the newest
    assert len(decodes) == 3
    assert client.get("/v1/me", headers=_bearer(tokens[3])).status_code == 200  # tokens[1] goes
    assert len(_cache_of(app)) == 3 and len(decodes) == 4
    assert client.get("/v1/me", headers=_bearer(tokens[0])).status_code == 200
    assert len(decodes) == 4
    assert client.get("/v1/me", headers=_bearer(tokens[1])).status_code == 200
    assert len(decodes) == 5 and len(_cache_of(app)) == 3
    for _ in range(20):
        assert client.get("/v1/me", headers=_bearer(_hs256(settings))).status_code == 200
    assert len(_cache_of(app)) == 3


def test_cache_size_zero_verifies_every_request(settings: Any, db: Any, decodes: list[int]) -> None:
    app = _app_with(settings, jwt_cache_size=0)
    assert _cache_of(app) is None
    client = app.test_client()
    token = _hs256(settings)
    for _ in range(3):
        assert client.get("/v1/me", headers=_bearer(token)).status_code == 200
    assert len(decodes) == 3


def test_cache_size_setting() -> None:
    from orchestrator.config import ConfigurationError, Settings

    assert Settings.from_env({}).jwt_cache_size == 10000
    assert Settings.from_env({"JWT_CACHE_SIZE": "0"}).jwt_cache_size == 0
    for bad in ("-1", "many"):
        with pytest.raises(ConfigurationError, match="JWT_CACHE_SIZE"):
            Settings.from_env({"JWT_CACHE_SIZE": bad})


def test_apps_with_other_secrets_share_no_cache(settings: Any, db: Any) -> None:
    first = _app_with(settings, jwt_secret="first-secret-" + "a" * 32)
    second = _app_with(settings, jwt_secret="second-secret-" + "b" * 32)
    token = jwt.encode(_claims(settings), "first-secret-" + "a" * 32, algorithm="HS256")
    assert first.test_client().get("/v1/me", headers=_bearer(token)).status_code == 200
    assert first.test_client().get("/v1/me", headers=_bearer(token)).status_code == 200
    assert _error(second.test_client().get("/v1/me", headers=_bearer(token))) == "Invalid token"
    assert len(_cache_of(second)) == 0 and _cache_of(first) is not _cache_of(second)
    # nor with another issuer setting
    strict = _app_with(settings, jwt_secret="first-secret-" + "a" * 32,
                       jwt_issuer="https://auth.example.test/auth/v1")
    assert _error(strict.test_client().get("/v1/me", headers=_bearer(token))) == "Invalid token"


def test_get_jwt_works_on_a_hit(settings: Any, db: Any) -> None:
    from flask_jwt_extended import get_jwt, get_jwt_header, get_jwt_identity

    from web import auth

    app = _app_with(settings)
    user_id = str(uuid.uuid4())
    token = _hs256(settings, sub=user_id, session_id="sess-x")
    for attempt in range(3):
        with app.test_request_context("/v1/me", headers=_bearer(token)):
            assert auth._authenticate_user() == user_id
            claims = get_jwt()
            assert claims["sub"] == user_id and claims["session_id"] == "sess-x"
            assert claims["role"] == "authenticated" and claims["type"] == "access"
            assert get_jwt_identity() == user_id and get_jwt_header()["alg"] == "HS256"
            claims["role"] = "anon"  # a request's copy: the cached claims stay as verified
        assert len(_cache_of(app)) == 1
