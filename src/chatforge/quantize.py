"""Weight-only int8 and int4 quantization for decoding on the CPU.

Decoding one token per sequence multiplies a few rows by every weight matrix: the time goes to
reading weights. Int8 weights with one scale per output channel (symmetric, absmax / 127) hold a
quarter of fp32's bytes, and torch's `_weight_int8pack_mm` kernel multiplies them without
unpacking. The engine keeps such copies for few-row matmuls only (`engine.linears.FastLinears`,
`decode_weights="int8"`): a prefill still uses the original weights and is exact, a decode step
carries int8 rounding (per-channel error <= scale / 2 per weight).

Int4 (`decode_weights="int4"`) holds an eighth of fp32's bytes: groups of 32 weights along the
input, each with its own scale and minimum (w ~= q * scale + min, q in 0..15), the layout of
GGUF's Q4_1, multiplied by torch's `_weight_int4pack_mm_for_cpu` (bf16 activations; fp32 ones ran
far slower: benchmarks/README.md). A model imported from a Q4_1 file gets back the file's own
4-bit values (each group's min and max are its q = 0 and q = 15), up to the bf16 rounding of the
scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import QUANT_KERNELS


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale




def check_kernel(fmt: str, device: torch.device) -> None:
    """A clear error where the `fmt` ("int8" | "int4") copies cannot run: off the CPU, or a torch without the kernel."""
    op = QUANT_KERNELS[fmt]
    if device.type != "cpu":
        raise ValueError(f"{fmt} decode weights use a CPU kernel (torch.{op}); on {device} use bf16 or fp16 decode weights")
    if not hasattr(torch.ops.aten, op):
        raise ValueError(f"torch {torch.__version__} has no {op} kernel; upgrade torch or use bf16/fp16 decode weights")


def _kernel_rows(x: torch.Tensor, kernel, bias: torch.Tensor | None, act: torch.dtype) -> torch.Tensor:
    """kernel(x as (rows, in) in `act`) -> (rows, out), back in x's shape and dtype, plus bias."""
    rows = x.numel() // x.shape[-1]
    y = kernel(x.reshape(rows, x.shape[-1]).to(act)).to(x.dtype).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (qweight * qscale[:, None]).T + bias, in x's dtype. The kernel multiplies activations
    in qscale's dtype: bf16 ones (rounded inputs and outputs; several times faster than fp32) or
    fp32 ones (exact up to the weights' rounding)."""
    return _kernel_rows(x, lambda x2: torch.ops.aten._weight_int8pack_mm(x2, qweight, qscale), bias, qscale.dtype)


INT4_GROUP = 32  # weights per scale/minimum along the input dimension (GGUF Q4_0/Q4_1 blocks)


def int4_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric 4-bit codes of an (out, in) weight, in % group == 0: (out, in) uint8 q in
    0..15, and (out, in/group) fp32 scale and minimum with w ~= q * scale + min. Each group's min and
    max are its q = 0 and q = 15, so quantizing the dequantized weights again gives the same codes."""
    out_f, in_f = w.shape
    assert in_f % group == 0, (tuple(w.shape), group)
    wg = w.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return q, scale, lo


def int4_weights(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Groupwise asymmetric int4 of an (out, in) weight in the kernel's packed layout, and its
    (in/group, out, 2) fp32 scales and zero points; None where the kernel takes no such shape
    (out not a multiple of 16, in not a multiple of the group)."""
    out_f, in_f = w.shape
    if out_f % 16 or in_f % group:
        return None
    q, scale, lo = int4_groups(w, group)
    # the kernel computes (q - 8) * scale + zero; fp32 here, cast to the kernel's activation dtype by the caller
    scales_zeros = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), scales_zeros


def int4_dequantized(w: torch.Tensor, act: torch.dtype, group: int = INT4_GROUP) -> torch.Tensor:
    """The fp32 weights that int4_linear multiplies by with activations (and so scales) in `act`."""
    q, scale, lo = int4_groups(w, group)
    s, z = (t.to(act).float().repeat_interleave(group, dim=1) for t in (scale, lo + 8 * scale))  # (out, in) each
    return (q.float() - 8) * s + z


def int8_dequantized(w: torch.Tensor, act: torch.dtype) -> torch.Tensor:
    """The fp32 weights that int8_linear multiplies by with activations (and so scales) in `act`."""
    q, scale = int8_weights(w)
    return q.float() * scale.to(act).float()[:, None]


def emulated_linear(x: torch.Tensor, deq: torch.Tensor, bias: torch.Tensor | None, act: torch.dtype) -> torch.Tensor:
    """What the int8/int4 kernels compute (inputs and outputs rounded to `act`, fp32 sums),
    as one fp32 matmul on their dequantized weights: fast for many rows, where the kernels are
    made for few (measuring a decode path over whole texts: Engine.score)."""
    y = F.linear(x.to(act).float(), deq).to(act).to(x.dtype)
    return y if bias is None else y + bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None,
                group: int = INT4_GROUP) -> torch.Tensor:
    """x @ dequantized(packed).T + bias, in x's dtype; activations in scales_zeros's dtype (as int8_linear)."""
    return _kernel_rows(x, lambda x2: torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales_zeros), bias, scales_zeros.dtype)
