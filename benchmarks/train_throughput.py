"""Training throughput: chatforge's pretraining step vs HF transformers' LlamaForCausalLM.

Same config (mapped field by field), same micro-batch, same dtype policy (fp32 weights, bf16
autocast), same AdamW settings, 2 threads, in one process; the two systems are timed in
alternation (A B A B ...) so machine noise hits both. MFU is against this machine's bf16 matmul
peak, measured here. Run: python benchmarks/train_throughput.py [--sizes cpu-10m cpu-50m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    return LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")


def measure(cfg, batch: int, seq: int, dt: str, rounds: int, steps: int, compile: bool = True, ablate_attention: bool = False) -> dict:
    """tokens/s of chatforge's eager step, its compiled step (when `compile`) and HF's, each timed
    in `rounds` alternating rounds of `steps` optimizer steps, on one random (batch, seq) batch;
    with `ablate_attention` also the eager step on torch's attention instead of the project's
    kernel (chatforge/causal_attention.py). Returns {"chatforge": [tok/s per round], "compiled":
    [...], "hf": [...], "torch_attention": [...], "compile_s": s, "params": n}."""
    from chatforge import causal_attention
    from chatforge.model import GPT
    from chatforge.train import common as C

    dist = C.Dist()
    torch.manual_seed(0)
    ours = GPT(cfg)
    ours.init_weights(0)
    theirs = hf_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    opt_ours = C.make_optimizer(ours, 1e-4, 0.1)
    opt_theirs = C.make_optimizer(theirs, 1e-4, 0.1)
    eager = C.LMLoss(ours)  # exactly what `chatforge pretrain` steps
    if compile:
        torch._dynamo.reset()  # a fresh compile per model: dynamo stops recompiling after a few models
    compiled = torch.compile(C.LMLoss(ours)) if compile else None  # and `chatforge pretrain --compile on` (auto, once it pays)

    def step_ours():
        C.train_step(eager, [(x, y)], C.lm_loss, opt_ours, dist, dt, 1.0)

    def step_compiled():
        C.train_step(compiled, [(x, y)], C.lm_loss, opt_ours, dist, dt, 1.0)

    def step_torch_attention():
        fits = causal_attention.fits
        causal_attention.fits = lambda *a: False
        try:
            step_ours()
        finally:
            causal_attention.fits = fits

    def step_theirs():
        with C.autocast(dist.device, dt):
            logits = theirs(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    compile_s = 0.0
    systems = [("chatforge", step_ours), ("hf", step_theirs)]
    if compile:
        t0 = time.perf_counter()
        step_compiled()
        step_compiled()
        compile_s = time.perf_counter() - t0
        systems.insert(1, ("compiled", step_compiled))
    if ablate_attention:
        systems.insert(1, ("torch_attention", step_torch_attention))
    for _, f in systems:  # warm up allocator and kernels
        f()
    times: dict = {name: [] for name, _ in systems}
    for _ in range(rounds):
        for name, f in systems:
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[name].append((time.perf_counter() - t0) / steps)
    out = {name: [batch * seq / t for t in ts] for name, ts in times.items()}
    return {**out, "compile_s": compile_s, "params": ours.num_params()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["cpu-10m", "cpu-50m"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per system")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="autocast dtype for both systems; auto = bf16 where the CPU runs it natively (dtypes.py), else fp32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import dtypes
    from chatforge.model import flops_per_token, preset
    from chatforge.train import common as C

    device = C.Dist().device
    dt = dtypes.resolve(a.dtype, device)
    peak = C.peak_flops(device, dt)
    print(f"{dt} matmul peak here: {peak / 1e9:.0f} GFLOP/s ({a.threads} threads)")
    rows = []
    for size in a.sizes:
        cfg = preset(size, vocab_size=a.vocab, max_seq_len=a.seq)
        r = measure(cfg, a.batch, a.seq, dt, a.rounds, a.steps)
        med = {k: statistics.median(r[k]) for k in ("chatforge", "compiled", "hf")}
        rows.append((size, r["params"] / 1e6, med["chatforge"], med["compiled"], med["hf"], flops_per_token(cfg, a.seq), r["compile_s"]))

    print(f"\nbatch {a.batch}x{a.seq}, vocab {a.vocab}, fp32 weights + {dt} autocast, AdamW, {a.threads} threads, median of {a.rounds} rounds")
    print("chatforge = eager; +compile = torch.compile (pretrain --compile; compile time excluded, shown); HF = eager LlamaForCausalLM, sdpa")
    print(f"{'size':10s} {'params':>8s} {'chatforge':>10s} {'MFU':>6s} {'+compile':>9s} {'MFU':>6s} {'HF':>8s} {'MFU':>6s} {'eager/HF':>9s} {'compile/HF':>11s} {'compile s':>9s}")
    for size, n, ours, comp, hf, fpt, cs in rows:
        mfu = lambda t: 100 * t * fpt / peak  # noqa: E731
        print(
            f"{size:10s} {n:7.1f}M {ours:10,.0f} {mfu(ours):5.1f}% {comp:9,.0f} {mfu(comp):5.1f}% {hf:8,.0f} {mfu(hf):5.1f}% "
            f"{ours / hf:8.2f}x {comp / hf:10.2f}x {cs:9.0f}"
        )


if __name__ == "__main__":
    main()
