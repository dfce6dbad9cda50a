"""LoRA: low-rank adapters (Hu et al. 2021). A frozen linear layer W gets a trainable update,
y = W x + (alpha / r) * B A x, with A (r, in) random and B (out, r) zero, so training starts
from the base model exactly and only r * (in + out) numbers per layer are learned.

Why a small module of our own rather than PEFT (both give the same outputs for the same A and
B; tests/test_lora.py checks that against PEFT when it is installed):
- The adapters live beside the model and are attached with forward hooks, so the GPT keeps its
  parameter names and module types. checkpoint.save/load, the engine, export and the optimizer
  helpers see a plain GPT; PEFT would wrap every targeted nn.Linear in a LoraLayer and rename
  its weight to `base_layer.weight`, which each of those would then have to undo.
- chatforge's linear layers are fused (attn.qkv = q|k|v rows, mlp.fc = gate|up rows). One
  adapter on a fused layer is LoRA on the concatenated output: the same as PEFT targeting that
  module, slightly more expressive than separate rank-r adapters on q and v with shared rank.
- No extra dependency for a feature that is ~60 lines.

Adapters are saved as `<layer>.lora_A.weight` / `<layer>.lora_B.weight` (PEFT's names and
shapes, checkpoint.adapter_keys) in a checkpoint's extra.safetensors; checkpoint.load merges them
(checkpoint.merge_lora), and `merge()` folds them into the weights for good.

LoRAConfig is the one set of LoRA fields (and flags) of every stage that fine-tunes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt_io

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass
class LoRAConfig:
    """The LoRA fields of SFT, the reward model, DPO and PPO: one set of flags. A mixin: list it
    before the stage's RunConfig base (class SFTConfig(LoRAConfig, ScheduleConfig)); its checks
    run, then the base's."""

    lora_rank: int = 0  # 0 = train all weights; r > 0 = rank-r adapters with the base frozen
    lora_alpha: float = 32.0  # adapter scale is lora_alpha / lora_rank
    lora_layers: int = 0  # adapters only in the last N transformer blocks (0 = every block); the backward stops below them
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # linear layers that get adapters

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.lora_rank < 0 or self.lora_layers < 0:
            raise ValueError(f"{name}: lora_rank={self.lora_rank} and lora_layers={self.lora_layers} must be >= 0 (0 = no adapters, every block)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{name}.lora_dropout={self.lora_dropout} must be in [0, 1)")
        super().__post_init__()  # the RunConfig base listed after this mixin

    def make_lora(self, model: nn.Module, seed: int) -> LoRA | None:
        """Adapters on `model` as configured (its own weights frozen), or None when lora_rank is 0."""
        if not self.lora_rank:
            return None
        return LoRA(model, self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets, seed, self.lora_layers)


def _block_index(name: str, n_blocks: int) -> int:
    """The transformer block a layer name lies in (`blocks.<i>.`); layers outside the blocks
    (the output head) count as above the top one."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else n_blocks


class LoRA(nn.Module):
    """Rank-`rank` adapters on every nn.Linear of `model` whose name ends with one of `targets`
    (only in the last `top_layers` transformer blocks when that is > 0). Freezes the model's own
    parameters; the adapters are this module's only parameters.

    With adapters in the top blocks only, nothing below them needs a gradient, so autograd keeps
    no activations there and the backward pass stops at the lowest adapted block: a reward model
    or PPO step on the top third of SmolLM2's 30 blocks skips two thirds of the backward."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=DEFAULT_TARGETS, seed: int = 0,
                 top_layers: int = 0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank={rank} must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout} must be in [0, 1)")
        n_blocks = len(getattr(model, "blocks", ()))
        if top_layers < 0 or (top_layers and top_layers > n_blocks):
            raise ValueError(f"LoRA top_layers={top_layers} must be in [0, {n_blocks}] (0 = every block)")
        lowest = n_blocks - top_layers if top_layers else 0
        self.names = [n for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and any(n.endswith(t) for t in targets) and _block_index(n, n_blocks) >= lowest]
        if not self.names:
            raise ValueError(f"LoRA targets {list(targets)} match no linear layer (names look like blocks.0.attn.qkv)")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets, self.top_layers = list(targets), top_layers
        self.scale = alpha / rank
        gen = torch.Generator().manual_seed(seed)
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for n in self.names:
            lin = model.get_submodule(n)
            a = torch.empty(rank, lin.in_features)
            # PEFT's and the paper's init: A like a default nn.Linear (Kaiming uniform, a=sqrt(5)), B = 0.
            bound = 1 / math.sqrt(lin.in_features)
            a.uniform_(-bound, bound, generator=gen)
            self.A.append(nn.Parameter(a.to(lin.weight.device)))
            self.B.append(nn.Parameter(torch.zeros(lin.out_features, rank, device=lin.weight.device)))
        for p in model.parameters():
            p.requires_grad_(False)
        self._hooks = [model.get_submodule(n).register_forward_hook(self._hook(i)) for i, n in enumerate(self.names)]

    def _hook(self, i: int):
        def add_update(module: nn.Linear, args, out: torch.Tensor) -> torch.Tensor:
            # Dropout follows the layer's own train/eval state, which model.eval() sets.
            x = F.dropout(args[0], self.dropout, training=module.training) if self.dropout else args[0]
            return out + F.linear(F.linear(x, self.A[i]), self.B[i]) * self.scale

        return add_update

    def meta(self) -> dict:
        """What a checkpoint's meta.json records about the adapters (checkpoint.load reads rank and alpha)."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "top_layers": self.top_layers, "layers": len(self.names)}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapters under PEFT's names, for a checkpoint's extra.safetensors."""
        out = {}
        for n, a, b in zip(self.names, self.A, self.B):
            a_key, b_key = ckpt_io.adapter_keys(n)
            out[a_key], out[b_key] = a.detach(), b.detach()
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        for n, a, b in zip(self.names, self.A, self.B):
            for key, p in zip(ckpt_io.adapter_keys(n), (a, b)):
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{source}: adapter {key} is missing or has another shape (rank or targets changed?)")
                p.copy_(tensors[key])

    def remove(self) -> None:
        """Detach the hooks: the model computes W x again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """Fold W += scale * B A into the model's weights and detach the hooks (same function after)."""
        self.remove()
        ckpt_io.merge_lora(model, self.tensors(), self.scale)
