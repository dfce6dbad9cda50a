"""Admission for the routes that generate nothing (the pages' /web/ endpoints, /v1/models) and
the roles some routes need. The generation endpoints admit in app._start, where they know how many
tokens to reserve; everything else comes through here, so no route a key can call skips its
quota, rate and concurrency limits or the ledger.
"""

from __future__ import annotations

import logging
import time
import uuid

import anyio
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from ..store import KeyInfo, RequestRecord
from . import protocol as P
from .auth import authenticate
from .limits import Rejected, retry_after_header

log = logging.getLogger("chatforge.serve")


async def require_role(key: KeyInfo | None, role: str, what: str) -> None:
    if key is None or not key.may(role):
        have = "no key" if key is None else f"key {key.prefix}... has role {key.role!r}"
        raise P.APIError(403, f"{what} needs a key with role {role!r} ({have}); an admin gives it with "
                              f"`chatforge keys role KEY {role}`", type="permission_error", code="insufficient_role")


def admission(state, endpoint: str, required: bool | None = None):
    """A FastAPI dependency that puts a route through the admission the generation endpoints get:
    the key (401), its quota, requests per minute and concurrency (429 with Retry-After), and a
    ledger row with the route and its status, so page traffic is limited and billed like API traffic
    (it reserves no tokens: these routes generate none). `required=None` follows `serve --no-auth`.
    scope="function": the row is written before the response goes out, as for the API's rows."""

    async def admitted(request: Request):
        t0 = time.perf_counter()
        key = await authenticate(request.headers.get("authorization"), state.store, state.cfg.auth if required is None else required)
        route = f"{request.method} {getattr(request.scope.get('route'), 'path', request.url.path)}"[:200]
        try:
            reservation = state.limiter.admit(key, 0)
        except Rejected as r:
            state.metrics.rejected.labels(r.code).inc()
            await _ledger(state, key, endpoint, route, 429, r.code, t0)
            raise P.APIError(429, r.message, type=r.type, code=r.code, headers=retry_after_header(r.retry_after)) from None
        status, code = 200, None
        try:
            yield key
        except P.APIError as e:
            status, code = e.status, e.code
            raise
        except RequestValidationError:
            status, code = 400, "invalid_value"
            raise
        except BaseException:
            status, code = 500, "server_error"
            raise
        finally:
            reservation.settle(0)
            await _ledger(state, key, endpoint, route, status, code, t0)

    return Depends(admitted, scope="function")


async def _ledger(state, key: KeyInfo | None, endpoint: str, route: str, status: int, code: str | None, t0: float) -> None:
    rec = RequestRecord(request_id=f"{endpoint}-{uuid.uuid4().hex}", endpoint=endpoint, key_id=key.id if key else None, model=route,
                        status=status, latency_ms=(time.perf_counter() - t0) * 1000, error_code=code)
    with anyio.CancelScope(shield=True):
        try:
            await anyio.to_thread.run_sync(state.store.record, rec)
        except Exception:  # the response matters more than its ledger row
            log.exception("could not record a %s request", endpoint)
