"""The OpenAI-compatible server, driven by the official `openai` SDK against a live server on loopback."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from chatforge import checkpoint
from chatforge.engine import Engine, SamplingParams
from chatforge.serve.config import ServeConfig
from serve_helpers import LiveServer, make_tiny_checkpoint, slow_engine, slowed
from store_backends import BACKENDS, database_url

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox 床前明月光"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    return make_tiny_checkpoint(tok, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module", params=BACKENDS)
def server(ckpt, tmp_path_factory, request):
    """One live server per store backend: every test below runs on SQLite and on PostgreSQL."""
    with database_url(request.param, tmp_path_factory.mktemp("db")) as db, \
            LiveServer(ServeConfig(models=[str(ckpt)], db=db, dtype="fp32", max_batch=4, max_waiting=8)) as s:
        s.key = s.store.create_key("tests")[1]
        s.admin = s.store.create_key("admin", role="admin")[1]
        yield s


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy/seeded generations straight from the engine, one request at a time (what the server must return)."""
    ck = checkpoint.load(ckpt)
    engine = Engine(ck.model, ck.tokenizer, max_batch=1)

    def run(ids, **kw):
        text, toks, finish = "", 0, None
        for ev in engine.generate([ids], SamplingParams(**kw)):
            text += ev.text
            toks += ev.token_id is not None
            finish = ev.finish_reason or finish
        return text, toks, finish

    return ck.tokenizer, run


def test_chat_nonstreaming_matches_engine_and_ledger(server, reference):
    """Guards the request -> chat template -> engine -> response path, usage counts, and the ledger row
    plus stored conversation written before the response."""
    tok, run = reference
    c = server.client(server.key)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0, user="alice")
    ids, _ = tok.render(MSGS, add_generation_prompt=True)
    text, ntok, finish = run(ids, temperature=0, max_new_tokens=12)
    assert r.object == "chat.completion" and r.model == server.model.id and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), ntok, len(ids) + ntok)
    [row] = server.store.usage_rows(r.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.model, row.user) == (200, len(ids), ntok, server.model.id, "alice")
    assert row.latency_ms > 0 and row.ttft_ms is not None
    [gen] = server.store.iter_generations(r.id)
    assert gen.output == text and gen.snapshot == server.model.snapshot and gen.sampling["temperature"] == 0
    msgs = server.store.conversation_messages(gen.conversation_id)
    assert [(m.role, m.content) for m in msgs] == [(m["role"], m["content"]) for m in MSGS] + [("assistant", text)]
    assert msgs[-1].generation_id == gen.id


def test_ttft_is_the_first_token_not_the_last(server):
    """Guards the ledger's time to first token (finding 7: the old check, ttft <= latency, held by
    construction). With every engine step slowed to 50 ms, 12 tokens take at least 12 steps: the
    first token comes after one step, and at least 10 more steps follow it before the response ends."""
    with slowed(server.model, 0.05):
        r = server.client(server.key).chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, extra_body={"ignore_eos": True})
    [row] = server.store.usage_rows(r.id)
    assert r.usage.completion_tokens == 12
    assert 50 <= row.ttft_ms and row.latency_ms - row.ttft_ms >= 10 * 50, (row.ttft_ms, row.latency_ms)


def test_streaming_with_usage(server, reference):
    """Guards SSE framing, deltas adding up to the full text, the finish chunk, and the usage chunk."""
    tok, run = reference
    c = server.client(server.key)
    chunks = list(c.chat.completions.create(model=server.model.id, messages=MSGS, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    ids, _ = tok.render(MSGS, add_generation_prompt=True)
    text, ntok, finish = run(ids, temperature=0, max_new_tokens=20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ntok and chunks[-1].usage.prompt_tokens == len(ids)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1
    [row] = server.store.usage_rows(chunks[0].id)
    assert (row.status, row.completion_tokens) == (200, ntok)


def test_n_choices_and_seed_reproducibility(server, reference):
    """Guards n>1 (one engine request per choice), per-choice seeds (seed+i), and same seed -> same text."""
    tok, run = reference
    c = server.client(server.key)
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = c.chat.completions.create(n=3, **kw)
    b = c.chat.completions.create(n=3, **kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    ids, _ = tok.render(MSGS, add_generation_prompt=True)
    total = 0
    for i in range(3):
        text, ntok, _ = run(ids, temperature=1.0, top_p=0.9, seed=1234 + i, max_new_tokens=10)
        assert a.choices[i].message.content == text
        total += ntok
    assert len({x.message.content for x in a.choices}) > 1  # different seeds, different samples
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (len(ids), total)  # the prompt is billed once
    assert len(list(server.store.iter_generations(a.id))) == 3
    # streaming n>1 interleaves choices but each adds up to the same text
    chunks = list(c.chat.completions.create(n=3, stream=True, **kw))
    for i in range(3):
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i) == a.choices[i].message.content


def test_stop_sequences(server, reference):
    """Guards stop strings: the text ends right before the first occurrence, finish_reason "stop"."""
    tok, run = reference
    ids, _ = tok.render(MSGS, add_generation_prompt=True)
    full, _, _ = run(ids, temperature=0, max_new_tokens=40, ignore_eos=False)
    assert len(full) > 6, "the greedy reference is too short to pick a stop string from"
    stop = full[3:6]
    c = server.client(server.key)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(server):
    """Guards logprobs/top_logprobs: one entry per content token, tokens spell the text, greedy picks the top one."""
    c = server.client(server.key)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert bytes(b for t in lp for b in t.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    for t in lp:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-5)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_completions_endpoint(server, reference):
    """Guards /v1/completions: plain prompt (no chat template), echo, legacy logprobs, token-id prompts, streaming."""
    tok, run = reference
    c = server.client(server.key)
    prompt = "The capital of France is"
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    text, ntok, finish = run(ids, temperature=0, max_new_tokens=6)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert r.object == "text_completion" and r.choices[0].text == prompt + text and r.usage.prompt_tokens == len(ids)
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    assert r.choices[0].text == text and len(r.choices[0].logprobs.tokens) == len(r.choices[0].logprobs.token_logprobs)
    assert all(len(d) <= 2 for d in r.choices[0].logprobs.top_logprobs)
    r = c.completions.create(model="tiny", prompt=[prompt, "学而时习之"], max_tokens=6, temperature=0, n=2)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text == text
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == ntok


def test_models_health_metrics(server):
    """Guards /v1/models (pinned name@snapshot ids), /health, and the Prometheus text exposition."""
    c = server.client(server.key)
    [m] = c.models.list().data
    assert m.id == f"tiny@{checkpoint.snapshot_id(server.model.path)}" and m.owned_by == "chatforge"
    assert c.models.retrieve(m.id).id == m.id
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}  # liveness only without an admin key
    assert httpx.get(server.base_url + "/health", headers={"Authorization": f"Bearer {server.key}"}).json() == {"status": "ok"}
    h = httpx.get(server.base_url + "/health", headers={"Authorization": f"Bearer {server.admin}"}).json()
    assert h["status"] == "ok" and h["models"] == [m.id]
    c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3)
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    r = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
    text = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {server.admin}"}).text
    assert 'chatforge_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert f'chatforge_queue_depth{{model="{m.id}"}}' in text and "chatforge_active_slots" in text
    assert f'chatforge_prefix_cache_hit_tokens{{model="{m.id}"}}' in text
    assert "chatforge_request_latency_seconds_bucket" in text and "chatforge_time_to_first_token_seconds_count" in text
    assert f'chatforge_tokens_total{{kind="completion",model="{m.id}"}}' in text


def test_errors_are_openai_errors(server):
    """Guards status codes and error objects for bad keys, unknown models and bad parameters, as the SDK's exception types."""
    c = server.client(server.key)
    ok = dict(model="tiny", messages=MSGS, max_tokens=4)
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("cf-not-a-real-key").chat.completions.create(**ok)
    assert e.value.code == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
    r = httpx.get(server.base_url + "/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    k, secret = server.store.create_key("to-revoke")
    server.client(secret).models.list()
    server.store.revoke_key(str(k.id))
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        server.client(secret).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(**{**ok, "model": "gpt-4"})
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(**{**ok, "model": "tiny@000000000000"})  # a snapshot this server does not have
    bad = [
        ({"temperature": 2.5}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"n": 17}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"), ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1000}, "messages"), ({"messages": []}, "messages"), ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"), ({"stop": ["x" * 257]}, "stop.0"),
        ({"stop": "x" * 257}, "stop"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x" * 200_001}]}, "messages.[0].content"),
    ]
    for change, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{**ok, **change})
        assert e.value.status_code == 400 and e.value.param == param, (change, e.value.body)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: frobnicate"):
        c.chat.completions.create(**ok, extra_body={"frobnicate": 1})
    hdr = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=hdr)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"x" * 9_000_000, headers=hdr)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # the same body sent chunked (no Content-Length) is a 413 too, not FastAPI's 400 "error parsing the body"
    for path in ("/v1/chat/completions", "/web/conversations"):
        r = httpx.post(server.base_url + path, content=iter([b"x" * 1_000_000] * 9), headers=hdr)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", (path, r.text)
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=hdr,
                   content=iter([b'{"model": "tiny", "messages": [{"role": "user", ', b'"content": "hi"}], "max_tokens": 2}']))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # a chunked body under the limit still works
    assert httpx.get(server.base_url + "/v1/nothing-here", headers=hdr).status_code == 404
    # refused requests of a known key are in the ledger too, with their status
    statuses = {u.status for u in server.store.usage_rows() if u.status != 200}
    assert {400, 404} <= statuses


def test_rate_limits_and_quota(server):
    """Guards per-key rpm (429 + Retry-After), tpm and the token quota (429 insufficient_quota)."""
    _, rpm_key = server.store.create_key("rpm", rpm=2)
    c = server.client(rpm_key)
    req = dict(model="tiny", messages=MSGS, max_tokens=3)
    c.chat.completions.create(**req)
    c.chat.completions.create(**req)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(**req)
    assert e.value.code == "rate_limit_exceeded" and 1 <= int(e.value.response.headers["retry-after"]) <= 60
    _, tpm_key = server.store.create_key("tpm", tpm=60)
    with pytest.raises(openai.RateLimitError, match="request too large"):
        server.client(tpm_key).chat.completions.create(**{**req, "max_tokens": 80})
    _, quota_key = server.store.create_key("quota", quota_tokens=30)
    cq = server.client(quota_key)
    r = cq.chat.completions.create(**{**req, "max_tokens": 20})
    assert r.usage.total_tokens >= 30  # this request used the quota up
    with pytest.raises(openai.RateLimitError) as e:
        cq.chat.completions.create(**req)
    assert e.value.code == "insufficient_quota"


def test_server_full_503_and_disconnect_cancels(ckpt, db_url):
    """Guards backpressure (bounded engine queue -> 503 + Retry-After) and that a client leaving mid-stream
    (or while queued) cancels its generation, frees the slot, and leaves a 499 ledger row."""
    cfg = ServeConfig(models=[str(ckpt)], db=db_url, dtype="fp32", max_batch=1, max_waiting=1,
                      public_metrics=True)
    with LiveServer(cfg) as s:
        slow_engine(s.model, 0.05)
        _, key = s.store.create_key("k")
        long = {"model": "tiny", "messages": MSGS, "max_tokens": 80, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json=long) as a:  # takes the one slot
                assert a.status_code == 200
                lines = a.iter_lines()
                while not next(lines).startswith('data: {"id'):
                    pass
                t0 = time.time()
                while s.model.loop.active_slots < 1 and time.time() - t0 < 5:
                    time.sleep(0.01)
                with h.stream("POST", "/v1/chat/completions", json=long) as b:  # waits in the queue
                    assert b.status_code == 200
                    t0 = time.time()
                    while s.model.loop.queue_depth < 1 and time.time() - t0 < 5:
                        time.sleep(0.01)
                    with pytest.raises(openai.InternalServerError) as e:  # the queue is full: 503, not a longer queue
                        s.client(key).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
                    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
                    assert e.value.code == "server_full"
            # both clients left: a after one chunk, b while queued. 80 slow steps would take 4 s.
            t0 = time.time()
            while (s.model.loop.active_slots or s.model.loop.queue_depth) and time.time() - t0 < 3:
                time.sleep(0.02)
            assert s.model.loop.active_slots == 0 and s.model.loop.queue_depth == 0
        t0 = time.time()
        while len([u for u in s.store.usage_rows() if u.status == 499]) < 2 and time.time() - t0 < 5:
            time.sleep(0.05)
        rows = s.store.usage_rows()
        cancelled = [u for u in rows if u.status == 499]
        assert len(cancelled) == 2 and all(u.completion_tokens < 80 for u in cancelled)
        assert [u.status for u in rows].count(503) == 1
        assert "chatforge_cancelled_requests_total" in httpx.get(s.base_url + "/metrics").text  # serve --public-metrics


def test_nonstreaming_disconnect_cancels(ckpt, db_url):
    """Guards the non-streaming path too: a client that gives up while waiting frees its slot (499 row)."""
    cfg = ServeConfig(models=[str(ckpt)], db=db_url, dtype="fp32", max_batch=1, max_waiting=1,
                      public_metrics=True)
    with LiveServer(cfg) as s:
        slow_engine(s.model, 0.05)
        _, key = s.store.create_key("k")
        body = {"model": "tiny", "messages": MSGS, "max_tokens": 80, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=0.5)
        t0 = time.time()
        # the ledger row is written when the handler sees the disconnect; the slot frees at the engine's next step
        while not ([u for u in s.store.usage_rows() if u.status == 499] and s.model.loop.active_slots == 0) and time.time() - t0 < 3:
            time.sleep(0.02)
        [row] = s.store.usage_rows()
        assert row.status == 499 and row.completion_tokens < 80 and s.model.loop.active_slots == 0


def test_per_key_concurrency_429(ckpt, db_url):
    """Guards the per-key bound: a key over its concurrent-request limit gets 429 while other keys are served."""
    cfg = ServeConfig(models=[str(ckpt)], db=db_url, dtype="fp32", max_batch=2, max_waiting=8,
                      max_concurrent_per_key=1)
    with LiveServer(cfg) as s:
        slow_engine(s.model, 0.02)
        _, k1 = s.store.create_key("k1")
        _, k2 = s.store.create_key("k2")
        with httpx.Client(base_url=s.base_url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {k1}"},
                          json={"model": "tiny", "messages": MSGS, "max_tokens": 60, "stream": True, "ignore_eos": True}) as a:
                lines = a.iter_lines()  # (keep the iterator: closing it closes the connection)
                next(lines)
                with pytest.raises(openai.RateLimitError) as e:
                    s.client(k1).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
                assert e.value.code == "rate_limit_exceeded" and "concurrent" in e.value.message
                s.client(k2).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)


def test_load_small(server):
    """Guards concurrent streaming through continuous batching: no errors, and the ledger holds exactly one
    row per completed request with the token counts the client was told (a small version of benchmarks/serve_load.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_load import run_load

    before = {u.request_id for u in server.store.usage_rows()}
    with slowed(server.model, 0.01):  # a floor under each step, so the timings below have something to show
        res = asyncio.run(run_load(server.base_url, server.key, "tiny", clients=12, requests=36, max_tokens=12))
    print(res.summary())
    assert res.errors == {} and len(res.completed) == 36
    rows = {u.request_id: u for u in server.store.usage_rows() if u.request_id not in before}
    assert set(rows) == set(res.completed)
    for rid, usage in res.completed.items():
        row = rows[rid]
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, usage["prompt_tokens"], usage["completion_tokens"])
        # each token after the first needs an engine step of its own (>= 10 ms): TTFT is when the first came
        assert row.ttft_ms >= 10 and row.latency_ms - row.ttft_ms >= 0.9 * 10 * (row.completion_tokens - 1), (row.ttft_ms, row.latency_ms)


def test_pages_routes_share_the_api_admission_and_ledger(server):
    """Guards finding 2: the /web/* routes skipped the rate limiter and the ledger (a key with
    --rpm 1 got 429 on its second /v1 call, then 20 of 20 POST /web/conversations went through).
    A small load test: 20 concurrent page calls from a key allowed 5 a minute get 5 answers and 15
    429s with Retry-After, every one of them has a ledger row, and the /v1 endpoints see the same
    window; a key over its token quota is refused on the pages too."""
    from chatforge.store import Usage

    k, secret = server.store.create_key("pages-rpm", rpm=5)
    hdr = {"Authorization": f"Bearer {secret}"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=hdr, timeout=60) as h:
            return await asyncio.gather(*[h.post("/web/conversations", json={"system": f"s{i}"}) for i in range(20)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * 15, codes
    limited = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 60 for r in limited)
    with pytest.raises(openai.RateLimitError):  # the pages used the key's minute; the API shares it
        server.client(secret).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert httpx.get(server.base_url + "/web/conversations", headers=hdr).status_code == 429
    with server.store.session() as s:
        rows = [u for u in s.query(Usage).filter(Usage.key_id == k.id)]
    web = [u for u in rows if u.endpoint == "web"]
    assert sorted(u.status for u in web) == [200] * 5 + [429] * 16 and {u.model for u in web} == {"POST /web/conversations", "GET /web/conversations"}
    assert [u.status for u in rows if u.endpoint == "chat.completions"] == [429]
    # a key whose quota is used up is refused on every route, pages included
    q, qsecret = server.store.create_key("pages-quota", quota_tokens=1)
    server.client(qsecret).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    r = httpx.post(server.base_url + "/web/conversations", json={}, headers={"Authorization": f"Bearer {qsecret}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    # and bad input on a page route is a 400 naming the field, in the ledger too
    r = httpx.post(server.base_url + "/web/conversations", json={"system": "x" * 200_001}, headers={"Authorization": f"Bearer {qsecret}"})
    assert r.status_code == 429  # admission comes first: the over-quota key is not even validated
    _, fresh = server.store.create_key("pages-big")
    r = httpx.post(server.base_url + "/web/conversations", json={"system": "x" * 200_001}, headers={"Authorization": f"Bearer {fresh}"})
    assert r.status_code == 400 and "200000" in r.json()["error"]["message"], r.text


def test_security_headers_on_every_page(server):
    """Guards finding 4: the pages sent no Content-Security-Policy while the API key sits in
    localStorage. Every page, static file and API answer carries the CSP (scripts only from this
    server, nowhere else to connect to, no framing) and the usual hardening headers."""
    for path in ("/", "/label", "/static/chat.js", "/static/style.css", "/health", "/v1/models", "/openapi.json"):
        h = httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {server.key}"}).headers
        csp = h["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert (h["x-content-type-options"], h["x-frame-options"], h["referrer-policy"]) == ("nosniff", "DENY", "no-referrer"), path
    for page in ("index.html", "label.html"):  # nothing inline for the CSP to block
        html = (Path(__import__("chatforge.serve.web", fromlist=["STATIC"]).STATIC) / page).read_text()
        assert "style=" not in html and "<script>" not in html and "onclick=" not in html, page
