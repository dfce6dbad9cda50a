"""The /v1 routes: models, chat completions and completions.

The path of a generation request: auth (key hash lookup, 401) -> validate (400/404) -> render the
prompt with the tokenizer's chat template -> admission (per-key rpm/tpm/quota/concurrency, 429) ->
engine queue (bounded, 503) -> stream tokens -> write the usage row, conversation and generations in
one transaction -> send the last bytes (usage chunk, [DONE]).

So a response the client has seen complete is always in the ledger. A client that disconnects
cancels its engine requests (the slot is freed at the next engine step) and leaves a usage row with
status 499 and the tokens generated so far. Model output is only ever sent as text; nothing here
evaluates it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..engine import Event, QueueFull, SamplingParams
from ..store import GenerationRecord, KeyInfo, RequestRecord
from . import protocol as P
from .admission import admission
from .auth import authenticate
from .config import ServeConfig
from .limits import Rejected, Reservation, retry_after_header
from .models import ModelRegistry, ServedModel, asyncio_sink
from .state import ServerState

_ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


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


# ---- the routes -----------------------------------------------------------------------------
def add_v1_routes(app: FastAPI, state: ServerState) -> None:
    bearer = HTTPBearer(auto_error=False, description="an API key from `chatforge keys create`")

    async def current_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> KeyInfo | None:
        key = await authenticate(request.headers.get("authorization"), state.store, state.cfg.auth)
        request.state.key = key
        request.state.authenticated = True
        endpoint = _ENDPOINTS.get(request.url.path)
        if endpoint is not None:  # a generation request: even a refused one gets a ledger row
            request.state.endpoint, request.state.model = endpoint, "(invalid request)"
        return key

    admitted = admission(state, "models")

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models(key: KeyInfo | None = admitted) -> P.ModelList:
        return P.ModelList(data=[_model_card(m) for m in state.models.models])

    @app.get("/v1/models/{model:path}", response_model=P.Model)
    async def retrieve_model(model: str, key: KeyInfo | None = admitted) -> P.Model:
        return _model_card(_get_model(state.models, model))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request, key: KeyInfo | None = Depends(current_key)):
        t0 = time.perf_counter()
        model = _requested_model(request, state.models, body.model)
        _check_unsupported(body.tools, body.tool_choice, body.logit_bias, body.response_format)
        messages = _chat_messages(body, state.cfg)
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
        n = _check_n(body.n, state.cfg)
        sampling = _sampling(body, max_new, n, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
        ctx = _Ctx(request, state, key, model, "chat.completions", f"chatcmpl-{uuid.uuid4().hex}", t0, body.user,
                   len(prompt), store=_store_flag(body.store, state.cfg), messages=messages)
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
        model = _requested_model(request, state.models, body.model)
        _check_unsupported(None, None, body.logit_bias, None)
        if body.suffix:
            raise P.APIError(400, "suffix is not supported (no fill-in-the-middle models)", param="suffix")
        n = _check_n(body.n, state.cfg)
        if body.best_of is not None and body.best_of != n:
            raise P.APIError(400, "best_of must equal n: chatforge does not rerank candidates on the server", param="best_of")
        if body.echo and body.logprobs is not None:
            raise P.APIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo")
        prompts, texts = _completion_prompts(body.prompt, model, state.cfg)
        if len(prompts) * n > state.cfg.max_n:
            raise P.APIError(400, f"{len(prompts)} prompts x n={n} choices; this server allows at most {state.cfg.max_n} per request",
                             param="n")
        max_new = max(_max_new_tokens(model, len(p), body.max_tokens, "prompt") for p in prompts)
        per_prompt = _sampling(body, max_new, n, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
        all_prompts = [p for p in prompts for _ in range(n)]
        sampling = per_prompt * len(prompts)
        ctx = _Ctx(request, state, key, model, "completions", f"cmpl-{uuid.uuid4().hex}", t0, body.user,
                   sum(len(p) for p in prompts), store=_store_flag(body.store, state.cfg), prompt_text="\n\n".join(texts),
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


def _requested_model(request: Request, models: ModelRegistry, name: str) -> ServedModel:
    """The served model a generation request names; its ledger row names the model as asked
    until it resolves, then by id (name@snapshot)."""
    request.state.model = name
    model = _get_model(models, name)
    request.state.model = model.id
    return model


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
    lp = P.TokenLogprob(token=tok.decode([ev.token_id]), bytes=tok.token_bytes(ev.token_id), logprob=ev.logprob,
                        top_logprobs=[P.TopLogprob(token=tok.decode([t]), bytes=tok.token_bytes(t), logprob=v)
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
