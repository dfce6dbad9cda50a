"""Engine: KV-cache decode equals full recompute; batching, seeds, stops, UTF-8, cancellation, logprobs."""

from __future__ import annotations

import threading

import pytest
import torch

from chatforge.engine import Engine, EngineLoop, SamplingParams, _Request, sample_next
from chatforge.model import GPT, GPTConfig
from chatforge.sample import sample_tokens


def tiny(tok, block="llama", seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2 if block == "llama" else 0, d_model=32, max_seq_len=128, block=block)
    m = GPT(cfg)
    m.init_weights(seed)
    return m.eval()


def run(engine, prompts, sp):
    outs = {i: [] for i in range(len(prompts))}
    texts = {i: "" for i in range(len(prompts))}
    finish = {}
    for ev in engine.generate(prompts, sp):
        if ev.token_id is not None:
            outs[ev.request_id].append(ev.token_id)
        texts[ev.request_id] += ev.text
        if ev.finish_reason:
            finish[ev.request_id] = ev.finish_reason
    return outs, texts, finish


@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_kv_cache_greedy_equals_recompute(tok, block):
    """Guards the KV cache (positions, GQA heads, masks) against recomputing the whole sequence."""
    m = tiny(tok, block)
    prompt = tok.encode("The quick brown fox 床前明月光")
    ref = sample_tokens(m, prompt, 20, temperature=0)
    outs, _, _ = run(Engine(m, tok, max_batch=2), [prompt], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    assert outs[0] == ref


def test_batched_equals_one_at_a_time(tok):
    """Guards right-padded prefill and per-row decode masks leaking between sequences of different lengths."""
    m = tiny(tok)
    prompts = [tok.encode(t) for t in ["Hi", "A journey of a thousand miles", "学而时习之，不亦说乎？有朋自远方来", "x"]]
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    alone = [run(Engine(m, tok, max_batch=1), [p], sp)[0][0] for p in prompts]
    together, _, _ = run(Engine(m, tok, max_batch=4), prompts, sp)
    assert [together[i] for i in range(4)] == alone
    # fewer slots than requests: continuous batching admits the rest as slots free up
    queued, _, _ = run(Engine(m, tok, max_batch=2), prompts, [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (3, 12, 7, 12)])
    assert [queued[i] for i in range(4)] == [alone[0][:3], alone[1], alone[2][:7], alone[3]]


def test_bf16_cache_decode_equals_bf16_recompute(tok):
    """Guards the bf16 path (cache dtype, fp32 sampling) against a bf16 full recompute."""
    import copy

    m = copy.deepcopy(tiny(tok)).to(torch.bfloat16)
    prompt = tok.encode("The capital of France")
    ref = sample_tokens(m, prompt, 8, temperature=0)
    out = run(Engine(m, tok), [prompt], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0][0]
    assert out[:4] == ref[:4]  # bf16 rounding differs between one long and many short attentions


def test_same_seed_same_text_regardless_of_batch(tok):
    """Guards sampling that depends on batch composition or a global RNG."""
    m = tiny(tok)
    p = tok.encode("Once upon a time")
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=16, seed=123, ignore_eos=True)
    a = run(Engine(m, tok), [p], sp)[0][0]
    b = run(Engine(m, tok), [tok.encode("other prompt"), p], [SamplingParams(seed=7, max_new_tokens=16), sp])[0][1]
    c = run(Engine(m, tok), [p], SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=16, seed=124, ignore_eos=True))[0][0]
    assert a == b and a != c


def test_logprobs_match_full_forward(tok):
    """Guards logprobs computed from the wrong position or after penalties/temperature."""
    m = tiny(tok)
    p = tok.encode("Hello world")
    events = [e for e in Engine(m, tok).generate([p], SamplingParams(temperature=0.7, seed=1, max_new_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True))]
    ids = p + [e.token_id for e in events]
    with torch.no_grad():
        ref = torch.log_softmax(m(torch.tensor([ids]))[0].float(), -1)
    for j, e in enumerate(events):
        row = ref[len(p) - 1 + j]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == torch.topk(row, 3).indices.tolist()


class _FakeTok:
    """A tokenizer whose tokens are given strings, to place stop strings and UTF-8 splits exactly."""

    def __init__(self, pieces: dict[int, bytes]):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def stop_ids(self):
        return [0]


def _scripted(pieces, script, sp):
    """Drive Engine's detokenizer with a fixed token script (the model is bypassed)."""
    eng = Engine.__new__(Engine)
    eng.tok = _FakeTok(pieces)
    r = _Request(0, [1], sp, {0}, "cpu")
    out, hit = "", False
    for t in script:
        r.out.append(t)
        d, hit = eng._detok(r)
        out += d
        if hit:
            break
    if not hit:
        out += eng._flush(r)
    return out, hit


def test_stop_string_across_tokens():
    """Guards stop strings split over tokens leaking their first half into the stream."""
    pieces = {1: b"x", 2: b"Hello ", 3: b"wor", 4: b"ld", 5: b"##", 6: b"EN", 7: b"D more"}
    out, hit = _scripted(pieces, [2, 3, 4, 5, 6, 7], SamplingParams(stop=["##END"]))
    assert hit and out == "Hello world"
    out, hit = _scripted(pieces, [2, 5, 3], SamplingParams(stop=["##END"]))
    assert not hit and out == "Hello ##wor"


def test_utf8_never_half_a_character():
    """Guards streaming that emits U+FFFD for a Chinese character or emoji split over byte tokens."""
    zh, emoji = "中".encode(), "🎉".encode()
    pieces = {1: b"", 2: zh[:1], 3: zh[1:], 4: emoji[:2], 5: emoji[2:], 6: b"!"}
    eng = Engine.__new__(Engine)
    eng.tok = _FakeTok(pieces)
    r = _Request(0, [1], SamplingParams(), {0}, "cpu")
    deltas = []
    for t in [2, 3, 4, 5, 6]:
        r.out.append(t)
        deltas.append(eng._detok(r)[0])
    assert deltas == ["", "中", "", "🎉", "!"]


def test_stop_token_and_length(tok):
    m = tiny(tok)
    p = tok.encode("hi")
    ref = sample_tokens(m, p, 8, temperature=0)
    j = max(i for i in range(len(ref)) if ref[i] not in ref[:i])  # the last token that is new when it appears
    sp = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[ref[j]], ignore_eos=True)
    outs, _, fin = run(Engine(m, tok), [p], sp)
    assert outs[0] == ref[: j + 1] and fin[0] == "stop"
    outs, _, fin = run(Engine(m, tok), [p], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert len(outs[0]) == 4 and fin[0] == "length"


def test_context_window_limits(tok):
    m = tiny(tok)
    eng = Engine(m, tok, max_seq_len=16)
    with pytest.raises(ValueError, match="context window"):
        eng.add(list(range(20)))
    outs, _, fin = run(eng, [tok.encode("hello")[:5]], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    assert fin[0] == "length" and len(outs[0]) + len(tok.encode("hello")[:5]) == 16


def test_penalties_by_hand():
    """Guards penalty arithmetic: repetition divides/multiplies, frequency and presence subtract."""
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    r = _Request(0, [0], SamplingParams(temperature=0, repetition_penalty=2.0), set(), "cpu")
    r.counts = {1: 1}
    # token 0 (prompt): 2.0/2 = 1.0; token 1 (output): -1*2 = -2; so argmax is 0 still (1.0 > 0.5)
    assert sample_next(logits, r) == 0
    r = _Request(0, [3], SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.6), set(), "cpu")
    r.counts = {0: 2}
    # token 0: 2.0 - 1.0*2 - 0.6 = -0.6 -> argmax becomes token 2 (0.5)
    assert sample_next(logits, r) == 2


def test_sampling_params_validation():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_logprobs=21), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_cancellation_frees_slot(tok):
    """Guards cancelled requests holding their slot (the server relies on this for disconnects)."""
    m = tiny(tok)
    eng = Engine(m, tok, max_batch=1)
    a = eng.add(tok.encode("first"), SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    b = eng.add(tok.encode("second"), SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    eng.step()
    assert [r.rid for r in eng.active] == [a]
    eng.cancel(a)
    finished = {}
    while eng.has_work:
        for ev in eng.step():
            if ev.finish_reason:
                finished[ev.request_id] = ev.finish_reason
    assert finished == {a: "cancelled", b: "length"}


def test_engine_loop_concurrent_submitters(tok):
    """Guards the background loop: many threads submit, each gets exactly its own tokens."""
    m = tiny(tok)
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = [tok.encode(f"prompt number {i}") for i in range(6)]
    expected = [run(Engine(m, tok, max_batch=1), [p], sp)[0][0] for p in prompts]
    loop = EngineLoop(Engine(m, tok, max_batch=3))
    results = {}

    def worker(i):
        results[i] = [e.token_id for e in loop.submit(prompts[i], sp) if e.token_id is not None]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    loop.close()
    assert [results[i] for i in range(6)] == expected


def test_int8_decode_linear():
    """Guards the int8 decode path: per-channel quantization error bound and the many-rows fallback."""
    from chatforge.quantize import Int8DecodeLinear, int8_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    q, scale = int8_weights(lin.weight)
    assert (q.float() * scale[:, None] - lin.weight.float()).abs().max() <= scale.max() / 2 + 1e-6
    layer = Int8DecodeLinear(lin.weight, lin.bias)
    x1 = torch.randn(1, 64).to(torch.bfloat16)
    ref = x1.float() @ (q.float() * scale[:, None]).t() + lin.bias.float()
    torch.testing.assert_close(layer(x1).float(), ref, atol=0.05, rtol=0.02)
    x8 = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(layer(x8), lin(x8))  # more rows than max_rows: the original weights, exactly


def test_int8_engine_close_to_bf16(tok):
    """Guards the engine's int8 option wiring (all linears and the head) on a whole decode."""
    import copy

    m = copy.deepcopy(tiny(tok)).to(torch.bfloat16)
    p = tok.encode("The capital of France")
    ref = sample_tokens(m, p, 1, temperature=0)
    ev = next(iter(Engine(copy.deepcopy(m), tok, int8=True).generate([p], SamplingParams(temperature=0, max_new_tokens=1, logprobs=True))))
    assert ev.token_id == ref[0]
