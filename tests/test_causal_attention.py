"""The project's causal attention kernel for bf16 training on the CPU (csrc/causal_attention.cpp,
chatforge/causal_attention.py): exact enough, and taken exactly where it fits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatforge import causal_attention
from chatforge.dtypes import amx_tiles
from chatforge.model import GPT, GPTConfig, attend
from chatforge.quantize import native_kernels


def reference(q, k, v):
    H, K = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), is_causal=True)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,K,T,D", [(2, 4, 4, 100, 64), (1, 4, 2, 130, 32), (2, 2, 2, 64, 48), (1, 3, 1, 7, 128), (1, 2, 2, 2, 16)])
def test_kernel_against_fp64(B, H, K, T, D, dtype):
    """Guards the kernel's forward and backward (bf16 products on vdpbf16ps where the CPU has them,
    fp32 ones on AVX2/AVX-512, else a plain loop: whichever this CPU builds) at windows that are not
    whole 64-position blocks, grouped heads and strided queries: output, log-sum-exp and the three
    gradients against fp64 attention on the same inputs no further off than torch's own kernel in
    that dtype (bf16 x1.25; fp32, whose errors are ~3e-7 and order-dependent, x4), lse to fp32."""
    assert native_kernels() is None, native_kernels()
    ops = torch.ops.chatforge_native
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)  # strided, as the model's split of q|k
    k, v = torch.randn(B, K, T, D).to(dtype), torch.randn(B, K, T, D).to(dtype)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    y64 = reference(q64, k64, v64)
    g = torch.randn_like(y64)
    y64.backward(g)
    scale = 1 / math.sqrt(D)
    out, lse = ops.causal_attention_fwd(q, k, v, None, scale)
    dq, dk, dv = ops.causal_attention_bwd(g.to(dtype), q, k, v, out, lse, None, scale)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    yt = reference(qt, kt, vt)
    yt.backward(g.to(dtype))
    factor, floor = (1.25, 1e-4) if dtype == torch.bfloat16 else (4, 1e-7)
    for ours, theirs, exact in [(out, yt, y64), (dq, qt.grad, q64.grad), (dk, kt.grad, k64.grad), (dv, vt.grad, v64.grad)]:
        assert ours.shape == exact.shape and ours.dtype == dtype
        assert rel(ours, exact) <= factor * rel(theirs, exact) + floor, (rel(ours, exact), rel(theirs, exact))
    scores = (q64 @ k64.repeat_interleave(H // K, 1).transpose(-1, -2) * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["packed", "random"])
def test_kernel_with_masks_against_fp64(dtype, kind):
    """Guards masked attention on the kernel: packed rows' block-diagonal causal mask (B, 1, T, T),
    and any pattern per head (1, H, T, T) with a query that may see nothing (zeros, as torch's
    kernel, and no gradient through it): output and gradients as near fp64 as torch's kernel."""
    ops = torch.ops.chatforge_native
    torch.manual_seed(2)
    if kind == "packed":
        B, H, K, T, D = 2, 4, 2, 150, 64
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[0, 40:], seg[0, 100:], seg[1, 70:], seg[1, 140:] = 1, 2, 1, 2
        mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    else:
        B, H, K, T, D = 1, 4, 4, 150, 32
        mask = torch.rand(1, H, T, T) > 0.5
        mask[0, 1, 5] = False
    q = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
    k, v = torch.randn(B, K, T, D).to(dtype), torch.randn(B, K, T, D).to(dtype)

    def torch_attention(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), attn_mask=mask)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    y64 = torch_attention(q64, k64, v64)
    g = torch.randn_like(y64)
    y64.backward(g)
    out, lse = ops.causal_attention_fwd(q, k, v, mask, 1 / math.sqrt(D))
    dq, dk, dv = ops.causal_attention_bwd(g.to(dtype), q, k, v, out, lse, mask, 1 / math.sqrt(D))
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    yt = torch_attention(qt, kt, vt)
    yt.backward(g.to(dtype))
    factor, floor = (1.25, 1e-4) if dtype == torch.bfloat16 else (4, 1e-7)
    for ours, theirs, exact in [(out, yt, y64), (dq, qt.grad, q64.grad), (dk, kt.grad, k64.grad), (dv, vt.grad, v64.grad)]:
        assert torch.isfinite(ours).all()
        assert rel(ours, exact) <= factor * rel(theirs, exact) + floor, (rel(ours, exact), rel(theirs, exact))
    if kind == "random":
        assert (out[0, 1, 5] == 0).all() and (dq[0, 1, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_is_thread_count_invariant(dtype):
    """Guards determinism: a task is one (sequence, head) whole, so 1 and 2 threads give the same bits."""
    assert native_kernels() is None, native_kernels()
    ops = torch.ops.chatforge_native
    torch.manual_seed(1)
    q, k, v, g = (torch.randn(3, 2, 90, 32).to(dtype) for _ in range(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = ops.causal_attention_fwd(q, k, v, None, 0.2)
            results.append((out, lse, *ops.causal_attention_bwd(g, q, k, v, out, lse, None, 0.2)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fits_where_the_kernel_runs():
    """Guards where the model's attention takes the kernel: bf16 (or bf16 autocast) on a CPU whose
    kernel has vdpbf16ps and no AMX, fp32 where it has AVX2 or AVX-512; as many keys as queries,
    more than one query, head dims in 16s, no mask or a boolean (B|1, H|1, T, T) one; everything
    else stays on torch's kernel."""
    q = torch.randn(2, 2, 8, 32)
    paths = causal_attention.paths()
    fp32, bf16 = bool(paths & causal_attention.FP32), bool(paths & causal_attention.BF16)
    assert causal_attention.fits(q, q) == fp32
    assert causal_attention.fits(q.bfloat16(), q.bfloat16()) == bf16
    assert not causal_attention.fits(q.half(), q.half())
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert causal_attention.fits(q, q, causal[None, None]) == fp32
    assert causal_attention.fits(q, q, causal.expand(2, 2, 8, 8)) == fp32
    assert not causal_attention.fits(q, q, causal[None, None].float())  # additive masks: torch's
    assert not causal_attention.fits(q, q, causal[None, None, :4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert causal_attention.fits(q, q) == bf16
        assert not causal_attention.fits(q[:, :, :1], q)  # one query: a decode step
        assert not causal_attention.fits(q[:, :, :4], q)  # queries over a longer cache
        assert not causal_attention.fits(torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24))
    if bf16:  # built with vdpbf16ps, and torch's kernel has no AMX tiles to use here, or was measured slower
        assert torch.ops.chatforge_native.causal_attention_native() & causal_attention.BF16
        assert not amx_tiles() or "on the project's kernel" in causal_attention.decision


def test_bf16_choice_on_amx_is_measured(monkeypatch):
    """Guards the choice on a CPU with AMX (faked here): bf16 stays on torch's kernel unless the
    measurement finds the project's clearly faster; the real measurement also runs when first asked
    for while a step is being compiled (fullgraph), and the step's result is the same either way."""
    if not torch.ops.chatforge_native.causal_attention_native() & causal_attention.BF16:
        pytest.skip("the kernel has no bf16 path on this CPU")
    monkeypatch.setattr(causal_attention, "amx_tiles", lambda: True)
    real = causal_attention.measure_bf16
    q = torch.randn(1, 2, 40, 32)
    try:
        for ratio, taken in ((1.2, False), (0.95, False), (0.5, True)):
            monkeypatch.setattr(causal_attention, "measure_bf16", lambda: ratio)
            causal_attention._probe.cache_clear()
            assert bool(causal_attention.paths() & causal_attention.BF16) == taken
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert causal_attention.fits(q, q) == taken
        monkeypatch.setattr(causal_attention, "measure_bf16", real)
        causal_attention._probe.cache_clear()
        state = torch.get_rng_state()

        def step(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return attend(x, x, x, None)

        compiled = torch.compile(step, fullgraph=True)(q)
        assert "bf16 causal attention on" in causal_attention.decision
        assert torch.equal(torch.get_rng_state(), state)
        torch.testing.assert_close(compiled.float(), step(q).float(), atol=0.02, rtol=0)
    finally:
        causal_attention._probe.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_step_on_kernel_matches_torch(monkeypatch, dtype):
    """Guards the model's use of the kernel, under bf16 autocast and in fp32, eager and compiled
    (fullgraph: the op and its autograd trace without breaks): the loss and every gradient within
    the dtype's noise of the same step on torch's attention (GQA, a window of 1.5 blocks)."""
    want = causal_attention.BF16 if dtype == torch.bfloat16 else causal_attention.FP32
    if not causal_attention.paths() & want:
        pytest.skip(f"the kernel takes no {dtype} on this CPU")
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=96))
    m.init_weights(0)
    x = torch.randint(0, 256, (2, 96))
    calls = []
    kernel = causal_attention.attend
    monkeypatch.setattr(causal_attention, "attend", lambda *a: calls.append(1) or kernel(*a))

    def step(module, use_kernel):
        m.zero_grad()
        with monkeypatch.context() as mp:
            if not use_kernel:
                mp.setattr(causal_attention, "fits", lambda *a: False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = F.cross_entropy(module(x).float().flatten(0, 1), x.flatten())
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    base_loss, base = step(m, False)
    assert not calls
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    for module in (m, torch.compile(m, fullgraph=True)):
        loss, grads = step(module, True)
        torch.testing.assert_close(loss, base_loss, atol=tol / 10, rtol=0)
        for a, b in zip(grads, base):
            assert rel(a, b.double()) < tol
    assert len(calls) >= 2 * 2  # both layers, eager and while tracing


def test_model_takes_masks_exactly():
    """The model's attention with a packed rows' mask on the kernel equals torch's on the same mask
    (fp32), and an additive mask stays on torch's."""
    if not causal_attention.paths() & causal_attention.FP32:
        pytest.skip("the kernel takes no fp32 on this CPU")
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 70, 32) for _ in range(3))
    seg = (torch.arange(70) >= 30).long()
    mask = ((seg[:, None] == seg[None, :]) & torch.ones(70, 70, dtype=torch.bool).tril())[None, None]
    torch.testing.assert_close(attend(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-6, rtol=2e-5)
    additive = torch.zeros(1, 1, 70, 70).masked_fill(~mask, float("-inf"))
    assert not causal_attention.fits(q, k, additive)
    torch.testing.assert_close(attend(q, k, v, additive), F.scaled_dot_product_attention(q, k, v, attn_mask=additive))
