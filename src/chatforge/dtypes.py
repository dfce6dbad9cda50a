"""Dtype names used by every command (`--dtype auto|bf16|fp32|fp16`) and the choice behind "auto".

bf16 is only fast where the hardware has it: CUDA GPUs from Ampere on, and CPUs whose oneDNN
kernels run bf16 natively (AVX-512 or AMX). On an AVX2-only CPU, torch falls back to a generic
bf16 matmul that measured 0.5 GFLOP/s against fp32's 24 GFLOP/s on the same 2 cores, so "auto"
(the default everywhere) picks fp32 there and bf16 where it pays.

Decoding is different: a decode step multiplies one row per stream by every weight, so its time
is the bytes it reads, and there half-precision one-row matmuls are fast even on AVX2. So "auto" on
such a CPU also gives the engine fp16 copies of the weights for decode steps of a few streams
(`decode_weights`): fp32 prefills, fp16 decoding. fp16 rather than bf16 because it measured ~10%
faster there (SmolLM2-135M, one stream: 32.4 / 34.9 / 35.2 against 25.4 / 31.7 / 33.0 tok/s, three
alternating rounds; F16C converts in hardware) and keeps 3 more mantissa bits; its range ends at
65504, and the engine returns to the model's own weights for good if a step overflows.
"""

from __future__ import annotations

import functools

NAMES = ("auto", "bf16", "fp32", "fp16")  # torch is imported only when a dtype is resolved (fast --help)
DECODE_NAMES = ("auto", "same", "bf16", "fp16", "int8", "int4")  # `--decode-weights`: see decode_weights()


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
def bf16_matmul_decode_attention(device_type: str) -> bool:
    """Whether batched bf16 decode attention runs faster as plain matmuls than in the fused SDPA
    kernel here: on a CPU with native bf16 but no AMX tiles (an AVX-512 BF16 AMD EPYC: 383 vs
    646 us for 16 rows, 3 kv heads, 384 positions). Not with AMX (a Sapphire Rapids Xeon, whose
    fused kernel multiplies on the tiles: 185 vs 1025 us for 16 rows at 260 positions, 264 vs
    980 at 380), on AVX2 (emulated bf16) or on CUDA."""
    import torch

    if device_type != "cpu" or not fast_bf16("cpu"):
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return not (amx is not None and amx())


def resolve(name: str, device="cpu") -> str:
    """The concrete dtype name for `name` on `device` (a torch.device or a string such as
    "cuda:1"): "auto" becomes "bf16" or "fp32"."""
    check_name(name)
    if name != "auto":
        return name
    return "bf16" if fast_bf16(str(device).split(":")[0]) else "fp32"


def decode_weights(name: str, dtype_name: str, device="cpu") -> str | None:
    """The engine's `decode_weights` for `--decode-weights name` with `--dtype dtype_name`:
    "same" = the model's own weights (None); "auto" = "fp16" where --dtype auto resolved to fp32
    on a CPU without native bf16, else the model's own weights."""
    check_name(name, "decode_weights", DECODE_NAMES)
    if name == "same":
        return None
    if name != "auto":
        return name
    kind = str(device).split(":")[0]
    return "fp16" if dtype_name == "auto" and kind == "cpu" and resolve("auto", kind) == "fp32" else None


def torch_dtype(name: str, device="cpu"):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[resolve(name, device)]
