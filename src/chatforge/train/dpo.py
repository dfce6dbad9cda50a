"""Direct preference optimisation (Rafailov et al. 2023): the cheaper alternative to RM + PPO.

The policy is trained directly on the rankings: for each (better, worse) pair,
loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
with sequence log-probabilities summed over the answer tokens (the prompt is context only).
It optimises the same KL-regularised objective as PPO with beta in the role of the KL weight,
but never samples, and needs no reward or value model.

Like the reward model (train/reward.py), all C(K,2) pairs of one ranking form one batch element,
and the same rankings/pairwise files are read. The reference (the SFT model) is only needed for
its log-probabilities of the training answers, which never change: they are computed once before
training and the reference is dropped, so only one model is held in memory.

Reported: loss, preference accuracy (share of pairs whose implicit reward beta*log(pi/ref)
orders them like the labeler), reward margin, on training and held-out rankings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..model import GPT
from . import common as C
from . import rl_math as R
from .lora import DEFAULT_TARGETS, LoRA
from .reward import RankingsTrainConfig, TokenizedRankings, load_policy, read_split, run_log, step_layout, tokenize_rankings


@dataclass
class DPOConfig(RankingsTrainConfig):
    policy: str = ""  # SFT checkpoint folder (or known model name) to start from
    ref: str = ""  # reference checkpoint; empty = the policy checkpoint
    out: str = "runs/dpo"  # checkpoint folder (also holds log.jsonl and loss.png)
    beta: float = 0.1  # strength of the implicit KL constraint (DPO paper: 0.1)
    label_smoothing: float = 0.0  # assumed share of flipped labels (conservative DPO); 0 = plain DPO
    lr: float = 5e-6  # peak learning rate
    fsdp: str = "auto"  # "on": shard the policy's weights, gradients and AdamW state over torchrun's processes (FSDP2, no LoRA); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        if self.fsdp not in ("on", "off", "auto") or (self.fsdp == "on" and self.lora_rank):
            raise ValueError(f"DPOConfig.fsdp={self.fsdp!r}: 'on', 'off' or 'auto', and 'on' only without LoRA (adapters are small: DDP)")
        if not self.policy:
            raise ValueError("DPOConfig.policy is required: the SFT checkpoint to start from")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig: beta={self.beta} must be > 0 and label_smoothing={self.label_smoothing} in [0, 0.5)")
        super().__post_init__()


RESUME_KEYS = ("policy", "data", "val_data", "val_fraction", "ref", "beta", "label_smoothing", "max_len", "micro_batch", "batch_rankings",
               "epochs", "max_steps", "lora_rank", "lora_alpha", "lora_layers", "seed")


def collate(data: TokenizedRankings, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Right-padded ids (N,T) of every answer of the chosen rankings, the answer-token mask
    aligned with next-token predictions (N,T-1), and each ranking as row indices (best first)."""
    flat, starts, groups = [], [], []
    for i in idx:
        base = len(flat)
        flat += data.seqs[i]
        starts += data.prompt_lens[i]
        groups.append([base + j for j in data.rankings[i]])
    T = max(len(s) for s in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    mask = torch.zeros(len(flat), T - 1)
    for n, (s, p) in enumerate(zip(flat, starts)):
        ids[n, : len(s)] = torch.tensor(s)
        mask[n, p - 1 : len(s) - 1] = 1.0
    return ids, mask, groups


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the answer tokens of each row, fp32 (N,)."""
    return R.answer_logprobs(model, ids, mask)[0].sum(1)


class SequenceLogprobs(nn.Module):
    """The policy (and its adapters) as one module whose forward is what DDP must see: the
    answers' sequence log-probabilities."""

    def __init__(self, model: GPT, lora: LoRA | None):
        super().__init__()
        self.model, self.lora = model, lora  # lora registered so DDP syncs the adapters' gradients

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sequence_logprobs(self.model, ids, mask)


def pairs_loss(logp: torch.Tensor, ref: torch.Tensor, groups: list[list[int]], beta: float, smoothing: float) -> tuple[torch.Tensor, dict]:
    """Sum over rankings of the mean DPO loss over each ranking's pairs, and pair statistics."""
    w_idx, l_idx, weight = [], [], []
    for g in groups:
        pairs = R.ranking_pairs(g)
        for w, lo in pairs:
            w_idx.append(w)
            l_idx.append(lo)
            weight.append(1.0 / len(pairs))
    w_t, l_t = torch.tensor(w_idx, device=logp.device), torch.tensor(l_idx, device=logp.device)
    loss, rw, rl = R.dpo_loss(logp[w_t], logp[l_t], ref[w_t], ref[l_t], beta, smoothing)
    total = (loss * torch.tensor(weight, device=logp.device)).sum()
    return total, {"correct": int((rw > rl).sum()), "pairs": len(w_idx), "margin": float((rw - rl).sum()), "chosen": float(rw.sum()), "rejected": float(rl.sum())}


@torch.no_grad()
def reference_logprobs(model: GPT, data: TokenizedRankings, batch: int, device, dtype: str) -> list[torch.Tensor]:
    """Per ranking, the reference's sequence log-probability of each answer (fp32, CPU)."""
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        idx = list(range(i, min(len(data), i + batch)))
        ids, mask, _ = collate(data, idx)
        with C.autocast(torch.device(device), dtype):
            lp = sequence_logprobs(model, ids.to(device), mask.to(device)).float().cpu()
        at = 0
        for j in idx:
            k = len(data.seqs[j])
            out.append(lp[at : at + k])
            at += k
    return out


def main(cfg: DPOConfig) -> Path:
    dist, out, state = C.begin_run(cfg, RESUME_KEYS)

    # Data first: every line is checked before any model work.
    train_r, val_r = read_split(cfg)

    # Reference log-probabilities, once; then the reference is dropped.
    ref_path = cfg.ref or cfg.policy
    ref, tok, ref_dir = load_policy(ref_path, dist.device)
    max_len = min(cfg.max_len, ref.cfg.max_seq_len)
    train, val = tokenize_rankings(train_r, tok, max_len), tokenize_rankings(val_r, tok, max_len)
    t0 = time.time()
    ref_train = reference_logprobs(ref, train, cfg.micro_batch, dist.device, cfg.dtype)
    ref_val = reference_logprobs(ref, val, cfg.micro_batch, dist.device, cfg.dtype)
    del ref
    ref_seconds = time.time() - t0

    policy, ptok, policy_path = load_policy(cfg.policy, dist.device)
    if ptok.hf.to_str() != tok.hf.to_str():
        raise ValueError(f"{ref_path}: the reference's tokenizer differs from the policy's")
    policy_snapshot = ckpt_io.snapshot_id(policy_path)
    lora = LoRA(policy, cfg.lora_rank, cfg.lora_alpha, 0.0, DEFAULT_TARGETS, cfg.seed, cfg.lora_layers) if cfg.lora_rank else None
    start_step = 0
    if state is not None:
        C.check_parent(out, policy_snapshot, policy_path, "policy")
        C.restore_weights(out, policy, lora)
        start_step = state["step"]

    per_step, accum, batches, max_steps = step_layout(cfg, len(train), dist)
    sharded = lora is None and C.use_fsdp(cfg.fsdp, policy.num_params(non_embedding=False), dist)
    if sharded:
        from torch.distributed.fsdp import register_fsdp_forward_method

        C.fsdp_shard(policy, dist, cfg.dtype)
        register_fsdp_forward_method(policy, "hidden")  # answer_logprobs runs hidden() then head(), not forward()
    optimizer = C.make_optimizer(lora if lora is not None else policy, cfg.lr, cfg.weight_decay)
    if state is not None:
        C.load_optimizer(optimizer, policy, state, out)
        C.set_rng_state(state["rng"])
    train_model: nn.Module = SequenceLogprobs(policy, lora)
    if dist.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    fpt, peak, log, n_pairs = run_log(cfg, policy, train, lora, dist, out, start_step)
    log.print(
        f"dpo: policy {policy_path} ({policy.num_params() / 1e6:.1f}M"
        + (f", LoRA r={cfg.lora_rank}: {lora.num_params() / 1e6:.2f}M trainable" if lora is not None else ", all trained")
        + f"), reference {ref_path} (log-probs of {sum(len(r) for r in train.seqs) + sum(len(r) for r in val.seqs)} answers in {ref_seconds:.1f}s), "
        f"beta {cfg.beta}, {len(train)} train rankings ({n_pairs} pairs) / {len(val)} held out, "
        f"{per_step} rankings/step = {cfg.micro_batch} x {accum} accum x {dist.world} proc, {max_steps} steps"
        + (f", resuming at step {start_step}" if cfg.resume else "")
    )
    if train.truncated or val.truncated:
        log.print(f"dpo: {train.truncated} train / {val.truncated} held-out answers cut to {max_len} tokens")
    meta = {
        "stage": "dpo",
        "parent": str(policy_path.resolve()),
        "parent_snapshot": policy_snapshot,
        "ref": str(Path(ref_dir).resolve()),
        "data": [str(Path(d).resolve()) for d in cfg.data],
        "beta": cfg.beta,
        "lora": lora.meta() if lora is not None else None,
    }

    def run_batch(module: nn.Module, ids, mask, groups, ref_lp) -> tuple[torch.Tensor, dict]:
        return pairs_loss(module(ids, mask), ref_lp, groups, cfg.beta, cfg.label_smoothing)

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        sums = torch.zeros(4, device=dist.device)  # loss, correct, pairs, margin
        mine = list(range(dist.rank, len(val), dist.world))
        for i in range(0, len(mine), cfg.micro_batch):
            idx = mine[i : i + cfg.micro_batch]
            ids, mask, groups = collate(val, idx)
            ref_lp = torch.cat([ref_val[j] for j in idx]).to(dist.device)
            with C.autocast(dist.device, cfg.dtype):
                loss, st = run_batch(C.unwrap(train_model), ids.to(dist.device), mask.to(dist.device), groups, ref_lp)
            sums += torch.tensor([loss.item(), st["correct"], st["pairs"], st["margin"]], device=dist.device)
        sums = C.all_reduce_sum(sums, dist)
        policy.train()
        pairs = max(1.0, sums[2].item())
        return {"val_loss": sums[0].item() / max(1, len(val)), "val_accuracy": sums[1].item() / pairs, "val_margin": sums[3].item() / pairs}

    def save(step: int, metrics: dict) -> None:
        meta.update(step=step, metrics=metrics)
        C.save_training(out, policy, tok, meta, optimizer, step, to_dict(cfg), dist, extra_tensors=lora.tensors() if lora is not None else None)
        log.plot(out / "loss.png", keys=("loss", "val_loss", "accuracy", "val_accuracy"), title=f"DPO from {policy_path.name}")

    stats: dict = {}

    def loss_fn(module: nn.Module, batch) -> tuple[torch.Tensor, None]:
        ids, mask, groups, ref_lp = batch
        loss, st = run_batch(module, ids, mask, groups, ref_lp)
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v
        return loss, None

    policy.train()
    progress = C.Progress(fpt, peak, max_steps, start_step)
    metrics: dict = {}
    step = start_step
    t_start = time.time()
    if step == 0:
        metrics.update(evaluate())
        log.log({"step": 0, **metrics})
        log.print(f"step 0: held-out loss {metrics['val_loss']:.4f} (= ln 2 at the start), accuracy {metrics['val_accuracy']:.3f}")
    while step < max_steps:
        if step > start_step and step % cfg.eval_every == 0:
            metrics.update(evaluate())
            log.log({"step": step, **metrics})
            log.print(f"step {step}: held-out loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}, margin {metrics['val_margin']:.3f}")
        if step > start_step and step % cfg.save_every == 0:
            save(step, metrics)
        lr = C.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = []
        for i in range(accum):
            idx = batches.get(step, i)
            ids, mask, groups = collate(train, idx)
            micro.append((ids.to(dist.device), mask.to(dist.device), groups, torch.cat([ref_train[j] for j in idx]).to(dist.device)))
        stats.clear()
        r = C.train_step(train_model, micro, loss_fn, optimizer, dist, cfg.dtype, cfg.grad_clip, count_fn=lambda b: len(b[2]))
        tot = C.all_reduce_sum(torch.tensor([stats["correct"], stats["pairs"], stats["margin"], stats["chosen"], stats["rejected"]], device=dist.device), dist)
        tokens = C.all_reduce_sum(torch.tensor(float(sum(b[0].numel() for b in micro)), device=dist.device), dist).item()
        p = progress.update(step, tokens)
        step += 1
        pairs = max(1.0, tot[1].item())
        rec = {"step": step, "loss": r["loss"], "accuracy": tot[0].item() / pairs, "margin": tot[2].item() / pairs, "chosen_reward": tot[3].item() / pairs,
               "rejected_reward": tot[4].item() / pairs, "lr": lr, "grad_norm": r["grad_norm"], "tok_per_s": p["tok_per_s"]}
        if step % cfg.log_every == 0 or step == max_steps:
            log.log(rec)
            log.print(
                f"step {step}/{max_steps} | loss {r['loss']:.4f} | pair acc {rec['accuracy']:.3f} | margin {rec['margin']:+.3f} "
                f"(chosen {rec['chosen_reward']:+.3f}, rejected {rec['rejected_reward']:+.3f}) | lr {lr:.2e} | {p['tok_per_s']:,.0f} tok/s | ETA {C.fmt_time(p['eta_s'])}"
            )
    metrics.update(evaluate())
    log.log({"step": step, **metrics})
    log.print(f"step {step}: held-out loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}, margin {metrics['val_margin']:.3f}")
    save(step, metrics)
    log.print(f"dpo: checkpoint {out}, {time.time() - t_start:.0f}s")
    C.teardown_dist()
    return out
