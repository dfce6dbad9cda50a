"""Model: causality, grouped-query attention, parameter counts, config validation."""

from __future__ import annotations

import pytest
import torch

from chatforge.model import (
    GPT,
    GPTConfig,
    RMSNorm,
    apply_rope,
    flops_per_token,
    preset,
    rope_tables,
)


def tiny(block: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2 if block == "llama" else 0, d_model=32, max_seq_len=64, block=block, **kw)
    m = GPT(cfg)
    m.init_weights(0)
    return m.eval()


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_causal(block):
    """Guards attention leaking the future: changing tokens after position t leaves logits <= t unchanged."""
    m = tiny(block)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


@pytest.mark.parametrize("rows", [3, 6])
def test_gqa_decode_matches_repeat(rows):
    """Guards both decode paths (query heads folded into time: the fused kernel below 4 rows, plain
    matmuls from 4 rows) against attention with repeated K/V heads."""
    from chatforge.model import attend

    torch.manual_seed(rows)
    q = torch.randn(rows, 8, 1, 16)
    k = torch.randn(rows, 2, 10, 16)
    v = torch.randn(rows, 2, 10, 16)
    mask = torch.rand(rows, 1, 1, 10) > 0.3
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
    torch.testing.assert_close(attend(q, k, v, mask), ref)


def test_explicit_mask_equals_causal():
    """Guards the masked path (used by packing and the engine) diverging from plain causal attention."""
    m = tiny("llama")
    x = torch.randint(0, 97, (1, 10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x, mask=causal), atol=1e-5, rtol=1e-5)


def test_param_count_by_hand():
    """Guards num_params (used for MFU and reports) against a hand count of a GPT-2 block."""
    cfg = GPTConfig(vocab_size=100, n_layer=1, n_head=2, d_model=8, max_seq_len=16, block="gpt2")
    m = GPT(cfg)
    d, f = 8, 32
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    assert m.num_params(non_embedding=False) == 100 * d + 16 * d + block + 2 * d
    assert m.num_params() == block + 2 * d + 100 * d  # tied head: token embedding counts as the output matrix


def test_llama_gqa_shapes_and_count_by_hand():
    """Guards grouped-query shapes (fused q|k|v rows = (H + 2K) * D) and the count of an untied
    SwiGLU model: embeddings 2 * V*C, per block norm C + qkv (H+2K)*D*C + proj C*H*D + norm C
    + gate|up 2*F*C + down C*F, then a final norm C."""
    V, C, H, K, D, F = 100, 8, 2, 1, 4, 64  # llama d_ff = 64 * ceil(8/3 * 8 / 64) = 64
    cfg = GPTConfig(vocab_size=V, n_layer=1, n_head=H, n_kv_head=K, d_model=C, max_seq_len=16, block="llama", tie_embeddings=False)
    m = GPT(cfg)
    assert m.blocks[0].attn.qkv.weight.shape == ((H + 2 * K) * D, C)
    assert m.blocks[0].mlp.fc.weight.shape == (2 * F, C)
    block = C + (H + 2 * K) * D * C + C * H * D + C + 2 * F * C + C * F
    assert m.num_params(non_embedding=False) == 2 * V * C + block + C == 3352
    assert m.num_params() == V * C + block + C  # the untied input table is not counted
    # Logits come out whole: (B, T, V) with 2 query heads sharing 1 kv head.
    assert m(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, V)


def test_flops_per_token_by_hand():
    """Guards the MFU numerator: 6 * (matmul weights incl. head) + 12 * L * H * D * T for attention
    (PaLM appendix B), for the same tiny llama as above at T = 16."""
    cfg = GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_kv_head=1, d_model=8, max_seq_len=16, block="llama")
    matmul = 8 * (2 + 2 * 1) * 4 + 2 * 4 * 8 + 3 * 8 * 64 + 8 * 100  # qkv + proj + gate|up|down + head
    assert flops_per_token(cfg, 16) == 6 * matmul + 12 * 1 * 2 * 4 * 16 == 16704


def test_flops_per_token_dominated_by_6n():
    """Guards a gross error at a real size: GPT-3 125M at 2048 tokens is about 6 * 125M FLOPs/token."""
    cfg = preset("gpt3-125m", vocab_size=50257)
    f = flops_per_token(cfg, 2048)
    assert 6 * 110e6 < f < 6 * 200e6


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(block="rnn"), "block"),
        (dict(n_head=6, n_kv_head=4), "multiple"),
        (dict(d_model=30, n_head=4), "divisible"),
        (dict(n_layer=0), "positive"),
    ],
)
def test_config_errors(kw, msg):
    """Guards configs that would build a broken model (bad block, heads that do not divide) being accepted."""
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**{**dict(vocab_size=10, n_layer=1, n_head=2, d_model=8), **kw})


def test_unknown_preset():
    """Guards a typo in --preset falling back to some default size."""
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")


def test_too_long_sequence():
    """Guards positions past the context silently indexing beyond the RoPE/position tables."""
    m = tiny("llama")
    with pytest.raises(ValueError, match="longer than the model's context"):
        m(torch.zeros(1, 65, dtype=torch.long))



@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_stem_continues_exactly(block):
    """Guards the shared stem: hidden states computed from another model's first blocks equal a
    full forward, and shared_depth counts only identical, frozen, hook-free lowest blocks."""
    from chatforge.model import shared_depth

    a, b = tiny(block), tiny(block)
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(b.hidden(x, stem=a.stem(x, 1)), b.hidden(x), rtol=0, atol=0)
    for p in list(a.parameters()) + list(b.parameters()):
        p.requires_grad_(False)
    assert shared_depth([a, b]) == 2
    with torch.no_grad():
        b.blocks[1].mlp.proj.weight.add_(1e-3)
    assert shared_depth([a, b]) == 1
    hook = a.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: o)
    assert shared_depth([a, b]) == 0
    hook.remove()
    b.blocks[0].attn.qkv.weight.requires_grad_(True)
    assert shared_depth([a, b]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_rotate_half(dtype):
    """Guards apply_rope's flip-and-signed-sin form: output and input gradient equal, bit for bit,
    the textbook x*cos + [-x2, x1]*sin (HF's rotate_half layout) in fp32 and bf16."""
    cos, sin = rope_tables(8, 16, 10000.0)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    grad = torch.randn(2, 3, 5, 8, generator=g).to(dtype)

    x = x0.clone().requires_grad_()
    y = apply_rope(x, cos, sin)
    y.backward(grad)
    ref_x = x0.clone().requires_grad_()
    x1, x2 = ref_x[..., :4], ref_x[..., 4:]
    ref = ref_x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]
    ref.backward(grad)
    assert not torch.equal(y, x0 * cos[:, None])  # the rotation did something
    assert torch.equal(y, ref) and torch.equal(x.grad, ref_x.grad)


def test_rmsnorm_under_autocast_equals_composite():
    """Guards RMSNormTo (RMSNorm while training under autocast): its bf16 output equals F.rms_norm
    in fp32 followed by the cast autocast made before, bit for bit, and the gradients of the input
    and the gain equal autograd's through that composite (fp32 rounding), here through a bf16 linear."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(16, generator=g))
    x0 = 3 * torch.randn(2, 5, 16, generator=g)
    w = 0.2 * torch.randn(8, 16, generator=g)

    def run(fused: bool):
        x = x0.clone().requires_grad_()
        norm.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = norm(x) if fused else torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5)
            y = torch.nn.functional.linear(h, w)
        y.float().square().sum().backward()
        return h, x.grad, norm.weight.grad

    h, gx, gw = run(True)
    h_ref, gx_ref, gw_ref = run(False)
    assert h.dtype == torch.bfloat16 and h_ref.dtype == torch.float32
    assert torch.equal(h, h_ref.to(torch.bfloat16))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x0).dtype == torch.float32  # inference keeps the plain fp32 path
