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

Where a C++ compiler is at hand, int4 decode copies use the project's own kernel instead
(csrc/grouped_linear.cpp, built on first use for this CPU and cached): the same groups, scales and
minimums in fp16, and fp32 activations, sums and outputs, faster than torch's bf16 kernel at one to
eight rows (benchmarks/README.md). Its answers are those of an fp32 matmul on the dequantized
weights up to summation order, so on weights that are 4-bit already (a Q4_1 import, a `chatforge
quantize --to int4` checkpoint) it is exact, and `--decode-weights auto` uses it there
(dtypes.inference_mode). On a CPU with AVX-512 VNNI or AVX2 a single row (one stream's decode
step) takes integer dot products instead, with each input held to 2^-23 (VNNI: three signed bytes)
or 2^-31 (AVX2: two int16s) of its group's largest |x| (fp32 holds it to 2^-24 of itself): its
error bound is that of the fp32 sums (tests/test_engine.py), at fewer instructions per weight.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import warnings
from pathlib import Path

import ninja
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from .config import cache_dir
from .console import say
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
    if fmt == "int4" and native_kernels() is None:
        return
    if not hasattr(torch.ops.aten, op):
        raise ValueError(f"torch {torch.__version__} has no {op} kernel; upgrade torch or use bf16/fp16 decode weights")


def _kernel_rows(x: torch.Tensor, kernel, bias: torch.Tensor | None, act: torch.dtype) -> torch.Tensor:
    """kernel(x as (rows, in) in `act`) -> (rows, out), back in x's shape and dtype, plus bias."""
    if x.dtype == act:  # no casts (fp32 decode steps: ~120 calls per token, each Python-bound)
        y = kernel(x.reshape(-1, x.shape[-1]))
        y = y.view(*x.shape[:-1], y.shape[-1])
    else:
        y = kernel(x.reshape(-1, x.shape[-1]).to(act)).to(x.dtype).view(*x.shape[:-1], -1)
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


NATIVE_DIR = Path(__file__).parent / "csrc"  # every .cpp there is one library; simd.h is their shared header


def _cpu_key() -> str:
    """What a -march=native build depends on: the CPU's feature flags (a cache shared by machines of
    other kinds must not hand one a binary with instructions it lacks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def native_kernels() -> str | None:
    """Load the project's CPU kernels (csrc/: grouped_linear.cpp, int4 groups, 8-bit groups for
    an output layer that is exactly that, and fp16 weights; decode_attention.cpp; pointwise.cpp:
    RMSNorm, RoPE, SwiGLU; decode_step.cpp: a whole decode step on those; causal_attention.cpp:
    training attention), compiling them on first use (~60 s on 2 cores; cached under
    cache_dir()/native, keyed by the sources, the CPU's flags, the -march (CHATFORGE_MARCH) and
    torch's version). None when they are loaded, else
    why they could not be (no compiler, say), once: callers then use torch's own kernels."""
    sources = sorted(NATIVE_DIR.glob("*.cpp"))
    files = sources + sorted(NATIVE_DIR.glob("*.h"))
    # CHATFORGE_MARCH builds for another CPU kind than this one (haswell: AVX2 without AVX-512), to
    # measure that kind's code paths here (benchmarks/README.md); it must be one this CPU can run
    march = os.environ.get("CHATFORGE_MARCH", "native")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", march):
        raise ValueError(f"CHATFORGE_MARCH={march!r}: not a compiler -march name (e.g. native, haswell, x86-64-v3)")
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + _cpu_key().encode() + march.encode()
                         + torch.__version__.encode()).hexdigest()[:12]
    name = f"chatforge_native_{key}"
    build = cache_dir() / "native" / key
    if shutil.which("ninja") is None:  # the ninja package's binary, where its bin folder is not on PATH (an unactivated venv)
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not (build / f"{name}.so").exists():
            say("quantize", f"building the project's CPU kernels (decode, training attention) for this CPU (once, ~60 s) in {build}")
        cpp_extension.load(name=name, sources=[str(f) for f in sources], build_directory=str(build),
                           extra_cflags=["-O3", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # a missing compiler, a failed build: the reason, not a crash
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        warnings.warn(f"the project's CPU kernels ({NATIVE_DIR}) could not be built: {why}; int4 decode copies use torch's bf16 "
                      "kernel, --decode-weights auto uses fp16 copies, and attention and pointwise ops torch's own")
        return why
    for op in ("q4_linear", "q8_linear", "f16_linear"):
        torch.library.register_fake(f"chatforge_native::{op}")(_grouped_linear_shape)
    torch.library.register_fake("chatforge_native::decode_attention")(_decode_attention_shape)
    torch.library.register_fake("chatforge_native::rms_norm")(lambda x, w, eps: torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.library.register_fake("chatforge_native::rope")(lambda x, cos, sin: torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.library.register_fake("chatforge_native::swiglu")(lambda h: h.new_empty((*h.shape[:-1], h.shape[-1] // 2)))
    torch.library.register_fake("chatforge_native::causal_attention_fwd")(_causal_attention_shapes)
    torch.library.register_fake("chatforge_native::causal_attention_bwd")(_causal_attention_grad_shapes)
    return None


def _grouped_linear_shape(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped as x (B, heads, T, D) whose memory is (B, T, heads, D), as the kernel returns."""
    B, H, T, D = x.shape
    return x.new_empty((B, T, H, D)).permute(0, 2, 1, 3)


def _causal_attention_shapes(q, k, v, mask, scale):
    return _heads_last(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _causal_attention_grad_shapes(grad_out, q, k, v, out, lse, mask, scale):
    return _heads_last(q), _heads_last(k), _heads_last(v)


def _decode_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def int4_native_weights(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An (out, in) weight in the native kernel's layout: (out, in/2) uint8, each group's 16 bytes
    holding its first 16 codes in the low nibbles and the last 16 in the high ones, and (out,
    in/group, 2) fp16 scale and minimum; None where in is not a multiple of the group or the
    scales leave fp16's range."""
    out_f, in_f = w.shape
    if in_f % group:
        return None
    q, scale, lo = int4_groups(w, group)
    scales_mins = torch.stack([scale, lo], dim=-1).half()
    if not torch.isfinite(scales_mins).all():
        return None
    qg = q.reshape(out_f, in_f // group, group)
    packed = (qg[..., : group // 2] | (qg[..., group // 2 :] << 4)).reshape(out_f, in_f // 2).contiguous()
    return packed, scales_mins.contiguous()


def int4_native_dequantized(packed: torch.Tensor, scales_mins: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """The fp32 weights that int4_native_linear multiplies by."""
    out_f, half = packed.shape
    p = packed.reshape(out_f, -1, group // 2)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # (out, groups, group)
    sm = scales_mins.float()
    return (q * sm[..., :1] + sm[..., 1:]).reshape(out_f, 2 * half)


def int4_native_linear(x: torch.Tensor, packed: torch.Tensor, scales_mins: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ int4_native_dequantized(packed, scales_mins).T + bias, in x's dtype, with fp32 arithmetic."""
    return _kernel_rows(x, lambda x2: torch.ops.chatforge_native.q4_linear(x2, packed, scales_mins), bias, torch.float32)


def f16_native_linear(x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w16.T + bias on the project's kernel: fp16 weights made fp32 exactly, fp32 activations and sums."""
    return _kernel_rows(x, lambda x2: torch.ops.chatforge_native.f16_linear(x2, w16), bias, torch.float32)


def int8_exact_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, in) int8 codes and (out, in/group) fp16 scales (w = q * scale, symmetric, GGUF Q8_0's
    blocks) of a weight that is exactly of that form already (a Q8_0 matrix of a GGUF import), else
    None: used only where it changes no weight."""
    out_f, in_f = w.shape
    if in_f % group:
        return None

    def codes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        wg = rows.detach().float().reshape(rows.shape[0], in_f // group, group)
        scale = (wg.abs().amax(dim=-1) / 127).half()
        if not torch.isfinite(scale).all():
            return None
        s = scale.float().clamp(min=1e-30)[..., None]
        q = torch.round(wg / s).clamp(-127, 127)
        if (q * s - wg).abs().amax() > 1e-6 * wg.abs().amax():
            return None
        return q.to(torch.int8).reshape(rows.shape), scale.contiguous()

    # the first row decides most weights (any trained fp32 matrix) before a pass over all of them,
    # which engine copies would otherwise pay at every refresh (PPO: every optimizer step)
    return codes(w) if codes(w[:1]) is not None else None


def int8_groups_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scales per group).T + bias on the native kernel, fp32 arithmetic."""
    return _kernel_rows(x, lambda x2: torch.ops.chatforge_native.q8_linear(x2, q, scales), bias, torch.float32)
