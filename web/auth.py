"""Authentication: user JWTs (flask-jwt-extended) and worker credentials.

User tokens are Supabase-compatible JWTs: ``sub`` a user uuid, ``aud`` and
``role`` ``authenticated``, ``exp`` required, ``nbf`` honoured, ``iss`` checked
when ``JWT_ISSUER`` is set, only in the ``Authorization`` header. They are
HS256 under ``JWT_SECRET``, or, when ``JWT_JWKS`` names a key set, signed by one
of its public keys (chosen by ``kid``, each key with its own algorithm: a token
cannot pick an algorithm its key was not made for). Revoked sessions and users
(``orchestrator revoke``) are refused. Workers authenticate with the bearer
worker token or a Standard Webhooks signature; neither kind of credential is
accepted for the other. Every failure is a 401 JSON body.

A user token that passed every check is kept, by its exact text, in a bounded
per-app cache (``JWT_CACHE_SIZE`` most recently used; 0 disables it), so the
next request with it is not decoded and verified again (what Envoy's
``jwt_cache_config`` does). Keys and secrets are fixed for the app's life, so
what was verified stays verified except for time and revocation: on every hit
``exp``, ``nbf`` and ``iat`` are checked against the clock again, and the
revocation list is consulted as on a miss. Failures are never cached.
"""
from __future__ import annotations

import functools
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, TypeVar

from flask import Flask, current_app, g, request
from flask_jwt_extended import JWTManager, get_jwt, get_jwt_header, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException, NoAuthorizationError
from jwt import ExpiredSignatureError, PyJWK, PyJWKSet, PyJWTError
from jwt.exceptions import InvalidTokenError

from orchestrator import queries, webhooks
from orchestrator.config import ConfigurationError
from orchestrator.errors import Forbidden, Unauthorized
from web.errors import error_response
from web.services import services

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds of clock skew allowed on ``exp``/``nbf``/``iat`` (PyJWT's and the cache's).
LEEWAY = 0
#: Where an app keeps its cache of verified tokens (absent when ``JWT_CACHE_SIZE`` is 0).
CACHE_KEY = "orchestrator.verified_tokens"
#: A compact JWS as flask-jwt-extended takes it from ``Authorization: Bearer <token>``:
#: three non-empty base64url parts, nothing else (no space, no comma), so the text
#: after "Bearer " is exactly the token that was verified.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class VerifiedTokens:
    """Tokens that passed every check, by their exact text; the least recently used
    one goes when more than ``size`` are kept. Safe to share between threads.

    An entry is ``(claims, header, user_id, exp, not_before)``: what the request
    needs, and the two instants (whole seconds, as PyJWT compares them) outside of
    which the token is refused again.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a token cache holds at least one token")
        self.size = size
        self._entries: OrderedDict[str, tuple[dict[str, Any], dict[str, Any], str, int, float]] \
            = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> tuple[dict[str, Any], dict[str, Any], str, int, float] | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is not None:
                self._entries.move_to_end(token)
            return entry

    def put(self, token: str, claims: dict[str, Any], header: dict[str, Any], user_id: str) -> None:
        """Keep a token that has just passed every check (its claims are copied)."""
        exp = int(claims["exp"])
        not_before = max((int(claims[name]) for name in ("nbf", "iat") if name in claims),
                         default=float("-inf"))
        entry = (dict(claims), dict(header), user_id, exp, not_before)
        with self._lock:
            self._entries[token] = entry
            self._entries.move_to_end(token)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def discard(self, token: str) -> None:
        with self._lock:
            self._entries.pop(token, None)


def load_jwks(raw: str | None) -> dict[str, PyJWK]:
    """``JWT_JWKS`` (inline JSON or a file path) as ``kid`` → key; {} when unset.

    Raises:
        ConfigurationError: unreadable, not a key set, a key without ``kid``,
            or a symmetric key (HS256 has its own secret, ``JWT_SECRET``).
    """
    if not raw:
        return {}
    text = raw if raw.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(raw).read_text()
        except OSError as e:
            raise ConfigurationError(f"JWT_JWKS: cannot read {raw!r} ({e.strerror})") from None
    try:
        keys = PyJWKSet.from_dict(json.loads(text)).keys
    except (ValueError, PyJWTError) as e:
        raise ConfigurationError(f"JWT_JWKS is not a usable JSON Web Key Set: {e}") from None
    found: dict[str, PyJWK] = {}
    for key in keys:
        if not key.key_id:
            raise ConfigurationError("JWT_JWKS: every key needs a kid")
        if key.algorithm_name.startswith("HS"):
            raise ConfigurationError("JWT_JWKS holds public keys only; HS256 uses JWT_SECRET")
        found[key.key_id] = key
    return found


def init_app(app: Flask) -> None:
    settings = app.extensions["orchestrator"].settings
    jwks = load_jwks(settings.jwt_jwks)
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret,
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=sorted({"HS256", *(k.algorithm_name for k in jwks.values())}),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_DECODE_AUDIENCE=settings.jwt_audience,
        JWT_DECODE_ISSUER=settings.jwt_issuer,
        JWT_IDENTITY_CLAIM="sub",
        JWT_DECODE_LEEWAY=LEEWAY,
    )
    jwt = JWTManager(app)
    # One cache per app: another app in this process may trust other keys.
    if settings.jwt_cache_size > 0:
        app.extensions[CACHE_KEY] = VerifiedTokens(settings.jwt_cache_size)

    @jwt.decode_key_loader
    def _key(header: dict[str, Any], _payload: dict[str, Any]) -> Any:
        """The key for this token's header, tied to one algorithm."""
        alg = header.get("alg")
        if alg == "HS256":
            return settings.jwt_secret
        key = jwks.get(header.get("kid")) if isinstance(header.get("kid"), str) else None
        if key is None or key.algorithm_name != alg:
            raise InvalidTokenError("no key for this token's kid and alg")
        return key.key

    def _reject(message: str) -> Any:
        return error_response(401, message, "unauthorized")

    jwt.unauthorized_loader(lambda reason: _reject("Missing or malformed Authorization header"))
    jwt.invalid_token_loader(lambda reason: _reject("Invalid token"))
    jwt.expired_token_loader(lambda header, payload: _reject("Token expired"))
    jwt.revoked_token_loader(lambda header, payload: _reject("Token revoked"))
    jwt.needs_fresh_token_loader(lambda header, payload: _reject("Fresh token required"))
    jwt.user_lookup_error_loader(lambda header, payload: _reject("Unknown user"))
    jwt.token_verification_failed_loader(lambda header, payload: _reject("Invalid token"))


def _verify_user_token() -> tuple[dict[str, Any], str]:
    """Decode and verify the request's token in full; its claims and canonical user id."""
    try:
        verify_jwt_in_request()
    except NoAuthorizationError:
        raise Unauthorized("Missing or malformed Authorization header") from None
    except ExpiredSignatureError:
        raise Unauthorized("Token expired") from None
    except (JWTExtendedException, PyJWTError):
        raise Unauthorized("Invalid token") from None
    claims = get_jwt()
    if "exp" not in claims:
        raise Unauthorized("Token has no expiry")
    if claims.get("role") != "authenticated":
        raise Unauthorized("Token is not a user token")
    sub = queries.canonical_uuid(claims.get("sub"))
    if sub is None:
        raise Unauthorized("Token subject is not a user id")
    return claims, sub


def _authenticate_user() -> str:
    """The request's user id, from a token verified now or found in the app's cache.

    A hit skips ``verify_jwt_in_request`` and so any flask-jwt-extended callback
    (none is registered today: no blocklist, user or claims loader); a check that
    must run on every request belongs here, beside the revocation check.
    """
    cache: VerifiedTokens | None = current_app.extensions.get(CACHE_KEY)
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else ""
    entry = cache.get(token) if cache is not None and token else None
    if entry is None:
        claims, sub = _verify_user_token()
    else:
        # Verified before, with the same keys: only time and revocation can change.
        cached_claims, jwt_header, sub, exp, not_before = entry
        now = time.time()
        if exp <= now - LEEWAY:
            cache.discard(token)  # type: ignore[union-attr]
            raise Unauthorized("Token expired")
        if not_before > now + LEEWAY:
            raise Unauthorized("Invalid token")
        claims = dict(cached_claims)
        # What verify_jwt_in_request leaves, so get_jwt() and get_jwt_header() work.
        g._jwt_extended_jwt_user = None
        g._jwt_extended_jwt_header = dict(jwt_header)
        g._jwt_extended_jwt = claims
        g._jwt_extended_jwt_location = "headers"
    if services().revocations.is_revoked(claims, sub):
        raise Unauthorized("Token revoked")
    if entry is None and cache is not None and _COMPACT_JWS.fullmatch(token):
        cache.put(token, claims, get_jwt_header(), sub)
    g.user_id = sub
    return sub


def user_required(view: F) -> F:
    """The view runs with ``g.user_id`` set to an authenticated user's uuid."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _authenticate_user()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def admin_required(view: F) -> F:
    """Authenticated, and holding the ``admin`` role (granted only by the CLI)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user_id = _authenticate_user()
        if not queries.is_admin(services().db, user_id):
            raise Forbidden("Admin role required")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def authenticate_worker() -> str:
    """Check worker credentials on the current request; return how it authenticated.

    Raises:
        Unauthorized: neither a valid worker bearer token nor a valid signature.
    """
    settings = services().settings
    if webhooks.has_signature_headers(request.headers):
        webhook_id = webhooks.verify(settings.worker_secrets, request.headers, request.get_data())
        g.webhook_id = webhook_id
        return "signature"
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token and hmac.compare_digest(
            token.strip().encode(), settings.worker_token.encode()):
        return "bearer"
    raise Unauthorized("Worker authentication required")


def worker_required(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        g.worker_auth = authenticate_worker()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
