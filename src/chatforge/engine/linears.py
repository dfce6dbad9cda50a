"""Copies of a model's linear weights in the layouts and formats that run fastest, which the
engine multiplies by in place of the model's own nn.Linear weights: on the CPU, oneDNN copies
reordered once into its blocked layout, and optionally (`decode_weights`) bf16 / fp16 / int8 / int4
copies for decode steps of a few streams, whose time is the weight bytes they read. The int8/int4
arithmetic itself (codes, kernels, their fp32 emulation) is quantize.py's.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import quantize
from ..model import GPT
from . import pages


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_PACKED: weakref.WeakValueDictionary[int, _PackedLinear] = weakref.WeakValueDictionary()  # live packed layers by handle
_HANDLES = itertools.count()


class _PackedLinear:
    """A linear layer on a oneDNN-packed weight copy. torch.compile cannot trace a packed (opaque,
    mkldnn-layout) tensor, so while compiling (the compiled decode step, compiled.py) the layer is
    the custom op `chatforge::packed_linear`, which names its weight by an integer handle and has
    a shape-only fake implementation; eager calls go straight to oneDNN, without the custom op's
    Python dispatch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = bias
        self.handle = next(_HANDLES)
        _PACKED[self.handle] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.out_features)
        return _mkldnn_linear(x, self.weight, self.bias)


@torch.library.custom_op("chatforge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x times the packed weight `handle` (a _PackedLinear that is still alive), plus its bias."""
    layer = _PACKED[handle]
    return _mkldnn_linear(x, layer.weight, layer.bias)


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _cast_linear(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """fn (a linear layer held in `dtype`) on x converted to `dtype`, the answer back in x's dtype."""
    return fn(x.to(dtype)).to(x.dtype)


DECODE_WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "int4": torch.quint4x2}
# Matmuls of at most this many rows (decode steps of that many streams) use the decode copies:
# where they stop paying, measured by `python benchmarks/decode_matmuls.py` and, for int4 and fp16
# copies on the project's kernels with the one-call step (fused.py), by whole engine steps
# (benchmarks/README.md). TORCH_FEW_ROWS: the same copies on torch's kernels (where the project's
# cannot be built; fp16 copies of a half-precision model).
FEW_ROWS = {"bf16": 2, "fp16": 8, "int8": 4, "int4": 16}
TORCH_FEW_ROWS = {"fp16": 2, "int4": 8}


# The int8/int4 kernels' activations: bf16 (inputs and outputs rounded to it, fp32 sums). With fp32
# ones they ran several times slower (benchmarks/README.md), which would leave no reason to use them.
KERNEL_ACT = torch.bfloat16


class _Quantized:
    """An int8/int4 decode copy's forward, and `emulate`, the same arithmetic as one fp32 matmul on
    its dequantized weights (`dequantized()`, made on first use) with activations in `act`: the
    kernels are made for a few rows and crawl at the thousands a whole text has when Engine.score
    measures the decode path."""

    def __init__(self, kernel: Callable, dequantized: Callable[[], torch.Tensor], b: torch.Tensor | None, act: torch.dtype):
        self.kernel, self.dequantized, self.b, self.act = kernel, dequantized, b, act
        self.deq: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        if self.deq is None:
            self.deq = self.dequantized()
        return quantize.emulated_linear(x, self.deq, self.b, self.act)


class FastLinears:
    """Copies of a model's linear weights in the layouts and formats that run fastest, used by the
    engine in place of the model's own nn.Linear weights.

    - Many rows (prefills, large decode batches): on the CPU, oneDNN copies reordered once into its
      blocked layout. Few-row matmuls ran faster there than on aten's default path and a prefill
      no slower (benchmarks/README.md); same computation, another summation order. A bf16 model on
      a CPU without native bf16 gets fp32 copies here: its prefill matmuls run at the fp32 rate
      instead of emulated bf16's, far slower, while its decode steps of a few streams keep its own
      bf16 weights (bandwidth-bound: fast).
    - Few rows (decode steps of at most FEW_ROWS streams), with `decode_weights`: copies in bf16,
      fp16, int8 (one scale per output channel) or int4 (a scale and minimum per 32 weights;
      quantize.py), the output layer excepted in an fp32 model (fp32 logits: half-precision ones
      flip near-tied tokens; it decodes on 8-bit groups only where its weights are exactly that,
      as a GGUF import's Q8_0 output layer is; in a bf16 model it goes to int8 with int4 copies).
      The int4 copies, and fp16 copies of an fp32 model, run the project's kernels with fp32
      activations where they build (else torch's: bf16 activations for int4, as for int8; fp16
      ones for fp16). One decode step reads every weight
      once, so its time is the bytes read (per-CPU figures: benchmarks/README.md). Answers of
      decode steps then carry that rounding (int4 copies of weights that are 4-bit already, as a
      GGUF Q4_1 import's blocks are, none on the project's kernel); prefills stay exact.

    Memory: the packed copies hold as much as the weights they copy (fp32 ones for a bf16 model
    without native bf16: twice its weight memory), and decode copies half (fp16, bf16), a quarter
    (int8) or about an eighth (int4) of the fp32 size more; for SmolLM2-135M in fp32, 540 MB packed
    + 270 MB fp16 beside its own 540 MB.

    The model's weights are not changed: `installed()` points its nn.Linear modules at the copies
    only for the duration of one step (the engine passes its own modules, engine.own_modules, so
    the caller's never change; oneDNN tensors cannot be deep-copied or saved, and training must see
    plain modules). A weight that changed since it was copied (an optimizer step between PPO
    rollouts, load_state_dict, .to()) is copied again before the step."""

    def __init__(self, model: GPT, pack: bool, decode_weights: str | None = None):
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        if decode_weights is not None and decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights={decode_weights!r}; expected one of {', '.join(DECODE_WEIGHTS)} or None")
        if decode_weights in ("int8", "int4"):
            quantize.check_kernel(decode_weights, self.device)
        self.decode = None if decode_weights is None or DECODE_WEIGHTS[decode_weights] == self.dtype else DECODE_WEIGHTS[decode_weights]
        # the dtype of the many-row copies: the model's, or fp32 where its dtype has no packed kernel
        self.compute = None
        if pack:
            self.compute = next((d for d in (self.dtype, torch.float32) if self.available(self.device, d)), None)
            if self.compute is None:
                raise ValueError(f"packed linears need the CPU and oneDNN; got {self.device}, {self.dtype}")
        self.few_rows = FEW_ROWS[decode_weights] if self.decode is not None else 0
        if self.decode is not None and not self.on_project_kernels():
            self.few_rows = TORCH_FEW_ROWS.get(decode_weights, self.few_rows)
        own = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype)
        if self.decode is None and self.compute not in (None, self.dtype) and own:
            # few rows keep the model's own half-precision weights: bandwidth-bound, half the bytes
            self.few_rows = TORCH_FEW_ROWS.get(own, FEW_ROWS[own])
        self.linears = [m for m in model.modules() if type(m) is nn.Linear]
        self.force_few = False  # every matmul on the few-row path (set by installed(force_few=True))
        self._signature: list | None = None
        self.forwards: list[Callable] = []  # per linear in self.linears, and head for the output layer: made by refresh()
        # the copies on the project's kernels by linear module, for the one-call decode step
        # (engine/fused.py): int4 (codes, scales and minimums, bias) or fp16 (weights, an empty
        # tensor, bias); made by refresh()
        self.native: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.head: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._placed: list[torch.Tensor] = []  # copies made by this refresh() for pages.onto_huge_pages
        self.generation = 0  # counts the times refresh() made new copies

    def on_project_kernels(self) -> bool:
        """Whether the decode copies run on the project's kernels (quantize.native_kernels): int4
        copies, and fp16 copies of an fp32 model."""
        if quantize.native_kernels() is not None:
            return False
        return self.decode == torch.quint4x2 or (self.decode == torch.float16 and self.dtype == torch.float32)

    @staticmethod
    @functools.cache
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this torch build and CPU run oneDNN linears natively in `dtype` (probed once on a tiny layer)."""
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
            return False
        try:
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return False
            w = torch.ones(4, 8, dtype=dtype)
            y = _mkldnn_linear(torch.ones(2, 8, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(w, None), None)
            return bool((y == 8).all())
        except (AttributeError, RuntimeError, NotImplementedError):  # op missing from this build, or no kernel for this CPU
            return False

    def _current(self) -> list:
        """Where each copied weight lives and its version counter. Asked before every step, so
        written for speed (the modules' parameter dicts read directly: ~4x faster than attribute
        access and per-tensor helpers, ~50 us for SmolLM2's 211 linears)."""
        ps = [m._parameters for m in self.linears]
        ts = [p["weight"] for p in ps] + [p["bias"] for p in ps if p["bias"] is not None] + [self.model.output_weight()]
        return [(t.data_ptr(), t.dtype, None if t.is_inference() else t._version) for t in ts]

    def _linear(self, w: torch.Tensor, b: torch.Tensor | None, output: bool = False,
                module: nn.Linear | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward of one linear layer (`module`, or the output layer with `output`) on its copies."""
        w, b = w.detach(), None if b is None else b.detach()
        many = functools.partial(F.linear, weight=w, bias=b)
        if self.compute is not None:
            packed = _PackedLinear(w.to(self.compute), None if b is None else b.to(self.compute))
            many = packed if self.compute == self.dtype else functools.partial(_cast_linear, fn=packed, dtype=self.compute)
        if self.few_rows == 0:
            return many
        if self.decode is None:  # a half-precision model whose many-row copies are fp32
            return functools.partial(self._route, many=many, few=functools.partial(F.linear, weight=w, bias=b))
        if output and self.dtype == torch.float32:
            # The output layer keeps the model's fp32 weights: the logits are where rounding flips
            # near-tied tokens (SmolLM2's "The"/"L" at 25.33/25.24 after "capital of France?"),
            # and `chatforge eval fidelity` measured half-precision logits out of its bounds. Only
            # where its weights are 8-bit groups already (a GGUF import's Q8_0 output layer) does
            # it decode on those codes, the same weights in a quarter of the bytes.
            exact = quantize.int8_exact_groups(w) if quantize.native_kernels() is None else None
            if exact is None:
                return many
            q, scales = exact
            self._placed += [q, scales]
            few = _Quantized(functools.partial(quantize.int8_groups_linear, q=q, scales=scales, bias=b), lambda: w, b, torch.float32)
            return functools.partial(self._route, many=many, few=few)
        if self.decode == torch.int8 or (self.decode == torch.quint4x2 and output):
            # int4 copies of a half-precision model keep the output layer in int8 (GGUF files
            # keep it at 8 bits or more too: SmolLM2's Q4_1 file has it in Q8_0)
            q, scale = quantize.int8_weights(w)
            few = _Quantized(functools.partial(quantize.int8_linear, qweight=q, qscale=scale.to(KERNEL_ACT), bias=b),
                             functools.partial(quantize.int8_dequantized, w, KERNEL_ACT), b, KERNEL_ACT)
        elif self.decode == torch.quint4x2 and quantize.native_kernels() is None:  # the project's kernel: fp32 activations
            packed = quantize.int4_native_weights(w)
            if packed is None:  # a shape the kernel does not take: this layer decodes on its own weights
                return many
            few = _Quantized(functools.partial(quantize.int4_native_linear, packed=packed[0], scales_mins=packed[1], bias=b),
                             functools.partial(quantize.int4_native_dequantized, *packed), b, torch.float32)
            self._placed += packed
            if module is not None:
                self.native[module] = (*packed, b)
        elif self.decode == torch.quint4x2:  # no compiler here: torch's kernel, bf16 activations
            packed = quantize.int4_weights(w)
            if packed is None:
                return many
            few = _Quantized(functools.partial(quantize.int4_linear, packed=packed[0], scales_zeros=packed[1].to(KERNEL_ACT), bias=b),
                             functools.partial(quantize.int4_dequantized, w, KERNEL_ACT), b, KERNEL_ACT)
        elif self.decode == torch.float16 and self.on_project_kernels() and w.shape[1] % quantize.INT4_GROUP == 0:
            # the project's kernel: fp32 activations (torch's fp16 matmul rounds them too), only the weights rounded
            hw = w.to(torch.float16).contiguous()
            self._placed.append(hw)
            few = _Quantized(functools.partial(quantize.f16_native_linear, w16=hw, bias=b), hw.float, b, torch.float32)
            if module is not None:
                self.native[module] = (hw, torch.empty(0), b)
        else:
            hw, hb = w.to(self.decode), None if b is None else b.to(self.decode)
            if self.available(self.device, self.decode):
                fn = _PackedLinear(hw, hb)
            else:
                fn = functools.partial(F.linear, weight=hw, bias=hb)
            few = functools.partial(_cast_linear, fn=fn, dtype=self.decode)
        return functools.partial(self._route, many=many, few=few)

    def _route(self, x: torch.Tensor, many: Callable, few: Callable) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.force_few and rows > FEW_ROWS["int4"] and isinstance(few, _Quantized):
            return few.emulate(x)
        return few(x) if self.force_few or rows <= self.few_rows else many(x)

    def refresh(self) -> None:
        """Copy again whatever weights changed since the last copies were made."""
        sig = self._current()
        if sig != self._signature:
            self.native, self._placed = {}, []
            self.forwards = [self._linear(m.weight, m.bias, module=m) for m in self.linears]
            self.head = self._linear(self.model.output_weight(), None, output=True)
            # the project's kernels' copies, in the order a decode step reads them, on 2 MB pages
            with torch.inference_mode(any(t.is_inference() for t in self._placed)):
                pages.onto_huge_pages(self._placed)
            self._placed = []
            self._signature = sig
            self.generation += 1

    def drop_copies(self) -> None:
        """Decode on the model's own weights from now on (the copies stay installed if they were)."""
        self.decode, self.few_rows, self._signature = None, 0, None
        installed = bool(self.linears) and "forward" in self.linears[0].__dict__
        self.refresh()
        if installed:
            self._install()

    def _install(self) -> None:
        for m, fwd in zip(self.linears, self.forwards):
            m.__dict__["forward"] = fwd  # an instance attribute shadows nn.Linear.forward

    @contextmanager
    def installed(self, force_few: bool = False):
        """The model's linear layers on the copies for one step; `force_few` puts every matmul on
        the few-row path (Engine.score's decode path)."""
        self.refresh()
        self._install()
        self.force_few = force_few
        try:
            yield
        finally:
            self.force_few = False
            for m in self.linears:
                m.__dict__.pop("forward", None)
