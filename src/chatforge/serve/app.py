"""The HTTP server: one process (FastAPI + uvicorn) serving one or more models over OpenAI's API
(serve/v1.py) and the chat and labeling pages (serve/web.py). Each model has its own engine loop (a
thread running continuous batching), and every request becomes one engine request per choice.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..store import Store
from . import protocol as P
from . import web
from .admission import require_role
from .auth import authenticate
from .config import ServeConfig
from .errors import install_error_handlers, openapi_without_422
from .limits import RateLimiter
from .metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from .middleware import BodyLimit, SecurityHeaders
from .models import ModelRegistry, load_model
from .state import ServerState
from .v1 import add_v1_routes


# ---- the app --------------------------------------------------------------------------------
def create_app(cfg: ServeConfig, models: ModelRegistry, store: Store) -> FastAPI:
    state = ServerState(cfg, models, store, RateLimiter(cfg.max_concurrent_per_key), Metrics())
    for m in models.models:
        state.metrics.track_engine(m.id, lambda lp=m.loop: lp.queue_depth, lambda lp=m.loop: lp.active_slots,
                                   lambda e=m.engine: e.prefix.hit_tokens if e.prefix is not None else 0)

    app = FastAPI(
        title="chatforge",
        version="0.1.0",
        description="OpenAI-compatible API over chatforge's engine. Fields that are not OpenAI's are described as \"extension: ...\".",
        responses={code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)},
        docs_url=None, redoc_url=None,  # Swagger UI and ReDoc load scripts from a CDN, which the pages' CSP forbids; /openapi.json stays
    )
    app.state.chatforge = state
    openapi_without_422(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(SecurityHeaders)
    install_error_handlers(app, state)

    # ---- routes ------------------------------------------------------------------------
    @app.get("/health", response_model=P.Health, response_model_exclude_none=True, tags=["extensions"])
    async def health(request: Request) -> P.Health:
        # Liveness for anyone (load balancers have no key); what is loaded and how busy it is only
        # for an admin key, as the snapshot ids name the weights.
        header = request.headers.get("authorization")
        key = await authenticate(header, store, required=False) if header else None
        if key is None or not key.may("admin"):
            return P.Health()
        return P.Health(models=[m.id for m in models.models], queue_depth=sum(m.loop.queue_depth for m in models.models),
                        active_slots=sum(m.loop.active_slots for m in models.models))

    @app.get("/metrics", tags=["extensions"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 403: {"model": P.ErrorResponse}})
    async def metrics(request: Request) -> Response:
        if not cfg.public_metrics:
            await require_role(await authenticate(request.headers.get("authorization"), store, required=True), "admin", "/metrics")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_v1_routes(app, state)
    web.mount(app, state)  # the chat and labeling pages and their /web/ endpoints
    return app


# ---- running it -----------------------------------------------------------------------------
def build(cfg: ServeConfig) -> tuple[FastAPI, ModelRegistry, Store]:
    store = Store(cfg.db or None)
    loaded = []
    try:
        for name in cfg.models:
            loaded.append(load_model(name, max_batch=cfg.max_batch, max_waiting=cfg.max_waiting, max_seq_len=cfg.max_seq_len or None,
                                     dtype=cfg.dtype, device=cfg.device, decode_weights=cfg.decode_weights, install=cfg.install, kv_cache=cfg.kv_cache,
                                     prefix_cache=cfg.prefix_cache, compile_decode=cfg.compile_decode, prefill_chunk=cfg.prefill_chunk))
        models = ModelRegistry(loaded)
    except BaseException:
        for m in loaded:
            m.close()
        raise
    return create_app(cfg, models, store), models, store


def main(cfg: ServeConfig) -> None:
    app, models, store = build(cfg)
    for m in models.models:
        print(f"serving {m.id} (context {m.context_len} tokens, {m.engine.max_batch} slots) from {m.path}", flush=True)
    print(f"store: {store.safe_url} (schema version {store.version}); auth {'on' if cfg.auth else 'OFF'}", flush=True)
    print(f"listening on http://{cfg.host}:{cfg.port}/v1", flush=True)
    print(f"chat page: http://{cfg.host}:{cfg.port}/  labeling page: http://{cfg.host}:{cfg.port}/label", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    finally:
        models.close()
        store.close()
