"""The HTTP server: OpenAI's chat completions, completions and models endpoints over the engine.

One process (FastAPI + uvicorn) serves one or more models; each model has its own engine loop
(a thread running continuous batching), and every request becomes one engine request per choice.
The path of a request:

    auth (key hash lookup, 401) -> validate (400/404) -> render the prompt with the tokenizer's chat
    template -> admission (per-key rpm/tpm/quota/concurrency, 429) -> engine queue (bounded, 503)
    -> stream tokens -> write the usage row, conversation and generations in one transaction
    -> send the last bytes (usage chunk, [DONE]).

So a response the client has seen complete is always in the ledger. A client that disconnects
cancels its engine requests (the slot is freed at the next engine step) and leaves a usage row with
status 499 and the tokens generated so far. Model output is only ever sent as text; nothing here
evaluates it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Event, QueueFull, SamplingParams
from ..store import GenerationRecord, KeyInfo, RequestRecord, Store
from . import protocol as P
from . import web
from .admission import admission, require_role
from .auth import authenticate
from .config import ServeConfig
from .limits import RateLimiter, Rejected, Reservation, retry_after_header
from .metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from .models import ModelRegistry, ServedModel, asyncio_sink

log = logging.getLogger("chatforge.serve")
_ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


@dataclass
class ServerState:
    cfg: ServeConfig
    models: ModelRegistry
    store: Store
    limiter: RateLimiter
    metrics: Metrics


# ---- one request in flight ------------------------------------------------------------------
class EngineFailed(Exception):
    pass


class Job:
    """The n engine requests of one API request, their events and what they produced."""

    def __init__(self, model: ServedModel, prompts: list[list[int]], sampling: list[SamplingParams]):
        self.model, self.prompts, self.sampling = model, prompts, sampling
        self.n = len(prompts)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.text = [""] * self.n
        self.tokens = [0] * self.n
        self.finish: list[str | None] = [None] * self.n
        self.t_first: float | None = None

    def submit(self) -> None:
        loop = self.model.loop
        if self.model.capacity_left < self.n:
            raise QueueFull(f"{loop.queue_depth} requests are waiting")
        try:
            for i, (p, sp) in enumerate(zip(self.prompts, self.sampling)):
                self.handles.append(loop.submit(p, sp, sink=asyncio_sink(self.queue, i)))
        except BaseException:
            self.cancel()
            raise

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def next(self) -> tuple[int, Event]:
        i, ev = await self.queue.get()
        if isinstance(ev, BaseException):
            self.finish = [f or "error" for f in self.finish]
            raise EngineFailed(f"the engine failed: {ev!r}") from ev
        if ev.token_id is not None:
            self.tokens[i] += 1
            if self.t_first is None:
                self.t_first = time.perf_counter()
        self.text[i] += ev.text
        if ev.finish_reason:
            self.finish[i] = ev.finish_reason
        return i, ev

    def cancel(self) -> None:
        for i, h in enumerate(self.handles):
            if self.finish[i] is None:
                self.model.loop.cancel(h)
                self.finish[i] = "cancelled"

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)


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
    _openapi_without_422(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(SecurityHeaders)
    bearer = HTTPBearer(auto_error=False, description="an API key from `chatforge keys create`")

    async def current_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> KeyInfo | None:
        key = await authenticate(request.headers.get("authorization"), store, cfg.auth)
        request.state.key = key
        request.state.authenticated = True
        endpoint = _ENDPOINTS.get(request.url.path)
        if endpoint is not None:  # a generation request: even a refused one gets a ledger row
            request.state.endpoint, request.state.model = endpoint, "(invalid request)"
        return key

    # ---- errors: OpenAI's error object with the right status --------------------------
    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError):
        if e.status == 429:
            state.metrics.rejected.labels(e.code or "rate_limit").inc()
        elif e.status == 503:
            state.metrics.rejected.labels("server_full").inc()
        await _record_rejection(request, state, e.status, e.code)
        return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = _validation_to_api_error(e)
        await _record_rejection(request, state, err.status, err.code)
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
        await _record_rejection(request, state, 500, "server_error")
        return JSONResponse(err.body().model_dump(), status_code=500)

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

    admitted = admission(state, "models")

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models(key: KeyInfo | None = admitted) -> P.ModelList:
        return P.ModelList(data=[_model_card(m) for m in models.models])

    @app.get("/v1/models/{model:path}", response_model=P.Model)
    async def retrieve_model(model: str, key: KeyInfo | None = admitted) -> P.Model:
        return _model_card(_get_model(models, model))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request, key: KeyInfo | None = Depends(current_key)):
        t0 = time.perf_counter()
        request.state.model = body.model
        model = _get_model(models, body.model)
        request.state.model = model.id
        _check_unsupported(body.tools, body.tool_choice, body.logit_bias, body.response_format)
        messages = _chat_messages(body, cfg)
        try:
            if sum(len(m["content"]) for m in messages) > 20_000:  # long prompts tokenize off the event loop
                prompt, _ = await anyio.to_thread.run_sync(model.tokenizer.render, messages, True)
            else:
                prompt, _ = model.tokenizer.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise P.APIError(400, f"messages: {e}", param="messages") from None
        if body.top_logprobs and not body.logprobs:
            raise P.APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_new = _max_new_tokens(model, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        n = _check_n(body.n, cfg)
        sampling = _sampling(body, max_new, n, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
        ctx = _Ctx(request, state, key, model, "chat.completions", f"chatcmpl-{uuid.uuid4().hex}", t0, body.user,
                   len(prompt), store=_store_flag(body.store, cfg), messages=messages)
        job = await _start(ctx, [prompt] * n, sampling)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(_chat_stream(ctx, job, include_usage, bool(body.logprobs)))
        await _collect(ctx, job)
        resp = P.ChatCompletion(
            id=ctx.request_id, created=ctx.created, model=model.id, system_fingerprint=f"fp_{model.snapshot}",
            choices=[P.ChatChoice(index=i, finish_reason=job.finish[i], message=P.ChatCompletionMessage(content=job.text[i]),
                                  logprobs=P.ChoiceLogprobs(content=ctx.logprobs[i]) if body.logprobs else None)
                     for i in range(n)],
            usage=_usage(ctx, job),
        )
        await _finish(ctx, job, 200)
        return JSONResponse(resp.model_dump(mode="json"))

    @app.post("/v1/completions", response_model=P.Completion,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def completions(body: P.CompletionRequest, request: Request, key: KeyInfo | None = Depends(current_key)):
        t0 = time.perf_counter()
        request.state.model = body.model
        model = _get_model(models, body.model)
        request.state.model = model.id
        _check_unsupported(None, None, body.logit_bias, None)
        if body.suffix:
            raise P.APIError(400, "suffix is not supported (no fill-in-the-middle models)", param="suffix")
        n = _check_n(body.n, cfg)
        if body.best_of is not None and body.best_of != n:
            raise P.APIError(400, "best_of must equal n: chatforge does not rerank candidates on the server", param="best_of")
        if body.echo and body.logprobs is not None:
            raise P.APIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo")
        prompts, texts = _completion_prompts(body.prompt, model, cfg)
        if len(prompts) * n > cfg.max_n:
            raise P.APIError(400, f"{len(prompts)} prompts x n={n} choices; this server allows at most {cfg.max_n} per request",
                             param="n")
        max_new = max(_max_new_tokens(model, len(p), body.max_tokens, "prompt") for p in prompts)
        per_prompt = _sampling(body, max_new, n, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
        all_prompts = [p for p in prompts for _ in range(n)]
        sampling = per_prompt * len(prompts)
        ctx = _Ctx(request, state, key, model, "completions", f"cmpl-{uuid.uuid4().hex}", t0, body.user,
                   sum(len(p) for p in prompts), store=_store_flag(body.store, cfg), prompt_text="\n\n".join(texts),
                   echo=[texts[i // n] if body.echo else "" for i in range(len(all_prompts))])
        job = await _start(ctx, all_prompts, sampling)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(_completion_stream(ctx, job, include_usage, body.logprobs is not None))
        await _collect(ctx, job)
        resp = P.Completion(
            id=ctx.request_id, created=ctx.created, model=model.id, system_fingerprint=f"fp_{model.snapshot}",
            choices=[P.CompletionChoice(index=i, finish_reason=job.finish[i], text=ctx.echo[i] + job.text[i],
                                        logprobs=_legacy_logprobs(ctx.logprobs[i]) if body.logprobs is not None else None)
                     for i in range(job.n)],
            usage=_usage(ctx, job),
        )
        await _finish(ctx, job, 200)
        return JSONResponse(resp.model_dump(mode="json"))

    web.mount(app, state)  # the chat and labeling pages and their /web/ endpoints
    return app


# ---- request helpers ------------------------------------------------------------------------
@dataclass
class _Ctx:
    request: Request
    state: ServerState
    key: KeyInfo | None
    model: ServedModel
    endpoint: str
    request_id: str
    t0: float
    user: str | None
    prompt_tokens: int
    store: bool = True
    messages: list[dict] | None = None
    prompt_text: str | None = None
    echo: list[str] = field(default_factory=list)
    reservation: Reservation | None = None
    logprobs: list[list[P.TokenLogprob]] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    recorded: bool = False


def _model_card(m: ServedModel) -> P.Model:
    return P.Model(id=m.id, created=m.created, root=m.name, max_model_len=m.context_len)


def _get_model(models: ModelRegistry, name: str) -> ServedModel:
    m = models.get(name)
    if m is None:
        offered = ", ".join(x.id for x in models.models)
        raise P.APIError(404, f"The model `{name}` does not exist or is not loaded; this server offers: {offered}.",
                         param="model", code="model_not_found")
    return m


def _check_unsupported(tools, tool_choice, logit_bias, response_format) -> None:
    if tools:
        raise P.APIError(400, "tools are not supported by chatforge's models", param="tools")
    if tool_choice not in (None, "none", "auto"):
        raise P.APIError(400, "tool_choice is not supported (there are no tools)", param="tool_choice")
    if logit_bias:
        raise P.APIError(400, "logit_bias is not supported", param="logit_bias")
    if response_format is not None and response_format.type != "text":
        raise P.APIError(400, f"response_format {response_format.type!r} is not supported; only 'text'", param="response_format")


def _chat_messages(body: P.ChatCompletionRequest, cfg: ServeConfig) -> list[dict]:
    if len(body.messages) > cfg.max_messages:
        raise P.APIError(400, f"{len(body.messages)} messages; at most {cfg.max_messages} are allowed", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if content is None:
            raise P.APIError(400, f"messages[{i}].content is required (tool calls are not supported)", param=f"messages.[{i}].content")
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        if len(content) > cfg.max_message_chars:
            raise P.APIError(400, f"messages[{i}].content has {len(content)} characters; at most {cfg.max_message_chars} are allowed",
                             param=f"messages.[{i}].content", code="string_above_max_length")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _completion_prompts(prompt: P.Prompt, model: ServedModel, cfg: ServeConfig) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of a completions `prompt`: a string, strings, token ids, or lists of ids."""
    tok = model.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise P.APIError(400, "prompt is empty", param="prompt")
    if len(prompt) > cfg.max_n:
        raise P.APIError(400, f"{len(prompt)} prompts in one request; at most {cfg.max_n}", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]  # one prompt given as token ids
    ids, texts = [], []
    vocab = model.engine.model.cfg.vocab_size
    for p in prompt:
        if isinstance(p, str):
            if len(p) > cfg.max_message_chars:
                raise P.APIError(400, f"prompt has {len(p)} characters; at most {cfg.max_message_chars}", param="prompt")
            ids.append(bos + tok.encode(p))
            texts.append(p)
        else:
            if not p or any(t < 0 or t >= vocab for t in p):
                raise P.APIError(400, f"token ids must be a non-empty list of ids in 0..{vocab - 1}", param="prompt")
            ids.append(list(p))
            texts.append(tok.decode(p))
        if not ids[-1]:
            raise P.APIError(400, "prompt is empty", param="prompt")
    return ids, texts


def _max_new_tokens(model: ServedModel, prompt_len: int, asked: int | None, param: str) -> int:
    ctx = model.context_len
    if asked is None:
        asked = ctx - prompt_len  # OpenAI's default: whatever the context window leaves
        if asked < 1:
            raise P.APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} resulted in "
                                  f"{prompt_len} tokens, which leaves no room for an answer.", param=param, code="context_length_exceeded")
    if prompt_len + asked > ctx:
        raise P.APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + asked} "
                              f"tokens ({prompt_len} in the {param}, {asked} in the completion). Please reduce the length of the "
                              f"{param} or the completion.", param=param, code="context_length_exceeded")
    return asked


def _check_n(n: int | None, cfg: ServeConfig) -> int:
    n = 1 if n is None else n
    if n > cfg.max_n:
        raise P.APIError(400, f"n={n}; this server allows at most {cfg.max_n}", param="n")
    return n


def _store_flag(asked: bool | None, cfg: ServeConfig) -> bool:
    return cfg.store_conversations and asked is not False


def _sampling(body, max_new: int, n: int, logprobs: bool, top_logprobs: int) -> list[SamplingParams]:
    """The engine's parameters for each of the n choices. `top_p=0` and temperatures below 1e-4
    mean greedy (dividing logits by a denormal temperature overflows to inf and NaN probabilities);
    with a seed, choice i uses seed+i, so choices differ from each other but the request is reproducible."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise P.APIError(400, "stop sequences must be non-empty strings", param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0 or temperature < 1e-4:
        temperature, top_p = 0.0, 1.0
    out = []
    for i in range(n):
        out.append(SamplingParams(
            temperature=temperature, top_k=body.top_k or 0, top_p=top_p,
            repetition_penalty=body.repetition_penalty or 1.0, frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0, max_new_tokens=max_new, stop=stop,
            seed=None if body.seed is None else (body.seed + i) % (2**63), logprobs=logprobs, top_logprobs=top_logprobs,
            ignore_eos=bool(body.ignore_eos),
        ))
    return out


async def _start(ctx: _Ctx, prompts: list[list[int]], sampling: list[SamplingParams]) -> Job:
    """Admission control, then the engine queue."""
    st = ctx.state
    reserve = ctx.prompt_tokens + sum(sp.max_new_tokens for sp in sampling)
    try:
        ctx.reservation = st.limiter.admit(ctx.key, reserve)
    except Rejected as r:
        raise P.APIError(429, r.message, type=r.type, code=r.code, headers=retry_after_header(r.retry_after)) from None
    job = Job(ctx.model, prompts, sampling)
    ctx.logprobs = [[] for _ in range(job.n)]
    try:
        job.submit()
    except QueueFull:
        ctx.reservation.settle(0)
        raise P.APIError(503, f"The server is at capacity ({ctx.model.loop.queue_depth} requests waiting for "
                              f"{ctx.model.engine.max_batch} slots); retry shortly.", type="server_error",
                         code="server_full", headers=retry_after_header(1)) from None
    except ValueError as e:  # the engine refused the prompt (should have been caught above)
        ctx.reservation.settle(0)
        raise P.APIError(400, str(e), param="messages" if ctx.messages is not None else "prompt") from None
    return job


def _add_logprobs(ctx: _Ctx, i: int, ev: Event) -> list[P.TokenLogprob]:
    """The event's token as OpenAI logprobs (nothing for the end-of-turn token that stops a choice)."""
    if ev.logprob is None or ev.token_id is None or (ev.finish_reason == "stop" and ev.token_id in ctx.model.engine.stop_ids):
        return []
    tok = ctx.model.tokenizer
    lp = P.TokenLogprob(token=tok.decode([ev.token_id]), bytes=token_bytes(tok, ev.token_id), logprob=ev.logprob,
                        top_logprobs=[P.TopLogprob(token=tok.decode([t]), bytes=token_bytes(tok, t), logprob=v)
                                      for t, v in (ev.top_logprobs or [])])
    ctx.logprobs[i].append(lp)
    return [lp]


async def _collect(ctx: _Ctx, job: Job) -> None:
    """Run a non-streaming job to the end, cancelling it if the client disconnects meanwhile."""

    async def watch_disconnect() -> None:
        while True:
            msg = await ctx.request.receive()
            if msg["type"] == "http.disconnect":
                job.cancel()
                return

    watcher = asyncio.create_task(watch_disconnect())
    try:
        while not job.done:
            i, ev = await job.next()
            _add_logprobs(ctx, i, ev)
    except EngineFailed:
        await _finish(ctx, job, 500, "engine_error")
        raise P.APIError(500, "The engine failed while generating; please retry.", type="server_error") from None
    finally:
        watcher.cancel()
    if any(f == "cancelled" for f in job.finish):
        ctx.state.metrics.cancelled.labels(ctx.model.id).inc()
        await _finish(ctx, job, 499, "client_closed")
        raise P.APIError(499, "client closed the request")


def _usage(ctx: _Ctx, job: Job) -> P.CompletionUsage:
    return P.CompletionUsage(prompt_tokens=ctx.prompt_tokens, completion_tokens=job.completion_tokens,
                             total_tokens=ctx.prompt_tokens + job.completion_tokens)


async def _finish(ctx: _Ctx, job: Job | None, status: int, error_code: str | None = None) -> None:
    """Settle the rate-limit reservation and write the request's ledger row (and, for a served
    request, its conversation and generations) in one transaction. Runs at most once."""
    if ctx.recorded:
        return
    ctx.recorded = ctx.request.state.recorded = True
    completion = job.completion_tokens if job else 0
    if ctx.reservation is not None:
        ctx.reservation.settle(ctx.prompt_tokens + completion)
    now = time.perf_counter()
    m = ctx.model
    rec = RequestRecord(
        request_id=ctx.request_id, endpoint=ctx.endpoint, key_id=ctx.key.id if ctx.key else None, model=m.id, status=status,
        latency_ms=(now - ctx.t0) * 1000, prompt_tokens=ctx.prompt_tokens, completion_tokens=completion,
        ttft_ms=(job.t_first - ctx.t0) * 1000 if job and job.t_first else None, error_code=error_code, user=ctx.user,
    )
    if job is not None and status == 200 and ctx.store:
        rec.model_name, rec.snapshot = m.name, m.snapshot
        rec.messages, rec.prompt_text = ctx.messages, ctx.prompt_text if ctx.messages is None else None
        rec.generations = [GenerationRecord(i, job.text[i], job.tokens[i], job.finish[i] or "", asdict(job.sampling[i]))
                           for i in range(job.n)]
    metrics = ctx.state.metrics
    metrics.tokens.labels(m.id, "prompt").inc(ctx.prompt_tokens)
    metrics.tokens.labels(m.id, "completion").inc(completion)
    if job and job.t_first:
        metrics.ttft.labels(m.id).observe(job.t_first - ctx.t0)
    with anyio.CancelScope(shield=True):  # also when the client has gone and this task is being cancelled
        await anyio.to_thread.run_sync(ctx.state.store.record, rec)


async def _record_rejection(request: Request, state: ServerState, status: int, code: str | None) -> None:
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


# ---- streaming ------------------------------------------------------------------------------
def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: P.BaseModel) -> str:
    return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"


async def _stream(ctx: _Ctx, job: Job, on_event, final_chunks) -> AsyncIterator[str]:
    """The common shape of a stream: events -> chunks; ledger write; usage chunk; [DONE].
    On disconnect (the task is cancelled) or any failure, cancel the generation and record it."""
    try:
        while not job.done:
            i, ev = await job.next()
            for chunk in on_event(i, ev):
                yield chunk
        await _finish(ctx, job, 200)  # before the last bytes: an acknowledged stream is in the ledger
        for chunk in final_chunks():
            yield chunk
        yield "data: [DONE]\n\n"
    except EngineFailed:
        await _finish(ctx, job, 500, "engine_error")
        err = P.APIError(500, "The engine failed while generating; please retry.", type="server_error")
        yield _data(err.body())
    finally:
        if not job.done or not ctx.recorded:
            job.cancel()
            ctx.state.metrics.cancelled.labels(ctx.model.id).inc()
            await _finish(ctx, job, 499, "client_closed")


async def _chat_stream(ctx: _Ctx, job: Job, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    m = ctx.model

    def chunk(choices: list[P.ChunkChoice], usage: P.CompletionUsage | None = None) -> str:
        return _data(P.ChatCompletionChunk(id=ctx.request_id, created=ctx.created, model=m.id,
                                           system_fingerprint=f"fp_{m.snapshot}", choices=choices, usage=usage))

    def on_event(i: int, ev: Event):
        lps = _add_logprobs(ctx, i, ev) if logprobs else []
        if ev.text or lps:
            yield chunk([P.ChunkChoice(index=i, delta=P.ChoiceDelta(content=ev.text),
                                       logprobs=P.ChoiceLogprobs(content=lps) if logprobs else None)])
        if ev.finish_reason in ("stop", "length"):
            yield chunk([P.ChunkChoice(index=i, delta=P.ChoiceDelta(), finish_reason=ev.finish_reason)])

    def final():
        if include_usage:
            yield chunk([], _usage(ctx, job))

    for i in range(job.n):
        yield chunk([P.ChunkChoice(index=i, delta=P.ChoiceDelta(role="assistant", content=""))])
    async for c in _stream(ctx, job, on_event, final):
        yield c


async def _completion_stream(ctx: _Ctx, job: Job, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    m = ctx.model

    def chunk(choices: list[P.CompletionChoice], usage: P.CompletionUsage | None = None) -> str:
        return _data(P.Completion(id=ctx.request_id, created=ctx.created, model=m.id, system_fingerprint=f"fp_{m.snapshot}",
                                  choices=choices, usage=usage))

    def on_event(i: int, ev: Event):
        lps = _add_logprobs(ctx, i, ev) if logprobs else []
        text = ev.text
        if ctx.echo[i] and job.tokens[i] <= 1 and ev.token_id is not None:
            text = ctx.echo[i] + text
        finish = ev.finish_reason if ev.finish_reason in ("stop", "length") else None
        if text or lps or finish:
            yield chunk([P.CompletionChoice(index=i, text=text, finish_reason=finish,
                                            logprobs=_legacy_logprobs(lps) if logprobs else None)])

    def final():
        if include_usage:
            yield chunk([], _usage(ctx, job))

    async for c in _stream(ctx, job, on_event, final):
        yield c


def _legacy_logprobs(lps: list[P.TokenLogprob]) -> P.CompletionLogprobs:
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return P.CompletionLogprobs(
        text_offset=offsets, token_logprobs=[lp.logprob for lp in lps], tokens=[lp.token for lp in lps],
        top_logprobs=[{t.token: t.logprob for t in lp.top_logprobs} for lp in lps],
    )


# ---- token bytes for logprobs ---------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table (what byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER: dict[str, int] | None = None


def token_bytes(tok, token_id: int) -> list[int]:
    """The raw UTF-8 bytes of one token (OpenAI's `bytes`), also for tokens that are half a character."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        _BYTE_DECODER = _byte_decoder()
    piece = tok.hf.id_to_token(token_id)
    if piece is not None and all(c in _BYTE_DECODER for c in piece):
        return [_BYTE_DECODER[c] for c in piece]
    return list(tok.decode([token_id]).encode("utf-8"))


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


def _openapi_without_422(app: FastAPI) -> None:
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


# ---- running it -----------------------------------------------------------------------------
def build(cfg: ServeConfig) -> tuple[FastAPI, ModelRegistry, Store]:
    from .models import load_model

    store = Store(cfg.db or None)
    loaded = []
    try:
        for name in cfg.models:
            loaded.append(load_model(name, max_batch=cfg.max_batch, max_waiting=cfg.max_waiting, max_seq_len=cfg.max_seq_len or None,
                                     dtype=cfg.dtype, device=cfg.device, decode_weights=cfg.decode_weights, install=cfg.install,
                                     prefix_cache=cfg.prefix_cache))
        models = ModelRegistry(loaded)
    except BaseException:
        for m in loaded:
            m.close()
        raise
    return create_app(cfg, models, store), models, store


def main(cfg: ServeConfig) -> None:
    import uvicorn

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
