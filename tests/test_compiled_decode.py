"""The compiled decode step (engine/compiled.py): the same greedy tokens as the eager step, one
graph per slot bucket reused across stream counts and lengths, and eager decoding when it cannot
compile. Compiling costs seconds per bucket, so the fp32 engine is compiled once for the module
and the low-precision one for a single bucket."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from chatforge.engine import Engine, EngineLoop, SamplingParams
from chatforge.engine.compiled import buckets
from chatforge.eval.fidelity import check_mode
from chatforge.model import GPT, GPTConfig

TEXTS = ["The quick brown fox jumps", "床前明月光，疑是地上霜。", "To be or not to be, that is the question.", "A", "Paris"]


def tiny(tok) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=128)
    m = GPT(cfg)
    m.init_weights(0)
    with torch.no_grad():  # weights 5x GPT-2's init: sharp attention, so a wrong mask or position changes the tokens
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(5)
    return m.eval()


def greedy(engine: Engine, prompts: list[list[int]], new: int | list[int]) -> list[list[int]]:
    news = new if isinstance(new, list) else [new] * len(prompts)
    sps = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in news]
    out: list[list[int]] = [[] for _ in prompts]
    for ev in engine.generate(prompts, sps):
        if ev.token_id is not None:
            out[ev.request_id].append(ev.token_id)
    return out


@pytest.fixture(scope="module")
def fp32(tok):
    """An eager and a compiled engine on the same fp32 model (packed oneDNN linears where the CPU
    has them: the custom op), not warmed: the tests share the graphs compiled on first use."""
    m = tiny(tok)
    return Engine(m, tok, max_batch=4), Engine(m, tok, max_batch=4, compile_decode=True)


def test_buckets(tok):
    """Guards the padding rule: powers of two up to max_batch, max_batch itself, FEW_ROWS cuts;
    a step takes the smallest compiled bucket that holds it, never across a FEW_ROWS cut."""
    assert buckets(1) == [1]
    assert buckets(4) == [1, 2, 4]
    assert buckets(6, (4,)) == [1, 2, 4, 6]
    assert buckets(12, (3, 0, 16)) == [1, 2, 3, 4, 8, 12]
    c = Engine(tiny(tok), tok, max_batch=8, decode_weights="int8", compile_decode=True).compiled  # FEW_ROWS["int8"] == 4
    assert c.buckets == [1, 2, 4, 8] and [c.bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    c.compiles[8] = 1
    assert [c.bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]  # 8 is compiled, but across the cut
    c.compiles[4] = 1
    assert [c.bucket(n) for n in (1, 2, 3, 5)] == [4, 4, 4, 8]
    with pytest.raises(ValueError, match="9 streams"):
        c.bucket(9)


def test_compile_bookkeeping(tok, monkeypatch):
    """Guards the per-bucket counts (without compiling: a stand-in for the compiled function that
    adds a graph the first time it sees a bucket): warm() compiles the buckets that steps skipped
    by running in a larger compiled one, and a bucket compiling twice is warned about."""
    c = Engine(tiny(tok), tok, max_batch=4, compile_decode=True).compiled
    seen: set[int] = set()

    def stand_in(ids_B1, pos_B, rows_B, keys_S):
        if ids_B1.shape[0] not in seen:
            seen.add(ids_B1.shape[0])
            counters["stats"]["unique_graphs"] += 1
        return torch.zeros(ids_B1.shape[0], 7)

    monkeypatch.setattr(c, "_compiled", stand_in)
    assert c([5, 6, 7], [3, 9, 4]).shape == (3, 7)
    assert c.compiles == {1: 0, 2: 0, 4: 1} and c.bucket(1) == 4
    assert sorted(c.warm()) == [1, 2] and c.compiles == {1: 1, 2: 1, 4: 1} and c.bucket(1) == 1
    seen.clear()
    with pytest.warns(UserWarning, match="for 2 streams compiled again"):
        c([5, 6], [3, 3])


def test_compiled_greedy_equals_eager_and_reuses_the_bucket(fp32, tok):
    """Guards the compiled step's arithmetic and its static shapes: 3 and then 4 streams in one
    graph (dummy rows), prompts of different lengths (per-row masks), and positions far past the
    ones the graph was compiled at (the attended length must not recompile)."""
    eager, compiled = fp32
    prompts = [tok.encode(t) for t in TEXTS]
    assert greedy(compiled, prompts[:3], 12) == greedy(eager, prompts[:3], 12)
    assert compiled.compiled.compiles == {1: 0, 2: 0, 4: 1}
    long = [tok.encode(" ".join(TEXTS * 2)), *prompts[1:4]]
    assert len(long[0]) > 40
    assert greedy(compiled, long, 24) == greedy(eager, long, 24)
    assert compiled.compiled.compiles == {1: 0, 2: 0, 4: 1}


def test_streams_joining_and_leaving(fp32, tok):
    """Guards continuous batching on the compiled step: requests leave at different steps (a slot
    refilled by moving the last one), waiting ones join mid-decode, the last ones decode alone in
    the compiled bucket's dummy-padded graph."""
    eager, compiled = fp32
    prompts = [tok.encode(t) for t in TEXTS] + [tok.encode(TEXTS[0] + " " + TEXTS[2])]
    new = [3, 9, 5, 14, 7, 11]
    assert greedy(compiled, prompts, new) == greedy(eager, prompts, new)
    assert sum(compiled.compiled.compiles.values()) == 1


def test_engine_loop_thread_reuses_the_graphs(fp32, tok):
    """Guards serving: graphs compiled on the caller's thread (serve warms them at start) are the
    ones the engine loop's thread runs, with the same tokens and no compilation."""
    eager, compiled = fp32
    prompts = [tok.encode(t) for t in TEXTS[:2]]
    greedy(compiled, prompts, 2)  # on this thread: compiles a bucket unless an earlier test did
    before = dict(compiled.compiled.compiles)
    sp = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    loop = EngineLoop(compiled)
    try:
        handles = [loop.submit(p, sp) for p in prompts]
        got = [[ev.token_id for ev in h if ev.token_id is not None] for h in handles]
    finally:
        loop.close()
    assert got == greedy(eager, prompts, 8)
    assert compiled.compiled.compiles == before


def test_int4_copies_compiled_equal_eager_after_warm(tok):
    """Guards the low-precision weights under compile and Engine.warm: int4 decode copies (aten's
    int4 kernel) beside the fp32 output layer's packed copy (the custom op), the bucket compiled
    ahead with its seconds reported, and no compilation after."""
    m = tiny(tok)
    eager = Engine(m, tok, max_batch=1, decode_weights="int4")
    compiled = Engine(m, tok, max_batch=1, decode_weights="int4", compile_decode=True)
    if compiled.fused is not None:  # the one-call step would take every step here: this test is of the compiled one
        assert compiled.warm() == {}
        compiled.fused, compiled.compiled.warm_above = None, 0
    seconds = compiled.warm()
    assert list(seconds) == [1] and seconds[1] > 0 and compiled.warm() == {}
    for text in TEXTS[:3]:
        assert greedy(compiled, [tok.encode(text)], 10) == greedy(eager, [tok.encode(text)], 10)
    assert compiled.compiled.compiles == {1: 1}


def test_trusted_buckets_recompile_for_new_weight_copies(tok):
    """Guards the guard skipping (a bucket with one graph runs it without dynamo's guards while
    the weight copies it was compiled with are installed): weights changed in place (a training
    step) make new copies, and the next step goes through the guards again, recompiles, and
    decodes with the new weights, not the graph's old ones."""
    m = tiny(tok)
    eager = Engine(m, tok, max_batch=1, decode_weights="fp16")
    compiled = Engine(m, tok, max_batch=1, decode_weights="fp16", compile_decode=True)
    compiled.fused = None  # else the one-call step takes every step here: this test is of the compiled one
    p = [tok.encode(TEXTS[1])]
    assert greedy(compiled, p, 8) == greedy(eager, p, 8)
    assert greedy(compiled, p, 8) == greedy(eager, p, 8) and compiled.compiled.compiles == {1: 1}
    before = greedy(eager, p, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for w in m.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    after = greedy(eager, p, 8)
    assert after != before
    with pytest.warns(UserWarning, match="compiled again"):
        assert greedy(compiled, p, 8) == after
    assert compiled.compiled.compiles == {1: 2}


def test_compile_failure_decodes_eagerly(tok, monkeypatch):
    """Guards the fallback: a bucket that fails to compile warns once and the engine decodes
    eagerly, with the same tokens."""
    m = tiny(tok)
    compiled = Engine(m, tok, max_batch=2, compile_decode=True)

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled.compiled, "_compiled", broken)
    prompts = [tok.encode(t) for t in TEXTS[:2]]
    with pytest.warns(UserWarning, match="for 2 streams failed: RuntimeError: no compiler here; this engine decodes eagerly"):
        out = greedy(compiled, prompts, 6)
    assert compiled.compiled is None
    assert out == greedy(Engine(m, tok, max_batch=2), prompts, 6)
    with pytest.raises(RuntimeError, match="compile_decode=True"):
        compiled.warm()



def test_fidelity_takes_compiled_modes():
    """Guards the `+compiled` suffix of eval fidelity's engine modes (and that it is refused elsewhere)."""
    for mode in ("auto+compiled", "fp32+compiled", "fp32+int4+compiled", "ckpt:/some/dir+compiled"):
        check_mode(mode)
    for bad in ("fp32+compiled+int4", "compiled", "fp32+int4+compiled+compiled"):
        with pytest.raises(ValueError, match="unknown fidelity mode"):
            check_mode(bad)
