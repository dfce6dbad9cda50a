"""`chatforge usage`: tokens and cost per key and model from the usage ledger."""

from __future__ import annotations

import datetime as dt

from ..store import Store, UsageLine, parse_since


def cost(line: UsageLine, price_prompt: float, price_completion: float) -> float:
    """Dollars (or any currency) at the given prices per 1,000 tokens."""
    return line.prompt_tokens / 1000 * price_prompt + line.completion_tokens / 1000 * price_completion


def report(store: Store, key: str | None = None, since: str | None = None,
           price_prompt: float = 0.0, price_completion: float = 0.0) -> str:
    if price_prompt < 0 or price_completion < 0:
        raise ValueError("prices per 1k tokens must be >= 0")
    key_id = store.find_key(key).id if key else None
    when: dt.datetime | None = parse_since(since) if since else None
    lines = store.usage(key_id=key_id, since=when)
    priced = price_prompt > 0 or price_completion > 0
    head = f"{'key':24s} {'model':40s} {'requests':>9s} {'prompt':>12s} {'completion':>12s} {'total':>12s}"
    out = [head + (f" {'cost':>12s}" if priced else ""), "-" * (len(head) + (13 if priced else 0))]
    tot = UsageLine(None, None, "", 0, 0, 0)
    for ln in lines:
        who = f"{ln.key_id}:{ln.key_name}" if ln.key_id is not None else "(anonymous)"
        row = (f"{who[:24]:24s} {ln.model[:40]:40s} {ln.requests:9d} {ln.prompt_tokens:12d} {ln.completion_tokens:12d} "
               f"{ln.prompt_tokens + ln.completion_tokens:12d}")
        out.append(row + (f" {cost(ln, price_prompt, price_completion):12.4f}" if priced else ""))
        tot.requests += ln.requests
        tot.prompt_tokens += ln.prompt_tokens
        tot.completion_tokens += ln.completion_tokens
    out.append("-" * len(out[1]))
    row = (f"{'total':24s} {'':40s} {tot.requests:9d} {tot.prompt_tokens:12d} {tot.completion_tokens:12d} "
           f"{tot.prompt_tokens + tot.completion_tokens:12d}")
    out.append(row + (f" {cost(tot, price_prompt, price_completion):12.4f}" if priced else ""))
    if since:
        out.append(f"since {when:%Y-%m-%d %H:%M:%S} UTC")
    return "\n".join(out)
