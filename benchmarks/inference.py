"""Inference speed on SmolLM2-135M-Instruct: chatforge's engine vs HF transformers `generate`
(same weights, same dtype) vs llama.cpp (llama-cpp-python, on the same GGUF file), in one run.

Prompt of 256 tokens, 128 new tokens, greedy, 2 threads. Reports time to first token, single-
stream decode tokens/s, and aggregate tokens/s with 1, 4 and 16 concurrent streams.
llama.cpp runs the Q4_1 weights natively (about 4x fewer bytes per token than bf16); chatforge and
HF run the same weights dequantized. llama-cpp-python serves one sequence per model, so its
aggregate is its single-stream figure.

Run: python benchmarks/inference.py [--dtypes bf16 fp32] [--streams 1 4 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPT_TOKENS, NEW_TOKENS = 256, 128


def prompt_ids(tok) -> list[int]:
    text = (
        "The history of the printing press begins in the fifteenth century, when movable type changed how books were made. "
        "Scholars, merchants and priests all found new uses for cheap printed pages, and within decades presses spread across Europe. "
    )
    ids = tok.encode(text * 20)
    return ids[:PROMPT_TOKENS]


def bench_chatforge(model, tok, ids, streams, int8=False):
    from chatforge.engine import Engine, SamplingParams

    sp = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    eng = Engine(model, tok, max_batch=max(streams), max_seq_len=PROMPT_TOKENS + NEW_TOKENS + 8, int8=int8)
    list(eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)))  # warm up
    out = {}
    t0 = time.perf_counter()
    times = []
    for _ev in eng.generate([ids], sp):
        times.append(time.perf_counter() - t0)
    out["ttft"] = times[0]
    out["decode"] = (len(times) - 1) / (times[-1] - times[0])
    for n in streams:
        t0 = time.perf_counter()
        count = sum(1 for ev in eng.generate([ids] * n, sp) if ev.token_id is not None)
        out[f"agg{n}"] = count / (time.perf_counter() - t0)
    return out


def bench_hf(hf, ids, streams):
    x = torch.tensor([ids])

    def gen(batch, new):
        with torch.inference_mode():
            hf.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )

    gen(x, 4)  # warm up
    out = {}
    t0 = time.perf_counter()
    gen(x, 1)
    out["ttft"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen(x, NEW_TOKENS)
    full = time.perf_counter() - t0
    out["decode"] = (NEW_TOKENS - 1) / max(1e-9, full - out["ttft"])
    out["agg1"] = NEW_TOKENS / full
    for n in streams:
        if n == 1:
            continue
        t0 = time.perf_counter()
        gen(x.repeat(n, 1), NEW_TOKENS)
        out[f"agg{n}"] = n * NEW_TOKENS / (time.perf_counter() - t0)
    return out


def bench_llama_cpp(gguf_path, ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_threads=2, n_threads_batch=2, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_batch=512, verbose=False)

    def run(new):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        ttft = time.perf_counter() - t0
        for _ in range(new):
            tok = int(llm.sample(temp=0.0)) if hasattr(llm, "sample") else int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([tok])
        return ttft, time.perf_counter() - t0

    run(4)  # warm up
    ttft, total = run(NEW_TOKENS)
    return {"ttft": ttft, "decode": NEW_TOKENS / (total - ttft), "agg1": NEW_TOKENS / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint
    from chatforge.convert.registry import KNOWN, package_file, resolve

    gguf_path = package_file(KNOWN["smollm2-135m-instruct"], install=False)
    rows = []
    for dt_name in a.dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
        ck = checkpoint.load(resolve("smollm2-135m-instruct"), dtype=dt)
        ids = prompt_ids(ck.tokenizer)
        rows.append((f"chatforge {dt_name}", bench_chatforge(ck.model, ck.tokenizer, ids, a.streams)))
        print(rows[-1], flush=True)
        if dt_name == "bf16":  # the --int8 option: int8 weight copies for decode steps
            rows.append(("chatforge bf16+int8", bench_chatforge(ck.model, ck.tokenizer, ids, a.streams, int8=True)))
            print(rows[-1], flush=True)
        del ck
        if not a.skip_hf:
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(
                str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name, torch_dtype=dt
            ).eval()
            rows.append((f"HF generate {dt_name}", bench_hf(hf, ids, a.streams)))
            print(rows[-1], flush=True)
            del hf
    try:
        import llama_cpp  # noqa: F401

        from chatforge.tokenizer import Tokenizer  # noqa: F401

        tok = checkpoint.load(resolve("smollm2-135m-instruct")).tokenizer
        rows.append(("llama.cpp Q4_1", bench_llama_cpp(gguf_path, prompt_ids(tok))))
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python; it builds from source, ~13 min on 2 cores)")

    print(f"\nSmolLM2-135M-Instruct, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new, greedy, {a.threads} threads")
    cols = ["ttft"] + ["decode"] + [f"agg{n}" for n in a.streams]
    print(f"{'system':22s} {'TTFT s':>7s} {'decode tok/s':>13s} " + " ".join(f"{'agg' + str(n):>8s}" for n in a.streams))
    for name, r in rows:
        cells = [f"{r['ttft']:7.3f}", f"{r['decode']:13.1f}"] + [f"{r[c]:8.1f}" if c in r else f"{'-':>8s}" for c in cols[2:]]
        print(f"{name:22s} " + " ".join(cells))
    by = dict(rows)
    for dt_name in a.dtypes:
        ours, hf = by.get(f"chatforge {dt_name}"), by.get(f"HF generate {dt_name}")
        if ours and hf:
            print(f"{dt_name}: single-stream decode chatforge/HF = {ours['decode'] / hf['decode']:.2f}x")
            q = by.get(f"chatforge {dt_name}+int8")
            if q:
                print(f"{dt_name}: single-stream decode chatforge --int8 / HF {dt_name} = {q['decode'] / hf['decode']:.2f}x")
        lc = by.get("llama.cpp Q4_1")
        for name in (f"chatforge {dt_name}", f"chatforge {dt_name}+int8"):
            r, key = by.get(name), f"agg{max(a.streams)}"
            if r and lc and key in r:
                print(f"{name}: aggregate at {max(a.streams)} streams / llama.cpp single stream = {r[key] / lc['decode']:.2f}x")


if __name__ == "__main__":
    main()
