"""Training throughput over a grid of widths and windows: chatforge's pretraining step vs HF
transformers' LlamaForCausalLM, each shape measured as in train_throughput.py (same config, fp32
weights + bf16 autocast, the same AdamW, alternating A/B rounds in one process).

Widths 256/512/768 with depths chosen for ~10M/30M/50M parameters (vocab 8192, 64-dim heads),
windows 256/512/1024, a fixed number of tokens per step (batch = tokens / window). Prints per
shape tok/s, the same-round ratio chatforge/HF (median and range over rounds) and MFU against
this machine's matmul peak probe (train.common.peak_flops).
Run: python benchmarks/train_grid.py [--compile] [--widths 512 --windows 512]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from train_throughput import measure

DEPTH = {256: 12, 512: 8, 768: 6}  # ~11.7M, ~29.9M, ~48.8M parameters with vocab 8192


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 768])
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / window)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per system")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (pretrain --compile on; auto picks it when measured faster)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--ablate-attention", action="store_true",
                    help="also time the eager step on torch's attention instead of the project's kernel (chatforge/causal_attention.py)")
    a = ap.parse_args()
    for w in a.widths:
        if w not in DEPTH:
            raise ValueError(f"--widths {w}: no depth chosen for it; use one of {sorted(DEPTH)}")
    for t in a.windows:
        if a.tokens % t:
            raise ValueError(f"--tokens {a.tokens} is not a multiple of window {t}")
    torch.set_num_threads(a.threads)

    from chatforge import causal_attention, dtypes
    from chatforge.model import GPTConfig, flops_per_token
    from chatforge.train import common as C

    device = C.Dist().device
    dt = dtypes.resolve(a.dtype, device)
    peak = C.peak_flops(device, dt)
    print(f"{dt} matmul peak here: {peak / 1e9:.0f} GFLOP/s ({a.threads} threads); {a.tokens} tokens/step, "
          f"{a.rounds} alternating rounds of {a.steps} steps", flush=True)
    causal_attention.paths()
    if causal_attention.decision:  # measured here (a CPU with AMX): which attention the bf16 steps take
        print(causal_attention.decision, flush=True)
    head = "| width | layers | params | window | batch | chatforge tok/s | MFU | HF tok/s | MFU | chatforge/HF (range) |"
    if a.ablate_attention:
        head += " on torch's attention tok/s | kernel/torch attention (range) |"
    if a.compile:
        head += " `--compile` tok/s | MFU | compile/HF (range) | compile/eager | compile s |"
    print(head + "\n|" + "---|" * (head.count("|") - 1), flush=True)
    for w in a.widths:
        for t in a.windows:
            cfg = GPTConfig(vocab_size=a.vocab, n_layer=DEPTH[w], d_model=w, n_head=w // 64, max_seq_len=t)
            batch = a.tokens // t
            r = measure(cfg, batch, t, dt, a.rounds, a.steps, compile=a.compile, ablate_attention=a.ablate_attention)
            fpt = flops_per_token(cfg, t)
            ours, hf = statistics.median(r["chatforge"]), statistics.median(r["hf"])
            ratios = [o / h for o, h in zip(r["chatforge"], r["hf"])]
            row = (f"| {w} | {DEPTH[w]} | {r['params'] / 1e6:.1f}M | {t} | {batch} | {ours:,.0f} | {100 * ours * fpt / peak:.1f}% | {hf:,.0f} | "
                   f"{100 * hf * fpt / peak:.1f}% | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
            if a.ablate_attention:
                ka = [o / t for o, t in zip(r["chatforge"], r["torch_attention"])]
                row += f" {statistics.median(r['torch_attention']):,.0f} | {statistics.median(ka):.2f}x ({min(ka):.2f}-{max(ka):.2f}) |"
            if a.compile:
                comp = statistics.median(r["compiled"])
                cr = [c / h for c, h in zip(r["compiled"], r["hf"])]
                ce = [c / o for c, o in zip(r["compiled"], r["chatforge"])]
                row += (f" {comp:,.0f} | {100 * comp * fpt / peak:.1f}% | {statistics.median(cr):.2f}x ({min(cr):.2f}-{max(cr):.2f}) | "
                        f"{statistics.median(ce):.2f}x | {r['compile_s']:.0f} |")
            print(row, flush=True)


if __name__ == "__main__":
    main()
