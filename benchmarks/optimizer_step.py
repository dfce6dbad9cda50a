"""The project's AdamW (the fused kernel, train.common.adamw) against torch's foreach AdamW on
the same model: whole pretraining steps and the optimizer step alone, alternating rounds in one
process, bf16 autocast where the CPU has it.
Run: python benchmarks/optimizer_step.py [--width 512 --layers 8 --window 512 --batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge.model import GPT, GPTConfig
    from chatforge.train import common as C

    cfg = GPTConfig(vocab_size=8192, n_layer=a.layers, d_model=a.width, n_head=a.width // 64, max_seq_len=a.window)
    dist = C.Dist(device=torch.device("cpu"))

    def make(impl: str):
        torch.manual_seed(0)
        m = GPT(cfg)
        m.init_weights(0)
        opt = C.make_optimizer(m, 1e-3, 0.1)
        if impl == "foreach":
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        return m, opt, C.LMLoss(m)

    systems = {"fused (chatforge)": make("chatforge"), "foreach": make("foreach")}
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.window + 1), generator=torch.Generator().manual_seed(0))
    step_s = {k: [] for k in systems}
    opt_s = {k: [] for k in systems}
    for _ in range(a.rounds + 1):  # the first round warms up
        for k, (m, opt, lm) in systems.items():
            t0 = time.perf_counter()
            C.train_step(lm, [(x[:, :-1], x[:, 1:])], C.lm_loss, opt, dist, a.dtype, 1.0)
            step_s[k].append(time.perf_counter() - t0)
            for p in m.parameters():  # the optimizer alone, on gradients of the same size
                p.grad = torch.randn_like(p) * 1e-3
            t0 = time.perf_counter()
            opt.step()
            opt_s[k].append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in systems["foreach"][0].parameters())
    print(f"{n / 1e6:.1f}M params, batch {a.batch}x{a.window}, {a.threads} threads, {a.rounds} rounds after a warmup round")
    for k in systems:
        print(f"  {k:18s} step {statistics.median(step_s[k][1:]):.3f} s   optimizer alone {statistics.median(opt_s[k][1:]) * 1e3:.1f} ms")
    r = [b / f for f, b in zip(step_s["fused (chatforge)"][1:], step_s["foreach"][1:])]
    print(f"  foreach/fused step time: median {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f})")


if __name__ == "__main__":
    main()
