"""Inference speed on SmolLM2-135M-Instruct: chatforge's engine vs HF transformers `generate`
(same weights, same dtype) vs llama.cpp (llama-cpp-python, on the same GGUF file), in one run.

Prompts of 256 tokens (a different one per stream), 128 new tokens, greedy, the same thread count for everyone (2). Reports
time to first token (prefill + one token), single-stream decode tokens/s (after the first
token), and aggregate tokens/s with 1, 4 and 16 concurrent streams (all streams start together;
the time includes every stream's prefill).

chatforge runs as `--dtype fp32` does (exact) and, where "auto" picks fp32 (a CPU without native
bf16), as "auto" does: fp32 prefills plus fp16 weight copies for decode steps of a few streams
(`decode_weights`, engine.FastLinears); `--ablations` adds the other decode copies (bf16, int8, int4)
and no packing.

Peers:
- HF `generate` on chatforge's HF export of the imported GGUF (the same weights, in the same
  dtype), sdpa attention, a batch of n identical prompts; next to chatforge's fp16 decode copies
  also HF in fp16 (single stream only: its half-precision prefills take seconds on such a CPU).
- llama.cpp on the GGUF shipped in the package (Q4_1: about 4x fewer weight bytes per token than
  bf16), and on chatforge's own bf16 GGUF export of the same checkpoint (the same weights and
  precision as chatforge bf16). llama-cpp-python runs one sequence per model, so its aggregate
  is its single-stream figure; skipped with a message when llama_cpp is not importable.

Run: python benchmarks/inference.py [--dtypes bf16 fp32] [--streams 1 4 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS, NEW_TOKENS = 256, 128


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def prompt_ids(tok, n: int = 1) -> list[list[int]]:
    """n different prompts of PROMPT_TOKENS tokens (windows at different offsets of one text), so
    that no system can share work between streams."""
    text = (
        "The history of the printing press begins in the fifteenth century, when movable type changed how books were made. "
        "Scholars, merchants and priests all found new uses for cheap printed pages, and within decades presses spread across Europe. "
        "Printers in Venice, Lyon and Antwerp competed on type faces, paper and speed; censors, guilds and universities answered. "
    )
    ids = tok.encode(text * 40)
    assert len(ids) >= PROMPT_TOKENS + 7 * n
    return [ids[7 * i : 7 * i + PROMPT_TOKENS] for i in range(n)]


def bench_chatforge(model, tok, prompts, streams, decode_weights=None, packed=None) -> tuple[dict, list[int]]:
    from chatforge.engine import Engine, SamplingParams

    sp = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    eng = Engine(model, tok, max_batch=max(streams), max_seq_len=PROMPT_TOKENS + NEW_TOKENS + 8, decode_weights=decode_weights,
                 packed=packed)
    list(eng.generate(prompts[: max(streams)], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)))  # warm up
    out = {}
    times, toks = [], []
    t0 = time.perf_counter()
    for ev in eng.generate(prompts[:1], sp):
        times.append(time.perf_counter() - t0)
        toks.append(ev.token_id)
    out["ttft"] = times[0]
    out["decode"] = (len(times) - 1) / (times[-1] - times[0])
    for n in streams:
        t0 = time.perf_counter()
        count, t_prefilled = 0, None
        for ev in eng.generate(prompts[:n], sp):
            count += ev.token_id is not None
            if count == n and t_prefilled is None:  # every stream has its first token: prefill done
                t_prefilled = time.perf_counter()
        end = time.perf_counter()
        out[f"agg{n}"] = count / (end - t0)
        out[f"agg{n}_decode_only"] = (count - n) / (end - t_prefilled)  # steady state, for reference
    return out, toks


def bench_hf(hf, prompts, streams) -> tuple[dict, list[int]]:
    x = torch.tensor(prompts[:1])
    ids = prompts[0]

    def gen(batch, new):
        with torch.inference_mode():
            return hf.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )

    gen(x, 4)  # warm up
    out = {}
    t0 = time.perf_counter()
    gen(x, 1)
    out["ttft"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = gen(x, NEW_TOKENS)[0, len(ids):].tolist()
    full = time.perf_counter() - t0
    out["decode"] = (NEW_TOKENS - 1) / max(1e-9, full - out["ttft"])
    out["agg1"] = NEW_TOKENS / full
    for n in streams:
        if n == 1:
            continue
        t0 = time.perf_counter()
        gen(torch.tensor(prompts[:n]), NEW_TOKENS)  # equal lengths: no padding
        out[f"agg{n}"] = n * NEW_TOKENS / (time.perf_counter() - t0)
    return out, toks


def bench_llama_cpp(gguf_path, ids, threads) -> tuple[dict, list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8,
                n_batch=512, verbose=False)

    def run(new):
        llm.reset()  # otherwise generate() reuses the cached prefix of the previous run: no prefill
        toks, t0 = [], time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # llama.cpp's own greedy sampler
            if not toks:
                ttft = time.perf_counter() - t0
            toks.append(int(tok))
            if len(toks) == new:
                break
        return ttft, time.perf_counter() - t0, toks

    run(4)  # warm up
    ttft, total, toks = run(NEW_TOKENS)
    llm.close()
    return {"ttft": ttft, "decode": (NEW_TOKENS - 1) / (total - ttft), "agg1": NEW_TOKENS / total}, toks


def _llama_cpp_child(queue, gguf_path, ids, threads) -> None:
    queue.put(bench_llama_cpp(gguf_path, ids, threads))


def bench_llama_cpp_isolated(gguf_path, ids, threads) -> tuple[dict, list[int]] | None:
    """bench_llama_cpp in a child process, so that a crash inside llama.cpp costs its rows, not
    the run: llama-cpp-python 0.3.36 built with GGML_NATIVE on a CPU with AMX (a Sapphire Rapids
    Xeon) segfaults in ggml_backend_amx_mul_mat at the first prefill (benchmarks/README.md has
    the build without AMX). None, with a message, when the child dies."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_llama_cpp_child, args=(results, str(gguf_path), ids, threads))
    child.start()
    result = None
    while result is None and (child.is_alive() or not results.empty()):
        try:
            result = results.get(timeout=1)
        except queue.Empty:  # still running
            pass
    child.join()
    if result is None:
        why = "SIGSEGV: on a CPU with AMX see benchmarks/README.md for a build without those kernels" if child.exitcode == -11 else "see above"
        print(f"llama.cpp on {Path(gguf_path).name}: skipped, its process died (exit code {child.exitcode}; {why})", flush=True)
    return result


def hf_model(ckpt, dtype):
    """transformers' LlamaForCausalLM on chatforge's HF export of the checkpoint: plain weights in
    `dtype`. (Loading the GGUF itself may keep its blocks packed behind a GGUF matmul kernel when
    the `kernels` package is installed, which would no longer be the same computation.)"""
    import transformers

    from chatforge.convert.hf import export_hf

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ckpt, tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["bf16", "fp32"],
                    help="default: bf16 and fp32 where the CPU runs bf16 natively, else fp32 only (emulated bf16 is ~50x slower)")
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--ablations", action="store_true", help="also chatforge without oneDNN packing, and with fp16 / int8 / int4 decode weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint, dtypes
    from chatforge.engine.cache import common_prefix

    if a.dtypes is None:
        a.dtypes = ["bf16", "fp32"] if dtypes.fast_bf16("cpu") else ["fp32"]
    from chatforge.convert.registry import KNOWN, model_file, resolve

    name = "smollm2-135m-instruct"
    gguf_path = model_file(KNOWN[name], install=True)
    ckpt = resolve(name)
    print(f"{name}: {gguf_path}; torch {torch.__version__}, {a.threads} threads; {load()} at start", flush=True)
    rows, tokens = [], {}

    def record(label, result):
        r, toks = result
        r["load"] = os.getloadavg()[0]
        rows.append((label, r))
        tokens[label] = toks
        print(f"{label:28s} " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)

    for dt_name in a.dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
        ck = checkpoint.load(ckpt, dtype=dt)
        prompts = prompt_ids(ck.tokenizer, max(a.streams))
        record(f"chatforge {dt_name}", bench_chatforge(ck.model, ck.tokenizer, prompts, a.streams))
        default_dt, auto = dtypes.inference_mode("auto", "auto", "cpu")
        auto = auto if dt_name == default_dt else None
        if auto:  # what chat/generate/serve run by default here: these weights plus decode copies
            record(f"chatforge {dt_name}+{auto} decode", bench_chatforge(ck.model, ck.tokenizer, prompts, a.streams, decode_weights=auto))
        if a.ablations:
            record(f"chatforge {dt_name} unpacked", bench_chatforge(ck.model, ck.tokenizer, prompts, a.streams, packed=False))
            for fmt in [f for f in (("bf16", "fp16", "int8", "int4") if dt_name == "fp32" else ("int8", "int4")) if f != auto]:
                record(f"chatforge {dt_name}+{fmt} decode", bench_chatforge(ck.model, ck.tokenizer, prompts, a.streams, decode_weights=fmt))
        del ck
        if not a.skip_hf:
            record(f"HF generate {dt_name}", bench_hf(hf_model(ckpt, dt), prompts, a.streams))
            if auto:
                # the peer at the precision of chatforge's decode copies; one stream only (its
                # half-precision prefills run at ~1/6 of the fp32 rate here)
                half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(auto)
                if half is not None:
                    record(f"HF generate {auto}", bench_hf(hf_model(ckpt, half), prompts, [1]))
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama.cpp: skipped, llama_cpp is not importable (pip install llama-cpp-python; it builds from source, ~13 min on 2 cores)")
    if llama_cpp is not None and not a.skip_llama_cpp:
        from chatforge.convert.gguf import export_gguf

        ids = prompt_ids(checkpoint.load(ckpt).tokenizer)[0]
        if (r := bench_llama_cpp_isolated(gguf_path, ids, a.threads)) is not None:
            record("llama.cpp Q4_1 (package)", r)
        with tempfile.TemporaryDirectory() as tmp:
            half = "bf16" if "bf16" in a.dtypes else "f16"
            f = export_gguf(ckpt, Path(tmp) / f"smollm2-{half}.gguf", dtype=half)
            if (r := bench_llama_cpp_isolated(f, ids, a.threads)) is not None:
                record(f"llama.cpp {half} (export)", r)

    print(f"\n{name}, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new, greedy, {a.threads} threads; {load()} at the end")
    print(f"{'system':28s} {'TTFT s':>7s} {'decode tok/s':>13s} " + " ".join(f"{'agg' + str(n):>8s}" for n in a.streams)
          + f" {'load':>5s}  same first tokens as chatforge in that dtype")
    for label, r in rows:
        cells = [f"{r['ttft']:7.3f}", f"{r['decode']:13.1f}"] + [f"{r[f'agg{n}']:8.1f}" if f"agg{n}" in r else f"{'-':>8s}" for n in a.streams]
        dt_word = next((w for w in ("bf16", "fp32") if w in label and f"chatforge {w}" in tokens), a.dtypes[0])
        ref_label = f"chatforge {dt_word}"
        same = f"{common_prefix(tokens[label], tokens[ref_label])}/{NEW_TOKENS}" if label != ref_label else ""
        print(f"{label:28s} " + " ".join(cells) + f" {r['load']:5.1f}  {same}")
    by = dict(rows)
    top = f"agg{max(a.streams)}"
    ours_rows = [label for label, _ in rows if label.startswith("chatforge") and "unpacked" not in label]
    for label in ours_rows:
        ours = by[label]
        for hf_label in ("HF generate fp32", "HF generate bf16", "HF generate fp16"):
            hf = by.get(hf_label)
            if hf is None or (hf_label.split()[-1] not in label.split("+")[0] and hf_label.split()[-1] + " decode" not in label):
                continue
            line = f"{label} / {hf_label}: single-stream decode {ours['decode'] / hf['decode']:.2f}x (target >= 2x); TTFT {hf['ttft'] / ours['ttft']:.2f}x"
            print(line + (f"; {top} {ours[top] / hf[top]:.2f}x" if top in hf else ""))
        for peer in ("llama.cpp Q4_1 (package)", "llama.cpp bf16 (export)", "llama.cpp f16 (export)"):
            lc = by.get(peer)
            if lc and top in ours:
                print(f"{label}: {top} / {peer} single stream = {ours[top] / lc['decode']:.2f}x (target >= 2x); "
                      f"single stream = {ours['decode'] / lc['decode']:.2f}x")

if __name__ == "__main__":
    main()
