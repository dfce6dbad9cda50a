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
- Linear layers run on copies of the weights made for speed (`FastLinears`): on the CPU, reordered
  once into oneDNN's blocked layout, and optionally (`decode_weights`) in bf16 / fp16 / int8 / int4 for
  decode steps of a few streams, whose time is the weight bytes they read.

`Engine.generate(prompts, sampling)` is a plain iterator (rollouts, evaluation, CLI);
`EngineLoop` runs the same scheduler in a background thread for the server.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .model import GPT, decode_attention_by_matmuls
from .tokenizer import Tokenizer


MIN_TEMPERATURE = 1e-4  # smallest positive temperature; below it logits / T overflow (0 means greedy)
MAX_STOP_CHARS = 256  # longest stop string


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
        if isinstance(self.stop, str):  # OpenAI accepts a single string too
            self.stop = [self.stop]
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / 1e-6 overflow to inf, softmax to NaN
            raise ValueError(f"temperature={self.temperature} is below {MIN_TEMPERATURE}: use 0 for greedy decoding")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty={self.presence_penalty} must be in [-2, 2]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: a stop string of {max(len(s) for s in self.stop)} characters; at most {MAX_STOP_CHARS} each")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative token ids")

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: no penalty can change the choice."""
        return self.temperature == 0 and self.repetition_penalty == 1.0 and not self.frequency_penalty and not self.presence_penalty


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
        self.prompt_set = set(prompt) if sp.repetition_penalty != 1.0 else set()
        # detokenization state
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of self.text already emitted
        self.stops = [_StopMatcher(x) for x in sp.stop]
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
        self._prefill = True
        self._offset = 0  # prefill: positions before this are already in the rows (a cached prefix)
        self._at: int | None = None  # decode, every row at the same position: a plain slice write
        self._rows_idx: torch.Tensor | None = None  # decode, rows at different positions: (B,) indices
        self._pos: torch.Tensor | None = None  # and their (B,) write positions
        self._read = 0

    def prefill(self, start: int, n: int, offset: int = 0) -> None:
        """The next forward fills rows start..start+n from position `offset` on."""
        self._rows, self._prefill, self._offset = slice(start, start + n), True, offset

    def decode(self, positions: list[int], device) -> None:
        """The next forward writes row i's new key at positions[i] and reads positions < max + 1."""
        n = len(positions)
        self._rows, self._prefill, self._read = slice(0, n), False, max(positions) + 1
        if min(positions) == self._read - 1:
            self._at = self._read - 1
        else:
            self._at = None
            self._rows_idx = torch.arange(n, device=device)
            self._pos = torch.tensor(positions, device=device)

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        kc, vc = self.k[layer, self._rows], self.v[layer, self._rows]
        if self._prefill:
            o, T = self._offset, k_BKTD.shape[2]
            kc[:, :, o : o + T] = k_BKTD
            vc[:, :, o : o + T] = v_BKTD
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
        if decode_attention_by_matmuls(k):
            # model.attend decodes 4+ bf16 rows with plain matmuls, which run ~4x slower on this
            # strided slice of the cache than on a contiguous copy (measured 1.33 ms vs 0.35 ms for
            # 16 rows, 320 positions; the copy costs 0.05 ms). The fused kernel used otherwise reads
            # strides fine.
            k, v = k.contiguous(), v.contiguous()
        return k, v

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _cast_linear(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """fn (a linear layer held in `dtype`) on x converted to `dtype`, the answer back in x's dtype."""
    return fn(x.to(dtype)).to(x.dtype)


DECODE_WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "int4": torch.quint4x2}
# Matmuls of at most this many rows (decode steps of that many streams) use the decode copies:
# where they stop paying. All of SmolLM2-135M's matmuls once, 2 AVX2 cores, ms for 1 / 2 / 4 / 8
# rows (`python benchmarks/decode_matmuls.py`): fp32 packed 23.9 / 27.6 / 29.7 / 36.5, fp16
# 14.8 / 25.3 / 47.5 / 92.2, bf16 18.3 / 30.3 / 56.7 / 111.8, int8 15.0 / 16.8 / 21.1 / 39.6;
# 2 cores with AMX: bf16 15.1 / 14.9 / 15.1 / 15.5, int4 5.8 / 6.7 / 8.8 / 15.8 (fp32 packed 30.0 at 8).
FEW_ROWS = {"bf16": 2, "fp16": 2, "int8": 4, "int4": 8}


# The int8/int4 kernels' activations: bf16 (inputs and outputs rounded to it, fp32 sums). With fp32
# ones they ran 2-15x slower, which would leave no reason to use them.
KERNEL_ACT = torch.bfloat16


class _Quantized:
    """An int8/int4 decode copy's forward, and `emulate`, the same arithmetic as one fp32 matmul on
    its dequantized weights (made on first use): the kernels are made for a few rows and crawl at
    the thousands a whole text has when Engine.score measures the decode path."""

    def __init__(self, kernel: Callable, w: torch.Tensor, b: torch.Tensor | None, fmt: str):
        self.kernel, self.w, self.b, self.fmt = kernel, w, b, fmt
        self.deq: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        from .quantize import emulated_linear, int4_dequantized, int8_dequantized

        if self.deq is None:
            self.deq = (int4_dequantized if self.fmt == "int4" else int8_dequantized)(self.w, KERNEL_ACT)
        return emulated_linear(x, self.deq, self.b, KERNEL_ACT)


class FastLinears:
    """Copies of a model's linear weights in the layouts and formats that run fastest, used by the
    engine in place of the model's own nn.Linear weights.

    - Many rows (prefills, large decode batches): on the CPU, oneDNN copies reordered once into its
      blocked layout. Few-row bf16 matmuls ran 2-4x faster there than on aten's default path and a
      prefill no slower (benchmarks/README.md); same computation, another summation order. A bf16
      model on a CPU without native bf16 (AVX2) gets fp32 copies here: its prefill matmuls run at
      the fp32 rate (measured 90 vs 16 GFLOP/s, 256 x 576 x 1536, 2 cores) instead of emulated bf16,
      while its decode steps of a few streams keep its own bf16 weights (bandwidth-bound: fast).
    - Few rows (decode steps of at most FEW_ROWS streams), with `decode_weights`: copies in bf16,
      fp16, int8 (one scale per output channel) or int4 (a scale and minimum per 32 weights;
      quantize.py), the output layer excepted in an fp32 model (fp32 logits: half-precision ones
      flip near-tied tokens; in a bf16 model it goes to int8 with int4 copies). The int8/int4
      kernels take bf16 activations. One decode step reads every weight once, so its time is
      the bytes read: on a 2-core AVX2 CPU, SmolLM2-135M's matmuls took 23.9 ms per token in packed
      fp32 (38.8 in aten's fp32, which used one core) against 18.3 (bf16), 14.8 (fp16) and 15.0
      (int8); on a 2-core CPU with AMX 15.1 (bf16), 11.6 (int8) and 5.8 (int4, all layers).
      Answers of decode steps then carry that rounding (int4 copies of weights that are 4-bit
      already, as a GGUF Q4_1 import's blocks are, only the bf16 rounding of their scales);
      prefills stay exact.

    Memory: the packed copies hold as much as the weights they copy (fp32 ones for a bf16 model on
    AVX2: twice its weight memory), and decode copies half (fp16, bf16), a quarter (int8) or about
    an eighth (int4) of the fp32 size more; for SmolLM2-135M in fp32, 540 MB packed + 270 MB fp16
    beside its own 540 MB.

    The model is not changed: `installed()` points its nn.Linear modules at the copies only for
    the duration of one engine step (oneDNN tensors cannot be deep-copied or saved, and training
    must see plain modules). A weight that changed since it was copied (an optimizer step between
    PPO rollouts, load_state_dict, .to()) is copied again before the step."""

    def __init__(self, model: GPT, pack: bool, decode_weights: str | None = None):
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        if decode_weights is not None and decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights={decode_weights!r}; expected one of {', '.join(DECODE_WEIGHTS)} or None")
        if decode_weights in ("int8", "int4"):
            from .quantize import check_kernel

            check_kernel(decode_weights, self.device)
        self.decode = None if decode_weights is None or DECODE_WEIGHTS[decode_weights] == self.dtype else DECODE_WEIGHTS[decode_weights]
        # the dtype of the many-row copies: the model's, or fp32 where its dtype has no packed kernel
        self.compute = None
        if pack:
            self.compute = next((d for d in (self.dtype, torch.float32) if self.available(self.device, d)), None)
            if self.compute is None:
                raise ValueError(f"packed linears need the CPU and oneDNN; got {self.device}, {self.dtype}")
        self.few_rows = FEW_ROWS[decode_weights] if self.decode is not None else 0
        own = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype)
        if self.decode is None and self.compute not in (None, self.dtype) and own:
            self.few_rows = FEW_ROWS[own]  # few rows keep the model's own half-precision weights: bandwidth-bound, half the bytes
        self.linears = [m for m in model.modules() if type(m) is nn.Linear]
        self.force_few = False  # every matmul on the few-row path (set by installed(force_few=True))
        self._signature: list | None = None
        self._forwards: list[Callable] = []
        self.head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    @functools.cache
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this torch build and CPU run oneDNN linears natively in `dtype` (probed once on a tiny layer)."""
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
            return False
        try:
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return False
            w = torch.ones(4, 8, dtype=dtype)
            y = _mkldnn_linear(torch.ones(2, 8, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(w, None), None)
            return bool((y == 8).all())
        except (AttributeError, RuntimeError, NotImplementedError):  # op missing from this build, or no kernel for this CPU
            return False

    def _current(self) -> list:
        def sig(t: torch.Tensor | None):
            if t is None:
                return None
            return (t.data_ptr(), t.dtype, None if t.is_inference() else t._version)

        return [(sig(m.weight), sig(m.bias)) for m in self.linears] + [sig(self.model.output_weight())]

    def _linear(self, w: torch.Tensor, b: torch.Tensor | None, output: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward of one linear layer on its copies; `output` = the output layer (logits)."""
        w, b = w.detach(), None if b is None else b.detach()
        many = functools.partial(F.linear, weight=w, bias=b)
        if self.compute is not None:
            packed = functools.partial(
                _mkldnn_linear, weight=torch.ops.mkldnn._reorder_linear_weight(w.to(self.compute), None), bias=None if b is None else b.to(self.compute)
            )
            many = packed if self.compute == self.dtype else functools.partial(_cast_linear, fn=packed, dtype=self.compute)
        if self.few_rows == 0:
            return many
        if self.decode is None:  # a half-precision model whose many-row copies are fp32
            return functools.partial(self._route, many=many, few=functools.partial(F.linear, weight=w, bias=b))
        if output and self.dtype == torch.float32:
            # The output layer keeps the model's fp32 weights: the logits are where rounding flips
            # near-tied tokens (SmolLM2's "The"/"L" at 25.33/25.24 after "capital of France?"),
            # and `chatforge eval fidelity` measured half-precision logits out of its bounds.
            return many
        if self.decode == torch.int8 or (self.decode == torch.quint4x2 and output):
            # int4 copies of a half-precision model keep the output layer in int8 (GGUF files
            # keep it at 8 bits or more too: SmolLM2's Q4_1 file has it in Q8_0)
            from .quantize import int8_linear, int8_weights

            q, scale = int8_weights(w)
            few = _Quantized(functools.partial(int8_linear, qweight=q, qscale=scale.to(KERNEL_ACT), bias=b), w, b, "int8")
        elif self.decode == torch.quint4x2:
            from .quantize import int4_linear, int4_weights

            packed = int4_weights(w)
            if packed is None:  # a shape the int4 kernel does not take: this layer decodes on its own weights
                return many
            few = _Quantized(functools.partial(int4_linear, packed=packed[0], scales_zeros=packed[1].to(KERNEL_ACT), bias=b), w, b, "int4")
        else:
            hw, hb = w.to(self.decode), None if b is None else b.to(self.decode)
            if self.available(self.device, self.decode):
                fn = functools.partial(_mkldnn_linear, weight=torch.ops.mkldnn._reorder_linear_weight(hw, None), bias=hb)
            else:
                fn = functools.partial(F.linear, weight=hw, bias=hb)
            few = functools.partial(_cast_linear, fn=fn, dtype=self.decode)
        return functools.partial(self._route, many=many, few=few)

    def _route(self, x: torch.Tensor, many: Callable, few: Callable) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.force_few and rows > FEW_ROWS["int4"] and isinstance(few, _Quantized):
            return few.emulate(x)
        return few(x) if self.force_few or rows <= self.few_rows else many(x)

    def refresh(self) -> None:
        """Copy again whatever weights changed since the last copies were made."""
        sig = self._current()
        if sig != self._signature:
            self._forwards = [self._linear(m.weight, m.bias) for m in self.linears]
            self.head = self._linear(self.model.output_weight(), None, output=True)
            self._signature = sig

    def drop_copies(self) -> None:
        """Decode on the model's own weights from now on (the copies stay installed if they were)."""
        self.decode, self.few_rows, self._signature = None, 0, None
        installed = bool(self.linears) and "forward" in self.linears[0].__dict__
        self.refresh()
        if installed:
            self._install()

    def _install(self) -> None:
        for m, fwd in zip(self.linears, self._forwards):
            m.__dict__["forward"] = fwd  # an instance attribute shadows nn.Linear.forward

    @contextmanager
    def installed(self, force_few: bool = False):
        """The model's linear layers on the copies for one step; `force_few` puts every matmul on
        the few-row path (Engine.score's decode path)."""
        self.refresh()
        self._install()
        self.force_few = force_few
        try:
            yield
        finally:
            self.force_few = False
            for m in self.linears:
                m.__dict__.pop("forward", None)


class PrefixCache:
    """Keys and values of the most recent prompt's first `capacity` tokens, so the next prompts
    that begin the same way skip computing that part: a chat template's system prompt shared by
    every request, or the history a multi-turn chat sends again each turn.

    Keys and values depend only on the tokens and their positions from 0, so a prefix computed
    in one slot is valid in any other. They do depend on the weights: use this only for a model
    that does not change while the engine lives (serving, chatting), never for PPO rollouts."""

    def __init__(self, cache: SlotCache, capacity: int, min_tokens: int = 8):
        L, _, K, _, D = cache.k.shape
        self.capacity, self.min_tokens = min(capacity, cache.max_len), min_tokens
        self.k = torch.zeros(L, K, self.capacity, D, device=cache.k.device, dtype=cache.k.dtype)
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
        self.k[:, :, :n] = cache.k[:, slot, :, :n]
        self.v[:, :, :n] = cache.v[:, slot, :, :n]
        self.tokens = list(prompt[:n])

    def load(self, cache: SlotCache, rows: slice, n: int) -> None:
        """Copy the first n stored positions into cache rows `rows`."""
        cache.k[:, rows, :, :n] = self.k[:, None, :, :n]
        cache.v[:, rows, :, :n] = self.v[:, None, :, :n]
        self.hit_tokens += n * (rows.stop - rows.start)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


PREFILL_TOKENS = 8192  # padded tokens per prefill step (a single longer prompt still goes alone)


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
    ):
        """`max_seq_len` bounds prompt + output per request (default: the model's context, at most
        2048); the KV cache holds max_batch x max_seq_len positions.
        `decode_weights` "bf16" | "fp16" | "int8" | "int4" multiplies decode steps of a few streams (FEW_ROWS)
        by copies of the weights in that format (FastLinears: fewer bytes per token, rounded
        answers); None = the model's own weights.
        `packed` runs many-row matmuls on oneDNN-packed weight copies (FastLinears); None = wherever
        available (the CPU, in the model's dtype or else fp32).
        `prefix_cache` > 0 keeps that many tokens of the latest prompt's keys/values to reuse for
        prompts that start the same way (PrefixCache; only for weights that do not change)."""
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2")
        self.model, self.tok = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        if p.device != self.device:
            self.model.to(self.device)
        self.dtype = p.dtype
        self.max_len = min(max_seq_len or 2048, model.cfg.max_seq_len)
        self.cache = SlotCache(model, max_batch, self.max_len, self.device, self.dtype)
        if prefix_cache < 0:
            raise ValueError(f"prefix_cache={prefix_cache} must be >= 0 tokens")
        self.prefix = PrefixCache(self.cache, prefix_cache) if prefix_cache else None
        self.max_batch = max_batch
        self.stop_ids = set(tokenizer.stop_ids())
        can_pack = any(FastLinears.available(self.device, d) for d in (self.dtype, torch.float32))
        if packed and not can_pack:
            raise ValueError(f"packed=True needs the CPU and a torch build with oneDNN; got {self.device}, {self.dtype}")
        pack = can_pack if packed is None else packed
        self.fast = FastLinears(self.model, pack, decode_weights) if pack or decode_weights is not None else None
        if self.fast is not None:
            self.fast.refresh()  # now rather than in the first request's time to first token
        self.active: list[_Request] = []
        self.waiting: list[_Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

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
        with self.fast.installed(force_few=decode_path) if self.fast is not None else nullcontext():
            return self.head(self.model.hidden(ids_BT.to(self.device))).float()

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

    def abort_all(self) -> None:
        """Drop every request at once, without events (a caller that stopped listening)."""
        with self._lock:
            self.waiting.clear()
            self.active.clear()

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

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

    # ---- one scheduler step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                events.append(Event(r.rid, None, finish_reason="cancelled"))
            joining = self._joiners(self.max_batch - len(self.active))
            del self.waiting[: len(joining)]
        for r in [r for r in self.active if r.cancelled]:
            events.append(Event(r.rid, None, finish_reason="cancelled"))
            self._release(r)
        if not (joining or self.active):
            return events
        with self.fast.installed() if self.fast is not None else nullcontext():
            if joining:
                events += self._prefill(joining)
            else:
                events += self._decode()
        return events

    def _joiners(self, free: int) -> list[_Request]:
        """The waiting requests (in order) to prefill together in this step: as many as there are
        free slots, stopping at one that would make the right-padded batch more than twice its
        real tokens or exceed PREFILL_TOKENS (it joins at the next step). Bounds wasted compute on
        padding and how long one prefill stalls the running streams."""
        group: list[_Request] = []
        real = longest = 0
        for r in self.waiting[:free]:
            n = len(r.prompt)
            padded = (len(group) + 1) * max(longest, n)
            if group and (padded > 2 * (real + n) or padded > PREFILL_TOKENS):
                break
            group.append(r)
            real, longest = real + n, max(longest, n)
        return group

    def _prefill(self, reqs: list[_Request]) -> list[Event]:
        start, n, dev = len(self.active), len(reqs), self.device
        # Positions 0..P-1 come from the prefix cache when every prompt of the group starts with it.
        P = self.prefix.match([r.prompt for r in reqs]) if self.prefix is not None else 0
        if P:
            self.prefix.load(self.cache, slice(start, start + n), P)
        lens = [len(r.prompt) - P for r in reqs]
        T = max(lens)
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt[P:])
        pos = torch.arange(P, P + T, device=dev).expand(n, T)
        mask = None  # no padding and no prefix: plain causal attention takes the faster kernel
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

        logits = self._finite(forward)
        if self.prefix is not None:
            self.prefix.store(reqs[0].prompt, self.cache, start)
        self.active += reqs
        return self._sample(reqs, logits)

    def _decode(self) -> list[Event]:
        reqs = list(self.active)
        positions = [r.length - 1 for r in reqs]
        last = torch.tensor([[r.out[-1]] for r in reqs], device=self.device)
        pos = torch.tensor(positions, device=self.device)

        def forward() -> torch.Tensor:
            self.cache.decode(positions, self.device)
            mask = None  # every row at the same position attends to all of 0..pos: no mask needed
            if self.cache._at is None:
                mask = (torch.arange(self.cache._read, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
            return self.head(self.model.hidden(last, pos[:, None], mask, self.cache)[:, -1]).float()

        return self._sample(reqs, self._finite(forward))

    def _finite(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The logits of `forward()` (one step: it rewrites the same cache positions when run
        again). fp16 decode copies can overflow (fp16 ends at 65504) where the model's own weights
        do not; any inf or NaN reaches the logits through the residual stream and the norms. Then
        the step runs again on the model's own weights, and the engine keeps those from now on."""
        logits = forward()
        if self.fast is not None and self.fast.decode == torch.float16 and not bool(torch.isfinite(logits).all()):
            warnings.warn("fp16 decode weights overflowed (non-finite logits): this engine decodes with the model's own weights from now on")
            self.fast.drop_copies()
            logits = forward()
        return logits

    def _sample(self, reqs: list[_Request], logits_BV: torch.Tensor) -> list[Event]:
        events = []
        greedy = logits_BV.argmax(-1).tolist() if any(r.sp.plain_greedy for r in reqs) else None
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

    def _flush(self, r: _Request) -> str:
        """At the end: whatever text is still held back (stop-string prefixes, not broken UTF-8)."""
        out_ids = [t for t in r.out if t not in r.stop_ids]
        text = self.tok.decode(out_ids).rstrip("\ufffd") if out_ids else ""
        if len(text) > len(r.text):
            r.text = text
        out = r.text[r.emitted :]
        r.emitted = len(r.text)
        return out


class _StopMatcher:
    """Knuth-Morris-Pratt over a growing text: `state` is the length of the longest prefix of the
    stop string that the text read so far ends with (what must be held back)."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str, start: int) -> int:
        """Read `text` (which begins at offset `start` of the whole text); the offset where the
        first complete stop string begins, or -1."""
        s, k = self.stop, self.state
        for i, c in enumerate(text):
            while k and c != s[k]:
                k = self.fail[k - 1]
            if c == s[k]:
                k += 1
            if k == len(s):
                self.state = k
                return start + i + 1 - len(s)
        self.state = k
        return -1


def penalized_logits(logits_V: torch.Tensor, r: _Request) -> torch.Tensor:
    """Logits after the request's penalties: repetition (Keskar et al. 2019: a seen token's logit
    is divided by the penalty when positive, multiplied when negative; prompt and output count as
    seen), then frequency and presence (OpenAI: minus count * frequency + presence, output only)."""
    sp = r.sp
    logits = logits_V
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(r.prompt_set | set(r.counts)), device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.frequency_penalty or sp.presence_penalty) and r.counts:
        ids = torch.tensor(list(r.counts), device=logits.device)
        cnt = torch.tensor(list(r.counts.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.clone()
        logits[ids] -= sp.frequency_penalty * cnt + sp.presence_penalty
    return logits


def sampling_probs(logits_V: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from (temperature > 0): softmax(logits / T) restricted to
    the top-k tokens, then to the smallest set of most likely tokens holding top_p of the mass
    (Holtzman et al. 2019), unnormalised (torch.multinomial normalises)."""
    logits = logits_V / sp.temperature
    if sp.top_k:
        kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return probs


def sample_next(logits_V: torch.Tensor, r: _Request) -> int:
    logits = penalized_logits(logits_V, r)
    if r.sp.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, r.sp), 1, generator=r.gen))


class _EventQueue:
    """The events of one request: put by the engine thread, taken by one consumer, which may be a
    thread (`get`) or a coroutine on an asyncio loop (`aget`; no thread is tied up waiting)."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def put(self, item: Event | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waker = self._waker
        if waker is not None:
            try:
                waker[0].call_soon_threadsafe(waker[1].set)
            except RuntimeError:  # that event loop has closed
                pass

    def get(self) -> Event | BaseException:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    async def aget(self) -> Event | BaseException:
        if self._waker is None:
            self._waker = (asyncio.get_running_loop(), asyncio.Event())
        flag = self._waker[1]
        while True:
            flag.clear()  # cleared before looking, so a put after the look always wakes us
            with self._cond:
                if self._items:
                    return self._items.popleft()
            await flag.wait()


class _Sink:
    def __init__(self, fn: Callable[[Event | BaseException], None]):
        self.put = fn


class RequestHandle:
    """Events of one request submitted to an EngineLoop: `for ev in handle` in a thread, or
    `async for ev in handle` on an event loop. The last event has a finish_reason; a failure of
    the engine is raised from the iteration."""

    def __init__(self, loop: EngineLoop, rid: int, sink: Callable[[Event | BaseException], None] | None = None):
        self.loop, self.rid = loop, rid
        self.events: _EventQueue | _Sink = _EventQueue() if sink is None else _Sink(sink)
        self.done = False

    def _check(self, ev: Event | BaseException) -> Event:
        if isinstance(ev, BaseException):
            self.done = True
            raise ev
        if ev.finish_reason:
            self.done = True
        return ev

    def __iter__(self) -> Iterator[Event]:
        if not isinstance(self.events, _EventQueue):
            raise TypeError("this request delivers its events to a sink; it cannot be iterated")
        while not self.done:
            yield self._check(self.events.get())

    async def __aiter__(self):
        if not isinstance(self.events, _EventQueue):
            raise TypeError("this request delivers its events to a sink; it cannot be iterated")
        while not self.done:
            yield self._check(await self.events.aget())

    def cancel(self) -> None:
        self.loop.cancel(self)


class EngineLoop:
    """The engine's scheduler in a background thread, shared by many callers (the server).

    `submit` refuses new work with QueueFull when `max_waiting` requests are already queued, so
    callers can answer 503/429 instead of growing a queue without bound. `queue_depth` and
    `active_slots` are for metrics."""

    def __init__(self, engine: Engine, max_waiting: int = 64):
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} must be >= 0")
        self.engine, self.max_waiting = engine, max_waiting
        self.handles: dict[int, RequestHandle] = {}
        self._wake = threading.Event()
        self._stop = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def active_slots(self) -> int:
        return len(self.engine.active)

    def submit(
        self, prompt: Sequence[int], sampling: SamplingParams | None = None, sink: Callable[[Event | BaseException], None] | None = None
    ) -> RequestHandle:
        """Queue a request. Its events go to the returned handle, or to `sink(event)` (called on
        the engine thread; it must not block) when one is given."""
        if self._stop:
            raise RuntimeError("the engine loop is closed")
        with self._submit_lock:  # the bound holds exactly under concurrent submitters
            if self.queue_depth >= self.max_waiting:
                raise QueueFull(f"{self.queue_depth} requests are already waiting")
            rid = next(self.engine._ids)
            h = RequestHandle(self, rid, sink)
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

    def _fail_all(self, e: BaseException) -> None:
        self.engine.abort_all()
        handles = list(self.handles.values())
        self.handles.clear()
        for h in handles:
            h.events.put(e)

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 (any failure goes to every waiting caller; the loop keeps serving)
                self._fail_all(e)
                continue
            for ev in events:
                h = self.handles.get(ev.request_id)
                if h is not None:
                    if ev.finish_reason:
                        del self.handles[ev.request_id]
                    h.events.put(ev)

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with a RuntimeError."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._fail_all(RuntimeError("the engine loop was closed"))


class QueueFull(Exception):
    """The engine's waiting queue is at its bound."""
