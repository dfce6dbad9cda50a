"""Time per PPO iteration, split into rollout / scoring / training, and rollout tokens/s of
chatforge's engine against HF `generate` on the same policy, in one run.

The policy is a checkpoint (default: SmolLM2-135M-Instruct, with LoRA so it trains on a CPU);
the reward model is that same transformer with a random scalar head (timings do not depend on
what the head learned). PPO runs `--iterations` iterations through `chatforge.train.ppo.main`
and the split comes from its log (the first iteration is reported separately: it pays for
warm-up). The rollout comparison samples the same prompts with temperature 1 and exactly
`--max-new-tokens` tokens per answer (end-of-turn ignored on both sides), batch = rollout batch.

Run: python benchmarks/ppo_iteration.py [--policy CKPT] [--lora-rank 8] [--lora-layers N] [--iterations 3]
         [--rollout-batch 8] [--max-new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is 12 + 7?", "Give a synonym for 'happy'.", "What does the word 'river' mean?", "How many days are in March?",
    "Tell me about the moon.", "What is the capital of France?", "Write a short greeting.", "What is 9 times 8?",
    "Name a fruit that is red.", "What day comes after Monday?", "How many centimeters are in 3 meters?", "Say something kind.",
    "What is a computer?", "Describe a cat in one sentence.", "What is 100 minus 37?", "Why is the sky blue?",
]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def engine_rollouts(model, tok, prompts: list[list[int]], new: int) -> float:
    """Sampled tokens/s of the engine for one batch (after a warm-up batch)."""
    from chatforge.engine import Engine, SamplingParams

    eng = Engine(model, tok, max_batch=len(prompts))
    sps = [SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=i) for i in range(len(prompts))]
    list(eng.generate(prompts, [SamplingParams(temperature=1.0, max_new_tokens=2, ignore_eos=True, seed=0)] * len(prompts)))
    t0 = time.perf_counter()
    n = sum(1 for ev in eng.generate(prompts, sps) if ev.token_id is not None)
    return n / (time.perf_counter() - t0)


def hf_rollouts(hf, prompts: list[list[int]], new: int) -> float:
    """Sampled tokens/s of HF generate for the same batch (left-padded, attention mask)."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1

    def gen(n):
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)

    gen(2)
    t0 = time.perf_counter()
    out = gen(new)
    return (out.shape[1] - T) * len(prompts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="checkpoint folder or known model name")
    ap.add_argument("--lora-rank", type=int, default=8, help="0 = full PPO (policy, value, reference, RM all full models)")
    ap.add_argument("--lora-layers", type=int, default=0, help="adapters only in the last N blocks (0 = every block)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rollout-batch", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast for scoring and training (auto: dtypes.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from chatforge import checkpoint as ckpt_io
    from chatforge.convert.registry import resolve
    from chatforge.train.ppo import PPOConfig
    from chatforge.train.ppo import main as ppo_main
    from chatforge.model import RewardModel

    policy = resolve(a.policy)
    print(f"ppo_iteration: {policy}; torch {torch.__version__}, {a.threads} threads; {load()} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = ckpt_io.load(policy)
        rm = RewardModel(ck.model, seed=0)
        ckpt_io.save(tmp / "rm", ck.model, ck.tokenizer, {"stage": "rm"}, extra_tensors=rm.head_tensors())
        (tmp / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
        cfg = PPOConfig(policy=str(policy), rm=str(tmp / "rm"), prompts=[str(tmp / "p.jsonl")], out=str(tmp / "ppo"),
                        iterations=a.iterations, rollout_batch=a.rollout_batch, minibatch=a.minibatch, ppo_epochs=a.ppo_epochs,
                        max_new_tokens=a.max_new_tokens, lora_rank=a.lora_rank, lora_layers=a.lora_layers, dtype=a.dtype, device="cpu", save_every=10**6,
                        eval_every=10**6, show_samples=0)
        t0 = time.perf_counter()
        ppo_main(cfg)
        wall = time.perf_counter() - t0
        recs = [r for r in map(json.loads, (tmp / "ppo" / "log.jsonl").read_text().splitlines()) if "t_rollout" in r]

        tok = ck.tokenizer
        prompts = [tok.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in PROMPTS[: a.rollout_batch]]
        rates = {"chatforge engine fp32 (PPO rollouts)": engine_rollouts(ck.model.float(), tok, prompts, a.max_new_tokens)}
        from chatforge import dtypes

        names = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if dtypes.fast_bf16("cpu") else (("fp32", torch.float32),)
        if len(names) == 2:  # bf16 is emulated (and ~50x slower) on CPUs without native support; not worth timing there
            rates["chatforge engine bf16"] = engine_rollouts(ckpt_io.load(policy, dtype=torch.bfloat16).model, tok, prompts, a.max_new_tokens)
        if not a.skip_hf:
            import transformers

            from chatforge.convert.hf import export_hf

            hf_dir = export_hf(policy, tmp / "hf")
            for name, dt in names:
                hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt).eval()
                rates[f"HF generate {name}"] = hf_rollouts(hf, prompts, a.max_new_tokens)
                del hf

    layers = f" in the last {a.lora_layers} blocks" if a.lora_layers else ""
    print(f"\nPPO, policy {Path(policy).name}, LoRA r={a.lora_rank}{layers}, {a.rollout_batch} rollouts x {a.max_new_tokens} tokens, "
          f"{a.ppo_epochs} epochs of minibatches of {a.minibatch}, autocast {a.dtype}; {load()} at the end; total {wall:.0f}s")
    print(f"{'iteration':>9s} {'rollout s':>10s} {'scoring s':>10s} {'training s':>11s} {'total s':>8s} {'rollout tok/s':>14s} {'answer len':>11s}")
    for r in recs:
        tot = r["t_rollout"] + r["t_score"] + r["t_train"]
        print(f"{r['step']:9d} {r['t_rollout']:10.2f} {r['t_score']:10.2f} {r['t_train']:11.2f} {tot:8.2f} {r['rollout_tok_per_s']:14.1f} {r['length']:11.1f}")
    steady = recs[1:] or recs
    mean = {k: sum(r[k] for r in steady) / len(steady) for k in ("t_rollout", "t_score", "t_train")}
    tot = sum(mean.values())
    print("steady state (iterations 2+): " + ", ".join(f"{k[2:]} {v:.2f}s ({100 * v / tot:.0f}%)" for k, v in mean.items()) + f", {tot:.2f}s per iteration")
    print(f"\nrollout sampling, {a.rollout_batch} prompts x {a.max_new_tokens} tokens, temperature 1")
    for k, v in rates.items():
        print(f"  {k:38s} {v:8.1f} tok/s")
    for name, _ in names:  # only the dtypes measured here (bf16 is skipped where the CPU emulates it)
        ours = next((v for k, v in rates.items() if k.startswith(f"chatforge engine {name}")), None)
        if ours is not None and f"HF generate {name}" in rates:
            print(f"  ratio engine/HF, {name}: {ours / rates[f'HF generate {name}']:.2f}x")


if __name__ == "__main__":
    main()
