"""Training attention: the project's causal kernel (csrc/causal_attention.cpp) vs torch's
scaled_dot_product_attention, forward and backward in bf16 or fp32 at the shapes of
benchmarks/train_grid.py (4,096 tokens, 64-dim heads, heads = width / 64), 2 threads, alternating
rounds in one process; `--packed N` gives both sides packed rows' mask instead (N documents per
row, block-diagonal causal), as SFT's packed batches.

Prints per shape the best-of-rounds milliseconds of each side, the same-round ratio torch / ours
(median and range), GFLOP/s of the causal half (forward 4 T^2 D per head and sequence / 2,
backward 2.5x that; with --packed the same count, though less is computed), and each side's
relative error against fp64 attention on the same inputs.
Run: python benchmarks/attention_train.py [--dtype fp32] [--packed 4] [--windows 256 1024 --heads 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from chatforge import causal_attention
from chatforge.quantize import native_kernels


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--heads", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--packed", type=int, default=0, help="documents per row (a block-diagonal causal mask on both sides); 0: plainly causal")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if native_kernels() is not None:
        raise SystemExit(f"the project's kernels could not be built: {native_kernels()}")
    ops = torch.ops.chatforge_native
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    want = causal_attention.BF16 if a.dtype == "bf16" else causal_attention.FP32
    print(f"{a.dtype}: vector products built: {bool(ops.causal_attention_native() & want)}; the model takes the kernel here: "
          f"{bool(causal_attention.paths() & want)}; {'packed rows of %d documents' % a.packed if a.packed else 'causal'}")
    print("| heads | window | batch | ours fwd ms | torch fwd ms | ours bwd ms | torch bwd ms | torch/ours fwd+bwd (range) | ours GFLOP/s | torch GFLOP/s | error ours / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    D = 64
    for H in a.heads:
        for T in a.windows:
            B = a.tokens // T
            torch.manual_seed(0)
            q, k, v, g = (torch.randn(B, H, T, D).to(dtype) for _ in range(4))
            scale = 1 / math.sqrt(D)
            mask = None
            if a.packed:
                seg = torch.arange(T) * a.packed // T
                mask = ((seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[None, None]
            qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
            saved = {}

            def ours_fwd():
                saved["o"] = ops.causal_attention_fwd(q, k, v, mask, scale)

            def ours_bwd():
                ops.causal_attention_bwd(g, q, k, v, *saved["o"], mask, scale)

            def torch_fwd():
                saved["y"] = F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask is None, attn_mask=mask)

            def torch_bwd():
                saved["y"].backward(g)
                for x in (qt, kt, vt):
                    x.grad = None

            for f in (ours_fwd, ours_bwd, torch_fwd, torch_bwd):  # warm-up
                f()
            times = {n: [] for n in ("of", "ob", "tf", "tb")}
            for _ in range(a.rounds):
                times["of"].append(timed(ours_fwd))
                times["ob"].append(timed(ours_bwd))
                times["tf"].append(timed(torch_fwd))
                times["tb"].append(timed(torch_bwd))
            ratios = [(tf + tb) / (of + ob) for of, ob, tf, tb in zip(times["of"], times["ob"], times["tf"], times["tb"])]
            flops = 3.5 * B * H * T * T * D * 2  # forward 2 T^2 D (causal half of 4 T^2 D), backward 2.5x
            ours, theirs = min(times["of"]) + min(times["ob"]), min(times["tf"]) + min(times["tb"])
            # error of the forward output against fp64 (one sequence: fp64 attention at 1024 is slow)
            q64, k64, v64 = (x[:1].double() for x in (q, k, v))
            y64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=mask is None, attn_mask=mask)
            err_ours = ((saved["o"][0][:1].double() - y64).norm() / y64.norm()).item()
            err_torch = ((saved["y"][:1].detach().double() - y64).norm() / y64.norm()).item()
            print(f"| {H} | {T} | {B} | {1e3 * min(times['of']):.1f} | {1e3 * min(times['tf']):.1f} | {1e3 * min(times['ob']):.1f} | "
                  f"{1e3 * min(times['tb']):.1f} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                  f"{flops / ours / 1e9:.0f} | {flops / theirs / 1e9:.0f} | {err_ours:.2e} / {err_torch:.2e} |", flush=True)


if __name__ == "__main__":
    main()
