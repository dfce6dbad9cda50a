"""The engine: token ids in, a stream of tokens out. Knows nothing of HTTP.

- Continuous batching: requests wait in a queue, join between decode steps (their prompts are
  prefilled together, right-padded, with per-row causal masks) and leave when they finish or
  are cancelled. Keys and values live in the slot cache (cache.py).
- Per request: its own sampling (sampling.py), logprobs and top-n alternatives (log-softmax of
  the model's logits), and stops: end-of-turn / end-of-text tokens, extra stop ids, stop strings
  that may span tokens, max_new_tokens, and the end of the context window.
- Incremental detokenization never emits half a UTF-8 character.
- Linear layers run on copies of the weights made for speed (linears.FastLinears).
- Decode steps of a few streams on int4 or fp16 copies (an fp32 Llama-block model on the CPU) run as one
  call into the project's kernels (fused.FusedDecode): the same answers bit for bit, without
  ~15 ops per block dispatched from Python.
- Optionally (`compile_decode`) decode steps run as torch.compile'd graphs, one per slot bucket
  (compiled.CompiledDecode); prefills stay eager.
- Optionally (`prefill_chunk`) a prompt longer than the chunk is prefilled a chunk per step,
  alternating with decode steps of the running streams, so one long prompt does not stall every
  stream for its whole prefill (their time between tokens is bounded by one chunk).

The caller's model is not changed: the engine runs its own modules over the model's parameters
(`own_modules`), in eval mode, with its own weight copies and attention kernel; the model keeps
its train/eval mode, device and forwards. Its weights are read at every step, so an optimizer step
between two calls (PPO rollouts) shows in the next one.

`Engine.generate(prompts, sampling)` is a plain iterator of token events (rollouts, evaluation,
CLI); `Engine.complete` collects each request's whole answer; loop.EngineLoop runs the same
scheduler in a background thread for the server.
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..console import StatusLine
from ..dtypes import KV_CACHE_NAMES, check_name
from ..model import GPT, MLP, Attention, RMSNorm, apply_rope, swiglu
from ..tokenizer import Tokenizer
from .cache import (PrefixCache, SlotCache, attend_decode_by_matmuls, attend_decode_native, matmul_decode_attention_wins, native_decode_attention,
                    stored_kv)
from .compiled import CompiledDecode, CompileFailed
from .fused import FusedDecode
from .linears import FastLinears
from .sampling import Request, SamplingParams, argmax_rows, sample_next


@dataclass
class Event:
    request_id: int
    token_id: int | None  # None for a final event that carries no token (cancel, held-back text)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    text: str = ""  # newly completed text; never half a character, never part of a stop string
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last event


@dataclass
class Completion:
    """One request's whole answer, as `Engine.complete` collects it from its events."""

    text: str  # the streamed text: stop tokens and stop strings excluded
    ids: list[int]  # the generated token ids, as emitted (a final stop token included)
    finish_reason: str  # "stop" (a stop token or string) | "length" (max_new_tokens or the context window)


def own_modules(model: nn.Module) -> nn.Module:
    """A module tree of the engine's own over `model`'s state: each module a shallow copy that
    shares the original's parameters, buffers and hooks (the same dicts: weight updates,
    load_state_dict, .to() and LoRA hooks added later all show through), but holds its own
    submodules and attributes, so its train/eval flags, its forwards (FastLinears) and its
    attention kernel never touch the caller's model."""
    memo: dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            v = memo[id(m)] = copy.copy(m)
            v.__dict__["_modules"] = {name: None if c is None else view(c) for name, c in m._modules.items()}
        return memo[id(m)]

    return view(model)


def _eager_fp32(*tensors: torch.Tensor) -> bool:
    """Whether an engine's pointwise op may run on the project's kernels (csrc/pointwise.cpp): fp32,
    not traced (the compiled decode step's compiler fuses these ops itself) and needing no gradient."""
    if torch.compiler.is_compiling() or any(t.dtype != torch.float32 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def native_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward on the project's kernel (one pass per row where torch's CPU norm runs ~8
    small ops), where _eager_fp32; else RMSNorm's own."""
    if not _eager_fp32(x, norm.weight):
        return RMSNorm.forward(norm, x)
    return torch.ops.chatforge_native.rms_norm(x, norm.weight, norm.eps)


def native_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """model.apply_rope in one op, where _eager_fp32."""
    if not _eager_fp32(x_BHTD, cos_BTD, sin_BTD):
        return apply_rope(x_BHTD, cos_BTD, sin_BTD)
    return torch.ops.chatforge_native.rope(x_BHTD, cos_BTD, sin_BTD)


def native_swiglu(h: torch.Tensor) -> torch.Tensor:
    """model.swiglu in one op, where _eager_fp32."""
    return torch.ops.chatforge_native.swiglu(h) if _eager_fp32(h) else swiglu(h)


PREFILL_TOKENS = 8192  # padded tokens per prefill step (a single longer prompt still goes alone)


def _same_device(asked: torch.device, have: torch.device) -> bool:
    """`have` is `asked` ("cuda" asks for whichever cuda device the model is on)."""
    return asked.type == have.type and asked.index in (None, have.index)


class RoundedKV:
    """A model.KVCache that stores nothing: the keys and values a forward attends to, rounded as a
    slot cache of `dtype` would keep them (Engine.score's decode path)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stored_kv(k, self.dtype).to(k.dtype), stored_kv(v, self.dtype).to(v.dtype)


class Engine:
    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        device: str | torch.device | None = None,
        decode_weights: str | None = None,
        packed: bool | None = None,
        prefix_cache: int = 0,
        compile_decode: bool = False,
        prefill_chunk: int = 0,
        kv_cache: str = "auto",
    ):
        """`max_seq_len` bounds prompt + output per request (default: the model's context, at most
        2048); the KV cache holds max_batch x max_seq_len positions.
        `decode_weights` "bf16" | "fp16" | "int8" | "int4" multiplies decode steps of a few streams (FEW_ROWS)
        by copies of the weights in that format (FastLinears: fewer bytes per token, rounded
        answers); None = the model's own weights.
        `packed` runs many-row matmuls on oneDNN-packed weight copies (FastLinears); None = wherever
        available (the CPU, in the model's dtype or else fp32).
        `prefix_cache` > 0 keeps that many tokens of the latest prompt's keys/values to reuse for
        prompts that start the same way (PrefixCache; only for weights that do not change).
        `compile_decode` runs decode steps as torch.compile'd graphs, one per slot bucket, compiled
        on first use or by `warm()` (compiled.CompiledDecode): the same tokens, fewer small ops.
        `prefill_chunk` > 0 prefills a prompt of more tokens than that in chunks of that many, one
        per step, alternating with the running streams' decode steps; 0 prefills every prompt whole.
        `kv_cache` "auto" keeps keys and values in fp16 where decode steps multiply weight copies
        on the CPU's fp32 path with the project's attention kernel (eager steps: half the bytes
        each step reads of the cache; measured in `chatforge eval fidelity`), else in the model's
        dtype; "same" always in the model's dtype (the exact path), "fp16" asks for fp16 (an error
        where that path is not taken).
        `device` is only checked: the model runs where it is (the engine never moves it)."""
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2")
        p = next(model.parameters())
        if device is not None and not _same_device(torch.device(device), p.device):
            raise ValueError(f"device={device!r}, but the model is on {p.device}: the engine runs the model where it is; move it first")
        self.device, self.dtype = p.device, p.dtype
        self.model, self.tok = own_modules(model).eval(), tokenizer
        # Decode attention (cache.py): fp32 on the project's kernel; batched bf16 as plain
        # matmuls where they beat the fused kernel. An fp32 model's RMSNorms, RoPE and SwiGLU on
        # the project's kernels too (csrc/pointwise.cpp; eager steps only).
        matmuls = self.dtype == torch.bfloat16 and matmul_decode_attention_wins(self.device.type)
        native = native_decode_attention(self.device, self.dtype)
        decode_attend = attend_decode_by_matmuls if matmuls else attend_decode_native if native else None
        for m in self.model.modules():
            if isinstance(m, Attention) and decode_attend is not None:
                m.attend = decode_attend
            if native and isinstance(m, Attention) and m.rotate is apply_rope:
                m.rotate = native_rope
            if native and isinstance(m, MLP) and m.act is swiglu:
                m.act = native_swiglu
            if native and isinstance(m, RMSNorm):
                m.forward = functools.partial(native_rms_norm, m)  # an instance attribute shadows RMSNorm.forward
        self.max_len = min(max_seq_len or 2048, model.cfg.max_seq_len)
        check_name(kv_cache, "kv_cache", KV_CACHE_NAMES)
        half_kv = native and decode_weights is not None and not compile_decode  # native: fp32 on the CPU, kernels built
        if kv_cache == "fp16" and not half_kv:
            raise ValueError("kv_cache='fp16' needs decode steps on weight copies (decode_weights) in fp32 on the CPU with the project's "
                             "kernels built, and no compile_decode")
        self.kv_dtype = torch.float16 if half_kv and kv_cache != "same" else self.dtype
        self.cache = SlotCache(self.model, max_batch, self.max_len, self.device, self.kv_dtype, contiguous_decode=matmuls)
        if prefix_cache < 0:
            raise ValueError(f"prefix_cache={prefix_cache} must be >= 0 tokens")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 0 tokens (0 = prefill whole prompts)")
        self.prefill_chunk = prefill_chunk
        # The request being prefilled a chunk at a time: its slot is always the one after the
        # active streams' (len(self.active)); `_chunk_done` of its prompt's positions are cached.
        self.chunking: Request | None = None
        self._chunk_done = 0
        self._chunk_turn = False  # alternates chunk and decode steps while both have work
        self.prefix = PrefixCache(self.cache, prefix_cache) if prefix_cache else None
        self.shared_prompt_tokens = 0  # prompt tokens copied from the same prompt's prefill in the same step (a counter)
        self.max_batch = max_batch
        self.stop_ids = set(tokenizer.stop_ids())
        can_pack = any(FastLinears.available(self.device, d) for d in (self.dtype, torch.float32))
        if packed and not can_pack:
            raise ValueError(f"packed=True needs the CPU and a torch build with oneDNN; got {self.device}, {self.dtype}")
        pack = can_pack if packed is None else packed
        self.fast = FastLinears(self.model, pack, decode_weights) if pack or decode_weights is not None else None
        if self.fast is not None:
            self.fast.refresh()  # now rather than in the first request's time to first token
        # decode steps of a few streams on int4 or fp16 copies: one call into the project's kernels (fused.py)
        self.fused = FusedDecode(self.model, self.cache, self.fast) if FusedDecode.applies(self.model, self.fast) else None
        self.compiled = None
        if compile_decode:
            self.compiled = CompiledDecode(self.model, self.cache, self.head, max_batch, self.fast.few_rows if self.fast else 0,
                                           copies=(lambda: self.fast.generation) if self.fast else (lambda: 0),
                                           warm_above=self.fast.few_rows if self.fused is not None else 0)
        self.active: list[Request] = []
        self.waiting: list[Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def warm(self) -> dict[int, float] | None:
        """Compile the decode step's slot buckets now rather than in the first requests' time
        (compile_decode=True engines; an idle engine): the seconds per bucket compiled here ({}:
        none needed it; those of up to FEW_ROWS streams are left out where the one-call step takes
        them). None when compilation failed (then the engine decodes eagerly, with a warning)."""
        if self.compiled is None:
            raise RuntimeError("warm() is for an engine made with compile_decode=True")
        if self.has_work:
            raise RuntimeError("warm() needs an idle engine (its dummy steps write into free slots)")
        with self.fast.installed() if self.fast is not None else nullcontext():
            try:
                return self.compiled.warm()
            except CompileFailed as e:
                self._compile_failed(e)
                return None

    def _compile_failed(self, e: CompileFailed) -> None:
        warnings.warn(f"{e}; this engine decodes eagerly from now on")
        self.compiled = None

    def new_request_id(self) -> int:
        """A request id no other request of this engine has (for `add(request_id=)`)."""
        return next(self._ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (the tied or untied output layer)."""
        if self.fast is not None:
            return self.fast.head(h)
        return F.linear(h, self.model.output_weight())

    @torch.inference_mode()
    def score(self, ids_BT: torch.Tensor, decode_path: bool = False) -> torch.Tensor:
        """Logits (B,T,V) in fp32 of whole sequences from position 0, in this engine's arithmetic:
        that of a prefill, or with `decode_path` that of decode steps of a few streams (every matmul
        on their weight copies), as if each token had been decoded in turn. For measuring how far
        a mode moves the model's distributions (eval/fidelity.py); not for serving."""
        if self.has_work:
            raise RuntimeError("score() needs an idle engine")
        if ids_BT.shape[1] > self.model.cfg.max_seq_len:
            raise ValueError(f"{ids_BT.shape[1]} positions exceed the model's context ({self.model.cfg.max_seq_len})")
        # prefills and decode steps attend to the stored keys and values: rounded, where the cache is fp16
        rounded = RoundedKV(self.kv_dtype) if self.kv_dtype != self.dtype else None
        with self.fast.installed(force_few=decode_path) if self.fast is not None else nullcontext():
            return self.head(self.model.hidden(ids_BT.to(self.device), kv_cache=rounded)).float()

    # ---- requests ----------------------------------------------------------------------
    def add(self, prompt: Sequence[int], sampling: SamplingParams | None = None, request_id: int | None = None) -> int:
        sp = sampling or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context window of {self.max_len} tokens")
        if max(prompt) >= self.model.cfg.vocab_size or min(prompt) < 0:
            raise ValueError(f"prompt has token ids outside the vocabulary (0..{self.model.cfg.vocab_size - 1})")
        rid = self.new_request_id() if request_id is None else request_id
        with self._lock:
            self.waiting.append(Request(rid, prompt, sp, self.stop_ids, self.device))
        return rid

    def cancel(self, rid: int) -> None:
        """Mark a request cancelled; its slot is freed at the next step."""
        with self._lock:
            for r in self.active + self.waiting + ([self.chunking] if self.chunking else []):
                if r.rid == rid:
                    r.cancelled = True

    def abort_all(self) -> None:
        """Drop every request at once, without events (a caller that stopped listening)."""
        with self._lock:
            self.waiting.clear()
            self.active.clear()
            self.chunking = None

    @property
    def slots_in_use(self) -> int:
        """Slots holding a request: the active streams and a prompt being prefilled in chunks."""
        return len(self.active) + (self.chunking is not None)

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.waiting or self.chunking)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None) -> Iterator[Event]:
        """Stream events for `prompts`; request_id is the prompt's index. Stopping the iteration
        early (break, an exception in the consumer) drops the unfinished requests."""
        sps = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
        if self.has_work:
            raise RuntimeError("generate() needs an idle engine; use EngineLoop to share one between callers")
        try:
            for i, (p, sp) in enumerate(zip(prompts, sps)):
                self.add(p, sp, request_id=i)
            while self.has_work:
                yield from self.step()
        finally:
            if self.has_work:
                self.abort_all()

    def complete(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: str = "",
        on_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Every prompt's whole answer (`generate`'s events collected per request), in prompt
        order. `on_done(i, completion)` is called as request i finishes (to save answers as they
        come); a non-empty `progress` labels a line on stderr with answers done, tokens/s and ETA."""
        n = len(prompts)
        texts, ids = [""] * n, [[] for _ in range(n)]
        out: list[Completion | None] = [None] * n
        status, t0 = StatusLine(), time.perf_counter()
        done = tokens = 0
        for ev in self.generate(prompts, sampling):
            i = ev.request_id
            texts[i] += ev.text
            if ev.token_id is not None:
                ids[i].append(ev.token_id)
                tokens += 1
            if ev.finish_reason is None:
                continue
            out[i] = Completion(texts[i], ids[i], ev.finish_reason)
            done += 1
            if on_done is not None:
                on_done(i, out[i])
            if progress:
                el = time.perf_counter() - t0
                status.update(f"{progress}: {done}/{n} answers, {tokens / el:.1f} tok/s, ETA {el / done * (n - done) / 60:.1f} min")
        if progress:
            status.done()
        return out

    # ---- one scheduler step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                events.append(Event(r.rid, None, finish_reason="cancelled"))
            if self.chunking is not None and self.chunking.cancelled:
                events.append(Event(self.chunking.rid, None, finish_reason="cancelled"))
                self.chunking = None
            joining = [] if self.chunking is not None else self._joiners(self.max_batch - len(self.active))
            del self.waiting[: len(joining)]
        for r in [r for r in self.active if r.cancelled]:
            events.append(Event(r.rid, None, finish_reason="cancelled"))
            self._release(r)
        if len(joining) == 1 and self._chunked(joining[0]):
            self.chunking, self._chunk_done, self._chunk_turn = joining[0], 0, True
            joining = []
        if not (joining or self.active or self.chunking):
            return events
        with self.fast.installed() if self.fast is not None else nullcontext():
            if joining:
                events += self._prefill(joining)
            elif self.chunking is not None and (self._chunk_turn or not self.active):
                events += self._prefill_chunk()
                self._chunk_turn = False
            else:
                events += self._decode()
                self._chunk_turn = True
        return events

    def _chunked(self, r: Request) -> bool:
        return 0 < self.prefill_chunk < len(r.prompt)

    def _joiners(self, free: int) -> list[Request]:
        """The waiting requests (in order) to prefill together in this step: as many as there are
        free slots, stopping at one that would make the right-padded batch more than twice its
        real tokens or exceed PREFILL_TOKENS (it joins at the next step). Bounds wasted compute on
        padding and how long one prefill stalls the running streams."""
        group: list[Request] = []
        real = longest = 0
        for r in self.waiting[:free]:
            if self._chunked(r):  # a long prompt goes alone, a chunk per step (_prefill_chunk)
                return group or [r]
            n = len(r.prompt)
            padded = (len(group) + 1) * max(longest, n)
            if group and (padded > 2 * (real + n) or padded > PREFILL_TOKENS):
                break
            group.append(r)
            real, longest = real + n, max(longest, n)
        return group

    def _prefill(self, reqs: list[Request]) -> list[Event]:
        # A prompt asked several times in one group (n answers to one prompt: RL groups, best-of-n,
        # ranking samples) is computed once: its copies take the first one's keys and values and
        # logits, and sample from them with their own seeds. The first of each prompt gets the
        # slots first, the copies the slots after them.
        row: dict[tuple[int, ...], int] = {}  # a prompt -> its row among the distinct prompts
        firsts, copies, src = [], [], []  # src: the row each copy takes after
        for r in reqs:
            key = tuple(r.prompt)
            if key in row:
                copies.append(r)
                src.append(row[key])
            else:
                row[key] = len(firsts)
                firsts.append(r)
        reqs = firsts + copies
        start, u = len(self.active), len(firsts)
        # Positions 0..P-1 come from the prefix cache when every prompt of the group starts with it.
        P = self.prefix.match([r.prompt for r in firsts]) if self.prefix is not None else 0
        if P:
            self.prefix.load(self.cache, slice(start, start + u), P)
        logits = self._prefill_logits(start, [r.prompt[P:] for r in firsts], P)
        for j, (r, i) in enumerate(zip(copies, src)):
            self.cache.move(start + i, start + u + j, len(r.prompt))
        self.shared_prompt_tokens += sum(len(r.prompt) for r in copies)
        if copies:
            logits = torch.cat([logits, logits[src]])
        if self.prefix is not None:
            self.prefix.store(reqs[0].prompt, self.cache, start)
        self.active += reqs
        return self._sample(reqs, logits)

    def _prefill_chunk(self) -> list[Event]:
        """The next chunk of the request being prefilled in chunks, in the slot after the active
        streams'; at its last chunk it samples its first token and joins them."""
        r, slot = self.chunking, len(self.active)
        done = self._chunk_done
        if done == 0 and self.prefix is not None:
            done = self.prefix.match([r.prompt])
            if done:
                self.prefix.load(self.cache, slice(slot, slot + 1), done)
        end = min(done + self.prefill_chunk, len(r.prompt))
        logits = self._prefill_logits(slot, [r.prompt[done:end]], done)
        self._chunk_done = end
        if end < len(r.prompt):
            return []
        self.chunking = None
        if self.prefix is not None:
            self.prefix.store(r.prompt, self.cache, slot)
        self.active.append(r)
        return self._sample([r], logits)

    def _prefill_logits(self, start: int, rows: list[list[int]], P: int) -> torch.Tensor:
        """Logits (n, V) after the last token of each row, prefilling slots start..start+n-1 with
        the rows' tokens from position P on (positions before P are in the cache already: a
        prefix, or a prompt's earlier chunks). Rows are right-padded to the longest."""
        n, dev = len(rows), self.device
        lens = [len(x) for x in rows]
        T = max(lens)
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, x in enumerate(rows):
            ids[i, : lens[i]] = torch.tensor(x)
        pos = torch.arange(P, P + T, device=dev).expand(n, T)
        mask = None  # no padding and nothing cached: plain causal attention takes the faster kernel
        if P or min(lens) != T:
            keys = torch.arange(P + T, device=dev)
            causal = keys[None, :] <= pos[0][:, None]  # (T, P+T): query at P+t sees keys up to P+t
            valid = keys[None, :] < P + torch.tensor(lens, device=dev)[:, None]  # (n, P+T): keys that are real tokens
            mask = (causal[None] & valid[:, None, :])[:, None]
            mask |= (keys[None, :] == pos[0][:, None])[None, None]  # padded queries attend to themselves: no NaN rows

        def forward() -> torch.Tensor:
            self.cache.prefill(start, n, offset=P)
            h = self.model.hidden(ids.to(dev), pos, mask, self.cache)
            return self.head(h[torch.arange(n, device=dev), torch.tensor(lens, device=dev) - 1]).float()

        return self._finite(forward)

    def _decode(self) -> list[Event]:
        reqs = list(self.active)
        positions = [r.length - 1 for r in reqs]
        last_ids = [r.out[-1] for r in reqs]

        def forward() -> torch.Tensor:
            if self.fused is not None and (h := self.fused(last_ids, positions)) is not None:
                return self.head(h).float()
            # A compiled step's dummy rows write into the free slots, the chunked prompt's among them.
            if self.compiled is not None and self.chunking is None:
                return self.compiled(last_ids, positions)
            mask = self.cache.decode(positions, self.device)
            last = torch.tensor(last_ids, device=self.device)[:, None]
            pos = torch.tensor(positions, device=self.device)
            return self.head(self.model.hidden(last, pos[:, None], mask, self.cache)[:, -1]).float()

        try:
            logits = self._finite(forward)
        except CompileFailed as e:
            self._compile_failed(e)
            logits = self._finite(forward)
        return self._sample(reqs, logits)

    def _finite(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The logits of `forward()` (one step: it rewrites the same cache positions when run
        again). fp16 decode copies can overflow (fp16 ends at 65504) where the model's own weights
        do not; any inf or NaN reaches the logits through the residual stream and the norms. Then
        the step runs again on the model's own weights, and the engine keeps those from now on."""
        logits = forward()
        if self.fast is not None and self.fast.decode == torch.float16 and not bool(torch.isfinite(logits).all()):
            warnings.warn("fp16 decode weights overflowed (non-finite logits): this engine decodes with the model's own weights "
                          "from now on" + (", eagerly (the compiled decode step was made for the copies)" if self.compiled else ""))
            self.fast.drop_copies()
            self.compiled = None
            logits = forward()
        return logits

    def _sample(self, reqs: list[Request], logits_BV: torch.Tensor) -> list[Event]:
        events = []
        greedy = argmax_rows(logits_BV) if any(r.sp.plain_greedy for r in reqs) else None
        want = [i for i, r in enumerate(reqs) if r.sp.logprobs or r.sp.top_logprobs]
        logp = torch.log_softmax(logits_BV[want], dim=-1) if want else None
        for i, r in enumerate(reqs):
            tid = greedy[i] if r.sp.plain_greedy else sample_next(logits_BV[i], r)
            ev = Event(r.rid, tid)
            if logp is not None and i in want:
                row = logp[want.index(i)]
                ev.logprob = float(row[tid])
                if r.sp.top_logprobs:
                    v, ix = torch.topk(row, r.sp.top_logprobs)
                    ev.top_logprobs = list(zip(ix.tolist(), v.tolist()))
            r.out.append(tid)
            r.counts[tid] = r.counts.get(tid, 0) + 1
            if tid in r.stop_ids:
                ev.text = self._flush(r)
                ev.finish_reason = "stop"
            else:
                ev.text, hit = self._detok(r)
                if hit:
                    ev.finish_reason = "stop"
                elif len(r.out) >= r.sp.max_new_tokens or r.length >= self.max_len:
                    ev.text += self._flush(r)
                    ev.finish_reason = "length"
            events.append(ev)
            if ev.finish_reason:
                self._release(r)
        return events

    def _release(self, r: Request) -> None:
        i = self.active.index(r)
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.cache.move(last, i, moved.length)
            self.active[i] = moved
        self.active.pop()
        if self.chunking is not None and self._chunk_done:  # its slot follows the active ones'
            self.cache.move(last + 1, last, self._chunk_done)

    # ---- text ---------------------------------------------------------------------------
    def _detok(self, r: Request) -> tuple[str, bool]:
        """New complete text after the latest token, holding back what might start a stop string."""
        prefix = self.tok.decode(r.out[r.prefix_offset : r.read_offset])
        full = self.tok.decode(r.out[r.prefix_offset :])
        if full.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for more bytes
            return "", False
        new_text, start = full[len(prefix) :], len(r.text)
        r.text += new_text
        r.prefix_offset, r.read_offset = r.read_offset, len(r.out)
        # The earliest stop string wins. Each matcher reads every new character once (KMP), so a
        # stop string of length L costs O(L) per request, not O(L^2) per token.
        hits = [at for m in r.stops if (at := m.feed(new_text, start)) != -1]
        if hits:
            r.text = r.text[: min(hits)]
            out = r.text[r.emitted :]
            r.emitted = len(r.text)
            return out, True
        hold = max((m.state for m in r.stops), default=0)  # the longest stop-string prefix the text ends with
        out = r.text[r.emitted : len(r.text) - hold]
        r.emitted += len(out)
        return out, False

    def _flush(self, r: Request) -> str:
        """At the end: whatever text is still held back (stop-string prefixes, not broken UTF-8)."""
        out_ids = [t for t in r.out if t not in r.stop_ids]
        text = self.tok.decode(out_ids).rstrip("\ufffd") if out_ids else ""
        if len(text) > len(r.text):
            r.text = text
        out = r.text[r.emitted :]
        r.emitted = len(r.text)
        return out
