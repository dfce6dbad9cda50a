"""A single stream's int4 matmuls: the integer kernel (csrc/grouped_linear.cpp: q4_row_vnni, x in
three bytes per input and vpdpbusd, on CPUs with AVX-512 VNNI; q4_row_avx2, x in two int16s and
vpmaddwd, on AVX2 ones) against the fp32 one (q4_one_row) on the same weights, in alternating
rounds, with paired differences.

Every int4 matrix of one decode step of the model (its real weights, made int4 as
`--decode-weights int4` makes them), one row of random activations each, caches cold (tens of MB
of codes), as in a real single-stream step; the output layer and the rest of the step are not
timed. Also prints both kernels' largest error against an fp64 matmul on the same weights, in
units of 2^-22 of |W| @ (each input's group maximum |x|), the bound tests/test_engine.py holds
both to.

Run: python benchmarks/int4_rows.py [--model smollm2-135m-instruct] [--rounds 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint folder or known name")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint, quantize
    from chatforge.convert.registry import resolve

    if quantize.native_kernels() is not None:
        raise SystemExit(f"the project's kernels are not built here: {quantize.native_kernels()}")
    switch = torch.ops.chatforge_native.q4_integer_rows
    if not switch(True):
        print("this build has no integer kernel (neither AVX-512 VNNI nor AVX2): both columns run the fp32 one")
    ck = checkpoint.load(resolve(a.model), dtype=torch.float32)
    mats = [quantize.int4_native_weights(m.weight.detach()) for m in ck.model.modules() if type(m) is nn.Linear]
    mats = [m for m in mats if m is not None]
    nbytes = sum(p.numel() + sm.numel() * 2 for p, sm in mats)
    xs = [torch.randn(1, p.shape[1] * 2) for p, _ in mats]

    def step() -> float:
        t = time.perf_counter()
        for (p, sm), x in zip(mats, xs):
            torch.ops.chatforge_native.q4_linear(x, p, sm)
        return time.perf_counter() - t

    kernels = {"integer (q4_row_vnni / q4_row_avx2)": True, "fp32 (q4_one_row)": False}
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for r in range(a.rounds):
        for name in (list(kernels) if r % 2 == 0 else list(kernels)[::-1]):
            switch(kernels[name])
            step()  # warm-up pass of this kernel
            times[name].append(min(step() for _ in range(3)) * 1e3)
    switch(True)

    errs = {}
    for name, on in kernels.items():
        switch(on)
        worst = 0.0
        for (p, sm), x in zip(mats[:12], xs):
            deq = quantize.int4_native_dequantized(p, sm).double()
            gmax = x.abs().reshape(1, -1, 32).amax(-1, keepdim=True).expand(1, -1, 32).reshape(1, -1)
            err = (torch.ops.chatforge_native.q4_linear(x, p, sm).double() - x.double() @ deq.t()).abs()
            worst = max(worst, (err / (2 ** -22 * (gmax.double() @ deq.abs().t()))).max().item())
        errs[name] = worst
    switch(True)

    one, five, _ = os.getloadavg()
    print(f"{a.model}: {len(mats)} int4 matrices, {nbytes / 1e6:.1f} MB of codes and scales, one row each; "
          f"{a.threads} threads, {a.rounds} rounds; torch {torch.__version__}; load {one:.1f}/{five:.1f}")
    print("| kernel | ms per step (min-max) | GB/s | largest error / bound |")
    print("|---|---|---|---|")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.2f} ({min(v):.2f}-{max(v):.2f}) | {nbytes / med / 1e6:.1f} | {errs[name]:.2f} |")
    new, old = times["integer (q4_row_vnni / q4_row_avx2)"], times["fp32 (q4_one_row)"]
    d = [x - y for x, y in zip(new, old)]
    print(f"integer - fp32: {statistics.mean(d):+.2f} +- {statistics.stdev(d) / len(d) ** 0.5:.2f} ms per step "
          f"(mean, standard error over {len(d)} paired rounds); ratio of medians {statistics.median(old) / statistics.median(new):.2f}x")


if __name__ == "__main__":
    main()
