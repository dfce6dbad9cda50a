"""Weight-only int8 quantization for decoding on the CPU.

Decoding one token per sequence multiplies a few rows by every weight matrix: the time goes to
reading weights. Int8 weights with one scale per output channel (symmetric, absmax / 127) hold a
quarter of fp32's bytes, and torch's `_weight_int8pack_mm` kernel multiplies them without
unpacking. The engine keeps such copies for few-row matmuls only (`engine.FastLinears`,
`decode_weights="int8"`): a prefill still uses the original weights and is exact, a decode step
carries int8 rounding (per-channel error <= scale / 2 per weight).
"""

from __future__ import annotations

import torch


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def check_int8_kernel(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"int8 decode weights use a CPU kernel (torch._weight_int8pack_mm); on {device} use bf16 or fp16 decode weights")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ValueError(f"torch {torch.__version__} has no _weight_int8pack_mm kernel; upgrade torch or use bf16/fp16 decode weights")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (qweight * qscale[:, None]).T + bias, in x's dtype (the kernel takes bf16 activations:
    it ran ~9x slower with fp32 ones on an AVX2 CPU)."""
    rows = x.numel() // x.shape[-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).to(torch.bfloat16), qweight, qscale)
    y = y.to(x.dtype).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias
