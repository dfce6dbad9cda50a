"""A decode step of a few streams as one call into the project's kernels (csrc/decode_step.cpp),
for an fp32 Llama-block model on the CPU whose block matmuls decode on int4 or fp16 copies on the
project's kernels (`auto`: int4 for a 4-bit GGUF import, fp16 for other checkpoints; or
`--decode-weights int4 / fp16`).

The eager step runs ~15 ops per block from Python, each a dispatch and an allocation or two around
a few microseconds of work; at SmolLM2-135M's 30 blocks that costs about as much as the matmuls
themselves (benchmarks/README.md). The one call runs the same kernels in the same order on the
same copies, so its logits are the eager step's bit for bit; the embedding lookup and the output
layer stay here. The call writes every block's new keys and values into the slot cache itself.

It steps aside (returns None; the engine runs its compiled or eager step) for more rows than the
copies' FEW_ROWS (those take the many-row matmuls), while any module has a forward hook (a LoRA
adapter) or a global one is set, and for a model any of whose block matmuls has no copy on the
kernels (an input width that is not a multiple of 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from ..model import GPT, RMSNorm
from .cache import SlotCache
from .linears import FastLinears


class FusedDecode:
    """One-call decode steps of `model` (the engine's own modules) over `cache`, on the int4 or
    fp16 copies of `fast` (module docstring)."""

    def __init__(self, model: GPT, cache: SlotCache, fast: FastLinears):
        self.model, self.cache, self.fast = model, cache, fast
        # the hook dicts are shared with the caller's model (engine.own_modules): hooks added later show here
        self._hooks = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._weights: list[torch.Tensor] | None = None
        # what _weights were collected from: the FastLinears.generation (the copies) and the
        # norms' weight tensors (not copied: an in-place update shows, a new Parameter must not be missed)
        self._made_for: tuple[int, list[torch.Tensor]] | None = None
        self._norms = [n for blk in model.blocks for n in (blk.norm1, blk.norm2)] + [model.norm_f]

    @staticmethod
    def applies(model: GPT, fast: FastLinears | None) -> bool:
        """Whether an engine over `model` with these weight copies may take the one-call step."""
        p = next(model.parameters())
        return (model.cfg.block == "llama" and p.device.type == "cpu" and p.dtype == torch.float32 and fast is not None
                and fast.on_project_kernels())

    def _collect(self) -> list[torch.Tensor] | None:
        """The op's weight list (csrc/decode_step.cpp's order), or None where a block cannot take it."""
        copies, none = self.fast.native, torch.empty(0)
        out: list[torch.Tensor] = []
        for blk in self.model.blocks:
            a, m = blk.attn, blk.mlp
            linears = (a.qkv, a.proj, m.fc, m.proj)
            if not (all(x in copies for x in linears) and isinstance(blk.norm1, RMSNorm) and isinstance(blk.norm2, RMSNorm) and a.rope):
                return None
            if any(copies[x][2] is not None for x in linears[1:]):  # Llama blocks: a bias only on q|k|v (Qwen2)
                return None
            qkv_bias = copies[a.qkv][2]
            out += [blk.norm1.weight.detach(), *copies[a.qkv][:2], none if qkv_bias is None else qkv_bias, *copies[a.proj][:2],
                    blk.norm2.weight.detach(), *copies[m.fc][:2], *copies[m.proj][:2]]
        return out + [self.model.norm_f.weight.detach()]

    def __call__(self, last_ids: list[int], positions: list[int]) -> torch.Tensor | None:
        """Final-norm hidden states (n, C) of one decode step (stream i, in slot i, feeds token
        last_ids[i] at position positions[i]), or None where this step cannot take the call. Run
        it under the engine's installed weight copies."""
        if len(positions) > self.fast.few_rows or self.fast.force_few or any(self._hooks) \
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return None
        norms = [n._parameters["weight"] for n in self._norms]
        if self._made_for is None or self._made_for[0] != self.fast.generation or any(a is not b for a, b in zip(norms, self._made_for[1])):
            self._weights, self._made_for = self._collect(), (self.fast.generation, norms)
        if self._weights is None:
            return None
        cfg, model = self.model.cfg, self.model
        pos = torch.tensor(positions)
        x = F.embedding(torch.tensor(last_ids), model.tok_emb.weight)
        return torch.ops.chatforge_native.decode_layers(x, self._weights, self.cache.k, self.cache.v, pos, model.rope_cos[pos][:, None],
                                                        model.rope_sin[pos][:, None], cfg.n_head, cfg.n_kv_head, cfg.norm_eps)
