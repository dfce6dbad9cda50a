"""The checkpoint directory: the one owner of its layout.

    DIR/model.safetensors      weights (names as in model.py)
    DIR/config.json            GPTConfig
    DIR/tokenizer.json         HF tokenizer file
    DIR/tokenizer_config.json  chat template and special tokens (tokenizer.py)
    DIR/meta.json              stage, parent checkpoint, data, step, metrics, created, snapshot id
    DIR/train_state.pt         optional: optimizer, RNG, dataloader position, step (for --resume)
    DIR/extra.safetensors      optional: tensors a stage adds beside the weights:
                                 a reward model's scalar head   value_head.weight (1, C), value_head.bias (1,)
                                 LoRA adapters (PEFT's names)   <layer>.lora_A.weight (r, in), <layer>.lora_B.weight (out, r)
                               (meta.json "lora" {rank, alpha, ...} says the weights are a frozen base
                               the adapters go on: `load` merges them)
    DIR/optimizer.dcp/         optional: a sharded (FSDP) run's AdamW state, one file per process
                               (torch.distributed.checkpoint); train_state.pt then has no optimizer

Quantized checkpoints (`chatforge quantize`, meta.json "weights": "int8" | "int4") store the
matrices of model.safetensors quantized; `load` dequantizes them to fp32, so every path that takes
a checkpoint takes these. For a matrix NAME (tok_emb, lm_head and every 2-D weight under blocks.):

    int8  NAME        int8 (out, in)        codes q, w = q * scale[:, None]  (per output channel,
          NAME.scale  fp32 (out,)           symmetric, absmax / 127: quantize.int8_weights)
    int4  NAME        uint8 (out, in / 2)   codes q in 0..15 two per byte: column 2j in the low
                                            nibble, column 2j + 1 in the high one
          NAME.scale  fp16 (out, in / 32)   w = q * scale + min per group of 32 along the input,
          NAME.min    fp16 (out, in / 32)   each group's min at q = 0 and max at q = 15 (GGUF Q4_1's
                                            layout: quantize.int4_groups)

An int4 checkpoint keeps tok_emb and lm_head, and matrices whose input is not a multiple of 32, at
int8 (the byte's dtype tells which); norms, biases and position embeddings stay fp32.

A directory is written to DIR.tmp-<pid> and renamed into place, so a crash never leaves a
half-written checkpoint; an existing DIR is replaced only after the new one is complete. Other
files in DIR (a run's log.jsonl and plots) are carried over into the new version.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import dtypes
from .config import from_dict, load_json, save_json, to_dict
from .model import GPT, GPTConfig, RewardModel, rope_tables
from .quantize import int4_groups, int8_weights, native_kernels

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
from .tokenizer import Tokenizer

REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")
EXTRA = "extra.safetensors"
OWNED = REQUIRED + ("tokenizer_config.json", "train_state.pt", EXTRA)
SHARDED_OPTIMIZER = "optimizer.dcp"
REWARD_HEAD = ("value_head.weight", "value_head.bias")  # RewardModel.head_tensors() names
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # suffixes of one layer's adapter pair


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


WEIGHT_FORMATS = ("int8", "int4")  # meta.json "weights" of a quantized checkpoint
INT4_GROUP = 32  # weights per int4 scale/minimum, as quantize.INT4_GROUP and GGUF's 4-bit blocks


def _quantized_matrix(name: str, v: torch.Tensor) -> bool:
    return v.ndim == 2 and (name.startswith("blocks.") or name in ("tok_emb.weight", "lm_head.weight"))


def quantize_state(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """A state dict in the quantized layout above (fmt "int8" | "int4")."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weights={fmt!r}; expected one of {', '.join(WEIGHT_FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not _quantized_matrix(k, v):
            out[k] = v.float().contiguous()
        elif fmt == "int4" and k.startswith("blocks.") and v.shape[1] % INT4_GROUP == 0:
            q, scale, lo = int4_groups(v, INT4_GROUP)
            scale16, lo16 = scale.to(torch.float16), lo.to(torch.float16)
            if not (torch.isfinite(scale16).all() and torch.isfinite(lo16).all()):
                raise ValueError(f"{k}: weights beyond fp16's range (|w| up to {v.abs().max().item():.3g}) cannot be stored as int4")
            out[k] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
            out[k + ".scale"], out[k + ".min"] = scale16, lo16
        else:
            q, scale = int8_weights(v)
            out[k], out[k + ".scale"] = q.contiguous(), scale.contiguous()
    return out


def dequantize_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a quantized one (the inverse of quantize_state, up to its rounding)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith((".scale", ".min")) and k.rsplit(".", 1)[0] in state:
            continue
        if v.dtype == torch.int8:
            scale = state.get(k + ".scale")
            if scale is None or tuple(scale.shape) != (v.shape[0],):
                raise ValueError(f"{source}: int8 matrix {k} {tuple(v.shape)} needs {k}.scale of shape ({v.shape[0]},)")
            out[k] = v.float() * scale.float()[:, None]
        elif v.dtype == torch.uint8:
            scale, lo = state.get(k + ".scale"), state.get(k + ".min")
            groups = (v.shape[0], v.shape[1] * 2 // INT4_GROUP)
            if scale is None or lo is None or tuple(scale.shape) != groups or tuple(lo.shape) != groups:
                raise ValueError(f"{source}: int4 matrix {k} {tuple(v.shape)} needs {k}.scale and {k}.min of shape {groups}")
            q = torch.stack([v & 15, v >> 4], dim=-1).reshape(v.shape[0], groups[1], INT4_GROUP).float()
            out[k] = (q * scale.float()[..., None] + lo.float()[..., None]).reshape(v.shape[0], -1)
        else:
            out[k] = v
    return out


def weight_format(path_or_meta: str | Path | dict[str, Any]) -> str | None:
    """"int8" | "int4" when a checkpoint's weights carry that rounding already (so decode copies in
    that format reproduce them), else None: a `chatforge quantize` output, or a GGUF import whose
    block matrices are all Q8_0 ("int8") or all Q4_0/Q4_1 ("int4"; the token embedding and output
    layer of such files are usually Q8_0/Q6_K, as llama.cpp keeps them)."""
    meta = path_or_meta if isinstance(path_or_meta, dict) else load_json(Path(path_or_meta) / "meta.json")
    if meta.get("weights") in WEIGHT_FORMATS:
        return meta["weights"]
    if meta.get("format") != "gguf":
        return None
    if "block_quantization" in meta:  # types of the blk.* matrices (imports since IMPORTER_VERSION 3)
        blocks = set(meta["block_quantization"])
        return "int4" if blocks and blocks <= {"Q4_0", "Q4_1"} else "int8" if blocks == {"Q8_0"} else None
    types = set(meta.get("quantization", ())) - {"F32"}  # older imports list every tensor's type together
    if types & {"Q4_0", "Q4_1"} and types <= {"Q4_0", "Q4_1", "Q8_0", "Q6_K"}:
        return "int4"
    return "int8" if types == {"Q8_0"} else None


def exact_int4(path_or_meta: str | Path | dict[str, Any]) -> bool:
    """Whether int4 decode copies on the project's fp32 kernel (quantize.native_kernels) reproduce this
    checkpoint's block matrices exactly: they are groups of 32 with a scale and a minimum already
    (a `chatforge quantize --to int4` output, or a GGUF import whose block matrices are all Q4_1;
    Q4_0's symmetric blocks are not of that form), and the kernel builds here."""
    meta = path_or_meta if isinstance(path_or_meta, dict) else load_json(Path(path_or_meta) / "meta.json")
    four_bit = meta.get("weights") == "int4" or (meta.get("format") == "gguf" and meta.get("block_quantization") == ["Q4_1"])
    return four_bit and native_kernels() is None


def inference_mode(path_or_meta: str | Path | dict[str, Any], dtype: str = "auto", decode: str = "auto", device="cpu") -> tuple[str, str | None]:
    """dtypes.inference_mode for this checkpoint: whether its weights are exactly int4 (which
    builds the CPU kernels) is asked only where the answer is used, a CPU's default mode."""
    return dtypes.inference_mode(dtype, decode, device, lambda: exact_int4(path_or_meta))


def save(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    weights: str | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path; `weights` "int8" | "int4" stores the
    matrices quantized (the layout above). `extra_dirs` (name -> a folder already written
    elsewhere, e.g. optimizer.dcp) are moved into the new version before it goes live."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    state = _state_for_save(model)
    if weights is not None:
        state = quantize_state(state, weights)
        meta = {**meta, "weights": weights}
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state, str(tmp / "model.safetensors"))
    save_json(to_dict(model.cfg), tmp / "config.json")
    tokenizer.save(tmp)
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / EXTRA))
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
    meta = load_json(d / "meta.json")
    state = load_file(str(d / "model.safetensors"))
    if meta.get("weights") is not None:
        if meta["weights"] not in WEIGHT_FORMATS:
            raise ValueError(f"{d / 'meta.json'}: weights={meta['weights']!r}; expected one of {', '.join(WEIGHT_FORMATS)}")
        state = dequantize_state(state, source=str(d / "model.safetensors"))
    load_weights(model, state, source=str(d / "model.safetensors"))
    if meta.get("lora"):
        # A LoRA run saved its frozen base weights plus adapters (train/lora.py): fold them in.
        merge_lora(model, load_extra(d), meta["lora"]["alpha"] / meta["lora"]["rank"], source=str(d / EXTRA))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=d)


def quantize_checkpoint(src: str | Path, out: str | Path, to: str) -> Path:
    """`chatforge quantize`: the checkpoint `src` with its matrices stored as `to` ("int8" | "int4")."""
    if to not in WEIGHT_FORMATS:
        raise ValueError(f"--to {to!r}; expected one of {', '.join(WEIGHT_FORMATS)}")
    ck = load(src)
    meta = {"stage": "quantize", "parent": str(Path(src).resolve())}
    return save(out, ck.model, ck.tokenizer, meta, weights=to)


def adapter_keys(layer: str) -> tuple[str, str]:
    """The extra.safetensors names of one layer's LoRA A and B."""
    return layer + LORA_A, layer + LORA_B


@torch.no_grad()
def merge_lora(model: GPT, tensors: dict[str, torch.Tensor], scale: float, source: str = "adapters") -> None:
    """W += scale * B @ A for every adapter pair in `tensors` (adapter_keys)."""
    pairs = [k[: -len(LORA_A)] for k in tensors if k.endswith(LORA_A)]
    if not pairs:
        raise ValueError(f"{source}: the checkpoint says it has LoRA adapters but holds none")
    for name in pairs:
        w = model.get_submodule(name).weight
        a_key, b_key = adapter_keys(name)
        a, b = tensors[a_key], tensors.get(b_key)
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
        cos, sin = rope_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin


def load_extra(directory: str | Path) -> dict[str, torch.Tensor]:
    p = Path(directory) / EXTRA
    return load_file(str(p)) if p.is_file() else {}


@torch.no_grad()
def load_reward_head(directory: str | Path, head: nn.Linear) -> None:
    """Copy a reward model's scalar head from `directory`'s extra.safetensors into `head`."""
    extra = load_extra(directory)
    missing = [k for k in REWARD_HEAD if k not in extra]
    if missing:
        raise ValueError(f"{directory}: not a reward model (no {', '.join(missing)} in {EXTRA}); train one with `chatforge rm`")
    for key, p in zip(REWARD_HEAD, (head.weight, head.bias)):
        if tuple(extra[key].shape) != tuple(p.shape):
            raise ValueError(f"{directory}: {key} has shape {tuple(extra[key].shape)}, expected {tuple(p.shape)}")
        p.copy_(extra[key])


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """A reward-model checkpoint (meta stage "rm") as a RewardModel in fp32, eval mode."""
    ck = load(path, device=device, dtype=torch.float32)
    head = nn.Linear(ck.model.cfg.d_model, 1)
    load_reward_head(path, head)
    return RewardModel(ck.model, head.to(device)).eval(), ck.tokenizer, ck.meta


def load_train_state(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / "train_state.pt"
    if not p.is_file():
        raise ValueError(f"{directory}: no train_state.pt to resume from (was it saved with --save-every?)")
    # weights_only: train_state.pt comes from a run folder, which may have been copied from anywhere;
    # a full unpickle would run whatever code the file names. The train state is tensors, numbers,
    # strings and containers, plus numpy's RNG state (an ndarray): those few numpy types are allowed.
    with torch.serialization.safe_globals(_numpy_rng_types()):
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{p}: not a chatforge train state (it holds objects other than tensors, numbers and numpy's "
                             f"RNG state; refusing to unpickle them): {str(e).splitlines()[0]}") from None


def _numpy_rng_types() -> list:
    """What np.random.get_state() pickles as: an ndarray of uint32 (numpy 1.x or 2.x module paths)."""
    return [_np_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

