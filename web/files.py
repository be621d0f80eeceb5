"""Downloads through signed, expiring URLs (the asset ``url`` of a job record).

A bad, tampered or expired link is a 404, like a missing file: it reveals
nothing about what exists.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request, send_file

from orchestrator.storage import content_type_for
from web.services import services

bp = Blueprint("files", __name__, url_prefix="/v1/files")


# merge_slashes=False: "//" is part of the (then refused) key, never an HTML redirect.
@bp.get("/<bucket>/<path:key>", merge_slashes=False)
def download(bucket: str, key: str) -> Any:
    svc = services()
    svc.signer.verify(bucket, key, request.args.get("expires", ""), request.args.get("sig", ""))
    handle = svc.storage.open(bucket, key)
    response = send_file(handle, mimetype=content_type_for(key), max_age=300, conditional=True,
                         download_name=key.rsplit("/", 1)[-1])
    response.headers["Cache-Control"] = "private, max-age=300"
    return response
