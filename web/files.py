"""Downloads through signed, expiring URLs (the asset ``url`` of a job record).

A bad, tampered or expired link is a 404, like a missing file: it reveals
nothing about what exists.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request, send_file
from pydantic import ValidationError

from orchestrator.errors import NotFound
from orchestrator.storage import content_type_for
from web.openapi import Reply, spec
from web.schemas import BINARY, Bucket, ErrorBody, FileQuery, StorageKey
from web.services import services

bp = Blueprint("files", __name__, url_prefix="/v1/files")


# merge_slashes=False: "//" is part of the (then refused) key, never an HTML redirect.
@bp.get("/<bucket>/<path:key>", merge_slashes=False)
@spec(summary="Download a file through a signed link", tags=["files"],
      path={"bucket": Bucket, "key": StorageKey}, query=FileQuery, responses={
          200: Reply(description="The file", content={
              "image/png": BINARY, "video/mp4": BINARY, "application/octet-stream": BINARY}),
          206: Reply(description="The requested byte range (`Range`)", content={
              "image/png": BINARY, "video/mp4": BINARY, "application/octet-stream": BINARY}),
          304: Reply(description="Not modified (`If-None-Match` / `If-Modified-Since`)"),
          404: Reply(ErrorBody, "No such file, or a bad, tampered or expired link"),
          416: Reply(ErrorBody, "Range not satisfiable")},
      description="The `url` of a job's asset: no header needed (works in `<img src>`).")
def download(bucket: str, key: str) -> Any:
    svc = services()
    try:
        link = FileQuery.model_validate(request.args.to_dict())
    except ValidationError:
        raise NotFound("file not found") from None
    svc.signer.verify(bucket, key, link.expires, link.sig)
    handle = svc.storage.open(bucket, key)
    response = send_file(handle, mimetype=content_type_for(key), max_age=300, conditional=True,
                         download_name=key.rsplit("/", 1)[-1])
    response.headers["Cache-Control"] = "private, max-age=300"
    return response
