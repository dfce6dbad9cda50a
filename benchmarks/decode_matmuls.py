"""Where a decode step's matmul time goes: every linear layer of a model once, as one decode step
multiplies them, by the engine's weight copies (`engine.FastLinears`) against the model's own
nn.Linear forward (aten `F.linear`, what HF transformers runs), in one run.

For each row count (streams decoding together) it times: the plain fp32 layers, the engine's
oneDNN-packed fp32 copies, and its bf16 / fp16 / int8 / int4 decode copies (forced onto the few-row path
for every row count here, so the table shows where each stops paying: the engine's FEW_ROWS).
The weights are the real checkpoint's; the inputs are random rows. Caches are cold: the weights
(hundreds of MB) do not fit in the CPU's caches, as in a real decode step. The rest of a decode
step (norms, RoPE, attention, cache writes, sampling) is not timed here.

Run: python benchmarks/decode_matmuls.py [--model smollm2-135m-instruct] [--rows 1 2 4 8 16] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn


def timed(fns: list, inputs: dict, repeat: int) -> float:
    """ms for calling every fn once on the input of its width (after one warm-up pass)."""

    def once():
        for width, fn in fns:
            fn(inputs[width])

    once()
    t0 = time.perf_counter()
    for _ in range(repeat):
        once()
    return (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint folder or known name")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint
    from chatforge.convert.registry import resolve
    from chatforge.engine import FastLinears

    ck = checkpoint.load(resolve(a.model), dtype=torch.float32)
    model = ck.model.eval()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    head = model.output_weight()
    nbytes = sum(m.weight.numel() for m in linears) * 4 + head.numel() * 4
    one, five, _ = os.getloadavg()
    print(f"{a.model}: {len(linears)} linear layers + output layer, {nbytes / 1e6:.0f} MB in fp32; torch {torch.__version__}, "
          f"{a.threads} threads, load {one:.1f}/{five:.1f} on {os.cpu_count()} cores", flush=True)

    def plain():
        return [(m.in_features, m) for m in linears] + [(head.shape[1], lambda x: torch.nn.functional.linear(x, head))]

    systems: dict[str, list] = {"aten F.linear fp32 (HF's path)": plain()}
    if FastLinears.available(torch.device("cpu"), torch.float32):
        fast = FastLinears(model, pack=True)
        fast.refresh()
        systems["chatforge packed fp32"] = [(m.in_features, f) for m, f in zip(linears, fast.forwards)] + [(head.shape[1], fast.head)]
    for fmt in ("bf16", "fp16", "int8", "int4"):
        fast = FastLinears(model, pack=False, decode_weights=fmt)
        fast.few_rows = max(a.rows)  # every row count on the copies, to see where they stop paying
        fast.refresh()
        systems[f"chatforge {fmt} copies"] = [(m.in_features, f) for m, f in zip(linears, fast.forwards)] + [(head.shape[1], fast.head)]

    widths = {w for fns in systems.values() for w, _ in fns}
    table = {}
    with torch.inference_mode():
        for rows in a.rows:
            inputs = {w: torch.randn(rows, w) for w in widths}
            for name, fns in systems.items():
                table[name, rows] = timed(fns, inputs, a.repeat)
                print(f"{rows:3d} rows  {name:32s} {table[name, rows]:8.1f} ms", flush=True)

    base = "aten F.linear fp32 (HF's path)"
    print(f"\nms for all matmuls of one decode step ({a.model}), by rows; ratio = {base} / system")
    print(f"{'system':32s} " + " ".join(f"{str(r) + ' rows':>16s}" for r in a.rows))
    for name in systems:
        cells = [f"{table[name, r]:7.1f} ({table[base, r] / table[name, r]:4.2f}x)" for r in a.rows]
        print(f"{name:32s} " + " ".join(f"{c:>16s}" for c in cells))
    fp32_ms = table[base, a.rows[0]]
    print(f"\n{a.rows[0]} row(s), fp32 weights read at {nbytes / fp32_ms / 1e6:.1f} GB/s by {base}")


if __name__ == "__main__":
    main()
