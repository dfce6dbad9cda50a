"""Name and layout mapping between chatforge's GPT and the Hugging Face / GGUF layouts.

chatforge fuses q|k|v into `attn.qkv` and gate|up into `mlp.fc` (one matmul instead of several);
the other formats keep them apart. Everything architecture-specific lives here, not in model.py.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import GPTConfig


def split_qkv(w: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    return tuple(w.split([H * D, K * D, K * D], dim=0))  # type: ignore[return-value]


def split_fc(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = w.chunk(2, dim=0)
    return gate, up


def llama_to_ours(get, cfg: GPTConfig, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """HF Llama/Qwen2/Mistral names -> chatforge. `get(name)` returns a tensor or None if absent."""
    sd = {"tok_emb.weight": get(prefix + "embed_tokens.weight"), "norm_f.weight": get(prefix + "norm.weight")}
    for i in range(cfg.n_layer):
        p, q = f"{prefix}layers.{i}.", f"blocks.{i}."
        sd[q + "norm1.weight"] = get(p + "input_layernorm.weight")
        sd[q + "norm2.weight"] = get(p + "post_attention_layernorm.weight")
        sd[q + "attn.qkv.weight"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            sd[q + "attn.qkv.bias"] = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[q + "attn.proj.weight"] = get(p + "self_attn.o_proj.weight")
        sd[q + "mlp.fc.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        sd[q + "mlp.proj.weight"] = get(p + "mlp.down_proj.weight")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    return sd


def ours_to_llama(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
        for name, w in zip("qkv", split_qkv(sd[q + "attn.qkv.weight"], cfg)):
            out[p + f"self_attn.{name}_proj.weight"] = w
        if cfg.qkv_bias:
            for name, b in zip("qkv", split_qkv(sd[q + "attn.qkv.bias"], cfg)):
                out[p + f"self_attn.{name}_proj.bias"] = b
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.proj.weight"]
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = split_fc(sd[q + "mlp.fc.weight"])
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.proj.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# GPT-2 checkpoints store Conv1D weights as (in, out): transpose to nn.Linear's (out, in).
GPT2_LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GPT2_MAP = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


def gpt2_to_ours(get, cfg: GPTConfig, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    sd = {
        "tok_emb.weight": get(prefix + "wte.weight"),
        "pos_emb.weight": get(prefix + "wpe.weight"),
        "norm_f.weight": get(prefix + "ln_f.weight"),
        "norm_f.bias": get(prefix + "ln_f.bias"),
    }
    for i in range(cfg.n_layer):
        for theirs, ours in GPT2_MAP.items():
            for kind in ("weight", "bias"):
                t = get(f"{prefix}h.{i}.{theirs}.{kind}")
                if kind == "weight" and theirs in GPT2_LINEAR:
                    t = t.t().contiguous()
                sd[f"blocks.{i}.{ours}.{kind}"] = t
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    return sd


def ours_to_gpt2(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["norm_f.weight"],
        "transformer.ln_f.bias": sd["norm_f.bias"],
    }
    for i in range(cfg.n_layer):
        for theirs, ours in GPT2_MAP.items():
            for kind in ("weight", "bias"):
                t = sd[f"blocks.{i}.{ours}.{kind}"]
                if kind == "weight" and theirs in GPT2_LINEAR:
                    t = t.t().contiguous()
                out[f"transformer.h.{i}.{theirs}.{kind}"] = t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def gguf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF->GGUF converter reorders q/k rows for its interleaved RoPE; undo it to get
    the rotate-half layout (rows: head, pair index, even/odd -> head, even/odd, pair index)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
