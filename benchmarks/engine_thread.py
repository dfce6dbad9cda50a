"""Why the server makes its engine on the engine thread: the same single-stream decode of
SmolLM2-135M-Instruct (default mode) timed through EngineLoop(make_engine) (first, while no other
thread of the process has run a parallel torch op: what `chatforge serve` does), then with the
engine made on the main thread: in the main thread, in a second Python thread, and through
EngineLoop(engine); then one OpenMP-parallel kernel (the int4 decode matmul, 1536 x 576) in the
main and a second thread. With torch's libgomp build, once two threads have run parallel ops,
each parallel op runs at about one thread's speed here (benchmarks/README.md), and every decode
step is ~120 of them.

Run: python benchmarks/engine_thread.py [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()

    from chatforge import checkpoint, dtypes, quantize
    from chatforge.convert.registry import resolve
    from chatforge.engine import Engine, EngineLoop, SamplingParams

    path = resolve("smollm2-135m-instruct")
    dt, copies = checkpoint.inference_mode(path)

    def make_engine() -> Engine:
        ck = checkpoint.load(path, dtype=dtypes.torch_dtype(dt))
        return Engine(ck.model.eval(), ck.tokenizer, max_batch=8, max_seq_len=512, decode_weights=copies)

    def ms_per_token(events) -> float:
        ts = [time.perf_counter() for _ in events]
        return (ts[-1] - ts[1]) / (len(ts) - 2) * 1000

    sp = SamplingParams(temperature=0, max_new_tokens=a.new_tokens, ignore_eos=True)
    rows = {}
    loop = EngineLoop(make_engine)
    ids = loop.engine.tok.encode("Request 1: write a few sentences about tea. " * 3)
    ms_per_token(loop.submit(ids, sp))
    rows["EngineLoop(make_engine): serve"] = [ms_per_token(loop.submit(ids, sp)) for _ in range(a.rounds)]
    loop.close()  # its thread ends, and with it that thread's OpenMP pool

    engine = make_engine()  # on the main thread from here on
    direct = lambda: ms_per_token(engine.generate([ids], sp))  # noqa: E731
    direct()
    rows.update({"main thread": [], "second thread": []})
    for _ in range(a.rounds):
        rows["main thread"].append(direct())
        rows["second thread"].append(in_thread(direct))
    loop = EngineLoop(engine)
    rows["EngineLoop(engine made on the main thread)"] = [ms_per_token(loop.submit(ids, sp)) for _ in range(a.rounds)]
    loop.close()

    if quantize.native_kernels() is None:
        packed, sm = quantize.int4_native_weights(torch.randn(1536, 576))
        x = torch.randn(1, 576)

        def kernel_us() -> float:
            for _ in range(20):
                quantize.int4_native_linear(x, packed, sm, None)
            t = time.perf_counter()
            for _ in range(400):
                quantize.int4_native_linear(x, packed, sm, None)
            return (time.perf_counter() - t) / 400 * 1e6

        rows["int4 kernel us, main thread"], rows["int4 kernel us, second thread"] = [], []
        for _ in range(a.rounds):
            rows["int4 kernel us, main thread"].append(kernel_us())
            rows["int4 kernel us, second thread"].append(in_thread(kernel_us))
    print(f"SmolLM2-135M-Instruct, {dt}+{copies}, {a.new_tokens} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| where | ms per token (or us per call) median (min-max) |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) |")


if __name__ == "__main__":
    main()
