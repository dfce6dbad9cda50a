"""The checkpoint directory: the one owner of its layout.

    DIR/model.safetensors      weights (names as in model.py)
    DIR/config.json            GPTConfig
    DIR/tokenizer.json         HF tokenizer file
    DIR/tokenizer_config.json  chat template and special tokens (tokenizer.py)
    DIR/meta.json              stage, parent checkpoint, data, step, metrics, created, snapshot id
    DIR/train_state.pt         optional: optimizer, RNG, dataloader position, step (for --resume)
    DIR/extra.safetensors      optional: tensors a stage adds (e.g. a reward or value head)
    DIR/optimizer.dcp/         optional: a sharded (FSDP) run's AdamW state, one file per process
                               (torch.distributed.checkpoint); train_state.pt then has no optimizer

A directory is written to DIR.tmp-<pid> and renamed into place, so a crash never leaves a
half-written checkpoint; an existing DIR is replaced only after the new one is complete. Other
files in DIR (a run's log.jsonl and plots) are carried over into the new version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import from_dict, load_json, save_json, to_dict
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")
OWNED = REQUIRED + ("tokenizer_config.json", "train_state.pt", "extra.safetensors")
SHARDED_OPTIMIZER = "optimizer.dcp"


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> GPTConfig:
        return self.model.cfg


def _state_for_save(model: GPT) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: the tied output head is tok_emb, saved once.
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def snapshot_id(path: str | Path) -> str:
    """A short content hash of the weights: `name@sha` pins the exact snapshot a server offers."""
    h = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def save(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path. `extra_dirs` (name -> a folder already
    written elsewhere, e.g. optimizer.dcp) are moved into the new version before it goes live."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_for_save(model), str(tmp / "model.safetensors"))
    save_json(to_dict(model.cfg), tmp / "config.json")
    tokenizer.save(tmp)
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for name, src in (extra_dirs or {}).items():
        shutil.move(str(src), str(tmp / name))
    meta = dict(meta)
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    meta["snapshot"] = snapshot_id(tmp)
    save_json(meta, tmp / "meta.json")
    _fsync_dir(tmp)
    if final.exists():
        # Files a run keeps beside its weights (log.jsonl, plots) carry over into the new version.
        for f in final.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.name not in OWNED:
                shutil.copy2(f, tmp / f.name)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def _fsync_dir(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in REQUIRED)


def load_config(directory: str | Path) -> GPTConfig:
    p = Path(directory) / "config.json"
    return from_dict(GPTConfig, load_json(p), source=str(p))


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Checkpoint:
    """Load a checkpoint directory into a GPT (eval mode) and its tokenizer."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d}: no such checkpoint directory")
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{d}: not a chatforge checkpoint (missing {', '.join(missing)})")
    cfg = load_config(d)
    tokenizer = Tokenizer.load(d)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} embeddings")
    with torch.device("meta"):
        model = GPT(cfg)
    state = load_file(str(d / "model.safetensors"))
    load_weights(model, state, source=str(d / "model.safetensors"))
    meta = load_json(d / "meta.json")
    if meta.get("lora"):
        # A LoRA run saved its frozen base weights plus adapters (train/lora.py): fold them in.
        merge_lora(model, load_extra(d), meta["lora"]["alpha"] / meta["lora"]["rank"], source=str(d / "extra.safetensors"))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=d)


@torch.no_grad()
def merge_lora(model: GPT, tensors: dict[str, torch.Tensor], scale: float, source: str = "adapters") -> None:
    """W += scale * B @ A for every `<layer>.lora_A.weight` / `<layer>.lora_B.weight` pair (PEFT's names)."""
    pairs = [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    if not pairs:
        raise ValueError(f"{source}: the checkpoint says it has LoRA adapters but holds none")
    for name in pairs:
        w = model.get_submodule(name).weight
        a, b = tensors[f"{name}.lora_A.weight"], tensors.get(f"{name}.lora_B.weight")
        if b is None or tuple((b @ a).shape) != tuple(w.shape):
            raise ValueError(f"{source}: adapter {name} is incomplete or does not fit the weight {tuple(w.shape)}")
        w += (scale * (b.float() @ a.float())).to(w.dtype)


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` (which may live on the meta device), checking names and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers that are not saved (RoPE tables) were built on the meta device: rebuild them.
    if model.cfg.block == "llama":
        from .model import rope_tables

        cos, sin = rope_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin


def load_extra(directory: str | Path) -> dict[str, torch.Tensor]:
    p = Path(directory) / "extra.safetensors"
    return load_file(str(p)) if p.is_file() else {}


def load_train_state(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / "train_state.pt"
    if not p.is_file():
        raise ValueError(f"{directory}: no train_state.pt to resume from (was it saved with --save-every?)")
    return torch.load(p, map_location="cpu", weights_only=False)
