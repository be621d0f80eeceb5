"""Standard Webhooks (https://www.standardwebhooks.com/) signing and verification.

Generation backends call us back when a job finishes; anyone on the internet
can reach that endpoint, so each callback must prove it was signed with a
shared secret.  We follow the Standard Webhooks scheme because the providers
we integrate with already speak it:

* signed content: ``f"{webhook-id}.{webhook-timestamp}.".encode() + body``
* signature: ``"v1," + base64(HMAC-SHA256(key, content))``
* ``webhook-signature`` may carry several space-separated signatures so a
  sender can rotate its secret; we likewise accept several secrets.
* secrets written ``whsec_<base64>`` are the base64 of the real key.

Verification failures raise only :class:`~orchestrator.errors.Unauthorized`
with short, fixed messages: callers are untrusted, so nothing about the
secrets or the expected signature may leak, and malformed input must never
surface as a 500.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.errors import Unauthorized

__all__ = [
    "ID_HEADER",
    "TIMESTAMP_HEADER",
    "SIGNATURE_HEADER",
    "DEFAULT_TOLERANCE",
    "signing_key",
    "sign",
    "verify",
    "has_signature_headers",
]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"

#: Seconds a signed message stays acceptable (either direction); bounds replay.
DEFAULT_TOLERANCE = 300

_SECRET_PREFIX = "whsec_"
_VERSION = "v1"
# Unix seconds; at most 12 digits so int() never works on attacker-sized input.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")

_MISSING = "missing webhook headers"
_STALE = "webhook timestamp outside tolerance"
_INVALID = "invalid webhook signature"


def signing_key(secret: str) -> bytes:
    """Turn a configured secret into HMAC key bytes.

    ``whsec_<base64>`` secrets (the Standard Webhooks format) decode the
    base64 part; anything else is used verbatim as UTF-8 so plain shared
    secrets from older configs keep working.  A ``whsec_`` secret with broken
    base64 raises :class:`ValueError`: that is a configuration mistake and
    must fail loudly rather than silently become a different key.
    """
    if secret.startswith(_SECRET_PREFIX):
        encoded = secret[len(_SECRET_PREFIX):]
        encoded += "=" * (-len(encoded) % 4)  # tolerate stripped padding
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("webhook secret has invalid base64 after 'whsec_'") from exc
    return secret.encode("utf-8")


def _digest(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    """HMAC-SHA256 over the Standard Webhooks signed content."""
    content = f"{msg_id}.{timestamp}.".encode("utf-8") + bytes(body)
    return hmac.new(key, content, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64>`` signature for one message.

    Used by tests and by our own outgoing callbacks so both ends share one
    implementation of the signed-content format.
    """
    digest = _digest(signing_key(secret), msg_id, int(timestamp), body)
    return f"{_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    """Case-insensitive header lookup that tolerates odd mapping types.

    Works for plain dicts (any key casing) and for framework header objects.
    Non-string or blank values count as missing.
    """
    value: Any = None
    try:
        value = headers.get(name)
        if value is None:
            for key, candidate in headers.items():
                if isinstance(key, str) and key.lower() == name:
                    value = candidate
                    break
    except Exception:  # a hostile/odd mapping must not turn into a 500
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except Exception:
            return None
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _candidate_signatures(header: str) -> list[bytes]:
    """Decode every ``v1,<base64>`` entry; other versions and junk are ignored."""
    found: list[bytes] = []
    for entry in header.split():
        version, sep, encoded = entry.partition(",")
        if not sep or version != _VERSION or not encoded:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> str:
    """Check a signed webhook and return its ``webhook-id``.

    Accepts when any ``v1`` signature in the header matches under any of
    ``secrets`` (so both sides can rotate without downtime) and the timestamp
    is within ``tolerance`` seconds of ``now`` (limits replay).  Raises
    :class:`Unauthorized` for every failure, including malformed headers.
    The returned id lets the caller de-duplicate redeliveries.
    """
    msg_id = _header(headers, ID_HEADER)
    raw_timestamp = _header(headers, TIMESTAMP_HEADER)
    signature_header = _header(headers, SIGNATURE_HEADER)
    if msg_id is None or raw_timestamp is None or signature_header is None:
        raise Unauthorized(_MISSING)

    if not _TIMESTAMP_RE.fullmatch(raw_timestamp):
        raise Unauthorized(_STALE)
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise Unauthorized(_STALE)

    try:
        msg_id.encode("utf-8")  # lone surrogates would fail inside _digest
        payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    except Exception:
        raise Unauthorized(_INVALID) from None

    candidates = _candidate_signatures(signature_header)
    if not candidates:
        raise Unauthorized(_INVALID)

    matched = False
    for secret in secrets:
        expected = _digest(signing_key(secret), msg_id, timestamp, payload)
        for candidate in candidates:
            # No early exit: keep timing independent of which entry matched.
            if hmac.compare_digest(expected, candidate):
                matched = True
    if not matched:
        raise Unauthorized(_INVALID)
    return msg_id


def has_signature_headers(headers: Mapping[str, str]) -> bool:
    """True if the request carries *any* Standard Webhooks header.

    Lets an endpoint choose webhook verification over other auth schemes.
    A partial set still counts, on purpose: a sender that signs but drops a
    header then gets a clear "missing webhook headers" error instead of
    silently falling through to a different authentication path.
    """
    return any(
        _header(headers, name) is not None
        for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    )
