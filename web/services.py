"""The per-app service objects, built once in ``create_app`` and kept on the app."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

from flask import current_app, request

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.revocation import RevocationList
from orchestrator.storage import LocalStorage, UrlSigner

Publisher = Callable[[str, str], None]


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: LocalStorage
    signer: UrlSigner
    publish: Publisher
    revocations: RevocationList

    def url_for_asset(self, bucket: str, path: str) -> str:
        """A signed, expiring download URL (works in ``<img src>``, no header needed)."""
        expires, sig = self.signer.sign(bucket, path)
        base = self.settings.public_url or request.host_url.rstrip("/")
        return f"{base}/v1/files/{quote(bucket)}/{quote(path)}?expires={expires}&sig={sig}"


def signing_key(settings: Settings) -> bytes:
    """URL-signing key derived from the JWT secret (one secret to rotate, separate uses)."""
    return hmac.new(settings.jwt_secret.encode(), b"orchestrator/url-signing/v1",
                    hashlib.sha256).digest()


def services() -> Services:
    return current_app.extensions["orchestrator"]
