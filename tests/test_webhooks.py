"""Standard Webhooks signing/verification (orchestrator.webhooks)."""
from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from orchestrator.errors import Unauthorized
from orchestrator.webhooks import has_signature_headers, sign, signing_key, verify

NOW = 1_700_000_000
SECRET = "whsec_" + base64.b64encode(b"super-secret-key-bytes-0123456789").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-key-bytes-98765432").decode()
BODY = b'{"job_id": "abc", "status": "done"}'


def headers(secret: str = SECRET, *, msg_id: str = "msg_1", ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def test_signing_key_decodes_whsec() -> None:
    assert signing_key("whsec_" + base64.b64encode(b"\x00\x01raw").decode()) == b"\x00\x01raw"
    assert signing_key("plain-secret") == b"plain-secret"
    assert signing_key("whsec_" + "YWJj") == b"abc"


def test_signing_key_rejects_broken_whsec_config() -> None:
    with pytest.raises(ValueError):
        signing_key("whsec_!!!not base64!!!")


def test_sign_matches_spec_format() -> None:
    key = b"abc"
    expected = base64.b64encode(hmac.new(key, b"id1.123.hello", hashlib.sha256).digest()).decode()
    assert sign("whsec_YWJj", "id1", 123, b"hello") == f"v1,{expected}"


def test_round_trip_returns_id() -> None:
    assert verify([SECRET], headers(msg_id="msg_42"), BODY, now=NOW) == "msg_42"


def test_headers_are_case_insensitive() -> None:
    upper = {k.title(): v for k, v in headers().items()}
    assert verify([SECRET], upper, BODY, now=NOW) == "msg_1"


def test_plain_secret_round_trip() -> None:
    assert verify(["plain"], headers("plain"), BODY, now=NOW) == "msg_1"


def test_rotation_second_secret_works() -> None:
    assert verify([OTHER, SECRET], headers(SECRET), BODY, now=NOW) == "msg_1"


def test_multiple_signatures_in_header() -> None:
    h = headers(SECRET)
    other_sig = sign(OTHER, "msg_1", NOW, BODY)
    h["webhook-signature"] = f"v2,abcd {other_sig} v1,!!garbage {h['webhook-signature']}"
    assert verify([SECRET], h, BODY, now=NOW) == "msg_1"
    assert verify([OTHER], h, BODY, now=NOW) == "msg_1"


def test_other_versions_are_ignored() -> None:
    h = headers()
    h["webhook-signature"] = h["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(Unauthorized, match="invalid webhook signature"):
        verify([SECRET], h, BODY, now=NOW)


def test_flipped_body_byte_rejected() -> None:
    tampered = bytearray(BODY)
    tampered[5] ^= 0x01
    with pytest.raises(Unauthorized, match="invalid webhook signature"):
        verify([SECRET], headers(), bytes(tampered), now=NOW)


def test_tampered_id_rejected() -> None:
    h = headers()
    h["webhook-id"] = "msg_2"
    with pytest.raises(Unauthorized):
        verify([SECRET], h, BODY, now=NOW)


def test_wrong_secret_rejected_without_leaking() -> None:
    with pytest.raises(Unauthorized) as info:
        verify([OTHER], headers(SECRET), BODY, now=NOW)
    text = str(info.value) + repr(info.value.details)
    assert OTHER not in text and SECRET not in text
    assert sign(OTHER, "msg_1", NOW, BODY).split(",")[1] not in text


def test_no_secrets_rejects() -> None:
    with pytest.raises(Unauthorized):
        verify([], headers(), BODY, now=NOW)


@pytest.mark.parametrize("offset", [-360, 360])
def test_timestamp_outside_tolerance(offset: int) -> None:
    h = headers(ts=NOW + offset)
    with pytest.raises(Unauthorized, match="timestamp outside tolerance"):
        verify([SECRET], h, BODY, now=NOW)


@pytest.mark.parametrize("offset", [-299, 0, 299])
def test_timestamp_within_tolerance(offset: int) -> None:
    assert verify([SECRET], headers(ts=NOW + offset), BODY, now=NOW) == "msg_1"


def test_default_now_is_wall_clock() -> None:
    with pytest.raises(Unauthorized, match="timestamp"):
        verify([SECRET], headers(ts=NOW), BODY)  # 2023 is far in the past


MALFORMED: list[tuple[str, Any]] = [
    ("empty", {}),
    ("missing id", {"webhook-timestamp": str(NOW), "webhook-signature": "v1,AAAA"}),
    ("missing signature", {"webhook-id": "m", "webhook-timestamp": str(NOW)}),
    ("blank values", {"webhook-id": " ", "webhook-timestamp": "", "webhook-signature": ""}),
    ("non-int timestamp", {"webhook-id": "m", "webhook-timestamp": "soon", "webhook-signature": "v1,AAAA"}),
    ("float timestamp", {"webhook-id": "m", "webhook-timestamp": f"{NOW}.5", "webhook-signature": "v1,AAAA"}),
    ("negative timestamp", {"webhook-id": "m", "webhook-timestamp": "-5", "webhook-signature": "v1,AAAA"}),
    ("huge timestamp", {"webhook-id": "m", "webhook-timestamp": "9" * 5000, "webhook-signature": "v1,AAAA"}),
    ("bad base64", {"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1,%%%%"}),
    ("no comma", {"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1"}),
    ("empty sig", {"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1,"}),
    ("non-str values", {"webhook-id": 5, "webhook-timestamp": NOW, "webhook-signature": None}),
    ("surrogate id", {"webhook-id": "\udc80", "webhook-timestamp": str(NOW), "webhook-signature": "v1,AAAA"}),
]


@pytest.mark.parametrize("hdrs", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_headers_raise_only_unauthorized(hdrs: Any) -> None:
    with pytest.raises(Unauthorized):
        verify([SECRET], hdrs, BODY, now=NOW)


def test_missing_headers_message() -> None:
    with pytest.raises(Unauthorized, match="missing webhook headers"):
        verify([SECRET], {}, BODY, now=NOW)


def test_has_signature_headers() -> None:
    assert has_signature_headers(headers())
    assert has_signature_headers({"Webhook-Signature": "v1,AAAA"})
    assert not has_signature_headers({"Authorization": "Bearer x"})
    assert not has_signature_headers({})
