"""Engine: KV-cache decode equals full recompute; batching, seeds, stops, UTF-8, cancellation, logprobs."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from chatforge.engine import Engine, EngineLoop, FEW_ROWS, FastLinears, QueueFull, SamplingParams
from chatforge.engine.sampling import Request, penalized_logits, sample_next, sampling_probs
from chatforge.model import GPT, GPTConfig
from chatforge.sample import sample_tokens
from chatforge.train import common as C


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
    r = Request(0, [1], sp, {0}, "cpu")
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
    r = Request(0, [1], SamplingParams(), {0}, "cpu")
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
    r = Request(0, [0], SamplingParams(temperature=0, repetition_penalty=2.0), set(), "cpu")
    r.counts = {1: 1}
    # token 0 (prompt): 2.0/2 = 1.0; token 1 (output): -1*2 = -2; so argmax is 0 still (1.0 > 0.5)
    assert sample_next(logits, r) == 0
    r = Request(0, [3], SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.6), set(), "cpu")
    r.counts = {0: 2}
    # token 0: 2.0 - 1.0*2 - 0.6 = -0.6 -> argmax becomes token 2 (0.5)
    assert sample_next(logits, r) == 2


def test_sampling_params_validation():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"top_logprobs": 21}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_tiny_temperature_is_refused_not_nan():
    """Guards finding 6: SamplingParams took temperature=1e-6, so logits / T overflowed to inf and
    the probabilities to NaN in `chat`, PPO rollouts and `label sample` (only the server guarded it)."""
    with pytest.raises(ValueError, match=r"temperature=1e-06 is below 0.0001: use 0 for greedy"):
        SamplingParams(temperature=1e-6)
    assert SamplingParams(temperature=1e-4).temperature == 1e-4 and SamplingParams(temperature=0).temperature == 0


def test_stop_strings_are_capped():
    """Guards finding 1: stop strings of any length (the body limit allowed millions of characters)
    stalled the shared engine loop; now at most 256 characters each, named in the error."""
    SamplingParams(stop=["x" * 256])
    with pytest.raises(ValueError, match="stop: a stop string of 257 characters; at most 256 each"):
        SamplingParams(stop=["ok", "x" * 257])


def _holdback_reference(text: str, emitted: int, stops: list[str]) -> tuple[str, bool]:
    """The old quadratic rule, as the reference: cut at the earliest stop string, else hold back the
    longest suffix that begins a stop string."""
    hits = [at for s in stops if (at := text.find(s)) != -1]
    if hits:
        return text[: min(hits)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab#", min_size=1, max_size=4), min_size=1, max_size=12),
       st.lists(st.text("ab#", min_size=1, max_size=6), min_size=1, max_size=3))
def test_linear_holdback_matches_the_quadratic_rule(chunks, stops):
    """Guards the KMP hold-back (finding 1's fix) against the rule it replaced: after every token the
    text streamed so far, and where it stops, are what the brute-force rule gives."""
    pieces = {1: b"x", **{i + 2: c.encode() for i, c in enumerate(chunks)}}
    eng = Engine.__new__(Engine)
    eng.tok = _FakeTok(pieces)
    r = Request(0, [1], SamplingParams(stop=stops), {0}, "cpu")
    text, out = "", ""
    for i, c in enumerate(chunks):
        r.out.append(i + 2)
        d, hit = eng._detok(r)
        out += d
        text += c
        want, want_hit = _holdback_reference(text, 0, stops)
        assert (out, hit) == (want, want_hit)
        if hit:
            break


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


def test_int8_linear():
    """Guards the int8 weight copies: per-channel quantization error bound, and the kernel call
    computing x @ dequantized(W).T + b in the input's dtype."""
    from chatforge.quantize import int8_linear, int8_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q, scale = int8_weights(lin.weight)
    assert (q.float() * scale[:, None] - lin.weight.float()).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(3, 1, 64)
    ref = x @ (q.float() * scale[:, None]).t() + lin.bias
    y = int8_linear(x, q, scale.to(torch.bfloat16), lin.bias.detach())
    assert y.shape == (3, 1, 96) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=0.05, rtol=0.02)  # bf16 activations and scales


def test_int4_linear():
    """Guards the int4 weight copies: weights that are already 4-bit per group of 32 (as a GGUF
    Q4_1 import gives) come back exactly, the kernel computes x @ dequantized(W).T + b in the
    input's dtype, other weights keep the groupwise error bound, and shapes the kernel does not
    take are declined."""
    from chatforge.quantize import INT4_GROUP, int4_linear, int4_weights

    torch.manual_seed(0)
    out_f, in_f = 48, 96
    q = torch.randint(0, 16, (out_f, in_f // INT4_GROUP, INT4_GROUP))
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full 4-bit range, as Q4_1's quantizer makes it
    scale = torch.rand(out_f, in_f // INT4_GROUP, 1) * 0.01 + 0.001
    lo = torch.randn(out_f, in_f // INT4_GROUP, 1) * 0.01
    w = (q * scale + lo).reshape(out_f, in_f)
    bias = torch.randn(out_f)
    packed, sz = int4_weights(w)
    x = torch.randn(3, 1, in_f)
    y = int4_linear(x, packed, sz, bias)
    assert y.shape == (3, 1, out_f) and y.dtype == torch.float32
    ref = x.to(torch.bfloat16).float() @ w.t() + bias
    torch.testing.assert_close(y, ref, atol=0.02, rtol=0.01)  # bf16 activations and scales only
    g = torch.randn(out_f, in_f)
    packed, sz = int4_weights(g)
    eye = torch.eye(in_f)
    deq = int4_linear(eye, packed, sz, None).t()  # column j = W @ e_j: the dequantized weights
    groups = g.reshape(out_f, -1, INT4_GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (deq - g).abs().reshape(out_f, -1, INT4_GROUP).amax(-1)
    assert (err <= step / 2 + 0.02 * groups.abs().amax(-1)).all()  # half a step, plus bf16 rounding
    assert int4_weights(torch.randn(40, 96)) is None and int4_weights(torch.randn(48, 80)) is None


def test_native_kernels_linear():
    """Guards the project's int4 kernel (csrc/grouped_linear.cpp, built here): x @ W.T with fp32
    activations equals an fp64 matmul on its dequantized weights to fp32 rounding at every row
    count (1-8 in one pass over the weights, more in several), weights already 4-bit per group
    come back exactly (fp16 scales and minimums), other weights within half a step, shapes it does
    not take are declined, and torch.compile traces it (the compiled decode step); its fp16-weight
    path (fp16 decode copies) equals an fp64 matmul on the same fp16 weights."""
    from chatforge.quantize import INT4_GROUP, f16_native_linear, int4_native_dequantized, int4_native_linear, int4_native_weights, native_kernels

    assert native_kernels() is None, native_kernels()
    torch.manual_seed(0)
    out_f, in_f = 41, 96  # an odd count: the kernels that take output rows in pairs have one left over
    q = torch.randint(0, 16, (out_f, in_f // INT4_GROUP, INT4_GROUP))
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full 4-bit range, as Q4_1's quantizer makes it
    scale = (torch.rand(out_f, in_f // INT4_GROUP, 1) * 0.01 + 0.001).half().float()  # Q4_1 keeps them in fp16
    lo = (torch.randn(out_f, in_f // INT4_GROUP, 1) * 0.01).half().float()
    w = (q * scale + lo).reshape(out_f, in_f)
    packed, sm = int4_native_weights(w)
    assert packed.shape == (out_f, in_f // 2) and packed.dtype == torch.uint8 and sm.dtype == torch.float16
    torch.testing.assert_close(int4_native_dequantized(packed, sm), w, atol=1e-6, rtol=0)
    bias = torch.randn(out_f)
    for rows in (1, 2, 5, 8, 11):
        x = torch.randn(rows, 1, in_f)
        y = int4_native_linear(x, packed, sm, bias)
        assert y.shape == (rows, 1, out_f) and y.dtype == torch.float32
        ref = (x.double() @ w.double().t() + bias.double()).float()
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5)  # fp32 sums, no bf16 anywhere
    big, threads = int4_native_weights(torch.randn(1001, in_f)), torch.get_num_threads()
    for rows in (1, 8, 11):  # split between two threads in parts of odd sizes, or not split: the same sums
        x = torch.randn(rows, in_f)
        torch.set_num_threads(2)
        y = int4_native_linear(x, *big, None)
        torch.set_num_threads(1)
        try:
            assert torch.equal(int4_native_linear(x, *big, None), y)
        finally:
            torch.set_num_threads(threads)
    g = torch.randn(out_f, in_f)
    deq = int4_native_dequantized(*int4_native_weights(g))
    groups = g.reshape(out_f, -1, INT4_GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (deq - g).abs().reshape(out_f, -1, INT4_GROUP).amax(-1)
    assert (err <= step / 2 + 2 ** -10 * groups.abs().amax(-1)).all()  # half a step, plus fp16 scales and minimums
    assert int4_native_weights(torch.randn(48, 80)) is None
    compiled = torch.compile(lambda x: int4_native_linear(x, packed, sm, None), fullgraph=True)
    x = torch.randn(2, in_f)
    torch.testing.assert_close(compiled(x), int4_native_linear(x, packed, sm, None))
    w16 = g.half()  # fp16 copies: the same kernel's fp16 path, fp32 activations and sums
    for rows in (1, 9):
        x = torch.randn(rows, in_f) * 100
        ref = (x.double() @ w16.double().t() + bias.double()).float()
        torch.testing.assert_close(f16_native_linear(x, w16, bias), ref, atol=2e-4, rtol=1e-5)


def test_native_int4_one_row():
    """Guards one row of x on int4 copies (a single stream's decode step; on a CPU with AVX-512
    VNNI or AVX2, integer dot products with x held in pieces per input): at 1, 3, 4, 5, 17, 18, 19,
    24, 28 and 48 groups (partly filled loads of 4 groups, last blocks of up to 8 groups, which skip
    the block's transpose, and of 12, which do not, and full ones), for inputs with an
    outlier, a zero group or a group near fp32's smallest normals (those take the fp32 kernel), y
    is within 2^-22 of |W| @ (each input's group maximum |x|) of an fp64 matmul, as the fp32
    kernels are (x held to 2^-15 of it would not be); NaN or inf in x gives no finite output. Both
    single-row kernels where the integer one is built."""
    from chatforge.quantize import native_kernels

    assert native_kernels() is None, native_kernels()
    integer = torch.ops.chatforge_native.q4_integer_rows(True)
    try:
        for on in {integer, False}:
            torch.ops.chatforge_native.q4_integer_rows(on)
            _int4_one_row_cases()
    finally:
        torch.ops.chatforge_native.q4_integer_rows(integer)


def _int4_one_row_cases():
    from chatforge.quantize import int4_native_dequantized, int4_native_linear, int4_native_weights

    torch.manual_seed(0)
    for in_f in (32, 96, 128, 160, 544, 576, 608, 768, 896, 1536):
        packed, sm = int4_native_weights(torch.randn(67, in_f) * 0.05)
        deq = int4_native_dequantized(packed, sm).double()
        for kind in ("normal", "outlier", "zeros", "tiny"):
            x = torch.randn(1, in_f)
            if kind == "outlier":
                x[0, 5], x[0, -1] = 1e4, -3e3
            elif kind == "zeros":
                x[0, :32] = 0
            elif kind == "tiny":
                x[0, -32:] *= 1e-33
            group_max = x.abs().reshape(1, -1, 32).amax(-1, keepdim=True).expand(1, -1, 32).reshape(1, -1)
            bound = 2 ** -22 * (group_max.double() @ deq.abs().t())
            for rows in (1, 2):  # 2: the fp32 kernel, for comparison
                y = int4_native_linear(x.expand(rows, -1), packed, sm, None)[:1]
                err = (y.double() - x.double() @ deq.t()).abs()
                assert (err <= bound).all(), (in_f, kind, rows, (err / bound).max().item())
        for bad in (float("nan"), float("inf")):
            x = torch.randn(1, in_f)
            x[0, 3] = bad
            assert not int4_native_linear(x, packed, sm, None).isfinite().any()


def test_native_decode_attention():
    """Guards the project's decode-attention kernel (csrc/decode_attention.cpp), which fp32 engines
    on the CPU decode with: against model.attend (torch's fused kernel) for grouped and plain
    heads, head sizes that are and are not a multiple of the vector width, keys read through the
    slot cache's strided slices, per-row masks (rows at different positions), contexts of several
    chunks (some all masked) whose sums do not depend on the thread count, query-head groups of 1
    to 9 (summed several heads at a time), an fp16 cache, one row that may attend to nothing
    (zeros, not NaN), and under torch.compile (the compiled decode step)."""
    from chatforge.engine.cache import attend_decode_native, native_decode_attention
    from chatforge.model import attend

    assert native_decode_attention(torch.device("cpu"), torch.float32)
    assert not native_decode_attention(torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(0)
    for B, H, K, S, D in [(1, 9, 3, 300, 64), (4, 8, 8, 17, 40), (3, 6, 2, 5, 8), (2, 12, 2, 140, 128), (2, 8, 1, 260, 32), (1, 5, 1, 33, 16),
                          (5, 4, 1, 70, 24)]:  # the last one's tensors are used below
        kc, vc = torch.randn(B + 2, K, S + 9, D), torch.randn(B + 2, K, S + 9, D)
        k, v = kc[:B, :, :S], vc[:B, :, :S]  # strided, as SlotCache.update hands them out
        q = torch.randn(B, H, 1, D) * 3
        pos = torch.randint(0, S, (B,))
        pos[0] = S - 1
        mask = (torch.arange(S)[None, :] <= pos[:, None])[:, None, None, :]
        for m in (None, mask):
            y = attend_decode_native(q, k, v, m)
            assert y.shape == (B, H, 1, D)
            torch.testing.assert_close(y, attend(q, k, v, m), atol=2e-6, rtol=1e-5)
            # an fp16 cache: the same sums over its values made fp32
            k16, v16 = kc.half()[:B, :, :S], vc.half()[:B, :, :S]
            torch.testing.assert_close(attend_decode_native(q, k16, v16, m), attend(q, k16.float(), v16.float(), m), atol=4e-6, rtol=1e-5)
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if threads > 1 else 2)
            try:
                assert torch.equal(attend_decode_native(q, k, v, m), y)
            finally:
                torch.set_num_threads(threads)
    mask[1] = False
    y = attend_decode_native(q, k, v, mask)
    assert (y[1] == 0).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y[2:], attend(q, k, v, mask)[2:], atol=2e-6, rtol=1e-5)
    compiled = torch.compile(attend_decode_native, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, None), attend(q, k, v, None), atol=2e-6, rtol=1e-5)
    prefill = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)  # T > 1: torch's kernel
    torch.testing.assert_close(attend_decode_native(*prefill, None), attend(*prefill, None))


def test_native_pointwise_ops(tok):
    """Guards the project's pointwise kernels (csrc/pointwise.cpp) that fp32 engines on the CPU run
    their eager steps on: RMSNorm, RoPE (on the strided query/key view the attention makes, with
    per-row and shared position tables) and SwiGLU (with gates far past exp's fp32 range) equal
    the model's own functions; calls that need gradients keep the model's own (gradients flow);
    an fp32 engine's modules use them and the caller's model is untouched."""
    from chatforge.engine.engine import native_rms_norm, native_rope, native_swiglu
    from chatforge.model import MLP, RMSNorm, apply_rope, rope_tables, swiglu

    torch.manual_seed(0)
    for shape in [(1, 1, 576), (4, 1, 64), (2, 37, 96), (3, 5, 40)]:
        norm = RMSNorm(shape[-1], 1e-5)
        with torch.no_grad():
            norm.weight.normal_()
            x = torch.randn(shape) * 3
            torch.testing.assert_close(native_rms_norm(norm, x), norm(x), atol=2e-6, rtol=2e-6)
    cos, sin = rope_tables(16, 64, 10000.0)
    for B, T in [(1, 1), (3, 1), (2, 7)]:
        qk = torch.randn(B, T, 6, 16)[:, :, :5].transpose(1, 2)  # (B, H+K, T, D), strided
        pos = torch.randint(0, 64, (B, T))
        for c, s_ in ((cos[pos], sin[pos]), (cos[pos[:1]], sin[pos[:1]])):
            with torch.no_grad():
                y = native_rope(qk, c, s_)
            assert y.is_contiguous()
            torch.testing.assert_close(y, apply_rope(qk, c, s_), atol=1e-6, rtol=1e-6)
    for shape in [(1, 1, 96), (4, 1, 64), (2, 9, 40), (1, 1, 6)]:
        h = torch.randn(shape) * 6
        h[..., 0], h[..., 1] = 100.0, -100.0
        with torch.no_grad():
            torch.testing.assert_close(native_swiglu(h), swiglu(h), atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 3, 40, requires_grad=True)
    native_rms_norm(norm, x).sum().backward()
    native_swiglu(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    m = tiny(tok)
    engine = Engine(m, tok)
    norms = [mod for mod in engine.model.modules() if isinstance(mod, RMSNorm)]
    assert norms and all(n.forward.func is native_rms_norm for n in norms)
    assert all(mod.act is native_swiglu for mod in engine.model.modules() if isinstance(mod, MLP))
    assert not any("forward" in mod.__dict__ for mod in m.modules() if isinstance(mod, RMSNorm))
    assert all(mod.act is swiglu for mod in m.modules() if isinstance(mod, MLP))


def test_exact_low_bit_weights_decode_as_fp32(tok):
    """Guards the exact int4 path (what --decode-weights auto runs on a Q4_1 import): a model whose
    block matrices are 4-bit groups and whose output layer is 8-bit groups (as a GGUF Q4_1 file
    stores them) decodes on int4 copies and the 8-bit output kernel with the exact engine's greedy
    tokens and log-probs (fp32 rounding), while an output layer that is not 8-bit keeps fp32."""
    from chatforge.quantize import int4_native_dequantized, int4_native_weights, int8_exact_groups

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128, tie_embeddings=False)
    m = GPT(cfg)
    m.init_weights(0)
    with torch.no_grad():
        for lin in [mod for mod in m.blocks.modules() if isinstance(mod, torch.nn.Linear)]:
            lin.weight.copy_(int4_native_dequantized(*int4_native_weights(lin.weight + torch.randn_like(lin.weight) * 0.02)))
        out = m.output_weight()
        scale = (out.reshape(out.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127).half().float()
        out.copy_((torch.round(out.reshape(out.shape[0], -1, 32) / scale) * scale).reshape(out.shape))
    assert int8_exact_groups(m.output_weight()) is not None
    m.eval()
    p = tok.encode("The quick brown fox jumps over the lazy dog, 床前明月光")
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=True)
    exact = [e for e in Engine(m, tok, packed=False).generate([p], sp) if e.token_id is not None]
    engine = Engine(m, tok, decode_weights="int4")
    fast = [e for e in engine.generate([p], sp) if e.token_id is not None]
    assert [e.token_id for e in fast] == [e.token_id for e in exact]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(fast, exact)) < 1e-4
    head = engine.fast.head.keywords["few"]
    assert head.act == torch.float32 and head.kernel.func.__name__ == "int8_groups_linear"
    with torch.no_grad():
        m.output_weight().add_(1e-3)  # no longer 8-bit groups: the output layer goes back to fp32
    engine.fast.refresh()
    assert "few" not in getattr(engine.fast.head, "keywords", {})


@pytest.mark.parametrize("decode,qkv_bias", [("int4", False), ("int4", True), ("fp16", False)])
def test_fused_decode_step_equals_eager(tok, decode, qkv_bias):
    """Guards the one-call decode step (engine/fused.py, csrc/decode_step.cpp) that int4 and fp16
    engines on the CPU decode few streams with: its greedy tokens and log-probs equal the eager step's bit
    for bit (streams at different positions, joining and leaving; grouped-query heads; Qwen2's
    q|k|v bias), and it steps aside for a forward hook (a LoRA adapter) and for more rows than
    the copies' FEW_ROWS; a norm weight replaced by a new tensor is read, not the old one."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128, qkv_bias=qkv_bias)
    m = GPT(cfg)
    m.init_weights(0)
    if qkv_bias:
        with torch.no_grad():
            for blk in m.blocks:
                blk.attn.qkv.bias.normal_(0, 0.1)
    m.eval()
    prompts = [tok.encode(t) for t in ("The quick brown fox", "床前明月光，疑是地上霜", "a", "Once upon a time there was")]
    sps = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=True) for n in (9, 14, 5, 11)]
    eager = Engine(m, tok, decode_weights=decode, max_batch=4)
    eager.fused = None
    fused = Engine(m, tok, decode_weights=decode, max_batch=4)
    assert fused.fused is not None
    one_call, calls = fused.fused, []
    fused.fused = lambda ids, pos: calls.append(len(pos)) or one_call(ids, pos)

    def events(engine):
        return [(e.request_id, e.token_id, e.logprob) for e in engine.generate(prompts, sps) if e.token_id is not None]

    want = events(eager)
    assert events(fused) == want
    assert sorted(set(calls)) == [1, 2, 3, 4]  # every step of 1-4 streams took the call
    handle = m.blocks[1].mlp.register_forward_hook(lambda mod, args, out: out * 2)  # the caller's model: shared hooks
    try:
        assert one_call([1], [0]) is None
        assert events(fused) != want  # the hook took part in the eager steps
    finally:
        handle.remove()
    assert one_call([1] * (fused.fast.few_rows + 1), [0] * (fused.fast.few_rows + 1)) is None
    assert events(fused) == want
    m.blocks[0].norm2.weight = torch.nn.Parameter(m.blocks[0].norm2.weight.detach() * 1.5)  # a new tensor, not an update
    want = events(eager)
    assert events(fused) == want and calls[-1] == 1
    # more streams than FEW_ROWS: those steps go step by step, and as streams finish the rest take the call
    n = fused.fast.few_rows + 2
    many = [prompts[i % 4][: 2 + i % 5] for i in range(n)]
    many_sps = [SamplingParams(temperature=0, max_new_tokens=3 + i % 6, ignore_eos=True, logprobs=True) for i in range(n)]
    big_eager, big_fused = Engine(m, tok, decode_weights=decode, max_batch=n), Engine(m, tok, decode_weights=decode, max_batch=n)
    big_eager.fused = None
    big_call, tried = big_fused.fused, []
    big_fused.fused = lambda ids, pos: tried.append(len(pos)) or big_call(ids, pos)
    got = [[(e.request_id, e.token_id, e.logprob) for e in eng.generate(many, many_sps)] for eng in (big_eager, big_fused)]
    assert got[0] == got[1]
    assert max(tried) == n and min(tried) <= fused.fast.few_rows  # both kinds of step ran



def test_native_kernels_march_is_checked(monkeypatch):
    """Guards CHATFORGE_MARCH (the kernels built for another CPU kind, to measure its code paths
    here): a value that is not a -march name is refused with the variable named, before a build."""
    from chatforge import quantize

    monkeypatch.setenv("CHATFORGE_MARCH", "native -O0; rm")
    with pytest.raises(ValueError, match="CHATFORGE_MARCH='native -O0; rm': not a compiler -march name"):
        quantize.native_kernels.__wrapped__()

def test_int4_without_the_native_kernel(tok, monkeypatch, tmp_path):
    """Guards the fallback where the kernel cannot be built (no compiler): native_kernels names the
    reason with a warning instead of raising, int4 copies then run torch's bf16 kernel (rounded
    activations: close to exact, not equal), and no checkpoint counts as exactly 4-bit, so
    --decode-weights auto keeps fp16 copies."""
    from torch.utils import cpp_extension

    from chatforge import checkpoint, quantize

    def no_compiler(**kw):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="could not be built: RuntimeError: Error building extension"):
        assert "command not found" in quantize.native_kernels.__wrapped__()
    for mod in (quantize, checkpoint):
        monkeypatch.setattr(mod, "native_kernels", lambda: "no compiler")
    assert not checkpoint.exact_int4({"weights": "int4"})
    m = tiny(tok)
    fast = FastLinears(m, pack=True, decode_weights="int4")
    fast.refresh()
    lin = fast.linears[0]
    x = torch.randn(1, lin.in_features)
    few = fast.forwards[0].keywords["few"]
    assert few.act == torch.bfloat16  # torch's kernel
    torch.testing.assert_close(few(x), lin(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("fmt,block", [("bf16", "llama"), ("fp16", "llama"), ("int8", "llama"), ("int4", "llama"), ("fp16", "gpt2"),
                                       ("int8", "gpt2"), ("int4", "gpt2")])
def test_decode_weights_round_only_decode_steps(tok, fmt, block):
    """Guards the decode-weight copies: a prefill (more than FEW_ROWS rows) runs the exact weights;
    decode steps (and the output layer on a prefill's last rows) run the copies, close to exact;
    the model's own weights are untouched, and the copies follow in-place updates."""
    import copy

    m = tiny(tok, block)  # gpt2 blocks: linears with biases
    before = copy.deepcopy(m.state_dict())
    p = tok.encode("The quick brown fox jumps over the lazy dog, 床前明月光，疑是地上霜。 She sells sea shells by the sea shore.")
    assert len(p) > max(FEW_ROWS.values())
    sp = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    engine = Engine(m, tok, decode_weights=fmt)
    for update in range(2):  # the second time after an in-place weight update: the copies follow it
        exact = list(Engine(m, tok, packed=False).generate([p], sp))
        fast = list(engine.generate([p], sp))
        with torch.no_grad():
            plain = m.hidden(torch.tensor([p]))
            with engine.fast.installed():  # a prefill's matmuls: the exact weights (on the engine's own modules)
                torch.testing.assert_close(engine.model.hidden(torch.tensor([p])), plain, atol=1e-5, rtol=1e-5)
            with engine.fast.installed():  # a decode step's: the copies
                assert not torch.allclose(engine.model.hidden(torch.tensor([p[:1]])), plain[:, :1], atol=1e-7, rtol=0)
        # teacher-forced: the exact model's log-probs of the tokens the copies chose stay close
        seq = torch.tensor([p + [e.token_id for e in fast]])
        with torch.no_grad():
            logp = torch.log_softmax(m(seq)[0, len(p) - 1 : -1].float(), -1)
        exact_lp = logp[torch.arange(len(fast)), seq[0, len(p) :]]
        tol = {"int8": 0.05, "int4": 0.1}.get(fmt, 0.02)
        assert max(abs(e.logprob - float(x)) for e, x in zip(fast, exact_lp)) < tol
        assert all("forward" not in mod.__dict__ for mod in m.modules())
        if update == 0:
            assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
            with torch.no_grad():  # an optimizer step: in place, new values
                for prm in m.parameters():
                    prm.add_(torch.randn_like(prm) * 0.05)
    with pytest.raises(ValueError, match="decode_weights='q4'"):
        Engine(m, tok, decode_weights="q4")


def test_fp16_overflow_falls_back_to_exact_weights(tok):
    """Guards the fp16 copies' range check: a model whose weights overflow fp16 (here one MLP weight
    past 65504) decodes the same tokens as the exact engine, with a warning, and the engine keeps
    the model's own weights from then on."""
    m = tiny(tok)
    with torch.no_grad():
        m.blocks[0].mlp.proj.weight[0, 0] = 1e5  # exact in fp32, inf in fp16
    p = tok.encode("The quick brown fox jumps over the lazy dog, 床前明月光")
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    exact = run(Engine(m, tok, packed=False), [p], sp)[0][0]
    engine = Engine(m, tok, decode_weights="fp16")
    with pytest.warns(UserWarning, match="overflowed"):
        assert run(engine, [p], sp)[0][0] == exact
    assert engine.fast.decode is None and engine.fast.few_rows == 0


def test_bf16_model_prefills_in_fp32_where_bf16_is_not_native(tok):
    """Guards the many-row copies of a bf16 model: fp32 on a CPU without native bf16 (bf16
    otherwise); either way the answers match the plain bf16 model within bf16 rounding."""
    m = tiny(tok).to(torch.bfloat16)
    fast = FastLinears(m, pack=True)
    native = FastLinears.available(torch.device("cpu"), torch.bfloat16)
    assert fast.compute == (torch.bfloat16 if native else torch.float32)
    assert fast.few_rows == (0 if native else FEW_ROWS["bf16"])  # decode steps: its own bf16 weights
    p = tok.encode("学而时习之，不亦说乎")
    sp = SamplingParams(temperature=0, max_new_tokens=1, logprobs=True)
    a = next(iter(Engine(m, tok, packed=True).generate([p], sp)))
    b = next(iter(Engine(m, tok, packed=False).generate([p], sp)))
    assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 0.05


def test_equal_length_batch_equals_one_at_a_time(tok):
    """Guards the unmasked decode path (every row at the same position: one slice write, no mask)."""
    m = tiny(tok)
    prompts = [tok.encode(t)[:5] for t in ["The quick brown fox jumps", "A journey of a thousand", "学而时习之，不亦说乎"]]
    assert len({len(p) for p in prompts}) == 1
    sp = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    alone = [run(Engine(m, tok, max_batch=1), [p], sp)[0][0] for p in prompts]
    together, _, _ = run(Engine(m, tok, max_batch=3), prompts, sp)
    assert [together[i] for i in range(3)] == alone


def test_generate_stopped_early_frees_the_engine(tok):
    """Guards a consumer that breaks out of generate() (Ctrl-C in chat, a caller that has enough)
    leaving its requests in the slots, so that the next generate() refuses to run."""
    m = tiny(tok)
    eng = Engine(m, tok, max_batch=2)
    sp = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    for i, _ev in enumerate(eng.generate([tok.encode("hello"), tok.encode("world")], sp)):
        if i == 3:
            break
    assert not eng.has_work
    ref = sample_tokens(m, tok.encode("hello"), 5, temperature=0)
    assert run(eng, [tok.encode("hello")], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0][0] == ref
    with pytest.raises(ValueError, match="vocabulary"):  # a bad second prompt: nothing is left behind either
        list(eng.generate([tok.encode("ok"), [10**6]], sp))
    assert not eng.has_work


def test_earliest_of_several_stop_strings():
    """Guards picking the first stop string in list order instead of the earliest in the text."""
    pieces = {1: b"x", 2: b"Hello ", 3: b"wor", 4: b"ld", 5: b"##", 6: b"EN", 7: b"D more"}
    out, hit = _scripted(pieces, [2, 3, 4, 5, 6, 7], SamplingParams(stop=["##END", "world"]))
    assert hit and out == "Hello "
    out, hit = _scripted({1: b"x", 2: b"xx abcdef yy"}, [2], SamplingParams(stop=["ef", "bc"]))  # both in one token
    assert hit and out == "xx a"


def test_stop_string_end_to_end(tok):
    """Guards stop strings on real tokens: a string that spans a token boundary ends the text
    exactly before it, and no part of it is streamed."""
    m = tiny(tok)
    p = tok.encode("The capital of France")
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    ids = run(Engine(m, tok), [p], sp)[0][0]
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # a stop string made of the last 2 characters of one token's text and the first 2 of the next
    j = next(i for i in range(3, len(ids) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2 and "\ufffd" not in pieces[i + 1])
    stop = pieces[j + 1][len(pieces[j]) - 2 : len(pieces[j]) + 2]
    full = tok.decode(ids)
    _, texts, fin = run(Engine(m, tok), [p], SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    assert fin[0] == "stop" and texts[0] == full[: full.index(stop)]


def test_utf8_stream_concatenates_to_the_decoded_text(tok):
    """Guards streaming on a real byte-level tokenizer: random tokens split Chinese characters
    and emoji across tokens; the deltas must never carry a replacement character that the full
    decode does not have, and must add up to exactly the decoded text."""
    m = tiny(tok)
    p = tok.encode("床前明月光 🎉")
    sps = [SamplingParams(temperature=1.5, max_new_tokens=60, seed=s, ignore_eos=True) for s in range(4)]
    outs, texts, _ = run(Engine(m, tok, max_batch=4), [p] * 4, sps)
    split = 0
    for i in range(4):
        assert texts[i] == tok.decode(outs[i]).rstrip("\ufffd")
        split += sum(tok.decode([t]).endswith("\ufffd") for t in outs[i])
    assert split > 0  # the test did exercise partial characters


def test_packed_weights_match_and_follow_updates(tok):
    """Guards the oneDNN-packed linears: same tokens as plain aten, repacked after an in-place weight
    update (an optimizer step between rollouts), and the model left untouched (deepcopy works)."""
    import copy

    m = tiny(tok)
    if not FastLinears.available(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN is not available in this torch build")
    p = tok.encode("The quick brown fox")
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=True)
    packed, plain = Engine(m, tok, packed=True), Engine(m, tok, packed=False)
    a = list(packed.generate([p], sp))
    b = list(plain.generate([p], sp))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < 1e-4
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    copy.deepcopy(m)
    with torch.no_grad():  # an optimizer step: in place, new values
        for prm in m.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    ref = sample_tokens(m, p, 12, temperature=0)
    assert [e.token_id for e in packed.generate([p], sp)] == ref
    # the project's optimizer step (the fused kernel, which leaves version counters alone by itself)
    opt = C.make_optimizer(m, 0.05, 0.0)
    x = torch.tensor([p])
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    ref2 = sample_tokens(m, p, 12, temperature=0)
    assert ref2 != ref  # the step changed the greedy answer, so a stale copy would show
    assert [e.token_id for e in packed.generate([p], sp)] == ref2


def test_penalties_and_filters_by_hand():
    """Guards the exact arithmetic of penalties (repetition divides positive / multiplies negative
    logits of seen tokens; frequency and presence subtract per output count) and of temperature,
    top-k and top-p on the sampling distribution."""
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0])
    r = Request(0, [0, 3], SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), set(), "cpu")
    r.counts = {1: 2, 4: 1}
    want = torch.tensor([2.0 / 2, -1.0 * 2 - 0.5 * 2 - 0.25, 0.5, 0.0 / 2, 1.0 / 2 - 0.5 - 0.25])
    torch.testing.assert_close(penalized_logits(logits, r), want)
    x = torch.tensor([3.0, 2.0, 1.0, 0.0])
    e = torch.exp(x / 2)
    torch.testing.assert_close(sampling_probs(x, SamplingParams(temperature=2.0)), e / e.sum())
    e2 = torch.exp(x[:2] / 2)
    torch.testing.assert_close(sampling_probs(x, SamplingParams(temperature=2.0, top_k=2)), torch.cat([e2 / e2.sum(), torch.zeros(2)]))
    full = e / e.sum()  # ~[0.46, 0.28, 0.17, 0.10]: top_p 0.6 keeps the first two, 0.4 only the first
    torch.testing.assert_close(sampling_probs(x, SamplingParams(temperature=2.0, top_p=0.6)), torch.cat([full[:2], torch.zeros(2)]))
    torch.testing.assert_close(sampling_probs(x, SamplingParams(temperature=2.0, top_p=0.4)), torch.cat([full[:1], torch.zeros(3)]))


def test_logprobs_in_a_mixed_batch(tok):
    """Guards logprob rows mixed up when only some requests in a batch ask for them, and greedy
    rows beside sampled ones."""
    m = tiny(tok)
    prompts = [tok.encode(t) for t in ["Hello world", "白日依山尽", "To be or not"]]
    sps = [SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=3, max_new_tokens=5, ignore_eos=True, top_logprobs=2),
           SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, logprobs=True)]
    evs = list(Engine(m, tok, max_batch=3).generate(prompts, sps))
    assert all(e.logprob is None for e in evs if e.request_id == 0)
    for i in (1, 2):
        mine = [e for e in evs if e.request_id == i]
        ids = prompts[i] + [e.token_id for e in mine]
        with torch.no_grad():
            ref = torch.log_softmax(m(torch.tensor([ids]))[0].float(), -1)
        for j, e in enumerate(mine):
            assert e.logprob == pytest.approx(float(ref[len(prompts[i]) - 1 + j, e.token_id]), abs=1e-4)
        assert (mine[0].top_logprobs is not None) == (i == 1)


def test_engine_loop_makes_its_engine_on_its_thread(tok):
    """Guards EngineLoop(make_engine): the function runs on the loop's own thread (the one that
    then steps the engine: torch's parallel ops stay on one thread, benchmarks/engine_thread.py),
    the loop serves what it made, and a failure comes back to the caller, no thread left behind."""
    made_on = []

    def make():
        made_on.append(threading.current_thread())
        return Engine(tiny(tok), tok, max_batch=2)

    loop = EngineLoop(make)
    assert made_on == [loop._thread] and made_on[0] is not threading.current_thread()
    sp = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    p = tok.encode("hello")
    assert [ev.token_id for ev in loop.submit(p, sp) if ev.token_id is not None] == sample_tokens(tiny(tok), p, 5, temperature=0)
    loop.close()

    def broken():
        raise ValueError("no such checkpoint: /nope")

    with pytest.raises(ValueError, match="no such checkpoint"):
        EngineLoop(broken)
    assert not any(t.name == "chatforge-engine" and t.is_alive() and t is not loop._thread for t in threading.enumerate())


def test_engine_loop_asyncio_sink_close_and_bound(tok):
    """Guards the server's side of the loop: `async for` over a handle on an event loop, events
    to a sink callback, the waiting-queue bound, and close() ending requests that still wait
    (no caller blocks forever)."""
    import asyncio

    m = tiny(tok)
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    p = tok.encode("async prompt")
    expected = run(Engine(m, tok, max_batch=1), [p], sp)[0][0]
    loop = EngineLoop(Engine(m, tok, max_batch=2), max_waiting=2)

    async def consume():
        h = loop.submit(p, sp)
        return [e.token_id async for e in h if e.token_id is not None]

    assert asyncio.run(consume()) == expected
    got = []
    done = threading.Event()

    def sink(ev):
        got.append(ev)
        if isinstance(ev, BaseException) or ev.finish_reason:
            done.set()

    loop.submit(p, sp, sink=sink)
    assert done.wait(30) and [e.token_id for e in got if e.token_id is not None] == expected
    loop.close()
    with pytest.raises(RuntimeError):
        loop.submit(p, sp)
    # a loop whose engine is busy: the queue bound, then close() fails the waiting requests
    eng = Engine(m, tok, max_batch=1)
    busy = EngineLoop(eng, max_waiting=1)
    long = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    first = busy.submit(p, long)
    while busy.active_slots == 0:
        threading.Event().wait(0.01)
    second = busy.submit(p, long)
    with pytest.raises(QueueFull):
        busy.submit(p, long)
    busy.close()
    for h in (first, second):
        with pytest.raises(RuntimeError, match="closed"):
            list(h)


def test_chat_session(tok):
    """Guards the terminal chat: commands, multi-turn history in the prompt, Chinese round trip,
    and dropping the oldest turns (with a notice) when the context overflows."""
    import io

    from chatforge.chat import chat, fit_history

    m = tiny(tok)
    eng = Engine(m, tok, max_batch=1, max_seq_len=128)
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    script = "你好，世界\n/system 你是助手\n/reset\n\nsecond question\n" + "a long line " * 8 + "\n" + "another long line " * 5 + "\n/exit\nnever read\n"
    out = io.StringIO()
    msgs = chat(eng, sp, system="be brief", inp=io.StringIO(script), out=out)
    shown = out.getvalue()
    assert "(system prompt set)" in shown and "(history cleared)" in shown and "oldest message(s)" in shown and "(error" not in shown
    assert msgs[0] == {"role": "system", "content": "你是助手"}
    assert msgs[-2]["content"].startswith("another long line") and msgs[-1]["role"] == "assistant"
    assert not any(x["content"] in ("你好，世界", "second question") for x in msgs)
    assert shown.count("bot> ") == 4 and "never read" not in shown
    # whole turns go: the oldest user message together with its reply
    conv = [{"role": "system", "content": "s"}] + [{"role": r, "content": "word " * 15} for r in ["user", "assistant"] * 3]
    conv.append({"role": "user", "content": "last"})
    ids, dropped = fit_history(eng, conv, 30)
    assert dropped % 2 == 0 and dropped > 0 and conv[1]["role"] == "user" and len(ids) + 30 <= 128


def test_generate_json(tok):
    """Guards `chatforge generate --json`: one JSON object whose text and usage match the tokens."""
    import io
    import json

    from chatforge.chat import generate

    m = tiny(tok)
    out = io.StringIO()
    res = generate(Engine(m, tok, max_batch=1), "床前明月光", SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True),
                   as_chat=True, system="sys", as_json=True, out=out)
    data = json.loads(out.getvalue())
    assert data["text"] == res["text"] and data["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 7 and data["usage"]["prompt_tokens"] > 5
    with pytest.raises(ValueError, match="--chat"):
        generate(Engine(m, tok, max_batch=1), "x", SamplingParams(max_new_tokens=2), as_chat=False, system="s", as_json=True, out=out)


def test_prefill_groups_bound_padding(tok):
    """Guards one long prompt padding a whole prefill batch (16 short prompts computed at the long
    one's length) and prefill steps without a size bound."""
    import chatforge.engine.engine as E

    m = tiny(tok)
    eng = Engine(m, tok, max_batch=8, max_seq_len=128)
    for n in (5, 100, 6, 7, 8):
        eng.add(list(range(20, 20 + n)), SamplingParams(max_new_tokens=2))
    assert [len(r.prompt) for r in eng._joiners(8)] == [5, 100]  # 2 x 100 padded <= 2 x 105 real; a third would not be
    assert [len(r.prompt) for r in eng._joiners(1)] == [5]
    del eng.waiting[:2]
    assert [len(r.prompt) for r in eng._joiners(8)] == [6, 7, 8]
    old, E.PREFILL_TOKENS = E.PREFILL_TOKENS, 16
    try:
        assert [len(r.prompt) for r in eng._joiners(8)] == [6, 7]
    finally:
        E.PREFILL_TOKENS = old


@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_prefix_cache_gives_the_same_answers(tok, block):
    """Guards reused prefix keys/values (positions, offsets, masks after a cached prefix, padding)
    changing any answer: prompts sharing a system-prompt-like start, in groups and one by one,
    give the tokens and log-probs of an engine without the cache, and the cache is really used."""
    m = tiny(tok, block)
    head = "<system> You are a careful assistant who answers briefly. </system> "
    prompts = [tok.encode(head + t) for t in ["Hi", "A journey of a thousand miles", "学而时习之，不亦说乎？", "x"]]
    sp = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=True)

    def answers(engine, groups):
        toks, lps = [], []
        for g in groups:
            for ev in sorted((e for e in engine.generate(g, sp) if e.token_id is not None), key=lambda e: e.request_id):
                toks.append((ev.request_id, ev.token_id))
                lps.append(ev.logprob)
        return toks, lps

    groups = [prompts[:1], prompts[1:3], prompts[3:], prompts[:1]]  # the last one: the whole prompt cached but its last token
    ref_toks, ref_lps = answers(Engine(m, tok, max_batch=4), groups)
    eng = Engine(m, tok, max_batch=4, prefix_cache=64)
    toks, lps = answers(eng, groups)
    assert toks == ref_toks
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=1e-4, atol=1e-4)
    shared = len(tok.encode(head)) - 2
    assert eng.prefix.hit_tokens >= 4 * shared  # every group after the first starts from the cache


def test_fp16_kv_cache(tok):
    """Guards the fp16 keys and values that decode steps on weight copies keep on the CPU: taken
    only there (exact engines, kv_cache="same" and bad names keep or refuse), the same greedy
    tokens as an fp32 cache with log-probs within fp16's rounding, the same answers with a
    prefix cache and chunked prefill as without (prefills attend to the stored values), and a key
    beyond fp16's range held to its largest value rather than made infinite."""
    from chatforge.engine.cache import SlotCache, native_decode_attention

    if not native_decode_attention(torch.device("cpu"), torch.float32):
        pytest.skip("the project's kernels are not built here")
    m = tiny(tok, "llama")
    half = Engine(m, tok, decode_weights="fp16", max_batch=4)
    assert half.kv_dtype == torch.float16 and half.cache.k[0].dtype == torch.float16
    same = Engine(m, tok, decode_weights="fp16", max_batch=4, kv_cache="same")
    assert same.kv_dtype == torch.float32 and Engine(m, tok, max_batch=1).kv_dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache='fp16' needs"):
        Engine(m, tok, max_batch=1, kv_cache="fp16")
    with pytest.raises(ValueError, match="kv_cache='bf16'"):
        Engine(m, tok, max_batch=1, decode_weights="fp16", kv_cache="bf16")
    head = "<system> You are a careful assistant who answers briefly. </system> "
    prompts = [tok.encode(head + t) for t in ["Hi", "A journey of a thousand miles", "学而时习之，不亦说乎？"]]
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=True)

    def answers(engine):
        evs = sorted((e for e in engine.generate(prompts, sp) if e.token_id is not None), key=lambda e: e.request_id)
        return [e.token_id for e in evs], torch.tensor([e.logprob for e in evs])

    ref_toks, ref_lps = answers(same)
    toks, lps = answers(half)
    assert toks == ref_toks
    assert 0 < (lps - ref_lps).abs().max() < 2e-3  # rounded, slightly
    for other in (Engine(m, tok, decode_weights="fp16", max_batch=4, prefix_cache=64),
                  Engine(m, tok, decode_weights="fp16", max_batch=4, prefill_chunk=5)):
        for _ in range(2):  # the second time from the prefix cache
            got_toks, got_lps = answers(other)
            assert got_toks == toks
            torch.testing.assert_close(got_lps, lps, atol=1e-5, rtol=0)
    cache = SlotCache(m, 1, 8, "cpu", torch.float16)
    cache.prefill(0, 1)
    k = torch.full((1, m.cfg.n_kv_head, 2, m.cfg.head_dim), 1e6)
    got_k, _ = cache.update(0, k, -k)
    assert (cache.k[0][0, :, :2] == 65504).all() and (cache.v[0][0, :, :2] == -65504).all() and torch.isfinite(got_k).all()


@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_a_prompt_asked_several_times_is_prefilled_once(tok, block):
    """Guards the shared prefill of identical prompts in one step (RL groups, best-of-n): each
    copy's answer and log-probs are those it gets alone with its seed, from a prefill computed
    once per distinct prompt, also mixed with other prompts, a prefix cache and fewer slots."""
    m = tiny(tok, block)
    a, b = tok.encode("<system> Be brief. </system> How many days are in June?"), tok.encode("2 + 2 =")
    prompts = [a, b, a, a, b, a]
    sps = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=s, ignore_eos=True, logprobs=True) for s in range(len(prompts))]

    def answers(engine, ps, sp):
        got = {}
        for ev in engine.generate(ps, sp):
            if ev.token_id is not None:
                got.setdefault(ev.request_id, []).append((ev.token_id, ev.logprob))
        return [got[i] for i in range(len(ps))]

    alone = [answers(Engine(m, tok, max_batch=1), [p], sp)[0] for p, sp in zip(prompts, sps)]
    assert len({tuple(t for t, _ in x) for x in alone}) > 2  # the seeds really give different answers
    for eng in (Engine(m, tok, max_batch=6), Engine(m, tok, max_batch=6, prefix_cache=64), Engine(m, tok, max_batch=3)):
        got = answers(eng, prompts, sps)
        assert [[t for t, _ in x] for x in got] == [[t for t, _ in x] for x in alone]
        torch.testing.assert_close(torch.tensor([[lp for _, lp in x] for x in got]), torch.tensor([[lp for _, lp in x] for x in alone]),
                                   rtol=1e-4, atol=1e-4)
        assert eng.shared_prompt_tokens > 0  # copies that joined with their first were not computed again
    eng = Engine(m, tok, max_batch=6)
    answers(eng, prompts, sps)
    assert eng.shared_prompt_tokens == 3 * len(a) + len(b)  # every copy, when all join in one step


def test_prefix_cache_needs_a_common_start(tok):
    """Guards reuse of a prefix that is not there: different prompts compute everything."""
    m = tiny(tok)
    eng = Engine(m, tok, max_batch=2, prefix_cache=64)
    sp = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    for text in ["The quick brown fox jumps over", "學而時習之 a wholly different beginning"]:
        list(eng.generate([tok.encode(text)], sp))
    assert eng.prefix.hit_tokens == 0
    with pytest.raises(ValueError, match="prefix_cache"):
        Engine(m, tok, prefix_cache=-1)


def test_inference_mode_resolution(monkeypatch):
    """Guards the inference defaults (`--dtype auto --decode-weights auto`, chosen by `eval
    fidelity`): fp32 activations on every device kind, whatever bf16 support it has; fp16 decode
    copies on a CPU; an explicit --dtype runs exactly as asked; an explicit copy format is kept;
    a bad name is refused."""
    from chatforge import dtypes

    for native in (False, True):
        monkeypatch.setattr(dtypes, "fast_bf16", lambda kind, native=native: native)
        assert dtypes.inference_mode("auto", "auto", "cpu") == ("fp32", "fp16")
        assert dtypes.inference_mode("auto", "auto", "cuda:0") == ("fp32", None)
    assert dtypes.inference_mode("fp32", "auto", "cpu") == ("fp32", None)  # fp32 asked for: exact
    assert dtypes.inference_mode("bf16", "same", "cpu") == ("bf16", None)
    assert dtypes.inference_mode("fp32", "int8") == ("fp32", "int8") and dtypes.inference_mode("auto", "same") == ("fp32", None)
    # weights that are 4-bit already (checkpoint.exact_int4): int4 copies hold them exactly
    assert dtypes.inference_mode("auto", "auto", "cpu", exact_int4=True) == ("fp32", "int4")
    assert dtypes.inference_mode("auto", "fp16", "cpu", exact_int4=True) == ("fp32", "fp16")
    assert dtypes.inference_mode("auto", "auto", "cuda", exact_int4=True) == ("fp32", None)
    # checkpoint.inference_mode asks (building the CPU kernels) only where the answer is used
    asked = []
    assert dtypes.inference_mode("auto", "auto", "cpu", exact_int4=lambda: asked.append(1) or True) == ("fp32", "int4")
    for args in (("auto", "auto", "cuda"), ("fp32", "auto", "cpu"), ("auto", "fp16", "cpu")):
        dtypes.inference_mode(*args, exact_int4=lambda: asked.append(1) or True)
    assert asked == [1]
    with pytest.raises(ValueError, match="decode_weights='q4'"):
        dtypes.inference_mode("auto", "q4")


def test_complete_collects_what_generate_streams(tok, capsys):
    """Guards Engine.complete, which callers use instead of collecting events themselves: per
    prompt the text, token ids and finish reason that `generate` streams, in prompt order even when
    requests finish out of order, one on_done call per request as it finishes, and progress on
    stderr only when asked for."""
    m = tiny(tok)
    prompts = [tok.encode(t) for t in ["The capital of France", "Hi", "学而时习之，不亦说乎"]]
    sps = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True),
           SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)]
    full = tok.decode(run(Engine(m, tok), [prompts[2]], sps[2])[0][0]).rstrip("\ufffd")
    sps[2] = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, stop=[full[-2:]])  # a stop string it reaches
    outs, texts, finish = run(Engine(m, tok, max_batch=2), prompts, sps)
    assert finish == {0: "length", 1: "length", 2: "stop"}
    seen = []
    got = Engine(m, tok, max_batch=2).complete(prompts, sps, on_done=lambda i, c: seen.append((i, c)))
    assert [(c.text, c.ids, c.finish_reason) for c in got] == [(texts[i], outs[i], finish[i]) for i in range(3)]
    assert sorted(i for i, _ in seen) == [0, 1, 2] and all(c is got[i] for i, c in seen)
    assert seen[0][0] == 1  # the short second answer finishes first: on_done follows the finishing order
    assert capsys.readouterr().err == ""
    Engine(m, tok).complete(prompts, sps[1], progress="answers")
    err = capsys.readouterr().err
    assert "answers: 1/3 answers" in err and "tok/s" in err and "ETA" in err


def test_engine_leaves_the_callers_model_alone(tok):
    """Guards the engine changing the caller's model behind its back (it set eval mode and moved
    the model, so training code had to switch it back; it swapped forwards on the model's own
    linears): the engine runs its own modules over the model's parameters, in eval mode, so the
    model keeps its train mode, forwards and attention kernel, while weight updates and hooks added
    later (a LoRA adapter with dropout) still show in the engine's answers."""
    from chatforge.model import attend
    from chatforge.train.lora import LoRA

    m = tiny(tok).train()
    p = tok.encode("The quick brown fox")
    sp = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    engine = Engine(m, tok, decode_weights="fp16")
    before = engine.complete([p], sp)[0].ids
    lora = LoRA(m, rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for b in lora.B:
            b.normal_(0, 0.5)
    m.eval()
    ref = sample_tokens(m, p, 10, temperature=0)
    m.train()
    assert ref != before  # the adapters matter
    params = [id(t) for t in m.parameters()]
    for _ in range(2):  # in train mode the adapters' dropout would make the two runs differ
        assert run(Engine(m, tok, packed=False), [p], sp)[0][0] == ref
        assert engine.complete([p], sp)[0].ids[:4] == ref[:4]  # fp16 decode copies: near-ties may flip later
    engine.score(torch.tensor([p]), decode_path=True)
    assert all(mod.training for mod in m.modules())
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert all(mod.attend is attend for mod in m.modules() if hasattr(mod, "attend"))
    assert [id(t) for t in m.parameters()] == params
    with pytest.raises(ValueError, match="device='meta', but the model is on cpu"):
        Engine(m, tok, device="meta")


def test_matmul_decode_attention_is_the_engines_choice(tok, monkeypatch):
    """Guards the decode-attention kernel choice that moved from model.py to the engine: where the
    engine picks plain matmuls (batched bf16 decode on a CPU with native bf16 and no AMX), its
    answers are those of the fused kernel, the kernel agrees with model.attend, and the caller's
    model keeps model.attend."""
    import chatforge.engine.engine as E
    from chatforge.engine.cache import attend_decode_by_matmuls
    from chatforge.model import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(5, 4, 1, 8), torch.randn(5, 2, 9, 8), torch.randn(5, 2, 9, 8)
    mask = (torch.arange(9)[None, :] <= torch.tensor([8, 3, 5, 8, 0])[:, None])[:, None, None, :]
    torch.testing.assert_close(attend_decode_by_matmuls(q, k, v, mask), attend(q, k, v, mask))
    m = tiny(tok).to(torch.bfloat16)
    prompts = [tok.encode(t) for t in ["Hi", "A journey of a thousand miles", "学而时习之", "x", "The capital"]]
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=True)
    monkeypatch.setattr(E, "matmul_decode_attention_wins", lambda device_type: False)
    fused = Engine(m, tok, max_batch=5).complete(prompts, sp)
    monkeypatch.setattr(E, "matmul_decode_attention_wins", lambda device_type: True)
    engine = Engine(m, tok, max_batch=5)
    assert engine.cache.contiguous_decode and all(mod.attend is attend_decode_by_matmuls for mod in engine.model.modules() if hasattr(mod, "attend"))
    assert [c.ids[:3] for c in engine.complete(prompts, sp)] == [c.ids[:3] for c in fused]  # bf16: later near-ties may flip
    assert all(mod.attend is attend for mod in m.modules() if hasattr(mod, "attend"))


def _long_prompts(tok):
    base = "The quick brown fox jumps over the lazy dog. 床前明月光，疑是地上霜。"
    return [tok.encode(t) for t in ["Hi", base * 3, "A journey of a thousand miles", base * 2 + "x", "学而时习之"]]


@pytest.mark.parametrize("block", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix_cache", [0, 64])
def test_chunked_prefill_gives_the_same_answers(tok, block, prefix_cache):
    """Guards chunked prefill (chunk offsets, masks over the cached chunks, the chunked prompt's slot
    moving when a stream before it finishes, prefix reuse at its first chunk) changing any answer:
    long prompts joining running streams, in fewer slots than requests, with different lengths to
    generate, give an unchunked engine's tokens and log-probs."""
    m = tiny(tok, block)
    prompts = _long_prompts(tok)
    assert max(map(len, prompts)) > 3 * 8
    sps = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=True) for n in (3, 9, 14, 6, 11)]

    def answers(engine):
        toks, lps = {}, {}
        for ev in engine.generate(prompts, sps):
            if ev.token_id is not None:
                toks.setdefault(ev.request_id, []).append(ev.token_id)
                lps.setdefault(ev.request_id, []).append(ev.logprob)
        return toks, lps

    ref_toks, ref_lps = answers(Engine(m, tok, max_batch=3, prefix_cache=prefix_cache))
    eng = Engine(m, tok, max_batch=3, prefix_cache=prefix_cache, prefill_chunk=8)
    toks, lps = answers(eng)
    assert toks == ref_toks
    for i in ref_lps:
        torch.testing.assert_close(torch.tensor(lps[i]), torch.tensor(ref_lps[i]), rtol=1e-4, atol=1e-4)
    assert not eng.has_work and eng.chunking is None


def test_chunked_prefill_interleaves_with_decoding(tok):
    """Guards the point of chunking: while a long prompt is prefilled, the running stream gets a
    token every other step instead of waiting for the whole prefill; the slot count includes the
    chunked prompt; cancelling it mid-prefill frees the engine for the next request."""
    m = tiny(tok)
    short, long = tok.encode("Hi there"), _long_prompts(tok)[1]
    chunks = -(-len(long) // 8)
    eng = Engine(m, tok, max_batch=2, prefill_chunk=8)
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    a = eng.add(short, sp)
    eng.step()  # prefills the short prompt: its first token
    b = eng.add(long, sp)
    per_step = []
    while b not in (ids := [ev.request_id for ev in eng.step()]):
        per_step.append(ids)
        assert eng.slots_in_use == 2
    assert chunks >= 4
    assert per_step == [[], [a]] * (chunks - 1)  # then the last chunk gives b its first token
    eng.abort_all()
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(m, tok, prefill_chunk=-1)

    eng = Engine(m, tok, max_batch=2, prefill_chunk=8)
    b = eng.add(long, sp)
    eng.step()
    assert eng.chunking is not None
    eng.cancel(b)
    assert [(ev.request_id, ev.finish_reason) for ev in eng.step()] == [(b, "cancelled")]
    assert not eng.has_work
    outs, _, _ = run(eng, [short], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    assert outs[0] == run(Engine(m, tok, max_batch=2), [short], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0][0]


def test_decode_memory_on_huge_pages(tok):
    """Guards engine/pages.py: tensors moved onto a huge-page buffer keep their values and move in
    place (a holder of the tensor reads the new memory), each on a 64-byte boundary after the
    previous one; a CPU slot cache of 2 MB or more sits on one such buffer, its blocks' keys and
    values apart and zero; less than a huge page moves nothing. (Placement is Linux's; elsewhere
    nothing moves.)"""
    import sys

    from chatforge.engine import pages
    from chatforge.engine.cache import SlotCache

    torch.manual_seed(0)
    ts = [torch.randn(1000, 600), torch.randint(0, 255, (1001,), dtype=torch.uint8), torch.randn(3, 5000).half()]
    want, holder = [t.clone() for t in ts], {"w": ts[0]}
    moved = pages.onto_huge_pages(ts)
    assert moved == (sys.platform == "linux")
    assert all(torch.equal(a, b) for a, b in zip(ts, want))
    if moved:
        assert ts[0].data_ptr() % pages.HUGE_PAGE == 0 and holder["w"].data_ptr() == ts[0].data_ptr()
        assert ts[1].data_ptr() == ts[0].data_ptr() + 1000 * 600 * 4 and ts[2].data_ptr() == ts[1].data_ptr() + 1024
        ts[0][0, 0] = 5.0
        assert holder["w"][0, 0] == 5.0
    small = [torch.randn(10)]
    assert not pages.onto_huge_pages(small) and pages.huge_page_buffer(1000) is None
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2, d_model=64, max_seq_len=2048)
    cache = SlotCache(GPT(cfg), slots=4, max_len=2048, device="cpu", dtype=torch.float32)
    starts = sorted(t.data_ptr() for t in cache.k + cache.v)
    size = cache.k[0].numel() * 4
    assert all(b - a >= size for a, b in zip(starts, starts[1:])) and all((t == 0).all() for t in cache.k + cache.v)
    if moved:
        assert starts[0] % pages.HUGE_PAGE == 0 and starts[-1] - starts[0] == 5 * size
