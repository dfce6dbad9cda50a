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
from ..data.loader import rank_batches
from ..model import GPT
from . import common as C
from . import rl_math as R
from .lora import LoRA
from .rankings import RankingsStage, RankingsTrainConfig, TokenizedRankings, flatten, micro_tokens, pad, read_split, run_log, step_layout, tokenize_rankings


@dataclass
class DPOConfig(RankingsTrainConfig):
    policy: str = ""  # SFT checkpoint folder (or known model name) to start from
    ref: str = ""  # reference checkpoint; empty = the policy checkpoint
    out: str = "runs/dpo"  # checkpoint folder (also holds log.jsonl and loss.png)
    beta: float = 0.1  # strength of the implicit KL constraint (DPO paper: 0.1)
    label_smoothing: float = 0.0  # assumed share of flipped labels (conservative DPO); 0 = plain DPO
    lr: float = 5e-6  # peak learning rate

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("DPOConfig.policy is required: the SFT checkpoint to start from")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig: beta={self.beta} must be > 0 and label_smoothing={self.label_smoothing} in [0, 0.5)")
        super().__post_init__()


RESUME_KEYS = ("policy", "data", "val_data", "val_fraction", "ref", "beta", "label_smoothing", "max_len", "micro_batch", "batch_rankings",
               "epochs", "max_steps", "lora_rank", "lora_alpha", "lora_layers", "lora_targets", "seed")


def collate(data: TokenizedRankings, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Right-padded ids (N,T) of every answer of the chosen rankings, the answer-token mask
    aligned with next-token predictions (N,T-1), and each ranking as row indices (best first)."""
    flat, starts, groups = flatten(data, idx)
    ids, _ = pad(flat)
    mask = torch.zeros(len(flat), ids.shape[1] - 1)
    for n, (s, p) in enumerate(zip(flat, starts)):
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



class DPOStage(RankingsStage):
    """One DPO run: set up in __init__ (reference log-probabilities, policy, optimizer, log), then
    what the loop calls (evaluate, eval_line, save) and the training step."""

    name = "dpo"

    def __init__(self, cfg: DPOConfig):
        dist, out, state = C.begin_run(cfg, RESUME_KEYS)  # processes, seeds, and the train state to resume from
        self.cfg, self.dist, self.out = cfg, dist, out
        # Data first: every line is checked before any model work.
        train_r, val_r = read_split(cfg)
        self._reference(train_r, val_r)
        self.policy, ptok, self.policy_path = C.load_policy(cfg.policy, dist.device)
        if ptok.hf.to_str() != self.tok.hf.to_str():
            raise ValueError(f"{self.ref_path}: the reference's tokenizer differs from the policy's")
        policy_snapshot = ckpt_io.snapshot_id(self.policy_path)
        self.lora = cfg.make_lora(self.policy, cfg.seed)
        self.start = 0
        if state is not None:
            C.check_parent(out, policy_snapshot, self.policy_path, "policy")
            C.restore_weights(out, self.policy, self.lora)
            self.start = state["step"]

        self.per_step, self.accum, self.batches, self.max_steps = step_layout(cfg, len(self.train), dist)
        self.shard(self.policy, forward_methods=("hidden",))  # answer_logprobs runs hidden() then head(), not forward()
        self.optimizer = C.make_optimizer(self.lora if self.lora is not None else self.policy, cfg.lr, cfg.weight_decay)
        if state is not None:
            C.restore_training(self.optimizer, self.policy, state, out)
        self.train_model = self.replicated(SequenceLogprobs(self.policy, self.lora))
        self.fpt, self.peak, self.log, self.n_pairs = run_log(cfg, self.policy, self.train, self.lora, dist, out, self.start)
        self.meta = {
            "stage": "dpo",
            "parent": str(self.policy_path.resolve()),
            "parent_snapshot": policy_snapshot,
            "ref": str(Path(self.ref_dir).resolve()),
            "data": [str(Path(d).resolve()) for d in cfg.data],
            "beta": cfg.beta,
            "lora": self.lora.meta() if self.lora is not None else None,
        }

    def _reference(self, train_r: list, val_r: list) -> None:
        """Tokenize the rankings and compute the reference's log-probabilities once; the
        reference is dropped after."""
        cfg, dev = self.cfg, self.dist.device
        self.ref_path = cfg.ref or cfg.policy
        ref, self.tok, self.ref_dir = C.load_policy(self.ref_path, dev)
        self.max_len = min(cfg.max_len, ref.cfg.max_seq_len)
        self.train, self.val = tokenize_rankings(train_r, self.tok, self.max_len), tokenize_rankings(val_r, self.tok, self.max_len)
        t0 = time.time()
        self.ref_train = reference_logprobs(ref, self.train, cfg.micro_batch, dev, cfg.dtype)
        self.ref_val = reference_logprobs(ref, self.val, cfg.micro_batch, dev, cfg.dtype)
        self.ref_seconds = time.time() - t0

    def trained(self) -> nn.Module:
        return self.policy

    def models_line(self) -> str:
        cfg, train, val = self.cfg, self.train, self.val
        return (f"policy {self.policy_path} ({self.policy.num_params() / 1e6:.1f}M{self.lora_note()}), reference {self.ref_path} "
                f"(log-probs of {sum(len(r) for r in train.seqs) + sum(len(r) for r in val.seqs)} answers in {self.ref_seconds:.1f}s), "
                f"beta {cfg.beta}, {len(train)} train rankings ({self.n_pairs} pairs)")

    def _batch_loss(self, module: nn.Module, ids, mask, groups, ref_lp) -> tuple[torch.Tensor, dict]:
        return pairs_loss(module(ids, mask), ref_lp, groups, self.cfg.beta, self.cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg, dev = self.cfg, self.dist.device
        self.policy.eval()
        sums = torch.zeros(4, device=dev)  # loss, correct, pairs, margin
        for idx, counts in rank_batches(len(self.val), cfg.micro_batch, self.dist.rank, self.dist.world):
            ids, mask, groups = collate(self.val, idx)
            ref_lp = torch.cat([self.ref_val[j] for j in idx]).to(dev)
            with C.autocast(dev, cfg.dtype):
                loss, st = self._batch_loss(C.unwrap(self.train_model), ids.to(dev), mask.to(dev), groups, ref_lp)
            if counts:
                sums += torch.tensor([loss.item(), st["correct"], st["pairs"], st["margin"]], device=dev)
        sums = C.all_reduce_sum(sums, self.dist)
        self.policy.train()
        pairs = max(1.0, sums[2].item())
        return {"val_loss": sums[0].item() / max(1, len(self.val)), "val_accuracy": sums[1].item() / pairs, "val_margin": sums[3].item() / pairs}

    def eval_line(self, step: int, m: dict) -> str:
        if step == 0:
            return f"step 0: held-out loss {m['val_loss']:.4f} (= ln 2 at the start), accuracy {m['val_accuracy']:.3f}"
        return f"step {step}: held-out loss {m['val_loss']:.4f}, accuracy {m['val_accuracy']:.3f}, margin {m['val_margin']:.3f}"

    def save(self, step: int, metrics: dict) -> None:
        self.meta.update(step=step, metrics=metrics)
        extra = self.lora.tensors() if self.lora is not None else None
        C.save_training(self.out, self.policy, self.tok, self.meta, self.optimizer, step, to_dict(self.cfg), self.dist, extra_tensors=extra)
        self.log.plot(self.out / "loss.png", keys=("loss", "val_loss", "accuracy", "val_accuracy"), title=f"DPO from {self.policy_path.name}")

    def train_step(self, step: int) -> tuple[dict, dict, float]:
        """One optimizer step: its train_step result, the pair statistics per pair (accuracy,
        margin, chosen and rejected rewards) and the token positions, over all ranks."""
        dev = self.dist.device
        micro = []
        for i in range(self.accum):
            idx = self.batches.get(step, i)
            ids, mask, groups = collate(self.train, idx)
            micro.append((ids.to(dev), mask.to(dev), groups, torch.cat([self.ref_train[j] for j in idx]).to(dev)))
        stats: dict = {}

        def loss_fn(module: nn.Module, batch) -> tuple[torch.Tensor, None]:
            loss, st = self._batch_loss(module, *batch)
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v
            return loss, None

        r = C.train_step(self.train_model, micro, loss_fn, self.optimizer, self.dist, self.cfg.dtype, self.cfg.grad_clip, count_fn=lambda b: len(b[2]))
        tot = C.all_reduce_sum(torch.tensor([stats["correct"], stats["pairs"], stats["margin"], stats["chosen"], stats["rejected"]], device=dev), self.dist)
        pairs = max(1.0, tot[1].item())
        per_pair = {"accuracy": tot[0].item() / pairs, "margin": tot[2].item() / pairs, "chosen_reward": tot[3].item() / pairs,
                    "rejected_reward": tot[4].item() / pairs}
        return r, per_pair, micro_tokens(micro, self.dist)


def main(cfg: DPOConfig) -> Path:
    run = DPOStage(cfg)
    loop = run.begin()
    for step in loop:
        r, pp, tokens = run.train_step(step)
        loop.done(tokens, {"loss": r["loss"], **pp}, r["grad_norm"],
                  f"loss {r['loss']:.4f} | pair acc {pp['accuracy']:.3f} | margin {pp['margin']:+.3f} "
                  f"(chosen {pp['chosen_reward']:+.3f}, rejected {pp['rejected_reward']:+.3f})")
    loop.finish()
    run.log.print(f"dpo: checkpoint {run.out}, {time.time() - loop.t0:.0f}s")
    C.teardown_dist()
    return run.out
