"""Every failure as OpenAI's error object with the right status, and a ledger row for a refused
generation request."""

from __future__ import annotations

import logging
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..store import RequestRecord
from . import protocol as P
from .state import ServerState

log = logging.getLogger("chatforge.serve")


def install_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError):
        if e.status == 429:
            state.metrics.rejected.labels(e.code or "rate_limit").inc()
        elif e.status == 503:
            state.metrics.rejected.labels("server_full").inc()
        await record_rejection(request, state, e.status, e.code)
        return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = _validation_to_api_error(e)
        await record_rejection(request, state, err.status, err.code)
        return JSONResponse(err.body().model_dump(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        msg = {404: f"Unknown path {request.url.path}", 405: f"Method {request.method} not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        err = P.APIError(e.status_code, msg, code=kind)
        return JSONResponse(err.body().model_dump(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = P.APIError(500, "The server had an error while processing your request.", type="server_error")
        await record_rejection(request, state, 500, "server_error")
        return JSONResponse(err.body().model_dump(), status_code=500)


async def record_rejection(request: Request, state: ServerState, status: int, code: str | None) -> None:
    """A ledger row for an authenticated generation request refused before it reached the engine."""
    if not getattr(request.state, "authenticated", False) or not hasattr(request.state, "endpoint"):
        return
    if getattr(request.state, "recorded", False):
        return
    request.state.recorded = True
    key = request.state.key
    rec = RequestRecord(request_id=f"rejected-{uuid.uuid4().hex}", endpoint=request.state.endpoint,
                        key_id=key.id if key else None, model=str(request.state.model)[:200], status=status,
                        latency_ms=0.0, error_code=code)
    try:
        await anyio.to_thread.run_sync(state.store.record, rec)
    except Exception:  # the error response matters more than its ledger row
        log.exception("could not record a rejected request")


# ---- validation errors as OpenAI 400s ---------------------------------------------------------
def _validation_to_api_error(e: RequestValidationError) -> P.APIError:
    errs = list(e.errors())
    # A union (stop: str | list[str]) reports one error per member; the member that matched the
    # value's type explains the problem better than "should be a valid string".
    errs.sort(key=lambda x: str(x.get("type", "")).endswith("_type"))
    first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return P.APIError(400, "We could not parse the JSON body of your request. (HINT: the body must be valid JSON; "
                               f"{first.get('msg', '')} at position {first.get('ctx', {}).get('error', '')})", code="invalid_json")
    if kind == "missing" and not loc:
        return P.APIError(400, "The request body is missing: send a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return P.APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return P.APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return P.APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}{more}", param=param, code="invalid_value")


def openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers 400 (as OpenAI does)."""
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build_schema()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _is_type_tag(part) -> bool:
    """Pydantic puts union members in error locations ('str', 'list[str]', 'TextContentPart'); fields are snake_case."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part or part[:1].isupper()
                                      or part.startswith("constrained-"))  # an Annotated str with max_length
