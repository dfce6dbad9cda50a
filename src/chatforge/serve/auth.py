"""API-key authentication: `Authorization: Bearer <key>` checked against the store on every request.

Keys are looked up by their SHA-256 hash (store.hash_key), so revoking a key with
`chatforge keys revoke` takes effect on the next request, from any process.
"""

from __future__ import annotations

import anyio

from ..store import KeyInfo, Store
from .protocol import APIError


def _mask(secret: str) -> str:
    return secret[:6] + "*" * 4 + secret[-4:] if len(secret) > 12 else "*" * len(secret)


async def authenticate(authorization: str | None, store: Store, required: bool) -> KeyInfo | None:
    """The key named by an Authorization header, or an APIError 401 (OpenAI's messages and codes).

    With `required=False` (`serve --no-auth`) a request without a valid key is served anonymously;
    a valid key is still used, so its usage is attributed."""
    if not authorization:
        if not required:
            return None
        raise APIError(401, "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY' "
                            "(create one with `chatforge keys create --name NAME`).", code="missing_api_key")
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        if not required:
            return None
        raise APIError(401, "Malformed Authorization header: expected 'Bearer YOUR_KEY'.", code="invalid_api_key")
    key = await anyio.to_thread.run_sync(store.lookup_key, secret)
    if key is None:
        if not required:
            return None
        raise APIError(401, f"Incorrect API key provided: {_mask(secret)}.", code="invalid_api_key")
    if key.revoked_at is not None:
        raise APIError(401, f"API key {key.prefix}... was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC.", code="invalid_api_key")
    return key
