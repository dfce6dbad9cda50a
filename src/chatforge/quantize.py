"""Weight-only int8 quantization for decoding on the CPU.

Decoding one token per sequence multiplies a few rows by every weight matrix: the time goes to
reading weights, and bf16 one-row matmuls read them slowly here (profiled: 74% of decode time in
`aten::mm`). Int8 weights with one scale per output channel (symmetric, absmax / 127) halve the
bytes, and torch's `_weight_int8pack_mm` kernel is 2-3x faster than a bf16 matmul on these shapes.
With more rows (prefill, large batches) the bf16 matmul is faster, so each layer keeps both and
picks by the number of rows: the answers of a prefill are exact, those of a decode step carry
int8 rounding (per-channel error <= scale / 2 per weight).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8DecodeLinear(nn.Module):
    """A linear layer that multiplies at most `max_rows` rows with int8 weights, more rows with the
    original weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int = 4):
        super().__init__()
        q, scale = int8_weights(weight)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("qscale", scale.to(torch.bfloat16), persistent=False)
        self.weight = weight
        self.bias = bias
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).to(torch.bfloat16), self.qweight, self.qscale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8_decode(model: GPT) -> GPT:
    """Give every linear layer of `model` (in place) an int8 copy for few-row matmuls; returns the
    output head to use, as a module, on `model.int8_head`."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 decode uses a CPU kernel (torch._weight_int8pack_mm); on CUDA serve bf16 or export to GGUF/vLLM")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ValueError(f"torch {torch.__version__} has no _weight_int8pack_mm kernel; upgrade torch or run without int8")
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in ("qkv", "proj", "fc"):
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, Int8DecodeLinear(lin.weight, lin.bias))
    model.int8_head = Int8DecodeLinear(model.output_weight(), None)
    return model
