"""Terminal front ends of the engine: `chatforge chat` (multi-turn) and `chatforge generate` (one shot)."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from . import checkpoint, dtypes
from .convert.registry import resolve
from .engine import Engine, SamplingParams
from .engine.compiled import warm_report

HELP = "commands: /reset clears the history, /system TEXT sets the system prompt (/system alone clears it), /exit quits"


def load_engine(
    model: str, install: bool = False, dtype: str = "auto", max_batch: int = 1, max_seq_len: int | None = None,
    decode_weights: str = "auto", compile_decode: bool = False, kv_cache: str = "auto",
) -> Engine:
    """An engine on a checkpoint folder or a known model name (imported on first use); with
    `compile_decode` its decode step is compiled here (the seconds go to stderr)."""
    path = resolve(model, install)
    dt, copies = checkpoint.inference_mode(path, dtype, decode_weights, "cpu")
    ck = checkpoint.load(path, dtype=dtypes.torch_dtype(dt))
    # Each turn sends the whole history again: the prefix cache computes only what is new.
    engine = Engine(ck.model, ck.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, prefix_cache=ck.model.cfg.max_seq_len,
                    decode_weights=copies, compile_decode=compile_decode, kv_cache=kv_cache)
    if compile_decode:
        print("compiling the decode step ...", end="", file=sys.stderr, flush=True)
        print(f" {warm_report(engine.warm())}", file=sys.stderr, flush=True)
    return engine


def fit_history(engine: Engine, messages: list[dict], reserve: int) -> tuple[list[int], int]:
    """Prompt ids for the conversation, dropping the oldest turns (a user message and the replies
    after it; the system prompt stays) until the prompt plus `reserve` new tokens fits the context
    window. Edits `messages` in place; returns (ids, number of messages dropped)."""
    dropped = 0
    while True:
        ids, _ = engine.tok.render(messages, add_generation_prompt=True)
        if len(ids) + reserve <= engine.max_len:
            return ids, dropped
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(
                f"the message alone takes {len(ids)} tokens; with {reserve} new tokens it does not fit the context window "
                f"of {engine.max_len} tokens (shorten it or lower --max-new-tokens)"
            )
        end = first + 1  # the oldest turn: its user message and every reply up to the next user message
        while end < len(messages) - 1 and messages[end]["role"] != "user":
            end += 1
        dropped += end - first
        del messages[first:end]


def _read_line(inp: TextIO, out: TextIO, prompt: str) -> str | None:
    """One line of input, None at end of input. A terminal gets line editing via `input()`."""
    if inp is sys.stdin and out is sys.stdout and inp.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    print(prompt, end="", file=out, flush=True)
    line = inp.readline()
    return line.rstrip("\n") if line else None


def chat(engine: Engine, sp: SamplingParams, system: str | None = None, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> list[dict]:
    """A multi-turn terminal chat with streaming replies. Ctrl-C stops a reply (the part shown is
    kept); Ctrl-C at the prompt, Ctrl-D or /exit quits. Returns the conversation."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"chatforge chat ({engine.max_len}-token context). {HELP}", file=out)
    while True:
        try:
            line = _read_line(inp, out, "\nyou> ")
        except KeyboardInterrupt:
            print(file=out)
            break
        if line is None:
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            break
        if cmd == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(history cleared)", file=out)
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            text = cmd[len("/system") :].strip()
            messages = [m for m in messages if m["role"] != "system"]
            if text:
                messages.insert(0, {"role": "system", "content": text})
            print(f"(system prompt {'set' if text else 'cleared'})", file=out)
            continue
        if cmd.startswith("/") and cmd.split()[0] in ("/help", "/?"):
            print(HELP, file=out)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids, dropped = fit_history(engine, messages, min(sp.max_new_tokens, engine.max_len // 2))
        except ValueError as e:
            messages.pop()
            print(f"(error: {e})", file=out)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the {engine.max_len}-token context window)", file=out)
        print("bot> ", end="", file=out, flush=True)
        reply, finish = "", None
        try:
            for ev in engine.generate([ids], sp):
                reply += ev.text
                finish = ev.finish_reason or finish
                print(ev.text, end="", file=out, flush=True)
        except KeyboardInterrupt:  # leaving the loop closes generate(), which frees the slot
            finish = "interrupted"
        print(file=out)
        if finish == "length":
            print("(reply cut at the token limit)", file=out)
        elif finish == "interrupted":
            print("(stopped)", file=out)
        messages.append({"role": "assistant", "content": reply})
    return messages


def generate(
    engine: Engine, prompt: str, sp: SamplingParams, as_chat: bool, system: str | None, as_json: bool, out: TextIO = sys.stdout
) -> dict:
    """One completion of `prompt` (raw text, or a user turn in the chat template with `as_chat`),
    streamed to `out`, or printed as one JSON object with usage and timings."""
    tok = engine.tok
    if as_chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids, _ = tok.render(msgs, add_generation_prompt=True)
    else:
        if system:
            raise ValueError("--system needs --chat (a raw prompt has no system turn)")
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
        "text": text,
        "finish_reason": finish,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        "time_to_first_token_s": round(first or 0.0, 4),
        "seconds": round(elapsed, 4),
        "decode_tokens_per_s": round((n - 1) / (elapsed - first), 2) if n > 1 and first is not None and elapsed > first else None,
    }
    if as_json:
        print(json.dumps(result, ensure_ascii=False), file=out)
    else:
        print(file=out)
    return result
