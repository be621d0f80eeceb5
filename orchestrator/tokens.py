"""Minting user JWTs (development and operators). Verification lives in ``web.auth``.

Tokens look like Supabase's: HS256, ``sub`` = user uuid, ``aud`` and ``role`` =
``authenticated``, ``exp`` always set.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from orchestrator.config import Settings


def mint_user_token(settings: Settings, user_id: str, *, ttl_seconds: int = 3600,
                    role: str = "authenticated", extra: dict[str, Any] | None = None) -> str:
    """A signed user token valid for ``ttl_seconds``."""
    uuid.UUID(user_id)  # raises ValueError for a malformed id
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id, "aud": settings.jwt_audience, "role": role, "iat": now,
        "exp": now + ttl_seconds, "session_id": str(uuid.uuid4()),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    claims.update(extra or {})
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
