"""Self-attention of T queries over the same T keys on the project's CPU kernel
(csrc/causal_attention.cpp), forward and backward, in bf16 (under bf16 autocast) or fp32: what a
training step's attention runs on the CPU.

torch's CPU flash kernel runs its block products through general GEMM calls; at training shapes the
project's kernel measured 2.0-3.1x faster forward + backward in bf16 on an AVX-512 BF16 CPU,
1.5-1.9x in fp32 and 4-6x on packed rows' block-diagonal mask (it skips the blocks a mask hides),
with errors against fp64 of torch's size (benchmarks/README.md). `model.attend` takes it where
`fits` says so: causal without a mask, or a boolean mask of any pattern. Additive masks, decode
steps, CUDA and other dtypes keep torch's scaled_dot_product_attention; so does bf16 on CPUs with
AMX, whose tiles torch's kernel uses and this one does not (not measured against it).
"""

from __future__ import annotations

import functools
import math

import torch

from .dtypes import amx_tiles
from .quantize import native_kernels

BF16, FP32 = 1, 2  # the bits of paths()


@torch.compiler.assume_constant_result  # a compiled step asks once, as it traces (no file reads in its graph)
def paths() -> int:
    """Which dtypes the kernel takes here (and its autograd registered): bit 1 bf16 (vdpbf16ps, on a
    CPU without AMX), bit 2 fp32 (AVX2 or AVX-512 multiply-adds); 0 where it is not built."""
    return _probe()


@functools.cache
def _probe() -> int:
    if native_kernels() is not None:
        return 0
    found = int(torch.ops.chatforge_native.causal_attention_native())
    if amx_tiles():  # torch's bf16 kernel runs on the tile unit there
        found &= ~BF16
    if found:
        torch.library.register_autograd("chatforge_native::causal_attention_fwd", _backward, setup_context=_save)
    return found


def _save(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.chatforge_native.causal_attention_bwd(grad_out, q, k, v, out, lse, mask, ctx.scale)
    return dq, dk, dv, None, None


def fits(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether attention of these queries over as many keys runs on the kernel: CPU tensors, more
    than one position, a head dim that is a multiple of 16, bf16 (or bf16 autocast) or fp32 where
    paths() has it, and no mask or a boolean (B or 1, H or 1, T, T) one (packed rows' block-diagonal
    causal mask; any pattern is exact, the kernel skips blocks nothing may see)."""
    B, H, T, D = q_BHTD.shape
    if q_BHTD.device.type != "cpu" or T < 2 or T != k_BKSD.shape[2] or D % 16:
        return False
    if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[2:] == (T, T)
                                 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H)):
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast casts q, k and v as it would for torch's kernel
        want = BF16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else 0
    else:
        want = {torch.bfloat16: BF16, torch.float32: FP32}.get(q_BHTD.dtype, 0) if k_BKSD.dtype == q_BHTD.dtype else 0
    return bool(want and paths() & want)


def attend(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the keys each query may see (causal without a mask, else
    where `mask` is True), in bf16 under bf16 autocast (as torch's kernel), else in q's dtype; query
    head h reads key/value head h / (H / K). The result's memory is (B, T, H, D)."""
    dt = torch.bfloat16 if torch.is_autocast_enabled("cpu") else q_BHTD.dtype
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    out, _ = torch.ops.chatforge_native.causal_attention_fwd(q_BHTD.to(dt), k_BKSD.to(dt), v_BKSD.to(dt), mask,
                                                             1.0 / math.sqrt(q_BHTD.shape[-1]))
    return out
