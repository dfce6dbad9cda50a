"""Admission control per API key: requests and tokens per minute, concurrency, token quota.

Windows are sliding 60 s windows kept in memory (one server process; the quota itself is in
the store, so it survives restarts). Tokens are reserved when a request is admitted (its prompt
plus max_tokens for each choice, as OpenAI estimates) and settled to the real count when it ends,
so a burst of long requests cannot overrun a tokens-per-minute limit while they are still running.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..store import KeyInfo

WINDOW_S = 60.0


class Rejected(Exception):
    """A request refused by admission control; maps to an OpenAI 429 error."""

    def __init__(self, message: str, code: str, type_: str, retry_after: float | None):
        super().__init__(message)
        self.message, self.code, self.type, self.retry_after = message, code, type_, retry_after


@dataclass
class _KeyState:
    requests: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (time, settled tokens)
    reserved: int = 0  # tokens held by requests still running
    inflight: int = 0


class Reservation:
    """What an admitted request holds; `settle` exactly once when it ends."""

    def __init__(self, limiter: "RateLimiter", key_id: int | None, tokens: int):
        self.limiter, self.key_id, self.tokens = limiter, key_id, tokens
        self.settled = False

    def settle(self, used_tokens: int) -> None:
        if not self.settled:
            self.settled = True
            self.limiter._settle(self, used_tokens)


class RateLimiter:
    def __init__(self, max_concurrent_per_key: int, clock=time.monotonic):
        self.max_concurrent = max_concurrent_per_key
        self.clock = clock
        self._keys: dict[int | None, _KeyState] = {}
        self._lock = threading.Lock()

    def admit(self, key: KeyInfo | None, tokens: int) -> Reservation:
        """Admit a request that may use `tokens` tokens, or raise Rejected."""
        key_id = None if key is None else key.id
        with self._lock:
            now = self.clock()
            st = self._keys.setdefault(key_id, _KeyState())
            _expire(st, now)
            if key is not None and key.quota_tokens is not None and key.tokens_used >= key.quota_tokens:
                raise Rejected(
                    f"API key {key.prefix}... has used its quota of {key.quota_tokens} tokens "
                    f"({key.tokens_used} used); ask for a larger quota or a new key",
                    "insufficient_quota", "insufficient_quota", None,
                )
            if st.inflight >= self.max_concurrent:
                raise Rejected(
                    f"too many concurrent requests for this key ({st.inflight} running, limit {self.max_concurrent}); retry shortly",
                    "rate_limit_exceeded", "requests", 1.0,
                )
            if key is not None and key.rpm is not None and len(st.requests) >= key.rpm:
                wait = st.requests[0] + WINDOW_S - now
                raise Rejected(
                    f"rate limit reached: {key.rpm} requests per minute; retry in {math.ceil(wait)} s",
                    "rate_limit_exceeded", "requests", wait,
                )
            if key is not None and key.tpm is not None:
                if tokens > key.tpm:
                    raise Rejected(
                        f"request too large: it may use {tokens} tokens (prompt + max_tokens x n) but the key's "
                        f"limit is {key.tpm} tokens per minute; lower max_tokens",
                        "rate_limit_exceeded", "tokens", None,
                    )
                used = sum(t for _, t in st.tokens) + st.reserved
                if used + tokens > key.tpm:
                    wait = (st.tokens[0][0] + WINDOW_S - now) if st.tokens else 1.0
                    raise Rejected(
                        f"rate limit reached: {key.tpm} tokens per minute ({used} used or reserved, this request "
                        f"may use {tokens}); retry in {math.ceil(wait)} s",
                        "rate_limit_exceeded", "tokens", wait,
                    )
            st.requests.append(now)
            st.inflight += 1
            st.reserved += tokens
            return Reservation(self, key_id, tokens)

    def _settle(self, r: Reservation, used_tokens: int) -> None:
        with self._lock:
            st = self._keys[r.key_id]
            st.inflight -= 1
            st.reserved -= r.tokens
            if used_tokens:
                st.tokens.append((self.clock(), used_tokens))
            assert st.inflight >= 0 and st.reserved >= 0

    def inflight(self, key_id: int | None) -> int:
        with self._lock:
            st = self._keys.get(key_id)
            return 0 if st is None else st.inflight


def _expire(st: _KeyState, now: float) -> None:
    while st.requests and st.requests[0] <= now - WINDOW_S:
        st.requests.popleft()
    while st.tokens and st.tokens[0][0] <= now - WINDOW_S:
        st.tokens.popleft()


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """Retry-After in whole seconds (at least 1), as HTTP wants it."""
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}
