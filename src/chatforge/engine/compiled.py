"""The decode step (one new token for each running request) compiled with torch.compile, so that
the ~30 small eager ops per block around its matmuls (norms, RoPE, cache writes, attention masks,
residual adds) run as a few fused kernels: inductor's C++ code on the CPU, CUDA graphs
(`mode="reduce-overhead"`) on a GPU. Opt-in: Engine(compile_decode=True), `--compile-decode`.

Static shapes, so that each graph is compiled once:
- Slot buckets: a step of n streams runs the graph of a bucket (1, 2, 4, 8, ... up to the
  engine's max_batch) that holds them: the smallest one compiled already, else the smallest one
  (compiled now), so that streams leaving an engine that was not warmed do not stall the others
  for another compilation; never across the weight copies' FEW_ROWS, which would change the
  arithmetic. The rows beyond n are dummies (token 0 at position 0 of free slots, which a
  prefill rewrites before anyone reads them) whose logits are dropped.
- Positions are tensors, and every layer's keys and values are written into the slot cache's
  preallocated per-layer tensors inside the graph (index_put_), never a Python int in the graph.
- The attended length: on the CPU the graph reads the cache up to the batch's longest position, a
  dimension marked dynamic (one graph for every length); with CUDA graphs, which record one graph
  per distinct shape, it reads the whole preallocated length under a mask built from the positions.

Each bucket compiles on its first step or in `warm()` (compile seconds per bucket); a bucket that
compiles again (its guards failed: the weight copies were remade, say) is counted and warned about.
A bucket whose compilation fails raises CompileFailed, and the engine decodes eagerly from then on.

The weights are whatever the engine's FastLinears installs for the step (packed oneDNN copies go
through the custom op `chatforge::packed_linear`, linears.py); the answers are the eager step's
up to the summation order of fused kernels.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from ..model import GPT
from .cache import MATMUL_ATTENTION_ROWS, SlotCache


class CompileFailed(RuntimeError):
    """torch.compile could not compile a decode bucket (the cause is chained)."""


def buckets(max_batch: int, also: tuple[int, ...] = ()) -> list[int]:
    """Slot counts that decode steps are padded up to: powers of two below max_batch, max_batch,
    and the counts in `also` (the weight copies' FEW_ROWS: a padded step must take the same
    few-rows-or-many path as the eager step of its real rows)."""
    out = {max_batch, *(n for n in also if 1 <= n < max_batch)}
    n = 1
    while n < max_batch:
        out.add(n)
        n *= 2
    return sorted(out)


class _BucketCache:
    """model.KVCache for one compiled decode step: writes row i's new key at position pos[i] of
    the slot cache (in place) and returns the bucket's rows, up to the attended length."""

    def __init__(self, cache: SlotCache):
        self.cache = cache
        self.rows: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length: int | torch.SymInt = 0

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, self.pos] = k_BKTD[:, :, 0]
        vc[self.rows, :, self.pos] = v_BKTD[:, :, 0]
        B = k_BKTD.shape[0]
        k, v = kc[:B, :, : self.length], vc[:B, :, : self.length]
        if self.cache.contiguous_decode and B >= MATMUL_ATTENTION_ROWS:  # as SlotCache.update, for attend_decode_by_matmuls
            k, v = k.contiguous(), v.contiguous()
        return k, v


class CompiledDecode:
    """Decode steps of `model` (the engine's own modules) over `cache`, compiled per slot bucket.
    `head` maps final hidden states to logits (the engine's output layer, on its copies);
    `few_rows`: steps of at most this many rows multiply by the decode copies (FastLinears)."""

    def __init__(self, model: GPT, cache: SlotCache, head: Callable[[torch.Tensor], torch.Tensor], max_batch: int, few_rows: int = 0,
                 copies: Callable[[], int] = lambda: 0, warm_above: int = 0):
        self.model, self.cache, self.head = model, cache, head
        # warm() leaves buckets of at most this many rows to first use: the engine's one-call step
        # (fused.py) takes those steps, and only steps it aside from would compile them
        self.warm_above = warm_above
        self.copies = copies  # which weight copies are installed (FastLinears.generation): a bucket's graph is made for one
        self._made_for: dict[int, int] = {}  # bucket -> the copies its one graph was compiled with
        self.device = cache.k[0].device
        self.buckets, self.few_rows = buckets(max_batch, (few_rows,)), few_rows
        self.compiles = dict.fromkeys(self.buckets, 0)  # graphs compiled per bucket (1 each once warm)
        self.compile_seconds = dict.fromkeys(self.buckets, 0.0)
        self.full_span = self.device.type == "cuda"  # attend over the whole cache under a mask (static shapes for CUDA graphs)
        self._view = _BucketCache(cache)
        self._keys = torch.arange(cache.max_len, device=self.device)
        self._rows = {b: torch.arange(b, device=self.device) for b in self.buckets}
        if self.device.type == "cuda":
            for t in cache.k + cache.v:  # written in place inside the CUDA graphs: their addresses must not change
                torch._dynamo.mark_static_address(t)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        # Without the generated wrapper's checks of every input's size and strides (~370 Python
        # calls per step on the CPU): the inputs are the engine's own tensors, made for the graph.
        options = None if mode else {"size_asserts": False, "scalar_asserts": False, "alignment_asserts": False}
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode, options=options)
        # One graph per bucket: more than dynamo's default limit of recompiles per function when
        # max_batch is large; the limit is raised only around this function's calls.
        self._limits = torch._dynamo.config.patch(recompile_limit=len(self.buckets) + 8)

    def bucket(self, n: int) -> int:
        """The bucket a step of n streams runs in (module docstring)."""
        if not 1 <= n <= self.buckets[-1]:
            raise ValueError(f"{n} streams: the compiled decode step takes 1..{self.buckets[-1]}")
        top = self.few_rows if n <= self.few_rows else self.buckets[-1]
        fits = [b for b in self.buckets if n <= b <= top]
        return next((b for b in fits if self.compiles[b]), fits[0])

    def _step(self, ids_B1: torch.Tensor, pos_B: torch.Tensor, rows_B: torch.Tensor, keys_S: torch.Tensor) -> torch.Tensor:
        mask = (keys_S[None, :] <= pos_B[:, None])[:, None, None, :]  # (B,1,1,S): row i attends to positions <= pos[i]
        self._view.rows, self._view.pos, self._view.length = rows_B, pos_B, keys_S.shape[0]
        h = self.model.hidden(ids_B1, pos_B[:, None], mask, self._view)
        return self.head(h[:, -1]).float()

    def __call__(self, last_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, V) in fp32 of one decode step: stream i (in slot i) feeds token last_ids[i]
        at position positions[i]. Run it under the engine's installed weight copies."""
        return self._run(self.bucket(len(last_ids)), last_ids, positions)

    def _run(self, b: int, last_ids: list[int], positions: list[int]) -> torch.Tensor:
        n = len(last_ids)
        pad = b - n
        ids = torch.tensor([*last_ids, *[0] * pad], device=self.device)[:, None]
        pos = torch.tensor([*positions, *[0] * pad], device=self.device)
        if self.full_span:
            keys = self._keys
        else:
            keys = self._keys[: max(positions) + 1]
            torch._dynamo.mark_dynamic(keys, 0)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        # Dynamo checks ~1,000 guards (every weight copy, module and flag the graph read) before
        # each call: ~1.8 ms of a ~10 ms step here. A bucket with one graph, called under the
        # copies it was compiled with, runs it without them; anything else (new copies, a first
        # call) goes through the guards, which recompile where they fail.
        trusted = self.compiles[b] == 1 and self._made_for.get(b) == self.copies()
        try:
            with self._limits, torch.compiler.set_stance("default", skip_guard_eval_unsafe=trusted):
                logits = self._compiled(ids, pos, self._rows[b], keys)
        except Exception as e:  # any failure while compiling: the engine decodes eagerly instead
            if self.compiles[b] == 0:
                raise CompileFailed(f"compiling the decode step for {b} streams failed: {type(e).__name__}: {e}".split("\n")[0]) from e
            raise
        compiled = counters["stats"]["unique_graphs"] - before
        if compiled:
            self._made_for[b] = self.copies()
            self.compiles[b] += compiled
            self.compile_seconds[b] += time.perf_counter() - t0
            if self.compiles[b] > 1:
                warnings.warn(f"the compiled decode step for {b} streams compiled again ({self.compiles[b]} graphs): "
                              "its guards failed (weight copies remade, or another dtype or device)")
        return logits[:n]

    def warm(self) -> dict[int, float]:
        """Compile every bucket not compiled yet above `warm_above` rows (with dummy steps that
        write only position 1 of the first slots: call it on an idle engine); the seconds each took."""
        out = {}
        for b in self.buckets:
            if self.compiles[b] == 0 and b > self.warm_above:
                self._run(b, [0] * b, [1] * b)
                out[b] = self.compile_seconds[b]
        return out


def warm_report(seconds: dict[int, float] | None) -> str:
    """Engine.warm's result in words (for the commands that print it)."""
    if seconds is None:
        return "not compiled: decoding eagerly (see the warning)"
    if not seconds:
        return "nothing to compile: the one-call step (engine/fused.py) takes these steps"
    return "compiled for " + ", ".join(f"{b} stream{'s' * (b > 1)} in {s:.0f} s" for b, s in seconds.items())
