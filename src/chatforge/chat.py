"""Terminal front ends of the engine: `chatforge chat` (multi-turn) and `chatforge generate` (one shot)."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from .engine import Engine, SamplingParams


def load_engine(
    model: str, install: bool = False, dtype: str = "fp32", max_batch: int = 1, max_seq_len: int | None = None, int8: bool = False
) -> Engine:
    import torch

    from . import checkpoint
    from .cli import resolve_model

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype={dtype!r}; expected fp32 or bf16")
    ck = checkpoint.load(resolve_model(model, install), dtype=dt)
    return Engine(ck.model, ck.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, int8=int8)


def fit_history(engine: Engine, messages: list[dict], reserve: int) -> tuple[list[int], int]:
    """Prompt ids for the conversation, dropping the oldest non-system turns until the prompt plus
    `reserve` new tokens fits the context window. Returns (ids, number of messages dropped)."""
    dropped = 0
    while True:
        ids, _ = engine.tok.render(messages, add_generation_prompt=True)
        if len(ids) + reserve <= engine.max_len:
            return ids, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the message alone ({len(ids)} tokens) does not fit the context window of {engine.max_len} tokens")
        del messages[first]
        dropped += 1


def chat(engine: Engine, sp: SamplingParams, system: str | None = None, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """A multi-turn terminal chat. Commands: /reset, /system TEXT, /exit."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("chatforge chat: /reset clears the history, /system TEXT sets the system prompt, /exit quits", file=out)
    while True:
        print("\nyou> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(history cleared)", file=out)
            continue
        if line.startswith("/system"):
            text = line[len("/system") :].strip()
            messages = [m for m in messages if m["role"] != "system"]
            if text:
                messages.insert(0, {"role": "system", "content": text})
            print(f"(system prompt {'set' if text else 'cleared'})", file=out)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids, dropped = fit_history(engine, messages, sp.max_new_tokens)
        except ValueError as e:
            messages.pop()
            print(f"(error: {e})", file=out)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the context window)", file=out)
        print("bot> ", end="", file=out, flush=True)
        reply = ""
        for ev in engine.generate([ids], sp):
            reply += ev.text
            print(ev.text, end="", file=out, flush=True)
        print(file=out)
        messages.append({"role": "assistant", "content": reply})


def generate(engine: Engine, prompt: str, sp: SamplingParams, as_chat: bool, system: str | None, as_json: bool, out: TextIO = sys.stdout) -> dict:
    tok = engine.tok
    if as_chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids, _ = tok.render(msgs, add_generation_prompt=True)
    else:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    t0 = time.perf_counter()
    text, n, finish, first = "", 0, None, None
    for ev in engine.generate([ids], sp):
        if first is None:
            first = time.perf_counter() - t0
        n += ev.token_id is not None
        text += ev.text
        finish = ev.finish_reason or finish
        if not as_json:
            print(ev.text, end="", file=out, flush=True)
    elapsed = time.perf_counter() - t0
    result = {
        "text": text, "finish_reason": finish,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        "time_to_first_token_s": round(first or 0.0, 4), "seconds": round(elapsed, 4),
    }
    if as_json:
        print(json.dumps(result, ensure_ascii=False), file=out)
    else:
        print(file=out)
    return result
