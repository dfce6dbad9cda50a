"""ASGI middleware around every route: the request-body limit and the security headers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from . import protocol as P


class BodyLimit:
    """413 for request bodies over `max_bytes`: by Content-Length when there is one, else (chunked
    transfer) by reading the body before the app sees it. A limit raised while the app reads would
    surface as FastAPI's 400 "error parsing the body"."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large(f"Request body of {length.decode(errors='replace')} bytes", scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._too_large("Request body", scope, receive, send)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, what: str, scope, receive, send) -> None:
        # Read (and drop) what the client is still sending, up to a bound, before answering: a server
        # that closes with unread bytes in its socket sends a TCP reset, which can destroy the 413
        # before the client reads it (seen as "peer closed connection" in a test).
        drained = 0
        while drained < 8 * self.max_bytes:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
            drained += len(msg.get("body", b""))
        err = P.APIError(413, f"{what} is over the limit of {self.max_bytes} bytes.", code="request_too_large")
        await JSONResponse(err.body().model_dump(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


# Pages load only this server's own scripts, styles and images and talk only to it; the API key sits
# in localStorage, so an injected script must have nowhere to load from or send to.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"), (b"permissions-policy", b"camera=(), microphone=(), geolocation=()")]


class SecurityHeaders:
    """CSP and the usual hardening headers on every response (pages, static files, API)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *SECURITY_HEADERS]}
            await send(msg)

        await self.app(scope, receive, send_with_headers)
