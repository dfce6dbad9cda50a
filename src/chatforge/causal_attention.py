"""Self-attention of T queries over the same T keys on the project's CPU kernel
(csrc/causal_attention.cpp), forward and backward, in bf16 (under bf16 autocast) or fp32: what a
training step's attention runs on the CPU.

torch's CPU flash kernel runs its block products through general GEMM calls; at training shapes the
project's kernel measured 2.0-3.1x faster forward + backward in bf16 on an AVX-512 BF16 CPU,
1.5-1.9x in fp32 and 4-6x on packed rows' block-diagonal mask (it skips the blocks a mask hides),
with errors against fp64 of torch's size (benchmarks/README.md). `model.attend` takes it where
`fits` says so: causal without a mask, or a boolean mask of any pattern. Additive masks, decode
steps, CUDA and other dtypes keep torch's scaled_dot_product_attention. On CPUs with AMX torch's
kernel runs parts of its work on the tiles, which this one does not use, and which is faster there
is not known in advance: the first bf16 use times both on a training-sized head (`measure_bf16`)
and keeps the faster (`decision` says which, and by how much).
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F

from .dtypes import amx_tiles
from .quantize import native_kernels

BF16, FP32 = 1, 2  # the bits of paths()
PROBE_SHAPE = (4, 8, 512, 64)  # batch, heads, window, head dim: a 30M model's training attention
decision = ""  # set where bf16 was measured against torch's kernel (an AMX CPU): which won, by how much


@torch.compiler.assume_constant_result  # a compiled step asks once, as it traces (no file reads in its graph)
def paths() -> int:
    """Which dtypes the kernel takes here (and its autograd registered): bit 1 bf16 (vdpbf16ps; on a
    CPU with AMX only where measure_bf16 found it faster than torch's), bit 2 fp32 (AVX2 or AVX-512
    multiply-adds); 0 where it is not built."""
    return _probe()


@functools.cache
def _probe() -> int:
    global decision
    decision = ""
    if native_kernels() is not None:
        return 0
    found = int(torch.ops.chatforge_native.causal_attention_native())
    if found:
        _register_autograd()
    if found & BF16 and amx_tiles() and measure_bf16() >= 0.9:  # keep ours only where clearly faster
        found &= ~BF16
    return found


@functools.cache  # once per process, though tests may probe again
def _register_autograd() -> None:
    torch.library.register_autograd("chatforge_native::causal_attention_fwd", _backward, setup_context=_save)


def measure_bf16(pairs: int = 5) -> float:
    """This kernel's time over torch's for a bf16 causal forward + backward at PROBE_SHAPE (median
    of alternating pairs, after one warm-up each; about a second on 2 cores), recorded in `decision`.
    Runs as plain eager code wherever it is first asked for (under autocast, no_grad or tracing)
    and leaves the global random state untouched."""
    global decision
    if (why := native_kernels()) is not None:
        raise RuntimeError(f"the project's kernels are not built here: {why}")
    B, H, T, D = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, H, T, D, generator=gen).bfloat16() for _ in range(4))
    scale = 1 / math.sqrt(D)
    ops = torch.ops.chatforge_native

    def ours() -> None:
        out, lse = ops.causal_attention_fwd(q, k, v, None, scale)
        ops.causal_attention_bwd(g, q, k, v, out, lse, None, scale)

    def theirs() -> None:
        qt, kt, vt = (x.detach().requires_grad_() for x in (q, k, v))
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(g)

    def seconds(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        ours(), theirs()
        ratio = statistics.median(seconds(ours) / seconds(theirs) for _ in range(pairs))
    winner = "the project's kernel" if ratio < 0.9 else "torch's kernel"
    decision = (f"bf16 causal attention on {winner}: the project's took {ratio:.2f}x torch's time "
                f"(forward + backward, {'x'.join(map(str, PROBE_SHAPE))}, median of {pairs} pairs)")
    return ratio


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
