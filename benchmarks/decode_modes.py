"""Single-stream decode speed of SmolLM2-135M-Instruct in each inference mode, against llama.cpp on
the GGUF it was imported from, in one run: alternating rounds (llama.cpp, then every mode; llama.cpp
once more after the last round), each mode reported as its median tokens/s and the median and
range of its ratio to the mean of the two llama.cpp runs around its round, with how many of its
greedy tokens come before the first that differs from the exact fp32 engine's.

Modes: the exact fp32 engine (oneDNN-packed), fp32 + fp16 decode copies, fp32 + int4 decode copies
and `auto` (what chat, generate and serve run here: dtypes.inference_mode). `--ablations` adds the
parts of the int4 path taken away: fp16 copies with the fp32 output layer (the default before
the exact 8-bit output layer), int4 copies on torch's bf16-activation kernel (the int4 path
before the project's own kernel; what runs where it cannot be built), and `auto` on torch's own
attention, RMSNorm, RoPE and SwiGLU instead of the project's kernels (csrc/decode_attention.cpp,
pointwise.cpp), and `auto` step by step from Python instead of the one-call step
(engine/fused.py, csrc/decode_step.cpp), and `auto` with a single row's int4 matmuls on the fp32
kernel instead of integer dot products (AVX-512 VNNI or AVX2 CPUs; elsewhere the same as auto),
and `auto` keeping keys and values in fp32 instead of fp16 (one stream, and the most `--streams`).
`--compiled` adds `auto` with the compiled decode step (`--compile-decode`; compiled before the
rounds). `--streams 4 16` adds `auto` decoding that many streams at once (prompts of the full
length, one token shorter, ...), as aggregate tokens/s against llama.cpp's single stream; its
greedy-token column is the first stream's (the full prompt). `--prompt-tokens` sets the prompt's
length: each decode step reads the cache of every position so far, so long prompts weigh the
attention and cache reads against the weights.

llama.cpp: llama-cpp-python (`pip install llama-cpp-python`, see ../shared/docs/benchmarks.md for
a portable build; LLAMA_CPP_LIB_PATH may point at a separately built libllama), its own greedy
sampler; skipped with a message when it is not importable.

Run: python benchmarks/decode_modes.py [--rounds 5] [--new-tokens 128] [--prompt-tokens 250] [--threads 2] [--ablations] [--compiled]
     [--streams 4 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch



@contextlib.contextmanager
def ablation(name: str):
    """Engines made (and first run) inside take the int4 path without one of its parts."""
    from chatforge import quantize

    from chatforge.engine import engine

    saved = quantize.int8_exact_groups, quantize.native_kernels, engine.native_decode_attention, engine.FusedDecode.applies
    if name in ("stepwise", "sdpa"):  # the one-call step runs the project's kernels, so "sdpa" goes step by step too
        engine.FusedDecode.applies = staticmethod(lambda model, fast: False)
    if name == "fp32 head":
        quantize.int8_exact_groups = lambda w, group=32: None
    elif name == "aten int4":
        quantize.native_kernels = lambda: "ablation"
    elif name == "sdpa":
        engine.native_decode_attention = lambda device, dtype: False
    try:
        yield
    finally:
        quantize.int8_exact_groups, quantize.native_kernels, engine.native_decode_attention, engine.FusedDecode.applies = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=250, help="prompt length (the cache each step reads grows with it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="add auto with the compiled decode step")
    ap.add_argument("--install", action="store_true", help="download SmolLM2's package if it is not cached")
    ap.add_argument("--streams", type=int, nargs="*", default=[], help="add auto at these numbers of streams (aggregate tok/s)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint
    from chatforge.convert.registry import resolve
    from chatforge.engine import Engine, SamplingParams

    path = resolve("smollm2-135m-instruct", install=a.install)
    ck = checkpoint.load(path, dtype=torch.float32)
    model, tok = ck.model.eval(), ck.tokenizer
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how books were made. "
            "印刷术的历史可以追溯到很久以前，活字印刷改变了书籍的制作方式。") * (a.prompt_tokens // 40 + 1)
    ids = tok.encode(text)[: a.prompt_tokens]
    new = a.new_tokens
    auto = checkpoint.inference_mode(path)[1]
    # name -> (decode copies, ablation, compile_decode, streams)
    modes = {"fp32 (exact)": (None, "", False, 1), "fp32 + fp16 copies": ("fp16", "", False, 1),
             "fp32 + int4 copies": ("int4", "", False, 1), f"auto (fp32 + {auto} copies)": (auto, "", False, 1)}
    if a.compiled:
        modes["auto, compiled decode step"] = (auto, "", True, 1)
    for n in a.streams:
        modes[f"auto, {n} streams (aggregate)"] = (auto, "", False, n)
    if a.ablations:
        modes["ablation: fp16 copies, fp32 output layer"] = ("fp16", "fp32 head", False, 1)
        modes["ablation: int4 on torch's bf16 kernel, fp32 output layer"] = ("int4", "aten int4", False, 1)
        modes["ablation: auto step by step from Python (no one-call step)"] = (auto, "stepwise", False, 1)
        modes["ablation: auto on torch's attention, RMSNorm, RoPE and SwiGLU (step by step)"] = (auto, "sdpa", False, 1)
        modes["ablation: auto, one row's int4 matmuls in fp32 (no integer dot products)"] = (auto, "fp32 rows", False, 1)
        modes["ablation: auto with an fp32 KV cache"] = (auto, "fp32 kv", False, 1)
        if a.streams:
            modes[f"ablation: auto, {max(a.streams)} streams, fp32 KV cache"] = (auto, "fp32 kv", False, max(a.streams))
    engines = {}
    for name, (copies, abl, compile_decode, n) in modes.items():
        with ablation(abl):
            e = Engine(model, tok, max_batch=n, max_seq_len=len(ids) + new + 8, decode_weights=copies, compile_decode=compile_decode,
                       kv_cache="same" if abl == "fp32 kv" else "auto")
            t = time.perf_counter()
            list(e.generate([ids], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)))  # copies made (and compiled) here
            if compile_decode:
                print(f"{name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        engines[name] = e
    sp = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)

    def run_engine(e, n):
        """Aggregate decode tok/s of n streams started together (after the step that prefilled
        them all), and the first stream's tokens."""
        times, toks = [], []
        t0 = time.perf_counter()
        for ev in e.generate([ids[: len(ids) - i] for i in range(n)], sp):
            times.append(time.perf_counter() - t0)
            if ev.request_id == 0:
                toks.append(ev.token_id)
        return (len(times) - n) / (times[-1] - times[n - 1]), toks

    def fp32_rows(run):
        """run with single int4 rows on the fp32 kernel: a switch in the kernel, so around each run"""
        was = torch.ops.chatforge_native.q4_integer_rows(False)
        try:
            return run()
        finally:
            torch.ops.chatforge_native.q4_integer_rows(was)

    runners = {name: (lambda e=e, n=modes[name][3]: run_engine(e, n)) for name, e in engines.items()}
    for name in [k for k, v in modes.items() if v[1] == "fp32 rows"]:
        runners[name] = lambda run=runners[name]: fp32_rows(run)
    llm = None
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=str(ck.meta["source"]), n_threads=a.threads, n_threads_batch=a.threads,
                    n_ctx=len(ids) + new + 8, n_batch=512, verbose=False)
    except (ImportError, KeyError, ValueError, OSError) as e:
        print(f"llama.cpp skipped: {type(e).__name__}: {e}")

    def run_llama():
        llm.reset()
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not toks:
                t1 = time.perf_counter()
            toks.append(int(t))
            if len(toks) == new:
                break
        return (new - 1) / (time.perf_counter() - t1), toks

    rates = {k: [] for k in runners}
    toks = {}
    # llama.cpp runs at the start of every round and once after the last, and each round's
    # ratios are against the mean of the runs that bracket it: this VM's speed drifts between rounds
    peer_runs: list[float] = []
    if llm is not None:
        run_llama()  # warm up
        peer_runs.append(run_llama()[0])
    for r in range(a.rounds):
        for name, fn in runners.items():
            rate, toks[name] = fn()
            rates[name].append(rate)
        if llm is not None:
            rate, toks["llama.cpp, the Q4_1 GGUF"] = run_llama()
            peer_runs.append(rate)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
              + (f", llama.cpp {peer_runs[-2]:.1f} / {peer_runs[-1]:.1f}" if llm is not None else ""), flush=True)
    if llm is not None:
        rates["llama.cpp, the Q4_1 GGUF"] = [(x + y) / 2 for x, y in zip(peer_runs, peer_runs[1:])]
    one, five, _ = os.getloadavg()
    print(f"\nSmolLM2-135M-Instruct, {len(ids)}-token prompt, {new} new tokens, greedy, {a.threads} threads, {a.rounds} rounds; "
          f"torch {torch.__version__}; load {one:.1f}/{five:.1f}")
    print("| mode | decode tok/s (min-max) | / llama.cpp (min-max) | greedy tokens as fp32's |")
    print("|---|---|---|---|")
    ref = toks["fp32 (exact)"]
    peer = rates.get("llama.cpp, the Q4_1 GGUF")
    for name, v in rates.items():
        ratio = "" if peer is None else (lambda rs: f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})")([x / y for x, y in zip(v, peer)])
        same = next((i for i, (x, y) in enumerate(zip(toks[name], ref)) if x != y), min(len(ref), len(toks[name])))
        print(f"| {name} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | {ratio} | {same}/{new} |")
    if llm is not None:
        llm.close()


if __name__ == "__main__":
    main()
