"""The OpenAPI 3.0 document (``GET /openapi.json``) and its interactive docs (``GET /docs``).

The document is generated, never kept by hand. Each view declares its contract
with :func:`spec`: the pydantic models (``web.schemas``) that validate its body,
query and headers, the models of its answers, the statuses it can give, who may
call it. The decorator only attaches that metadata to the view; the document is
built from ``app.url_map`` on first request, so its paths and methods are the
routes Flask really serves, and its schemas are the models that really validate
(``tests/test_openapi.py`` checks both and runs schemathesis against it).

``/docs`` is Swagger UI from the installed ``swagger_ui_bundle`` (no CDN) with
an initializer script served from here: no inline script, so it works under a
``script-src 'self'`` Content-Security-Policy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from pydantic import BaseModel, TypeAdapter
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import NotFound
from werkzeug.routing import Rule

from web.schemas import ErrorBody, IdempotencyKey

F = TypeVar("F", bound=Callable[..., Any])

OPENAPI_VERSION = "3.0.3"
REF = "#/components/schemas/{model}"
ATTRIBUTE = "__openapi__"
HIDDEN = "__openapi_hidden__"

#: Who may call an operation → its security requirement (alternatives).
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "user": [{"userJWT": []}],
    "admin": [{"userJWT": []}],
    "worker": [{"workerToken": []}, {"webhookSignature": []}],
}

SECURITY_SCHEMES: dict[str, Any] = {
    "userJWT": {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": (
            "A user's Supabase-style JWT: HS256 under `JWT_SECRET` (or a `JWT_JWKS` public key "
            "chosen by `kid`), `sub` = the user's uuid, `aud` and `role` = `authenticated`, "
            "`exp` required. `generate-admin-image` also needs the admin role (granted only "
            "with `orchestrator grant-admin`; token claims never make an admin)."),
    },
    "workerToken": {
        "type": "http", "scheme": "bearer",
        "description": "External GPU workers: `Authorization: Bearer <WORKER_TOKEN>`.",
    },
    "webhookSignature": {
        "type": "apiKey", "in": "header", "name": "webhook-signature",
        "description": (
            "Standard Webhooks (https://www.standardwebhooks.com/), instead of the worker token: "
            "`webhook-id` (a message id; a redelivery of the same id and body is answered as the "
            "first time, the same id with another body is a 409), `webhook-timestamp` (Unix "
            "seconds, within 5 minutes of now) and `webhook-signature`: `v1,<base64 of "
            "HMAC-SHA256(key, \"<webhook-id>.<webhook-timestamp>.<body>\")>`, several "
            "space-separated for rotation; the key is `WORKER_SECRET` (`whsec_<base64>` decoded). "
            "Any of the three headers present selects this scheme."),
    },
}

RESPONSE_HEADERS: dict[str, Any] = {
    "X-Request-Id": {
        "description": "The request's id (the caller's `X-Request-Id` when well formed); in the logs",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}},
    "Idempotent-Replayed": {
        "description": "Present on an answer replayed for a repeated `Idempotency-Key` or `webhook-id`",
        "schema": {"type": "string", "enum": ["true"]}},
    "Retry-After": {"description": "Seconds to wait before trying again",
                    "schema": {"type": "integer", "minimum": 0}},
}

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: malformed JSON, a value outside its schema, or a rule the schema "
         "cannot say (e.g. no prompt anywhere)",
    401: "Missing or invalid credentials",
    402: "Not enough credits for this job type",
    403: "Authenticated, but not allowed",
    404: "Not found; another user's row is indistinguishable from a missing one",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Idempotency-Key reused with a different request",
    429: "Too many submissions, or too many active jobs; see Retry-After",
    502: "The generation failed",
    503: "The database is unavailable; try again shortly",
    504: "The generation did not finish within the wait; it continues",
}


@dataclass(frozen=True)
class Reply:
    """A documented answer: a JSON ``model`` (pydantic), or raw ``content`` by media type."""

    model: Any = None
    description: str | None = None
    content: Mapping[str, Any] | None = None
    headers: Sequence[str] = ()


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: ``endpoint`` (a Flask endpoint name) with parameters from this answer."""

    endpoint: str
    parameters: Mapping[str, str]
    description: str | None = None


@dataclass(frozen=True)
class Operation:
    summary: str
    tags: tuple[str, ...]
    responses: Mapping[int, Any]
    description: str | None = None
    auth: str | None = None
    body: Any = None
    body_content: Mapping[str, Any] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    path: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    links: Mapping[int, Mapping[str, Link]] = field(default_factory=dict)
    idempotent: bool = False
    body_unless: str | None = None


def spec(*, summary: str, tags: Sequence[str], responses: Mapping[int, Any],
         description: str | None = None, auth: str | None = None, body: Any = None,
         body_content: Mapping[str, Any] | None = None, body_required: bool = True,
         query: type[BaseModel] | None = None, path: Mapping[str, Any] | None = None,
         headers: Mapping[str, Any] | None = None, errors: Iterable[int] = (),
         links: Mapping[int, Mapping[str, Link]] | None = None, idempotent: bool = False,
         body_unless: str | None = None) -> Callable[[F], F]:
    """Attach a view's contract; nothing else changes about the view.

    Args:
        summary, description, tags: for the reader.
        responses: status → answer model (or :class:`Reply`).
        auth: ``"user"``, ``"admin"``, ``"worker"`` or None (public).
        body: the pydantic model of the JSON body (the one the view validates with).
        body_content: media type → type or JSON schema, for bodies that are not one JSON model.
        query, path, headers: the query model; path parameter and header name → type.
        errors: the error statuses beyond the ones implied (401/403 by ``auth``, 400/413 by a
            body, 400 by a query or headers).
        links: status → name → :class:`Link` (stateful testing and readers follow them).
        idempotent: takes ``Idempotency-Key`` (documents the header, the 422 and the replay).
        body_unless: no body on the rule that has this path argument (the value comes from
            the path there).
    """
    if auth not in (None, *SECURITY):
        raise ValueError(f"auth must be one of {sorted(SECURITY)} or None")
    operation = Operation(
        summary=summary, tags=tuple(tags), responses=dict(responses), description=description,
        auth=auth, body=body, body_content=body_content, body_required=body_required,
        query=query, path=dict(path or {}), headers=dict(headers or {}), errors=tuple(errors),
        links=dict(links or {}), idempotent=idempotent, body_unless=body_unless)

    def attach(view: F) -> F:
        setattr(view, ATTRIBUTE, operation)
        return view

    return attach


def hidden(view: F) -> F:
    """Keep a route out of the document (the docs' own static assets only)."""
    setattr(view, HIDDEN, True)
    return view


# --- pydantic (JSON Schema 2020-12) → OpenAPI 3.0 schema objects ------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_ONE = ("items", "additionalProperties", "not")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_NULL = {"type": "null"}


def to_oas30(schema: Any) -> Any:
    """Rewrite what OpenAPI 3.0 lacks: ``null`` types become ``nullable``, ``const`` an
    ``enum``, numeric exclusive bounds booleans, ``examples`` one ``example``; titles go
    (the component names say it)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key == "description" and isinstance(value, str):
            value = value.replace("``", "`")  # docstrings are reST; the document is Markdown
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: to_oas30(sub) for name, sub in value.items()}
        elif key in _SCHEMA_ONE:
            out[key] = to_oas30(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [to_oas30(sub) for sub in value]
        else:
            out[key] = value
    for key in ("anyOf", "oneOf"):
        branches = out.get(key)
        if isinstance(branches, list) and any(b == {"enum": [None], "nullable": True} for b in branches):
            rest = [b for b in branches if b != {"enum": [None], "nullable": True}]
            del out[key]
            if len(rest) == 1 and "$ref" not in rest[0]:
                out = {**rest[0], **out}
            elif len(rest) == 1:
                out["allOf"] = rest
            else:
                out[key] = rest
            out["nullable"] = True
    if out.get("type") == "null":
        del out["type"]
        out.update(enum=[None], nullable=True)
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if "examples" in out:
        examples = out.pop("examples")
        if isinstance(examples, list) and examples:
            out["example"] = examples[0]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[plain], out[bound] = value, True
    if "default" in out and out["default"] is None and not out.get("nullable"):
        del out["default"]
    return out


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the ``null`` branch (query strings and headers have no null)."""
    schema = dict(schema)
    schema.pop("nullable", None)
    if schema.get("default", 0) is None:
        del schema["default"]
    if schema.get("allOf") and len(schema["allOf"]) == 1 and "$ref" in schema["allOf"][0]:
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        schema = {**schema["allOf"][0], **rest} if not rest else schema
    return schema


class _Schemas:
    """The components of one document: every model once, under its class name."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def _add(self, name: str, schema: Any) -> None:
        schema = to_oas30(schema)
        if self.components.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r}")

    def of(self, tp: Any) -> dict[str, Any]:
        """The schema of a type: a ``$ref`` for a model, inline otherwise; definitions hoisted."""
        if isinstance(tp, dict):
            return tp
        schema = TypeAdapter(tp).json_schema(by_alias=True, ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self._add(name, sub)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            self._add(tp.__name__, schema)
            return {"$ref": REF.format(model=tp.__name__)}
        return to_oas30(schema)

    def parameter(self, name: str, where: str, tp: Any, *, required: bool) -> dict[str, Any]:
        schema = _without_null(self.of(tp))
        param: dict[str, Any] = {"name": name, "in": where, "required": required}
        description = schema.pop("description", None)
        if description:
            param["description"] = description
        param["schema"] = schema
        return param

    def query(self, model: type[BaseModel]) -> list[dict[str, Any]]:
        schema = model.model_json_schema(by_alias=True, ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self._add(name, sub)
        required = set(schema.get("required", ()))
        params = []
        for name, prop in schema.get("properties", {}).items():
            prop = _without_null(to_oas30(prop))
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
            description = prop.pop("description", None)
            if description:
                param["description"] = description
            param["schema"] = prop
            params.append(param)
        return params


# --- the document ------------------------------------------------------------------------------

_ARGUMENT = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


def openapi_path(rule: Rule) -> str:
    """``/v1/jobs/<job_id>`` → ``/v1/jobs/{job_id}``."""
    return _ARGUMENT.sub(r"{\1}", rule.rule)


def operation_methods(rule: Rule) -> list[str]:
    """The methods a rule documents: what it serves, less Flask's automatic HEAD and OPTIONS."""
    return sorted(m for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))


def documented_rules(app: Flask) -> list[tuple[Rule, Operation]]:
    """Every rule whose view carries a :func:`spec`, in path order."""
    found = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        operation = getattr(app.view_functions.get(rule.endpoint), ATTRIBUTE, None)
        if operation is not None:
            found.append((rule, operation))
    return found


def _operation_ids(rules: list[tuple[Rule, Operation]]) -> dict[tuple[str, str], str]:
    """(path, method) → operationId: the endpoint, with the method and path arguments
    appended when one view serves several operations."""
    by_endpoint: dict[str, list[tuple[Rule, str]]] = {}
    for rule, _ in rules:
        for method in operation_methods(rule):
            by_endpoint.setdefault(rule.endpoint, []).append((rule, method))
    ids: dict[tuple[str, str], str] = {}
    for endpoint, uses in by_endpoint.items():
        several_rules = len({rule.rule for rule, _ in uses}) > 1
        for rule, method in uses:
            name = endpoint.replace(".", "_")
            if len(uses) > 1:
                name += f"_{method.lower()}"
            if several_rules:
                name += "".join(f"_{arg}" for arg in sorted(rule.arguments))
            ids[(openapi_path(rule), method)] = name
    return ids


def _response(schemas: _Schemas, status: int, answer: Any, *, extra_headers: Sequence[str]) -> dict[str, Any]:
    reply = answer if isinstance(answer, Reply) else Reply(model=answer)
    summary = (reply.model.__doc__ or "").strip().split("\n")[0].replace("``", "`")
    out: dict[str, Any] = {"description": reply.description or ERROR_DESCRIPTIONS.get(status)
                           or summary or "OK"}
    headers = ["X-Request-Id", *reply.headers, *extra_headers]
    out["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in dict.fromkeys(headers)}
    if reply.content is not None:
        out["content"] = {media: {"schema": schemas.of(tp)} for media, tp in reply.content.items()}
    elif reply.model is not None:
        out["content"] = {"application/json": {"schema": schemas.of(reply.model)}}
    return out


def _operation(schemas: _Schemas, rule: Rule, method: str, op: Operation,
               ids: dict[tuple[str, str], str], links_to: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tags": list(op.tags), "summary": op.summary,
                           "operationId": ids[(openapi_path(rule), method)]}
    if op.description:
        out["description"] = op.description
    params = []
    for name in sorted(rule.arguments, key=rule.rule.index):
        if name not in op.path:
            raise ValueError(f"{rule.rule}: path parameter {name!r} has no type in its spec")
        params.append(schemas.parameter(name, "path", op.path[name], required=True))
    if op.query is not None:
        params.extend(schemas.query(op.query))
    headers = dict(op.headers)
    if op.idempotent:
        headers["Idempotency-Key"] = IdempotencyKey
    for name, tp in headers.items():
        params.append(schemas.parameter(name, "header", tp, required=False))
    if params:
        out["parameters"] = params
    has_body = (method in ("POST", "PUT", "PATCH") and (op.body is not None or op.body_content)
                and op.body_unless not in rule.arguments)
    if has_body:
        content = op.body_content or {"application/json": op.body}
        out["requestBody"] = {"required": op.body_required, "content": {
            media: {"schema": schemas.of(tp)} for media, tp in content.items()}}
    statuses: dict[int, Any] = dict(op.responses)
    implied = list(op.errors)
    if op.auth:
        implied.append(401)
    if op.auth == "admin":
        implied.append(403)
    if has_body:
        implied += [400, 413]
    if op.query is not None or headers:
        implied.append(400)
    if op.idempotent:
        implied.append(422)
    for status in implied:
        statuses.setdefault(status, ErrorBody)
    responses = {}
    for status in sorted(statuses):
        extra: list[str] = []
        if op.idempotent and 200 <= status < 300:
            extra.append("Idempotent-Replayed")
        if status == 429:
            extra.append("Retry-After")
        response = _response(schemas, status, statuses[status], extra_headers=extra)
        if status in op.links:
            response["links"] = {name: {
                "operationId": links_to[link.endpoint], "parameters": dict(link.parameters),
                **({"description": link.description} if link.description else {})}
                for name, link in op.links[status].items()}
        responses[str(status)] = response
    out["responses"] = responses
    if op.auth:
        out["security"] = SECURITY[op.auth]
    return out


def _version() -> str:
    try:
        return package_metadata.version("orchestrator")
    except package_metadata.PackageNotFoundError:
        return "0.0.0"


DESCRIPTION = """\
Jobs for AI image and video generation: users submit jobs (JWT), the service
charges credits and queues them for GPU workers; external workers lease jobs,
upload files and call back (worker token or Standard Webhooks signature).

Every error is JSON: `{"success": false, "error", "code", "details"?}`, never a
stack trace. JSON request strings must not contain NUL characters (the
databases cannot store them); request bodies are at most 1 MiB and 32 levels
deep, `metadata` at most 16 KiB.
"""


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes."""
    schemas = _Schemas()
    rules = documented_rules(app)
    ids = _operation_ids(rules)
    links_to: dict[str, str] = {}
    for rule, _ in rules:
        for method in operation_methods(rule):
            links_to.setdefault(rule.endpoint, ids[(openapi_path(rule), method)])
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, None] = {}
    for rule, op in rules:
        item = paths.setdefault(openapi_path(rule), {})
        for method in operation_methods(rule):
            item[method.lower()] = _operation(schemas, rule, method, op, ids, links_to)
        tags.update(dict.fromkeys(op.tags))
    schemas.of(ErrorBody)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "orchestrator", "version": _version(), "description": DESCRIPTION},
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": SECURITY_SCHEMES,
            "headers": RESPONSE_HEADERS,
        },
    }


def document(app: Flask) -> dict[str, Any]:
    """The app's document, built once (the URL map is fixed once the app serves)."""
    cached = app.extensions.get("openapi_document")
    if cached is None:
        cached = app.extensions["openapi_document"] = build_document(app)
    return cached


# --- routes ------------------------------------------------------------------------------------

bp = Blueprint("openapi", __name__)

DOCS_ASSETS = frozenset({"swagger-ui.css", "index.css", "swagger-ui-bundle.js",
                         "swagger-ui-standalone-preset.js", "favicon-32x32.png", "favicon-16x16.png"})

DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>orchestrator API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="stylesheet" href="docs/index.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/swagger-ui-standalone-preset.js"></script>
<script src="docs/initializer.js"></script>
</body>
</html>
"""

# Ours, not the bundle's petstore initializer; a file, not an inline script (CSP script-src 'self').
DOCS_INITIALIZER = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout"
  });
});
"""

_OPENAPI_JSON = Reply(description="This document (OpenAPI 3.0.3)",
                      content={"application/json": {"type": "object"}})
_HTML = Reply(description="Swagger UI for this document",
              content={"text/html": {"type": "string"}})


@bp.get("/openapi.json")
@spec(summary="The OpenAPI document of this service", tags=["meta"], responses={200: _OPENAPI_JSON})
def openapi_json() -> Any:
    return jsonify(document(current_app))


@bp.get("/docs")
@spec(summary="Interactive API documentation (Swagger UI)", tags=["meta"], responses={200: _HTML})
def docs() -> Any:
    return Response(DOCS_HTML, mimetype="text/html")


@bp.get("/docs/initializer.js")
@hidden
def docs_initializer() -> Any:
    response = Response(DOCS_INITIALIZER, mimetype="text/javascript")
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@bp.get("/docs/<asset>")
@hidden
def docs_asset(asset: str) -> Any:
    if asset not in DOCS_ASSETS:
        raise NotFound("No such documentation asset")
    return send_from_directory(str(swagger_ui_path), asset, max_age=86400)
