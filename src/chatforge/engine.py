"""The inference engine: token ids in, a stream of tokens out. Knows nothing of HTTP.

- A preallocated KV cache per slot (L, slots, K kv-heads, positions, D): grouped-query aware.
  Active requests always occupy slots 0..n-1, so a decode step attends to a plain slice of the
  cache (no gather); a finished request's slot is refilled by moving the last one into it.
- Continuous batching: requests wait in a queue, join between decode steps (their prompts are
  prefilled together, right-padded, with per-row causal masks) and leave when they finish or
  are cancelled.
- Sampling per request: greedy, temperature, top-k, top-p, repetition / frequency / presence
  penalties, a seed (each request owns its generator, so its text does not depend on what else
  is in the batch), logprobs and top-n alternatives (log-softmax of the model's logits).
- Stops: end-of-turn / end-of-text tokens, extra stop ids, stop strings that may span tokens
  (text that could begin a stop string is held back until it is decided), max_new_tokens,
  and the end of the context window.
- Incremental detokenization never emits half a UTF-8 character.

`Engine.generate(prompts, sampling)` is a plain iterator (rollouts, evaluation, CLI);
`EngineLoop` runs the same scheduler in a background thread for the server.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import GPT
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus: smallest set with this much probability
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages any token already in prompt or output
    frequency_penalty: float = 0.0  # OpenAI-style: minus this times the token's count in the output
    presence_penalty: float = 0.0  # OpenAI-style: minus this if the token appeared in the output
    max_new_tokens: int = 256  # generation length limit
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens beside the tokenizer's
    ignore_eos: bool = False  # do not stop at the tokenizer's end-of-turn/text tokens
    seed: int | None = None  # per-request RNG seed for reproducible sampling
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and this many alternatives (0-20)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            raise ValueError("frequency_penalty and presence_penalty must be in [-2, 2]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


@dataclass
class Event:
    request_id: int
    token_id: int | None  # None for a final event that carries no token (cancel, held-back text)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    text: str = ""  # newly completed text; never half a character, never part of a stop string
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last event


class _Request:
    def __init__(self, rid: int, prompt: list[int], sp: SamplingParams, stop_ids: set[int], device):
        self.rid, self.prompt, self.sp = rid, prompt, sp
        self.stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else stop_ids)
        self.out: list[int] = []
        self.gen = None
        if sp.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(sp.seed if sp.seed is not None else torch.randint(0, 2**62, ()).item())
        self.counts: dict[int, int] = {}
        # detokenization state
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of self.text already emitted
        self.cancelled = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


class SlotCache:
    """KV cache of `slots` sequences; implements model.KVCache for one forward at a time."""

    def __init__(self, model: GPT, slots: int, max_len: int, device, dtype):
        c = model.cfg
        shape = (c.n_layer, slots, c.n_kv_head, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._rows = slice(0, 0)
        self._pos: torch.Tensor | None = None  # decode: (B,) write positions
        self._read = 0

    def prefill(self, start: int, n: int) -> None:
        self._rows, self._pos, self._read = slice(start, start + n), None, 0

    def decode(self, n: int, pos: torch.Tensor, read: int) -> None:
        self._rows, self._pos, self._read = slice(0, n), pos, read

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        kc, vc = self.k[layer, self._rows], self.v[layer, self._rows]
        if self._pos is None:  # prefill from position 0: attend to what was just computed
            T = k_BKTD.shape[2]
            kc[:, :, :T] = k_BKTD
            vc[:, :, :T] = v_BKTD
            return k_BKTD, v_BKTD
        b = torch.arange(kc.shape[0], device=kc.device)
        kc[b, :, self._pos] = k_BKTD[:, :, 0]
        vc[b, :, self._pos] = v_BKTD[:, :, 0]
        return kc[:, :, : self._read], vc[:, :, : self._read]

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Engine:
    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        device: str | torch.device | None = None,
        int8: bool = False,
    ):
        """`int8=True` gives the model's linear layers int8 copies for decode steps (quantize.py;
        CPU only; changes `model` in place, so use it for serving, not for a model in training)."""
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model, self.tok = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        if p.device != self.device:
            self.model.to(self.device)
        self.dtype = p.dtype
        self.head = lambda h: torch.nn.functional.linear(h, self.model.output_weight())
        if int8:
            from .quantize import int8_decode

            self.head = int8_decode(self.model).int8_head
        self.max_len = min(max_seq_len or 2048, model.cfg.max_seq_len)
        self.cache = SlotCache(model, max_batch, self.max_len, self.device, self.dtype)
        self.max_batch = max_batch
        self.stop_ids = set(tokenizer.stop_ids())
        self.active: list[_Request] = []
        self.waiting: list[_Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

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
        rid = next(self._ids) if request_id is None else request_id
        with self._lock:
            self.waiting.append(_Request(rid, prompt, sp, self.stop_ids, self.device))
        return rid

    def cancel(self, rid: int) -> None:
        """Mark a request cancelled; its slot is freed at the next step."""
        with self._lock:
            for r in self.active + self.waiting:
                if r.rid == rid:
                    r.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None) -> Iterator[Event]:
        """Stream events for `prompts`; request_id is the prompt's index."""
        sps = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
        if self.has_work:
            raise RuntimeError("generate() needs an idle engine; use EngineLoop to share one between callers")
        for i, (p, sp) in enumerate(zip(prompts, sps)):
            self.add(p, sp, request_id=i)
        while self.has_work:
            yield from self.step()

    # ---- one scheduler step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                events.append(Event(r.rid, None, finish_reason="cancelled"))
            free = self.max_batch - len(self.active)
            joining = self.waiting[:free]
            del self.waiting[: len(joining)]
        for r in [r for r in self.active if r.cancelled]:
            events.append(Event(r.rid, None, finish_reason="cancelled"))
            self._release(r)
        if joining:
            events += self._prefill(joining)
        elif self.active:
            events += self._decode()
        return events

    def _prefill(self, reqs: list[_Request]) -> list[Event]:
        start, n = len(self.active), len(reqs)
        T = max(len(r.prompt) for r in reqs)
        ids = torch.zeros(n, T, dtype=torch.long)
        lens = torch.tensor([len(r.prompt) for r in reqs])
        for i, r in enumerate(reqs):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        pos = torch.arange(T).expand(n, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        valid = torch.arange(T)[None, :] < lens[:, None]  # (n, S): keys that are real tokens
        mask = (causal[None] & valid[:, None, :])[:, None]
        mask |= torch.eye(T, dtype=torch.bool)[None, None]  # padded queries attend to themselves: no NaN rows
        if bool((lens == T).all()):
            mask = None  # no padding: plain causal attention takes the faster kernel
        self.cache.prefill(start, n)
        h = self.model.hidden(ids.to(self.device), pos.to(self.device), None if mask is None else mask.to(self.device), self.cache)
        last = h[torch.arange(n), (lens - 1).to(self.device)]
        logits = self.head(last).float()
        self.active += reqs
        return self._sample(reqs, logits)

    def _decode(self) -> list[Event]:
        reqs = self.active
        n = len(reqs)
        last = torch.tensor([[r.out[-1]] for r in reqs], device=self.device)
        pos = torch.tensor([r.length - 1 for r in reqs], device=self.device)
        read = int(pos.max()) + 1
        mask = (torch.arange(read, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        self.cache.decode(n, pos, read)
        logits = self.head(self.model.hidden(last, pos[:, None], mask, self.cache)[:, -1]).float()
        return self._sample(list(reqs), logits)

    def _sample(self, reqs: list[_Request], logits_BV: torch.Tensor) -> list[Event]:
        events = []
        logp_all = torch.log_softmax(logits_BV, dim=-1) if any(r.sp.logprobs or r.sp.top_logprobs for r in reqs) else None
        for i, r in enumerate(reqs):
            tid = sample_next(logits_BV[i], r)
            ev = Event(r.rid, tid)
            if logp_all is not None and (r.sp.logprobs or r.sp.top_logprobs):
                ev.logprob = float(logp_all[i, tid])
                if r.sp.top_logprobs:
                    v, ix = torch.topk(logp_all[i], r.sp.top_logprobs)
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

    def _release(self, r: _Request) -> None:
        i = self.active.index(r)
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.cache.move(last, i, moved.length)
            self.active[i] = moved
        self.active.pop()

    # ---- text ---------------------------------------------------------------------------
    def _detok(self, r: _Request) -> tuple[str, bool]:
        """New complete text after the latest token, holding back what might start a stop string."""
        prefix = self.tok.decode(r.out[r.prefix_offset : r.read_offset])
        full = self.tok.decode(r.out[r.prefix_offset :])
        if full.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for more bytes
            return "", False
        r.text += full[len(prefix) :]
        r.prefix_offset, r.read_offset = r.read_offset, len(r.out)
        for s in r.sp.stop:
            at = r.text.find(s, max(0, r.emitted - len(s)))
            if at != -1:
                r.text = r.text[:at]
                out = r.text[r.emitted :]
                r.emitted = len(r.text)
                return out, True
        hold = max((k for s in r.sp.stop for k in range(1, len(s)) if r.text.endswith(s[:k])), default=0)
        out = r.text[r.emitted : len(r.text) - hold]
        r.emitted += len(out)
        return out, False

    def _flush(self, r: _Request) -> str:
        """At the end: whatever text is still held back (stop-string prefixes, not broken UTF-8)."""
        out_ids = [t for t in r.out if t not in r.stop_ids]
        text = self.tok.decode(out_ids).rstrip("\ufffd") if out_ids else ""
        if len(text) > len(r.text):
            r.text = text
        out = r.text[r.emitted :]
        r.emitted = len(r.text)
        return out


def sample_next(logits_V: torch.Tensor, r: _Request) -> int:
    sp = r.sp
    logits = logits_V
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt) | set(r.counts)), device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.frequency_penalty or sp.presence_penalty) and r.counts:
        ids = torch.tensor(list(r.counts), device=logits.device)
        cnt = torch.tensor(list(r.counts.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.clone()
        logits[ids] -= sp.frequency_penalty * cnt + sp.presence_penalty
    if sp.temperature == 0:
        return int(logits.argmax())
    logits = logits / sp.temperature
    if sp.top_k:
        kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=r.gen))


class RequestHandle:
    """Events of one request submitted to an EngineLoop; iterate to stream them."""

    def __init__(self, loop: "EngineLoop", rid: int):
        self.loop, self.rid = loop, rid
        self.events: queue.Queue[Event | BaseException] = queue.Queue()
        self.done = False

    def __iter__(self) -> Iterator[Event]:
        while not self.done:
            ev = self.events.get()
            if isinstance(ev, BaseException):
                self.done = True
                raise ev
            if ev.finish_reason:
                self.done = True
            yield ev

    def cancel(self) -> None:
        self.loop.cancel(self)


class EngineLoop:
    """The engine's scheduler in a background thread, shared by many callers (the server).

    `submit` refuses new work with QueueFull when `max_waiting` requests are already queued, so
    callers can answer 503/429 instead of growing a queue without bound."""

    def __init__(self, engine: Engine, max_waiting: int = 64):
        self.engine, self.max_waiting = engine, max_waiting
        self.handles: dict[int, RequestHandle] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def active_slots(self) -> int:
        return len(self.engine.active)

    def submit(self, prompt: Sequence[int], sampling: SamplingParams | None = None) -> RequestHandle:
        if self.queue_depth >= self.max_waiting:
            raise QueueFull(f"{self.queue_depth} requests are already waiting")
        rid = next(self.engine._ids)
        h = RequestHandle(self, rid)
        self.handles[rid] = h
        try:
            self.engine.add(prompt, sampling, request_id=rid)
        except ValueError:
            del self.handles[rid]
            raise
        self._wake.set()
        return h

    def cancel(self, h: RequestHandle) -> None:
        self.engine.cancel(h.rid)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except BaseException as e:  # hand the failure to every waiting caller, then keep serving
                for h in list(self.handles.values()):
                    h.events.put(e)
                self.handles.clear()
                self.engine.active.clear()
                self.engine.waiting.clear()
                continue
            for ev in events:
                h = self.handles.get(ev.request_id)
                if h is not None:
                    h.events.put(ev)
                    if ev.finish_reason:
                        del self.handles[ev.request_id]

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)


class QueueFull(Exception):
    """The engine's waiting queue is at its bound."""
