"""The per-app service objects, built once in ``create_app`` and kept on the app."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

from flask import current_app, request

from orchestrator.config import Settings
from orchestrator import queues
from orchestrator.db import Database
from orchestrator.dispatch_marks import DispatchMarks
from orchestrator.queues import Estimates
from orchestrator.records import job_record
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
    estimates: Estimates
    dispatch_marks: DispatchMarks

    def url_for_asset(self, bucket: str, path: str) -> str:
        """A signed, expiring download URL (works in ``<img src>``, no header needed)."""
        expires, sig = self.signer.sign(bucket, path)
        base = self.settings.public_url or request.host_url.rstrip("/")
        return f"{base}/v1/files/{quote(bucket)}/{quote(path)}?expires={expires}&sig={sig}"


    def job_answer(self, job: Any, position: int | None = None) -> dict[str, Any]:
        """A job record with signed URLs, and ``queue_position``/``eta_seconds`` when queued.

        ``position``: known by the caller (a new job is last in its queue); else looked up.
        """
        if position is None and job.status == queues.QUEUED:
            return self.job_answers([job])[0]
        record = job_record(job, self.url_for_asset)
        self.estimates.annotate([record], {job.id: position} if position else {})
        return record

    def job_answers(self, jobs: list[Any]) -> list[dict[str, Any]]:
        """Records of several jobs; one query for the positions of the queued ones."""
        queued = [j.id for j in jobs if j.status == queues.QUEUED]
        found: dict[str, int] = {}
        if queued:
            with self.db.session() as session:
                found = queues.positions(session, queued)
        records = [job_record(j, self.url_for_asset) for j in jobs]
        self.estimates.annotate(records, found)
        return records


def signing_key(settings: Settings) -> bytes:
    """URL-signing key derived from the JWT secret (one secret to rotate, separate uses)."""
    return hmac.new(settings.jwt_secret.encode(), b"orchestrator/url-signing/v1",
                    hashlib.sha256).digest()


def services() -> Services:
    return current_app.extensions["orchestrator"]
