"""Load test and serving benchmark: streaming OpenAI clients against chatforge (and llama-server).

    # the issue's load test: 64 streaming clients, 500 requests, ledger checked against responses
    python benchmarks/serve_load.py --clients 64 --requests 500 --max-tokens 32 --check-ledger

    # aggregate tokens/s and latency at 1/8/32 clients vs llama.cpp's server on the same GGUF
    python benchmarks/serve_load.py --clients 1 8 32 --llama-server /root/llama-build/bin/llama-server

Both servers are driven by the same client code (`run_load`, the official `openai` package,
streaming with usage), with the same prompts, greedy sampling and `ignore_eos` so every request
generates exactly --max-tokens tokens. chatforge serves the checkpoint imported from the GGUF that
llama-server loads (SmolLM2-135M-Instruct Q4_1 by default; chatforge dequantizes it to --dtype).
Only loopback addresses are used. tests/test_serve.py runs a small `run_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOPICS = ["the ocean", "a small robot", "the history of bread", "why the sky is blue", "a rainy day in Paris",
          "how bicycles work", "the moon landing", "a cat that learns to code", "winter in the mountains", "tea"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: write a few sentences about {TOPICS[i % len(TOPICS)]}."}]


@dataclass
class LoadResult:
    completed: dict[str, dict] = field(default_factory=dict)  # response id -> usage and content of requests that ended with [DONE]
    errors: dict[str, int] = field(default_factory=dict)  # HTTP status or exception name -> count
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return sum(u["completion_tokens"] for u in self.completed.values())

    def pct(self, name: str, q: float) -> float:
        xs = sorted(getattr(self, name))
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    def p50(self, name: str) -> float:
        return self.pct(name, 0.5)

    def p95(self, name: str) -> float:
        return self.pct(name, 0.95)

    def summary(self) -> str:
        n = len(self.completed)
        return (f"{n} completed, errors {self.errors or 'none'}, {self.wall_s:.1f} s: {n / self.wall_s:.2f} req/s, "
                f"{self.completion_tokens / self.wall_s:.1f} completion tok/s; TTFT p50 {self.p50('ttft'):.3f} s "
                f"p95 {self.p95('ttft'):.3f} s; latency p50 {self.p50('latency'):.3f} s p95 {self.p95('latency'):.3f} s")


async def run_load(base_url: str, api_key: str, model: str, clients: int, requests: int, max_tokens: int,
                   temperature: float = 0.0, ignore_eos: bool = True, on_complete=None) -> LoadResult:
    """`clients` concurrent streaming clients share `requests` chat requests; returns what they saw.

    A request counts as completed only when its stream ended with [DONE] (the SDK stops there);
    TTFT is the time to the first chunk with content."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=900)
    res = LoadResult()
    counter = iter(range(requests))

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        first, text, usage, rid = None, [], None, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=prompt(i), max_tokens=max_tokens, temperature=temperature, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if ignore_eos else None)
            async for ch in stream:
                rid = ch.id
                if ch.choices and ch.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(ch.choices[0].delta.content)
                if ch.usage is not None:
                    usage = ch.usage
        except openai.APIStatusError as e:
            res.errors[str(e.status_code)] = res.errors.get(str(e.status_code), 0) + 1
            return
        except (openai.APIError, OSError) as e:
            res.errors[type(e).__name__] = res.errors.get(type(e).__name__, 0) + 1
            return
        end = time.perf_counter()
        if usage is None:  # a server that does not send usage: count content chunks
            usage_d = {"prompt_tokens": None, "completion_tokens": len(text)}
        else:
            usage_d = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        res.completed[rid] = {**usage_d, "content": "".join(text)}
        res.ttft.append((first or end) - t0)
        res.latency.append(end - t0)
        if on_complete is not None:
            on_complete(rid, res.completed[rid])

    async def worker() -> None:
        for i in counter:
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    res.wall_s = time.perf_counter() - t0
    await client.close()
    return res


# ---- servers as child processes ---------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def start_chatforge(model: str, db: str, args, decode_weights: str, compiled: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "chatforge", "serve", model, "--port", str(port), "--db", db, "--dtype", args.dtype,
           "--max-batch", str(args.max_batch), "--max-waiting", str(max(64, args.requests)),
           "--max-concurrent-per-key", str(max(64, max(args.clients) + 1)), "--decode-weights", decode_weights,
           "--kv-cache", args.kv_cache, *(["--compile-decode"] * compiled)]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", proc)
    return proc, url


def start_llama_server(binary: str, gguf: str, args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    ctx_per_slot = args.ctx_per_slot
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(args.llama_parallel),
           "-c", str(ctx_per_slot * args.llama_parallel), "--threads", str(args.threads), "--threads-batch", str(args.threads),
           "-cb", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.llama_log, "w"))
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ledger_ids(db_url: str) -> set[str]:
    from chatforge.store import Store

    store = Store(db_url)
    ids = {u.request_id for u in store.usage_rows()}
    store.close()
    return ids


def check_ledger(db_url: str, res: LoadResult, before: set[str]) -> str:
    """The issue's ledger check: exactly one 200 row per completed request, with the same token counts
    (rows written before this run, `before`, are left out)."""
    from chatforge.store import Store

    store = Store(db_url)
    rows = {u.request_id: u for u in store.usage_rows() if u.status == 200 and u.request_id not in before}
    store.close()
    missing = [r for r in res.completed if r not in rows]
    extra = [r for r in rows if r not in res.completed]
    wrong = [r for r, u in res.completed.items() if r in rows and
             (rows[r].prompt_tokens, rows[r].completion_tokens) != (u["prompt_tokens"], u["completion_tokens"])]
    ok = not missing and not extra and not wrong
    return (f"ledger: {len(rows)} rows with status 200 for {len(res.completed)} completed requests; missing {len(missing)}, "
            f"extra {len(extra)}, token counts differing {len(wrong)} -> {'OK' if ok else 'MISMATCH'}")


def main() -> None:
    from chatforge.dtypes import DECODE_NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="chatforge checkpoint or known name")
    ap.add_argument("--clients", type=int, nargs="+", default=[64])
    ap.add_argument("--requests", type=int, default=0, help="requests per run (default: 4 per client, at least 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="chatforge weights: auto, bf16 or fp32")
    ap.add_argument("--decode-weights", nargs="+", default=["auto"], choices=DECODE_NAMES,
                    help="chatforge's decode weight copies (serve --decode-weights); several: one run each")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "same", "fp16"], help="chatforge's keys and values (serve --kv-cache)")
    ap.add_argument("--compile-decode", action="store_true", help="also run each chatforge system with serve --compile-decode")
    ap.add_argument("--check-ledger", action="store_true", help="compare the usage ledger with what clients received")
    ap.add_argument("--llama-server", default=None, help="path to llama-server: also benchmark it on the same GGUF")
    ap.add_argument("--gguf", default=None, help="GGUF for llama-server (default: the known model's packaged file)")
    ap.add_argument("--llama-parallel", type=int, default=32)
    ap.add_argument("--ctx-per-slot", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-log", default=os.path.join(tempfile.gettempdir(), "llama-server.log"))
    args = ap.parse_args()

    from chatforge.convert.registry import KNOWN, model_file, resolve
    from chatforge.store import Store

    ckpt = str(resolve(args.model))
    gguf = args.gguf or (str(model_file(KNOWN[args.model], install=True)) if args.model in KNOWN else None)
    tmp = tempfile.mkdtemp(prefix="chatforge-load-")
    db = f"sqlite:///{tmp}/chatforge.db"
    store = Store(db)
    _, key = store.create_key("load-test")
    store.close()

    results: dict[tuple[str, int], LoadResult] = {}
    systems = [("chatforge" + (f" ({dw} decode)" if dw != "auto" else "") + (" compiled" if compiled else ""), None, dw, compiled)
               for dw in args.decode_weights for compiled in (False, True)[: 1 + args.compile_decode]]
    if args.llama_server:
        systems.append(("llama-server", args.llama_server, "", False))
    for system, binary, decode_weights, compiled in systems:
        if binary is None:
            proc, url = start_chatforge(ckpt, db, args, decode_weights, compiled)
        else:
            proc, url = start_llama_server(binary, gguf, args)
        try:
            model = Path(ckpt).name if binary is None else "gguf"
            asyncio.run(run_load(url, key, model, 1, 2, 8))  # warm-up
            for c in args.clients:
                n = args.requests or max(16, 4 * c)
                print(f"{system}: {c} clients, {n} requests, {args.max_tokens} tokens each ...", flush=True)
                before = ledger_ids(db) if args.check_ledger and binary is None else set()
                r = asyncio.run(run_load(url, key, model, c, n, args.max_tokens))
                results[(system, c)] = r
                print(f"  {r.summary()}", flush=True)
                if args.check_ledger and binary is None:
                    print("  " + check_ledger(db, r, before), flush=True)
        finally:
            stop(proc)

    print("\n| system | clients | req/s | aggregate tok/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (system, c), r in results.items():
        print(f"| {system} | {c} | {len(r.completed) / r.wall_s:.2f} | {r.completion_tokens / r.wall_s:.1f} | {r.p50('ttft'):.3f} | "
              f"{r.p95('ttft'):.3f} | {r.p50('latency'):.3f} | {r.p95('latency'):.3f} | {sum(r.errors.values())} |")
    if args.llama_server:
        for system, binary, _, _ in systems:
            if binary is not None:
                continue
            for c in args.clients:
                a, b = results[(system, c)], results[("llama-server", c)]
                ratio = (a.completion_tokens / a.wall_s) / (b.completion_tokens / b.wall_s)
                print(f"{c} clients: {system} / llama-server aggregate tok/s = {ratio:.2f}x; "
                      f"p95 latency {a.p95('latency'):.2f} s vs {b.p95('latency'):.2f} s")


if __name__ == "__main__":
    main()
