"""The GPT: a decoder-only transformer (Radford et al. 2018/2019; Brown et al. 2020; Touvron et al. 2023).

One config describes both block families chatforge needs:
- "gpt2":  learned positions, LayerNorm, GELU MLP, biases (GPT-2/GPT-3);
- "llama": rotary positions (RoPE), RMSNorm, SwiGLU MLP, grouped-query attention (Llama, Qwen2,
           SmolLM2). `qkv_bias` adds Qwen2's q/k/v biases.

This file is only the architecture: no optimizer, no I/O, no name mapping for other formats
(that lives in convert/). Heads: the LM head (GPT.head) and a scalar one (RewardModel: the
reward model, and PPO's value model). Shapes are in suffixes: B batch, T new positions, S attended positions,
H query heads, K kv heads, D head dim, C model width, V vocab.

The KV cache is the caller's (engine/cache.py). Attention calls `kv_cache.update(layer, k, v)`
and gets back every key/value that the new queries may attend to; the caller passes matching
positions and a boolean mask (True = may attend). Without a cache or mask, attention is plainly
causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import causal_attention

BLOCKS = ("gpt2", "llama")


@dataclass
class GPTConfig:
    vocab_size: int = 32768  # rows of the embedding; at least the tokenizer's vocabulary
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head
    d_model: int = 384  # residual stream width
    d_ff: int = 0  # MLP hidden width; 0 derives 4*d_model (gpt2) or 8/3*d_model rounded to 64 (llama)
    head_dim: int = 0  # 0 derives d_model // n_head
    max_seq_len: int = 1024  # context window (positions the model was built for)
    block: str = "llama"  # "gpt2" or "llama" (see module docstring)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base (llama blocks only)
    tie_embeddings: bool = True  # share the token embedding with the output head
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2); gpt2 blocks always have biases

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"GPTConfig.block={self.block!r}; expected one of {BLOCKS}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be positive")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.block == "llama" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.block == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def bias(self) -> bool:
        return self.block == "gpt2"


# Sizes from the GPT-3 paper (Brown et al. 2020, table 2.1) and small sizes for a 2-core CPU.
# Width/heads come from the table; vocab and context come from the tokenizer and the run.
PRESETS: dict[str, dict] = {
    "cpu-tiny": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=256),
    "cpu-small": dict(n_layer=4, d_model=256, n_head=4, max_seq_len=256),
    "cpu-10m": dict(n_layer=6, d_model=384, n_head=6, max_seq_len=256),
    "cpu-50m": dict(n_layer=10, d_model=640, n_head=10, max_seq_len=256),
    "gpt3-125m": dict(n_layer=12, d_model=768, n_head=12, max_seq_len=2048),
    "gpt3-350m": dict(n_layer=24, d_model=1024, n_head=16, max_seq_len=2048),
    "gpt3-760m": dict(n_layer=24, d_model=1536, n_head=16, max_seq_len=2048),
    "gpt3-1.3b": dict(n_layer=24, d_model=2048, n_head=16, max_seq_len=2048),
    "gpt3-2.7b": dict(n_layer=32, d_model=2560, n_head=32, max_seq_len=2048),
    "gpt3-6.7b": dict(n_layer=32, d_model=4096, n_head=32, max_seq_len=2048),
    "gpt3-13b": dict(n_layer=40, d_model=5120, n_head=40, max_seq_len=2048),
    "gpt3-175b": dict(n_layer=96, d_model=12288, n_head=96, max_seq_len=2048),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A GPTConfig from a named preset; keyword overrides win (e.g. vocab_size, block)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class KVCache(Protocol):
    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer`; return all keys/values to attend to (B,K,S,D)."""
        ...


class RMSNormTo(torch.autograd.Function):
    """fp32 RMSNorm whose output is rounded once to `dtype` (the autocast dtype of the matmul that
    reads it), for training under autocast. The same forward values as F.rms_norm followed by
    autocast's cast; the backward is written out (grad_x = rstd * (g*w - xhat * mean(g*w*xhat)),
    grad_w = sum of g*xhat over rows) in fewer passes over (B,T,C) than autograd's chain of the
    composite norm and the two casts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
        torch.mul(x * rstd, w, out=y)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        xhat = x * rstd
        gw = g * w  # fp32, as w is; g comes in the autocast dtype
        grad_w = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        dot = (gw * xhat).mean(-1, keepdim=True)
        return torch.addcmul(gw, xhat, dot, value=-1.0).mul_(rstd), grad_w, None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()
                and torch.is_autocast_enabled(x.device.type)):  # training under autocast: see RMSNormTo
            return RMSNormTo.apply(x, self.weight, self.eps, torch.get_autocast_dtype(x.device.type))
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts: ~30% less time per call (decode)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 (as Llama does) and cast back: bf16 variance is too coarse.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.block == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_pos, head_dim) in the rotate-half layout used by HF Llama checkpoints."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]. The halves are swapped by one flip and
    the sign goes on the (per-position, not per-head) sin table: the same products bit for bit,
    without the slices, negation and concatenation whose backward zero-fills and adds whole
    (B,H,T,D) tensors (a training step's cost: benchmarks/README.md)."""
    d = x_BHTD.shape[-1] // 2
    sin_BTD = torch.cat([-sin_BTD[..., :d], sin_BTD[..., d:]], dim=-1)
    swapped = x_BHTD.unflatten(-1, (2, d)).flip(-2).flatten(-2)  # [x2, x1]
    return x_BHTD * cos_BTD[:, None] + swapped * sin_BTD[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        # One fused q|k|v projection: a single larger matmul is faster than three small ones.
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.rope = cfg.block == "llama"
        # The attention kernel, a function like `attend`, and the rotation, like `apply_rope`; the
        # engine sets others on the modules it runs where those run faster (engine/engine.py).
        self.attend = attend
        self.rotate = apply_rope

    def forward(self, x_BTC, cos_BTD, sin_BTD, mask, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.qkv(x_BTC).split([(H + K) * D, K * D], dim=-1)
        qk = qk.view(B, T, H + K, D).transpose(1, 2)
        if self.rope:  # one rotation for the query and key heads together: half the small ops
            qk = self.rotate(qk, cos_BTD, sin_BTD)
        q, k = qk.split([H, K], dim=1)
        v = v.view(B, T, K, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        y = self.attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


def attend(q_BHTD, k_BKSD, v_BKSD, mask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads; `mask` None means causal over T=S."""
    H, K = q_BHTD.shape[1], k_BKSD.shape[1]
    if causal_attention.fits(q_BHTD, k_BKSD, mask):  # causal or packed rows, T = S, on the CPU: the project's kernel
        return causal_attention.attend(q_BHTD, k_BKSD, v_BKSD, mask)
    if H != K:
        if q_BHTD.shape[2] == 1:
            # Decoding one token: fold the query heads of a group into the time axis instead of
            # copying the whole cache n_rep times. A (B,1,1,S) mask broadcasts over the fold.
            B, _, _, D = q_BHTD.shape
            y = F.scaled_dot_product_attention(q_BHTD.reshape(B, K, H // K, D), k_BKSD, v_BKSD, attn_mask=mask)
            return y.reshape(B, H, 1, D)
        k_BKSD = k_BKSD.repeat_interleave(H // K, dim=1)
        v_BKSD = v_BKSD.repeat_interleave(H // K, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, is_causal=q_BHTD.shape[2] > 1)
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [gate | up] projection."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama), the latter with gate and up fused into one matmul."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        gated = cfg.block == "llama"
        self.fc = nn.Linear(cfg.d_model, (2 if gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = swiglu if gated else gelu_tanh  # the engine may set another function (engine/engine.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.attn(self.norm1(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.norm2(x))


@dataclass
class Stem:
    """The residual stream (B,T,C) after a model's first `depth` blocks."""

    x: torch.Tensor
    depth: int


def shared_depth(models: list[GPT]) -> int:
    """How many of the lowest blocks (with the embeddings) these models hold with identical
    weights and no trainable parameter or forward hook (a LoRA adapter): the blocks whose output
    one `stem` can stand in for in all of them. 0 when the embeddings differ."""
    first = models[0]
    if any(m.cfg != first.cfg for m in models):
        return 0
    def frozen_same(mods: list[nn.Module]) -> bool:
        for group in zip(*(list(m.named_parameters()) for m in mods)):
            if any(p.requires_grad for _, p in group) or any(not torch.equal(group[0][1], p) for _, p in group[1:]):
                return False
        return not any(getattr(sub, "_forward_hooks", None) for m in mods for sub in m.modules())

    emb = [[m.tok_emb] + ([m.pos_emb] if m.cfg.block == "gpt2" else []) for m in models]
    if not all(frozen_same([e[i] for e in emb]) for i in range(len(emb[0]))):
        return 0
    depth = 0
    while depth < first.cfg.n_layer and frozen_same([m.blocks[depth] for m in models]):
        depth += 1
    return depth


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.block == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.block == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02); residual output projections scaled by 1/sqrt(2L)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std_res = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                std = std_res if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def _positions(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Positions 0..T-1 of full sequences (B,T), refusing ones longer than the context."""
        B, T = input_ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.cfg.max_seq_len})")
        return torch.arange(T, device=input_ids_BT.device).expand(B, T)

    def _embed(self, input_ids_BT: torch.Tensor, pos_ids_BT: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids_BT)
        return x + self.pos_emb(pos_ids_BT) if self.cfg.block == "gpt2" else x

    def _rope(self, pos_ids_BT: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos/sin for these positions in the dtype of the q/k heads they rotate: the residual
        stream's, or under autocast the autocast dtype of the q|k|v matmul (else the rotation of
        bf16 heads would run in fp32 and be cast back for attention: ~8% of an eager bf16
        training step at cpu-10m)."""
        if self.cfg.block != "llama":
            return None, None
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return self.rope_cos[pos_ids_BT].to(dt), self.rope_sin[pos_ids_BT].to(dt)

    def hidden(
        self,
        input_ids_BT: torch.Tensor,
        pos_ids_BT: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        stem: Stem | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B,T,C): the LM head and the reward/value heads read these.
        With a `stem` (from `self.stem` or another model whose lowest blocks hold the same
        weights) the first `stem.depth` blocks are not run again."""
        if pos_ids_BT is None:
            pos_ids_BT = self._positions(input_ids_BT)
        x, start = (stem.x, stem.depth) if stem is not None else (self._embed(input_ids_BT, pos_ids_BT), 0)
        cos, sin = self._rope(pos_ids_BT, x)
        for block in self.blocks[start:]:
            x = block(x, cos, sin, mask, kv_cache)
        return self.norm_f(x)

    def stem(self, input_ids_BT: torch.Tensor, depth: int) -> Stem:
        """The residual stream after the first `depth` blocks (full-length sequences from 0, no
        cache), for `hidden(..., stem=)` of this model or of any model that shares those blocks."""
        pos = self._positions(input_ids_BT)
        x = self._embed(input_ids_BT, pos)
        cos, sin = self._rope(pos, x)
        for block in self.blocks[:depth]:
            x = block(x, cos, sin, None, None)
        return Stem(x, depth)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final-norm hidden states of any shape (...,C). Calls the lm_head module
        when there is one, so its forward hooks (LoRA on "lm_head") take part."""
        return F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids_BT, pos_ids_BT=None, mask=None, kv_cache=None) -> torch.Tensor:
        """Logits (B,T,V)."""
        return self.head(self.hidden(input_ids_BT, pos_ids_BT, mask, kv_cache))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the (position and untied token) embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() if self.lm_head is not None else 0
            n -= self.pos_emb.weight.numel() if self.cfg.block == "gpt2" else 0
        return n


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*C*T for attention (Kaplan et al. 2020;
    PaLM appendix B). N counts the matmul weights including the output head."""
    d = cfg.d_model
    attn = d * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim * d
    mlp = (3 if cfg.block == "llama" else 2) * d * cfg.d_ff
    n_matmul = cfg.n_layer * (attn + mlp) + d * cfg.vocab_size
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


class RewardModel(nn.Module):
    """A GPT body and a scalar head: `scores` at each sequence's last token (the reward model),
    `values` at every position (PPO's value model)."""

    def __init__(self, gpt: GPT, head: nn.Linear | None = None, seed: int = 0):
        super().__init__()
        self.gpt = gpt
        if head is None:
            head = nn.Linear(gpt.cfg.d_model, 1)
            with torch.no_grad():
                # Small random weights (std 1/sqrt(C+1)) and zero bias: initial rewards near 0.
                g = torch.Generator().manual_seed(seed)
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(gpt.cfg.d_model + 1))
                head.bias.zero_()
            head.to(next(gpt.parameters()).device)
        self.value_head = head

    def values(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor | None = None, mask=None, stem=None) -> torch.Tensor:
        """The head at every position, (B,T), fp32. `stem`: see GPT.hidden."""
        return self.value_head(self.gpt.hidden(ids_BT, pos_BT, mask, stem=stem)).squeeze(-1).float()

    def forward(self, ids_BT: torch.Tensor, last_B: torch.Tensor, stem=None) -> torch.Tensor:
        """Reward of each right-padded sequence, read at its last real token `last_B`, (B,)."""
        h = self.gpt.hidden(ids_BT, stem=stem)
        return self.value_head(h[torch.arange(ids_BT.shape[0], device=ids_BT.device), last_B]).squeeze(-1).float()

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The head's parameters under their module names (checkpoint.py stores them in extra.safetensors)."""
        return {"value_head.weight": self.value_head.weight.detach(), "value_head.bias": self.value_head.bias.detach()}
