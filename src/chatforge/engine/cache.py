"""Keys and values the engine keeps: the slot cache every running request decodes from, the
prefix cache that lets prompts sharing a beginning skip computing it, and the decode-attention
kernel that reads the slot cache.

- A preallocated KV cache per slot, one (slots, K kv-heads, positions, D) tensor per layer (the
  compiled decode step, compiled.py, writes each in place): grouped-query aware.
  Active requests always occupy slots 0..n-1, so a decode step attends to a plain slice of the
  cache (no gather); a finished request's slot is refilled by moving the last one into it.
- Decode attention: in fp32 on the CPU, the project's kernel (csrc/decode_attention.cpp: one task
  per row and query head, where torch's fused kernel spends a decode step's call on set-up);
  bf16 batches as plain matmuls where those beat the fused kernel (`matmul_decode_attention_wins`);
  else model.attend's fused kernel. The engine chooses and sets it on its own modules.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .. import quantize
from ..dtypes import amx_tiles, fast_bf16
from ..model import GPT, attend
from . import pages

FP16_MAX = 65504.0  # keys and values kept in fp16 are held to this
MATMUL_ATTENTION_ROWS = 4  # decode steps of at least this many rows take the matmul kernel where it wins


@functools.cache
def matmul_decode_attention_wins(device_type: str) -> bool:
    """Whether batched bf16 grouped-query decode attention runs faster as plain matmuls than in the
    fused SDPA kernel here: on a CPU with native bf16 but no AMX tiles. Not with AMX (whose fused
    kernel multiplies on the tiles), on AVX2 (emulated bf16) or on CUDA. Measurements:
    benchmarks/README.md."""
    return device_type == "cpu" and fast_bf16("cpu") and not amx_tiles()


def attend_decode_by_matmuls(q_BHTD, k_BKSD, v_BKSD, mask) -> torch.Tensor:
    """model.attend, with grouped-query decode steps of MATMUL_ATTENTION_ROWS or more rows computed
    as plain matmuls instead of the fused kernel (the engine uses it where
    `matmul_decode_attention_wins`; the slot cache then hands such steps contiguous keys)."""
    B, H, T, D = q_BHTD.shape
    K = k_BKSD.shape[1]
    if H == K or T != 1 or B < MATMUL_ATTENTION_ROWS:
        return attend(q_BHTD, k_BKSD, v_BKSD, mask)
    q = q_BHTD.reshape(B, K, H // K, D)  # the query heads of a group folded into the time axis, as model.attend does
    scores = torch.matmul(q, k_BKSD.transpose(-1, -2)).float() / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(torch.softmax(scores, dim=-1).to(v_BKSD.dtype), v_BKSD)
    return y.reshape(B, H, 1, D)


def native_decode_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps of a model in `dtype` on `device` take attend_decode_native (builds the
    project's kernels once if needed; False, with a warning, where they cannot be built)."""
    return device.type == "cpu" and dtype == torch.float32 and quantize.native_kernels() is None


def attend_decode_native(q_BHTD, k_BKSD, v_BKSD, mask) -> torch.Tensor:
    """model.attend, with one-token decode steps in fp32 on the project's kernel (keys and values
    fp32 or fp16); other calls (prefills, other dtypes, masks of other shapes) on model.attend's."""
    B, H, T, D = q_BHTD.shape
    S = k_BKSD.shape[2]
    fits = T == 1 and q_BHTD.dtype == torch.float32 and k_BKSD.dtype in (torch.float32, torch.float16) and q_BHTD.device.type == "cpu"
    if not fits or (mask is not None and tuple(mask.shape) != (B, 1, 1, S)):
        return attend(q_BHTD, k_BKSD.to(q_BHTD.dtype), v_BKSD.to(q_BHTD.dtype), mask)
    m = None if mask is None else mask.reshape(B, S)
    return torch.ops.chatforge_native.decode_attention(q_BHTD.reshape(B, H, D), k_BKSD, v_BKSD, m, 1 / math.sqrt(D)).view(B, H, 1, D)


def stored_kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` keeps it: fp16 rounded to nearest and held to its largest finite
    value (as csrc/decode_step.cpp stores it), rather than made infinite."""
    if dtype == torch.float16 and x.dtype != dtype:
        return x.clamp(-FP16_MAX, FP16_MAX).to(dtype)
    return x.to(dtype)


class SlotCache:
    """KV cache of `slots` sequences; implements model.KVCache for one forward at a time.
    `contiguous_decode`: hand decode steps of MATMUL_ATTENTION_ROWS or more rows contiguous copies
    of their keys and values (for attend_decode_by_matmuls)."""

    def __init__(self, model: GPT, slots: int, max_len: int, device, dtype, contiguous_decode: bool = False):
        c = model.cfg
        shape, L = (slots, c.n_kv_head, max_len, c.head_dim), c.n_layer
        n = math.prod(shape)
        # on the CPU, every block's keys then values in one buffer on 2 MB pages (pages.py)
        buf = pages.huge_page_buffer(2 * L * n * dtype.itemsize) if torch.device(device).type == "cpu" else None
        if buf is None:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)]
        else:
            flat = buf.view(dtype).zero_()
            self.k = [flat[2 * i * n:(2 * i + 1) * n].view(shape) for i in range(L)]
            self.v = [flat[(2 * i + 1) * n:(2 * i + 2) * n].view(shape) for i in range(L)]
        self.max_len = max_len
        self.contiguous_decode = contiguous_decode
        self._rows = slice(0, 0)
        self._prefill = True
        self._offset = 0  # prefill: positions before this are already in the rows (a cached prefix)
        self._at: int | None = None  # decode, every row at the same position: a plain slice write
        self._rows_idx: torch.Tensor | None = None  # decode, rows at different positions: (B,) indices
        self._pos: torch.Tensor | None = None  # and their (B,) write positions
        self._read = 0

    def prefill(self, start: int, n: int, offset: int = 0) -> None:
        """The next forward fills rows start..start+n from position `offset` on."""
        self._rows, self._prefill, self._offset = slice(start, start + n), True, offset

    def decode(self, positions: list[int], device) -> torch.Tensor | None:
        """The next forward writes row i's new key at positions[i] and reads positions < max + 1.
        Returns the attention mask that step needs: None when every row is at the same position
        (each attends to all of 0..pos), else (B,1,1,S) True where a row may attend."""
        n = len(positions)
        self._rows, self._prefill, self._read = slice(0, n), False, max(positions) + 1
        if min(positions) == self._read - 1:
            self._at = self._read - 1
            return None
        self._at = None
        self._rows_idx = torch.arange(n, device=device)
        self._pos = torch.tensor(positions, device=device)
        return (torch.arange(self._read, device=device)[None, :] <= self._pos[:, None])[:, None, None, :]

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        kc, vc = self.k[layer][self._rows], self.v[layer][self._rows]
        half = kc.dtype == torch.float16 and k_BKTD.dtype != torch.float16
        if half:
            dt = k_BKTD.dtype
            k_BKTD, v_BKTD = stored_kv(k_BKTD, kc.dtype), stored_kv(v_BKTD, kc.dtype)
        if self._prefill:
            o, T = self._offset, k_BKTD.shape[2]
            kc[:, :, o : o + T] = k_BKTD
            vc[:, :, o : o + T] = v_BKTD
            if half:  # prefills attend to the stored values, as later steps will (a cached prefix or not: the same answers)
                return kc[:, :, : o + T].to(dt), vc[:, :, : o + T].to(dt)
            if o == 0:  # from position 0: attend to just what was computed
                return k_BKTD, v_BKTD
            return kc[:, :, : o + T], vc[:, :, : o + T]  # after a cached prefix: attend to it too
        if self._at is not None:
            kc[:, :, self._at] = k_BKTD[:, :, 0]
            vc[:, :, self._at] = v_BKTD[:, :, 0]
        else:
            kc[self._rows_idx, :, self._pos] = k_BKTD[:, :, 0]
            vc[self._rows_idx, :, self._pos] = v_BKTD[:, :, 0]
        k, v = kc[:, :, : self._read], vc[:, :, : self._read]
        if self.contiguous_decode and k.shape[0] >= MATMUL_ATTENTION_ROWS:
            # Plain matmuls run several times slower on this strided slice of the cache than on a
            # contiguous copy, which costs far less than that; the fused kernel reads strides fine.
            k, v = k.contiguous(), v.contiguous()
        return k, v

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class PrefixCache:
    """Keys and values of the most recent prompt's first `capacity` tokens, so the next prompts
    that begin the same way skip computing that part: a chat template's system prompt shared by
    every request, or the history a multi-turn chat sends again each turn.

    Keys and values depend only on the tokens and their positions from 0, so a prefix computed
    in one slot is valid in any other. They do depend on the weights: use this only for a model
    that does not change while the engine lives (serving, chatting), never for PPO rollouts."""

    def __init__(self, cache: SlotCache, capacity: int, min_tokens: int = 8):
        L, (_, K, _, D) = len(cache.k), cache.k[0].shape
        self.capacity, self.min_tokens = min(capacity, cache.max_len), min_tokens
        self.k = torch.zeros(L, K, self.capacity, D, device=cache.k[0].device, dtype=cache.k[0].dtype)
        self.v = torch.zeros_like(self.k)
        self.tokens: list[int] = []
        self.hit_tokens = 0  # prompt tokens served from here rather than computed (a counter)

    def match(self, prompts: list[list[int]]) -> int:
        """Tokens every prompt shares with the stored prefix (each keeps at least its last token
        to compute, for the first output's logits); 0 when fewer than `min_tokens`."""
        n = min(min(common_prefix(self.tokens, p) for p in prompts), min(map(len, prompts)) - 1)
        return n if n >= self.min_tokens else 0

    def store(self, prompt: list[int], cache: SlotCache, slot: int) -> None:
        """Keep the prompt just prefilled into `slot`, unless the stored prefix covers it already."""
        n = min(len(prompt), self.capacity)
        if common_prefix(self.tokens, prompt) >= n:
            return
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.k[layer, :, :n] = k[slot, :, :n]
            self.v[layer, :, :n] = v[slot, :, :n]
        self.tokens = list(prompt[:n])

    def load(self, cache: SlotCache, rows: slice, n: int) -> None:
        """Copy the first n stored positions into cache rows `rows`."""
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[rows, :, :n] = self.k[layer, None, :, :n]
            v[rows, :, :n] = self.v[layer, None, :, :n]
        self.hit_tokens += n * (rows.stop - rows.start)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
