"""What a request asks for and how its next token is drawn: SamplingParams, the per-request state
(its own RNG, penalty counts, detokenization offsets, stop matchers), penalties, temperature /
top-k / top-p, and stop strings matched as the text grows.

Sampling per request: greedy, temperature, top-k, top-p, repetition / frequency / presence
penalties, a seed (each request owns its generator, so its text does not depend on what else is in
the batch). Stop strings may span tokens: text that could begin one is held back until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


class Request:
    """One request's state inside the engine: its prompt and output ids, sampling generator and
    penalty counts, detokenization offsets and stop matchers."""

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
        self.stops = [StopMatcher(x) for x in sp.stop]
        self.cancelled = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


class StopMatcher:
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


def argmax_rows(logits_BV: torch.Tensor) -> list[int]:
    """Each row's greedy token. CPU fp32 rows go through numpy, whose argmax over a 49k vocabulary
    takes ~5 us where torch's takes ~50 (a decode step's whole Python side is ~300 us); both
    return the first of tied maxima and a NaN's index."""
    if logits_BV.device.type == "cpu" and logits_BV.dtype == torch.float32 and not logits_BV.requires_grad:
        return logits_BV.numpy().argmax(-1).tolist()
    return logits_BV.argmax(-1).tolist()


def penalized_logits(logits_V: torch.Tensor, r: Request) -> torch.Tensor:
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


def top_k_probs(logits_V: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """softmax(logits / temperature) over the `top_k` most likely tokens (0 = all), the others 0."""
    logits = logits_V / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sampling_probs(logits_V: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from (temperature > 0): softmax(logits / T) restricted to
    the top-k tokens, then to the smallest set of most likely tokens holding top_p of the mass
    (Holtzman et al. 2019), unnormalised (torch.multinomial normalises)."""
    probs = top_k_probs(logits_V, sp.temperature, sp.top_k)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return probs


def sample_next(logits_V: torch.Tensor, r: Request) -> int:
    logits = penalized_logits(logits_V, r)
    if r.sp.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, r.sp), 1, generator=r.gen))
