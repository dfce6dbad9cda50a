"""Stage 2: a reward model from rankings (InstructGPT step 2; Ouyang et al. 2022, section 3.5).

The transformer starts from the SFT checkpoint; a scalar head (model.RewardModel) reads the
final-norm hidden state of each sequence's last token (the end-of-turn token of a finished
answer) and outputs r(x, y). Loss: for each ranking of K answers, -1/C(K,2) * sum over its pairs
of log sigmoid(r_w - r_l), with all pairs of one ranking forming ONE batch element
(rl_math.ranking_loss; the data and batches are train/rankings.py's). Pairwise files are
rankings of two. Reported: held-out pairwise accuracy (prompts held out whole).

After training, the head's bias is shifted so that the training answers (samples of the SFT
policy, since `label sample` drew them from it) score 0 on average, as InstructGPT normalises
its reward before RL; the shift is stored in meta.json ("reward_shift").

The checkpoint is a plain chatforge checkpoint (meta stage "rm") plus the head in
extra.safetensors (checkpoint.load_reward_model reads it); PPO initialises its value model from it.
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
from ..model import RewardModel
from . import common as C
from . import rl_math as R
from .rankings import RankingsStage, RankingsTrainConfig, TokenizedRankings, collate, micro_tokens, read_split, run_log, score_all, step_layout, tokenize_rankings


@dataclass
class RewardConfig(RankingsTrainConfig):
    base: str = ""  # SFT checkpoint folder (or known model name) the reward model starts from
    out: str = "runs/rm"  # checkpoint folder (also holds log.jsonl and loss.png)
    epochs: float = 1.0  # passes over the training rankings (InstructGPT: 1; more overfits)
    lora_rank: int = 0  # 0 = train the whole transformer; r > 0 = rank-r adapters (the head is always trained)

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("RewardConfig.base is required: the SFT checkpoint to start from")
        super().__post_init__()


RESUME_KEYS = ("base", "data", "val_data", "val_fraction", "max_len", "micro_batch", "batch_rankings", "epochs", "max_steps",
               "lora_rank", "lora_alpha", "lora_layers", "lora_targets", "seed")


@torch.no_grad()
def evaluate_rankings(rm: RewardModel, data: TokenizedRankings, batch: int, device, dtype: str, dist: C.Dist | None = None) -> dict:
    """Held-out loss (per ranking) and pairwise accuracy: the share of (better, worse) pairs the
    reward model orders like the labeler."""
    dist = dist or C.Dist(device=torch.device(device))
    was = rm.training
    rm.eval()
    sums = torch.zeros(3, device=device)  # loss, correct pairs, pairs
    for idx, counts in rank_batches(len(data), batch, dist.rank, dist.world):
        ids, last, groups = collate(data, idx)
        with C.autocast(dist.device, dtype):
            scores = rm(ids.to(device), last.to(device))
        if counts:
            loss, correct, pairs = R.ranking_loss(scores, groups)
            sums += torch.tensor([loss.item(), correct, pairs], device=device)
    sums = C.all_reduce_sum(sums, dist)
    rm.train(was)
    return {"val_loss": sums[0].item() / max(1, len(data)), "val_accuracy": sums[1].item() / max(1.0, sums[2].item()), "val_pairs": int(sums[2].item())}


class RewardStage(RankingsStage):
    """One reward-model run: set up in __init__ (model, data, optimizer, log), then what the loop
    calls (evaluate, eval_line, save) and the training step."""

    name = "rm"

    def __init__(self, cfg: RewardConfig):
        dist, out, state = C.begin_run(cfg, RESUME_KEYS)  # processes, seeds, and the train state to resume from
        self.cfg, self.dist, self.out = cfg, dist, out
        gpt, self.tok, self.base_path = C.load_policy(cfg.base, dist.device)
        base_snapshot = ckpt_io.snapshot_id(self.base_path)
        self.lora = cfg.make_lora(gpt, cfg.seed)
        self.rm = RewardModel(gpt, seed=cfg.seed)
        self.start = 0
        if state is not None:
            C.check_parent(out, base_snapshot, self.base_path, "base")
            C.restore_weights(out, self.rm, self.lora)
            self.start = state["step"]

        # Data: every line checked before training starts.
        train_r, val_r = read_split(cfg)
        self.max_len = min(cfg.max_len, gpt.cfg.max_seq_len)
        self.train, self.val = tokenize_rankings(train_r, self.tok, self.max_len), tokenize_rankings(val_r, self.tok, self.max_len)
        self.per_step, self.accum, self.batches, self.max_steps = step_layout(cfg, len(self.train), dist)

        self.shard(self.rm)  # the GPT's blocks, and the root with the embeddings and the scalar head; the loss calls forward()
        trainable = nn.ModuleList([self.lora, self.rm.value_head]) if self.lora is not None else self.rm
        self.optimizer = C.make_optimizer(trainable, cfg.lr, cfg.weight_decay)
        if state is not None:
            C.restore_training(self.optimizer, self.rm, state, out)
        self.train_model = self.replicated(self.rm)
        self.fpt, self.peak, self.log, self.n_pairs = run_log(cfg, gpt, self.train, self.lora, dist, out, self.start)
        self.meta = {
            "stage": "rm",
            "parent": str(self.base_path.resolve()),
            "parent_snapshot": base_snapshot,
            "data": [str(Path(d).resolve()) for d in cfg.data],
            "rankings": {"train": len(self.train), "val": len(self.val), "train_pairs": self.n_pairs},
            "lora": self.lora.meta() if self.lora is not None else None,
            "reward_shift": 0.0,
            "normalised": False,
        }
        if state is not None:  # a finished run's head already carries its shift
            saved_meta = ckpt_io.load_json(out / "meta.json")
            self.meta.update(reward_shift=saved_meta.get("reward_shift", 0.0), normalised=saved_meta.get("normalised", False))

    def trained(self) -> nn.Module:
        return self.rm

    def models_line(self) -> str:
        ks = sorted({len(r) for r in self.train.rankings})
        return (f"base {self.base_path} ({self.rm.gpt.num_params() / 1e6:.1f}M params{self.lora_note(' + head')}), "
                f"{len(self.train)} train rankings (K in {ks}, {self.n_pairs} pairs)")

    def evaluate(self) -> dict:
        return evaluate_rankings(self.rm, self.val, self.cfg.micro_batch, self.dist.device, self.cfg.dtype, self.dist)

    def eval_line(self, step: int, m: dict) -> str:
        if step == 0:
            return f"step 0: held-out accuracy {m['val_accuracy']:.3f} over {m['val_pairs']} pairs (untrained head)"
        if "reward_std" in m:  # the last evaluation, after normalise()
            return (f"step {step}: held-out loss {m['val_loss']:.4f}, pairwise accuracy {m['val_accuracy']:.3f} ({m['val_pairs']} pairs); "
                    f"reward shifted by {-self.meta['reward_shift']:+.4f} so SFT answers score mean 0 (std {self.meta.get('reward_std', 0):.3f})")
        return f"step {step}: held-out loss {m['val_loss']:.4f}, accuracy {m['val_accuracy']:.3f}"

    def save(self, step: int, metrics: dict) -> None:
        self.meta.update(step=step, metrics=metrics)
        extra = self.lora.tensors() if self.lora is not None else None  # the head goes beside the GPT (C.save_training)
        C.save_training(self.out, self.rm, self.tok, self.meta, self.optimizer, step, to_dict(self.cfg), self.dist, extra_tensors=extra)
        self.log.plot(self.out / "loss.png", keys=("loss", "val_loss", "accuracy", "val_accuracy"), title=f"reward model from {self.base_path.name}")

    def train_step(self, step: int) -> tuple[dict, float, float]:
        """One optimizer step: its train_step result, pair accuracy and token positions (all ranks)."""
        micro = []
        for i in range(self.accum):
            ids, last, groups = collate(self.train, self.batches.get(step, i))
            micro.append((ids.to(self.dist.device), last.to(self.dist.device), groups))
        stats = [0, 0]

        def loss_fn(module: nn.Module, batch) -> tuple[torch.Tensor, None]:
            ids, last, groups = batch
            loss, correct, pairs = R.ranking_loss(module(ids, last), groups)
            stats[0] += correct
            stats[1] += pairs
            return loss, None

        r = C.train_step(self.train_model, micro, loss_fn, self.optimizer, self.dist, self.cfg.dtype, self.cfg.grad_clip, count_fn=lambda b: len(b[2]))
        acc = C.all_reduce_sum(torch.tensor([float(stats[0]), float(stats[1])], device=self.dist.device), self.dist)
        return r, acc[0].item() / max(1.0, acc[1].item()), micro_tokens(micro, self.dist)

    def normalise(self) -> dict:
        """Shift the head's bias so the SFT policy's answers (the training rankings' responses) score
        0 on average. Rank 0 scores them; sharded, every rank does (each forward is a collective),
        and shifts its shard of the bias."""
        if not (self.dist.main or self.sharded):
            return {}
        scores = score_all(self.rm, [s for row in self.train.seqs for s in row], self.cfg.micro_batch * 4, self.dist.device, self.cfg.dtype)
        shift = scores.mean().item()
        with torch.no_grad():
            if self.sharded:  # FSDP keeps the root's weights gathered after a forward: shift the shard, which is what is saved
                self.rm.reshard()
            self.rm.value_head.bias -= shift
        self.meta.update(reward_shift=self.meta["reward_shift"] + shift, normalised=True, reward_std=scores.std().item())
        return {"reward_std": scores.std().item()}


def main(cfg: RewardConfig) -> Path:
    run = RewardStage(cfg)
    loop = run.begin()
    for step in loop:
        r, acc, tokens = run.train_step(step)
        loop.done(tokens, {"loss": r["loss"], "accuracy": acc}, r["grad_norm"], f"loss {r['loss']:.4f} | pair acc {acc:.3f}")
    loop.finish(run.normalise)
    run.log.print(f"rm: checkpoint {run.out}, {time.time() - loop.t0:.0f}s")
    C.teardown_dist()
    return run.out
