"""The project's causal attention kernel for bf16 training on the CPU (csrc/causal_attention.cpp,
chatforge/causal_attention.py): exact enough, and taken exactly where it fits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatforge import causal_attention
from chatforge.model import GPT, GPTConfig, attend
from chatforge.quantize import native_kernels


def reference(q, k, v):
    H, K = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), is_causal=True)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("B,H,K,T,D", [(2, 4, 4, 100, 64), (1, 4, 2, 130, 32), (2, 2, 2, 64, 48), (1, 3, 1, 7, 128), (1, 2, 2, 2, 16)])
def test_kernel_against_fp64(B, H, K, T, D):
    """Guards the kernel's forward and backward (its products on vdpbf16ps where the CPU has them,
    else a plain loop: both run here) at windows that are not whole 64-position blocks, grouped
    heads and strided queries: output, log-sum-exp and the three gradients against fp64 attention
    on the same bf16 inputs no further off than torch's own bf16 kernel (x1.25), lse to fp32."""
    assert native_kernels() is None, native_kernels()
    ops = torch.ops.chatforge_native
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D).bfloat16().transpose(1, 2)  # strided, as the model's split of q|k
    k, v = torch.randn(B, K, T, D).bfloat16(), torch.randn(B, K, T, D).bfloat16()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    y64 = reference(q64, k64, v64)
    g = torch.randn_like(y64)
    y64.backward(g)
    scale = 1 / math.sqrt(D)
    out, lse = ops.causal_attention_fwd(q, k, v, scale)
    dq, dk, dv = ops.causal_attention_bwd(g.bfloat16(), q, k, v, out, lse, scale)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    yt = reference(qt, kt, vt)
    yt.backward(g.bfloat16())
    for ours, theirs, exact in [(out, yt, y64), (dq, qt.grad, q64.grad), (dk, kt.grad, k64.grad), (dv, vt.grad, v64.grad)]:
        assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
        assert rel(ours, exact) <= 1.25 * rel(theirs, exact) + 1e-4, (rel(ours, exact), rel(theirs, exact))
    scores = (q64 @ k64.repeat_interleave(H // K, 1).transpose(-1, -2) * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_kernel_is_thread_count_invariant():
    """Guards determinism: a task is one (sequence, head) whole, so 1 and 2 threads give the same bits."""
    assert native_kernels() is None, native_kernels()
    ops = torch.ops.chatforge_native
    torch.manual_seed(1)
    q, k, v, g = (torch.randn(3, 2, 90, 32).bfloat16() for _ in range(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = ops.causal_attention_fwd(q, k, v, 0.2)
            results.append((out, lse, *ops.causal_attention_bwd(g, q, k, v, out, lse, 0.2)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fits_only_plain_causal_bf16():
    """Guards where the model's attention takes the kernel: bf16 (or bf16 autocast), no mask, as many
    keys as queries, more than one query, head dims in 16s, on a CPU whose kernel was built with
    vdpbf16ps and has no AMX; everything else stays on torch's kernel."""
    q = torch.randn(1, 2, 8, 32)
    ok = causal_attention.available()
    assert not causal_attention.fits(q, q)  # fp32 outside autocast
    assert causal_attention.fits(q.bfloat16(), q.bfloat16()) == ok
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert causal_attention.fits(q, q) == ok
        assert not causal_attention.fits(q[:, :, :1], q)  # one query: a decode step
        assert not causal_attention.fits(q[:, :, :4], q)  # queries over a longer cache
        assert not causal_attention.fits(torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24))


@pytest.mark.skipif(not causal_attention.available(), reason="needs AVX-512 BF16 without AMX (the kernel's CPUs)")
def test_training_step_on_kernel_matches_torch(monkeypatch):
    """Guards the model's use of the kernel under bf16 autocast, eager and compiled (fullgraph: the
    op and its autograd trace without breaks): the loss and every gradient within bf16 noise of the
    same step on torch's attention (GQA, a window of 1.5 blocks)."""
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
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(module(x).float().flatten(0, 1), x.flatten())
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    base_loss, base = step(m, False)
    assert not calls
    for module in (m, torch.compile(m, fullgraph=True)):
        loss, grads = step(module, True)
        torch.testing.assert_close(loss, base_loss, atol=2e-3, rtol=0)
        for a, b in zip(grads, base):
            assert rel(a, b.double()) < 0.02
    assert len(calls) >= 2 * 2  # both layers, eager and while tracing


def test_attend_declines_masks():
    """A mask (a padded batch, a cache) keeps torch's kernel even in bf16."""
    q = torch.randn(1, 2, 8, 32).bfloat16()
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(attend(q, q, q, mask), F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
