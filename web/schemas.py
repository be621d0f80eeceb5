"""Request bodies, as pydantic models: they validate requests (and will
generate the OpenAPI document from the same source)."""
from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import InvalidRequest

MAX_METADATA_BYTES = 16 * 1024
#: Deepest nesting of arrays/objects a request body may have (the body itself is depth 1).
MAX_JSON_DEPTH = 32

M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class QueueJobBody(_Body):
    """CONTRACT §2; camelCase as the legacy clients send it (snake_case accepted)."""

    job_type: str = Field(alias="jobType", min_length=1, max_length=64)
    metadata: dict[str, Any] | None = None
    project_id: str | None = Field(default=None, alias="projectId", max_length=64)
    video_id: str | None = Field(default=None, alias="videoId", max_length=64)
    image_id: str | None = Field(default=None, alias="imageId", max_length=64)


class AdminImageBody(_Body):
    prompt: str = Field(min_length=1, max_length=4000)
    mode: str | None = Field(default=None, max_length=32)
    metadata: dict[str, Any] | None = None


class ProjectBody(_Body):
    title: str | None = Field(default=None, max_length=200)
    original_prompt: str | None = Field(default=None, max_length=4000)
    enhanced_prompt: str | None = Field(default=None, max_length=4000)
    media_type: str | None = Field(default=None, max_length=16)


class AssetBody(_Body):
    title: str | None = Field(default=None, max_length=200)
    prompt: str | None = Field(default=None, max_length=4000)
    project_id: str | None = Field(default=None, max_length=64)


def parse(model: type[M]) -> M:
    """The JSON body as ``model``; 400 for anything that is not a JSON object of that shape."""
    return model.model_validate(parse_object())


def parse_object() -> dict[str, Any]:
    """The JSON body as a dict; 400 for invalid JSON or anything but an object."""
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw or b"null", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest("Request body must be valid JSON") from e
    if b"\\u0000" in raw.lower():
        raise InvalidRequest("Strings must not contain NUL characters")
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"Request body is nested deeper than {MAX_JSON_DEPTH} levels")
    for name in ("metadata",):
        if name in data and len(json.dumps(data[name])) > MAX_METADATA_BYTES:
            raise InvalidRequest(f"{name} is larger than {MAX_METADATA_BYTES} bytes",
                                 details={"field": name})
    return data


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in
                             (node.values() if isinstance(node, dict) else node))
    return deepest


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python accepts them; PostgreSQL does not)."""
    raise ValueError(f"{name} is not valid JSON")
