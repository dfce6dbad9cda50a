"""The models a server offers, each with its own engine loop, and the bridge from the engine's
thread to asyncio (the engine calls a sink per event; the sink hands it to the event loop with
`call_soon_threadsafe`, so awaiting tokens never ties up a thread per request).

A model id is `name@snapshot`: the snapshot is the checkpoint's content hash, so a client that
sends the full id is sure of the exact weights; the bare name is accepted too and means "the
snapshot this server has loaded".
"""

from __future__ import annotations

import asyncio
import calendar
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import checkpoint, dtypes
from ..convert.registry import KNOWN, resolve
from ..engine import Engine, EngineLoop, Event
from ..engine.compiled import warm_report
from ..tokenizer import Tokenizer


def asyncio_sink(queue: asyncio.Queue, tag: int) -> Callable[[Event | BaseException], None]:
    """A thread-safe callback that puts (tag, event) on an asyncio queue of the running loop."""
    loop = asyncio.get_running_loop()

    def put(ev: Event | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (tag, ev))
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass

    return put


@dataclass
class ServedModel:
    name: str
    snapshot: str
    engine: Engine
    loop: EngineLoop
    created: int
    path: Path
    max_waiting: int  # requests beyond the engine's slots before the server answers 503

    @property
    def capacity_left(self) -> int:
        """Requests that can still be taken: free slots plus room in the waiting queue. Counted over
        slots and queue together because the engine admits waiting requests only at its next step:
        right after a step frees slots, the queue alone would look fuller than it is."""
        return self.engine.max_batch + self.max_waiting - self.engine.slots_in_use - len(self.engine.waiting)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.snapshot}"

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tok

    @property
    def context_len(self) -> int:
        return self.engine.max_len

    def close(self) -> None:
        self.loop.close()


def load_model(
    name_or_path: str,
    max_batch: int,
    max_waiting: int,
    max_seq_len: int | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    decode_weights: str = "same",
    install: bool = False,
    prefix_cache: int = 1024,
    compile_decode: bool = False,
    prefill_chunk: int = 0,
    kv_cache: str = "auto",
) -> ServedModel:
    """Resolve a checkpoint folder or known model name, load it and start its engine loop (with
    `compile_decode`, after compiling every slot bucket of its decode step)."""
    path = resolve(name_or_path, install=install)
    dt, copies = checkpoint.inference_mode(path, dtype, decode_weights, device)
    name = name_or_path if name_or_path in KNOWN else Path(path).resolve().name
    meta: dict = {}

    def make_engine() -> Engine:  # on the engine loop's thread: the only one that runs torch's parallel ops (EngineLoop)
        ck = checkpoint.load(path, device=device, dtype=dtypes.torch_dtype(dt, device))
        meta.update(ck.meta)
        engine = Engine(ck.model, ck.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, device=device,
                        decode_weights=copies,
                        prefix_cache=prefix_cache, compile_decode=compile_decode, prefill_chunk=prefill_chunk, kv_cache=kv_cache)
        if compile_decode:
            print(f"{name}: compiling the decode step for up to {max_batch} streams ...", file=sys.stderr, flush=True)
            print(f"{name}: decode step {warm_report(engine.warm())}", file=sys.stderr, flush=True)
        return engine

    # The engine loop's own bound on its waiting list is only a backstop (capacity_left is checked first).
    loop = EngineLoop(make_engine, max_waiting=max_batch + max_waiting)
    snapshot = meta.get("snapshot") or checkpoint.snapshot_id(path)
    created = int(calendar.timegm(time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ"))) if "created" in meta else int(time.time())
    return ServedModel(name=name, snapshot=snapshot, engine=loop.engine, loop=loop, created=created, path=Path(path), max_waiting=max_waiting)


class ModelRegistry:
    """The loaded models, found by `name@snapshot` or by bare name."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("serve: give at least one model")
        self.models = models
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"serve: the same snapshot is loaded twice: {ids}")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"serve: two models are named the same ({names}); give them distinct folder names")

    def get(self, model_id: str) -> ServedModel | None:
        for m in self.models:
            if model_id in (m.id, m.name):
                return m
        return None

    def close(self) -> None:
        for m in self.models:
            m.close()
