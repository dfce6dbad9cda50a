"""Batches of (input, target) windows from token shards (format: data/prepare.py), memory-mapped.

Training windows start at random offsets drawn from a generator seeded by (seed, step), so:
- the position in the data is just the step number (exact resume needs nothing else);
- the global batch of a step is the same whatever the number of processes: row j of the global
  batch goes to micro-step j // (world*B) on rank (j // B) % world. Two processes with B rows
  each see exactly the rows one process sees with gradient accumulation 2.
Validation reads consecutive windows from the start of val.bin, the same every time, dealt to
ranks by rank_batches (as many batches on every rank, which a sharded model needs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import load_json


class Shards:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.dir}: no meta.json; build token shards with `chatforge data prepare`")
        self.meta = load_json(meta_path)
        if self.meta.get("format") != "chatforge-shards/1":
            raise ValueError(f"{meta_path}: unknown shard format {self.meta.get('format')!r}")
        self.dtype = np.dtype(self.meta["dtype"])
        self._arrays: dict[str, np.memmap] = {}

    def split(self, name: str) -> np.memmap:
        if name not in self._arrays:
            path = self.dir / f"{name}.bin"
            if not path.is_file():
                raise ValueError(f"{path}: missing; rebuild the shards with `chatforge data prepare`")
            self._arrays[name] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._arrays[name]

    def bytes_per_token(self, name: str) -> float:
        s = self.meta["splits"][name]
        return s["bytes"] / max(1, s["tokens"])

    def __repr__(self) -> str:
        return json.dumps(self.meta["splits"])


class TrainBatches:
    """Random windows for step `step`, micro-step `micro`, on `rank` of `world`."""

    def __init__(self, shards: Shards, seq_len: int, micro_batch: int, accum: int, seed: int, rank: int = 0, world: int = 1):
        self.data = shards.split("train")
        if len(self.data) <= seq_len + 1:
            raise ValueError(
                f"{shards.dir}: train split has {len(self.data)} tokens, fewer than one window of seq_len={seq_len}+1; "
                "use more text or a shorter --seq-len"
            )
        self.seq_len, self.B, self.accum, self.seed = seq_len, micro_batch, accum, seed
        self.rank, self.world = rank, world

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.B * self.world * self.accum
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.data) - self.seq_len - 1, size=rows)
        first = (micro * self.world + self.rank) * self.B
        idx = starts[first : first + self.B]
        buf = np.stack([self.data[s : s + self.seq_len + 1].astype(np.int64) for s in idx])
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]


def rank_batches(n: int, batch: int, rank: int = 0, world: int = 1) -> list[tuple[list[int], bool]]:
    """This rank's share of items 0..n-1 (every world-th) for an evaluation, in batches of up to
    `batch`, each with whether it counts: as many batches on every rank, since a sharded (FSDP)
    model's forward is a collective that every rank must join. A rank whose share ran out gets
    stand-in batches ([0], False): it runs the forward and counts nothing."""
    mine = list(range(rank, n, world))
    return [(mine[i : i + batch] or [0], i < len(mine)) for i in range(0, -(-n // world), batch)]


def val_batches(shards: Shards, seq_len: int, batch: int, max_tokens: int, rank: int = 0, world: int = 1):
    """Consecutive, non-overlapping windows from the start of val.bin, up to `max_tokens` in total,
    dealt round-robin to ranks, as many batches on each (rank_batches): a stand-in batch has
    every target -100, so it adds no loss and no tokens."""
    data = shards.split("val")
    n_windows = min((len(data) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise ValueError(f"{shards.dir}: val split has {len(data)} tokens, fewer than seq_len={seq_len}+1")
    for windows, counts in rank_batches(n_windows, batch, rank, world):
        buf = np.stack([data[w * seq_len : w * seq_len + seq_len + 1].astype(np.int64) for w in windows])
        t = torch.from_numpy(buf)
        yield t[:, :-1], (t[:, 1:] if counts else torch.full_like(t[:, 1:], -100))
