"""Dtype names used by every command (`--dtype auto|bf16|fp32|fp16`) and the choices behind "auto".

Training (`resolve`): bf16 autocast where the hardware has it, CUDA GPUs from Ampere on and CPUs
whose oneDNN kernels run bf16 natively (AVX-512 or AMX); on an AVX2-only CPU torch falls back to a
generic bf16 matmul some fifty times slower than fp32 (benchmarks/README.md), so "auto" picks fp32
there.

Inference (`inference_mode`): chosen by fidelity to fp32, then by speed (`chatforge eval
fidelity`): fp32 activations everywhere, and decode steps of a few streams multiplying by weight
copies that read fewer bytes (a decode step's time is the weight bytes it reads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

NAMES = ("auto", "bf16", "fp32", "fp16")  # torch is imported only when a dtype is resolved (fast --help)
DECODE_NAMES = ("auto", "same", "bf16", "fp16", "int8", "int4")  # `--decode-weights`: see inference_mode()
KV_CACHE_NAMES = ("auto", "same", "fp16")  # `--kv-cache`: engine.Engine's kv_cache
QUANT_KERNELS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}  # the aten CPU matmuls of int8/int4 decode copies


def check_name(name: str, field: str = "dtype", names: tuple[str, ...] = NAMES) -> None:
    if name not in names:
        raise ValueError(f"{field}={name!r}; expected one of {', '.join(names)}")


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run natively (not emulated) on this kind of device."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older or slimmer torch build without the probe
            return False
    return False


@functools.cache
def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles that torch's CPU kernels use (its fused attention among them):
    where they do, the project's decode attention is not taken (engine/cache.py) and its training
    attention in bf16 only where measured faster (causal_attention.py)."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # absent in older torch builds: no AMX kernels there either
    return bool(amx is not None and amx())


def resolve(name: str, device="cpu") -> str:
    """The concrete dtype name for `name` on `device` (a torch.device or a string such as
    "cuda:1"): "auto" becomes "bf16" or "fp32"."""
    check_name(name)
    if name != "auto":
        return name
    return "bf16" if fast_bf16(str(device).split(":")[0]) else "fp32"


def torch_dtype(name: str, device="cpu"):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[resolve(name, device)]


def inference_mode(dtype: str = "auto", decode: str = "auto", device="cpu",
                   exact_int4: bool | Callable[[], bool] = False) -> tuple[str, str | None]:
    """(dtype name, decode copies or None) that chat, generate, serve and eval tasks run for
    `--dtype dtype --decode-weights decode` on `device`.

    Chosen by `chatforge eval fidelity` (README table): the default must stay within a mean KL of
    0.005 nats of fp32 and repeat fp32's first 24 greedy tokens on 95% of chat prompts. On
    SmolLM2-135M bf16 activations failed that (the residual stream and bf16 logits flip near-tied
    tokens), and so did bf16, int8 and int4 decode copies (8-bit mantissas or coarser), on any
    device; fp16 copies with fp32 activations and fp32 logits stayed within it. So inference keeps
    fp32 activations ("auto" -> "fp32", unlike training's `resolve`) and, on a CPU, decodes a few
    streams on fp16 copies of the weights: half of fp32's bytes, and a decode step's time is the
    weight bytes it reads. Where the checkpoint's weights are 4-bit groups already and the project's
    fp32-activation int4 kernel is built (`exact_int4`, or a function that says so, asked only in
    that case: checkpoint.inference_mode), int4 copies hold the very same weights in a quarter of
    fp16's bytes, and "auto" decodes on them. An explicit
    --dtype runs exactly as asked (fp32: the exact reference)."""
    check_name(dtype)
    check_name(decode, "decode_weights", DECODE_NAMES)
    dt = "fp32" if dtype == "auto" else dtype
    if decode != "auto":
        return dt, None if decode == "same" else decode
    if dtype != "auto" or str(device).split(":")[0] != "cpu":
        return dt, None
    return dt, "int4" if (exact_int4() if callable(exact_int4) else exact_int4) else "fp16"
