"""Causal self-attention in bf16 on the project's CPU kernel (csrc/causal_attention.cpp), forward and
backward: what a bf16-autocast training step's attention runs on a CPU with AVX-512 BF16.

torch's CPU flash kernel runs its block products through general bf16 GEMM calls; on such a CPU the
project's kernel measured 2.0-2.9x faster forward + backward at training shapes, with errors against
an fp64 reference no larger than torch's (benchmarks/README.md). `model.attend` takes it for plainly
causal attention (no mask, as many keys as queries) where `fits` says so; everything else, and every
other CPU or device, keeps torch's scaled_dot_product_attention. CPUs with AMX are left to torch too:
its kernels use the tile unit there, which this kernel does not (not measured against it).
"""

from __future__ import annotations

import functools
import math

import torch

from .quantize import cpu_flags, native_kernels


@torch.compiler.assume_constant_result  # a compiled step asks once, as it traces (no file reads in its graph)
def available() -> bool:
    """Whether the kernel is built here with its vdpbf16ps products (and its autograd registered)."""
    return _probe()


@functools.cache
def _probe() -> bool:
    flags = cpu_flags()
    if "avx512_bf16" not in flags or "amx_bf16" in flags or native_kernels() is not None:
        return False
    if not torch.ops.chatforge_native.causal_attention_native():
        return False
    torch.library.register_autograd("chatforge_native::causal_attention_fwd", _backward, setup_context=_save)
    return True


def _save(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.chatforge_native.causal_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def fits(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor) -> bool:
    """Whether causal attention of these queries over as many keys runs on the kernel: CPU tensors,
    bf16 (or under bf16 autocast), a head dim that is a multiple of 16, more than one position."""
    if q_BHTD.device.type != "cpu" or q_BHTD.shape[2] < 2 or q_BHTD.shape[2] != k_BKSD.shape[2] or q_BHTD.shape[-1] % 16:
        return False
    bf16 = q_BHTD.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and available()


def attend(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v in bf16 (as torch's kernel under bf16 autocast); query
    head h reads key/value head h / (H / K). The result's memory is (B, T, H, D)."""
    bf = torch.bfloat16
    out, _ = torch.ops.chatforge_native.causal_attention_fwd(q_BHTD.to(bf), k_BKSD.to(bf), v_BKSD.to(bf), 1.0 / math.sqrt(q_BHTD.shape[-1]))
    return out
