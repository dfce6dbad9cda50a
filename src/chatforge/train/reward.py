"""Stage 2: a reward model from rankings (InstructGPT step 2; Ouyang et al. 2022, section 3.5).

The transformer starts from the SFT checkpoint; a scalar head reads the final-norm hidden state
of each sequence's last token (the end-of-turn token of a finished answer) and outputs r(x, y).
Loss: for each ranking of K answers, -1/C(K,2) * sum over its pairs of log sigmoid(r_w - r_l),
with all pairs of one ranking forming ONE batch element (rl_math.ranking_loss): a batch is a
set of rankings, and every answer gets one forward pass however many pairs it is in. Pairwise
files are rankings of two. Reported: held-out pairwise accuracy (prompts held out whole).

After training, the head's bias is shifted so that the training answers (samples of the SFT
policy, since `label sample` drew them from it) score 0 on average, as InstructGPT normalises
its reward before RL; the shift is stored in meta.json ("reward_shift").

The checkpoint is a plain chatforge checkpoint (meta stage "rm") plus the head in
extra.safetensors as value_head.weight (1, C) and value_head.bias (1,); PPO initialises its
value model from it.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..data.rankings import Ranking, fit, prompt_ids, read_rankings, response_ids
from ..model import GPT, flops_per_token
from ..tokenizer import Tokenizer
from . import common as C
from . import rl_math as R
from .lora import DEFAULT_TARGETS, LoRA

HEAD_KEYS = ("value_head.weight", "value_head.bias")


class RewardModel(nn.Module):
    """A GPT body and a scalar head: `scores` at each sequence's last token (the reward model),
    `values` at every position (PPO's value model)."""

    def __init__(self, gpt: GPT, head: nn.Linear | None = None, seed: int = 0):
        super().__init__()
        self.gpt = gpt
        if head is None:
            head = nn.Linear(gpt.cfg.d_model, 1)
            with torch.no_grad():
                # Small random weights (std 1/sqrt(C+1)) and zero bias: initial rewards near 0.
                g = torch.Generator().manual_seed(seed)
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(gpt.cfg.d_model + 1))
                head.bias.zero_()
            head.to(next(gpt.parameters()).device)
        self.value_head = head

    def values(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor | None = None, mask=None, stem=None) -> torch.Tensor:
        """The head at every position, (B,T), fp32. `stem`: see GPT.hidden."""
        return self.value_head(self.gpt.hidden(ids_BT, pos_BT, mask, stem=stem)).squeeze(-1).float()

    def forward(self, ids_BT: torch.Tensor, last_B: torch.Tensor, stem=None) -> torch.Tensor:
        """Reward of each right-padded sequence, read at its last real token `last_B`, (B,)."""
        h = self.gpt.hidden(ids_BT, stem=stem)
        return self.value_head(h[torch.arange(ids_BT.shape[0], device=ids_BT.device), last_B]).squeeze(-1).float()

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"value_head.weight": self.value_head.weight.detach(), "value_head.bias": self.value_head.bias.detach()}


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer, dict]:
    """A reward-model checkpoint (meta stage "rm") as a RewardModel in fp32, eval mode."""
    ck = ckpt_io.load(path, device=device, dtype=torch.float32)
    extra = ckpt_io.load_extra(path)
    missing = [k for k in HEAD_KEYS if k not in extra]
    if missing:
        raise ValueError(f"{path}: not a reward model (no {', '.join(missing)} in extra.safetensors); train one with `chatforge rm`")
    head = nn.Linear(ck.model.cfg.d_model, 1)
    if tuple(extra["value_head.weight"].shape) != tuple(head.weight.shape):
        raise ValueError(f"{path}: value_head.weight has shape {tuple(extra['value_head.weight'].shape)}, expected {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(extra["value_head.weight"])
        head.bias.copy_(extra["value_head.bias"])
    rm = RewardModel(ck.model, head.to(device)).eval()
    return rm, ck.tokenizer, ck.meta


# ---- data -------------------------------------------------------------------------------------


@dataclass
class TokenizedRankings:
    seqs: list[list[list[int]]]  # per ranking, per response: prompt + response ids
    rankings: list[list[int]]  # best first
    prompt_lens: list[list[int]]  # per ranking, per response: where the response starts in its sequence
    truncated: int = 0  # sequences cut to max_len

    def __len__(self) -> int:
        return len(self.seqs)


def tokenize_rankings(rankings: list[Ranking], tok: Tokenizer, max_len: int) -> TokenizedRankings:
    seqs, starts, truncated = [], [], 0
    for r in rankings:
        p = prompt_ids(tok, r.messages)
        row, row_starts = [], []
        for text in r.responses:
            pp, rr, cut = fit(p, response_ids(tok, text), max_len)
            truncated += cut
            row.append(pp + rr)
            row_starts.append(len(pp))
        seqs.append(row)
        starts.append(row_starts)
    return TokenizedRankings(seqs, [r.ranking for r in rankings], starts, truncated)


def split_by_prompt(rankings: list[Ranking], fraction: float, seed: int) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out whole prompts (a stable hash of the prompt decides), so no held-out prompt's
    answers were seen in training; at least one prompt on each side."""
    def h(r: Ranking) -> float:
        d = hashlib.sha1(f"{seed}|{r.messages!r}".encode()).digest()
        return int.from_bytes(d[:8], "big") / 2**64

    keys = {repr(r.messages): h(r) for r in rankings}
    if len(keys) < 2:
        raise ValueError(f"{len(rankings)} rankings of {len(keys)} prompt(s) are too few to hold any out; add data or pass --val-data")
    hs = sorted(keys.values())
    cut = min(max(fraction, hs[0]), hs[-2])  # at least the lowest-hash prompt held out, the highest kept
    val = [r for r in rankings if keys[repr(r.messages)] <= cut]
    train = [r for r in rankings if keys[repr(r.messages)] > cut]
    assert train and val
    return train, val


def collate(data: TokenizedRankings, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Right-padded ids (N,T) of every answer of the chosen rankings, the index of each one's
    last token, and each ranking as indices into the N rows (best first)."""
    flat, groups = [], []
    for i in idx:
        base = len(flat)
        flat += data.seqs[i]
        groups.append([base + j for j in data.rankings[i]])
    T = max(len(s) for s in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    for n, s in enumerate(flat):
        ids[n, : len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in flat])
    return ids, last, groups


class ShuffledBatches:
    """Item indices (rankings, prompts) for step `step`, micro-step `micro`, on `rank`: epoch e is
    a shuffle seeded by (seed, e), and the global batch of a step is the next `per_step` items
    of that endless stream, so resuming needs the step number only."""

    def __init__(self, n: int, micro_batch: int, accum: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.B, self.accum, self.seed, self.rank, self.world = n, micro_batch, accum, seed, rank, world
        self._orders: dict[int, list[int]] = {}

    @property
    def per_step(self) -> int:
        return self.B * self.accum * self.world

    def _at(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch][i]

    def get(self, step: int, micro: int) -> list[int]:
        first = step * self.per_step + (micro * self.world + self.rank) * self.B
        return [self._at(first + j) for j in range(self.B)]


# ---- training ---------------------------------------------------------------------------------


@dataclass
class RankingsTrainConfig:
    """What every stage that trains on rankings shares (the reward model here, DPO): the data,
    the held-out split, the step layout, the schedule, LoRA and the run's bookkeeping."""

    data: list[str] = field(default_factory=list)  # rankings / pairwise JSONL files
    val_data: list[str] = field(default_factory=list)  # held-out rankings; empty = hold out val_fraction of the prompts
    val_fraction: float = 0.1  # share of prompts held out when val_data is empty
    out: str = ""  # checkpoint folder (also holds log.jsonl and loss.png)
    max_len: int = 512  # tokens per prompt + answer; longer ones are cut (and counted)
    micro_batch: int = 4  # rankings per forward/backward on each process
    batch_rankings: int = 0  # rankings per optimizer step over all processes; 0 = one micro-batch per process
    epochs: float = 1.0  # passes over the training rankings
    max_steps: int = 0  # optimizer steps; 0 derives them from epochs
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    lora_rank: int = 0  # 0 = train all weights; r > 0 = rank-r adapters with the base frozen
    lora_alpha: float = 32.0  # adapter scale is lora_alpha / lora_rank
    lora_layers: int = 0  # adapters only in the last N transformer blocks (0 = every block); the backward stops below them
    dtype: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the device runs it natively (dtypes.py)
    eval_every: int = 50  # steps between held-out evaluations (and at the end)
    save_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between progress lines
    resume: bool = False  # continue from out/'s train_state.pt
    seed: int = 0  # held-out split, data order, adapter and head init
    device: str = "auto"  # "auto", "cpu", "cuda"
    peak_flops: float = 0.0  # FLOP/s for MFU; 0 measures this device

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.data:
            raise ValueError(f"{name}.data is required: rankings or pairwise JSONL files")
        for key in ("max_len", "micro_batch", "eval_every", "save_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{name}.{key}={getattr(self, key)} must be positive")
        if self.max_steps < 0 or self.batch_rankings < 0 or self.epochs <= 0:
            raise ValueError(f"{name}: max_steps and batch_rankings must be >= 0 and epochs > 0")
        if not self.val_data and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"{name}.val_fraction={self.val_fraction} must be in (0, 1) when no val_data is given")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.lora_rank < 0:
            raise ValueError(f"{name}: lr={self.lr} > 0, min_lr_ratio={self.min_lr_ratio} in [0, 1], lora_rank={self.lora_rank} >= 0")
        C.parse_dtype(self.dtype)


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


def read_split(cfg: RankingsTrainConfig) -> tuple[list[Ranking], list[Ranking]]:
    """Train and held-out rankings: val_data when given, else a seeded split by prompt."""
    rankings = read_rankings(cfg.data)
    if cfg.val_data:
        return rankings, read_rankings(cfg.val_data)
    return split_by_prompt(rankings, cfg.val_fraction, cfg.seed)


def step_layout(cfg: RankingsTrainConfig, n_train: int, dist: C.Dist) -> tuple[int, int, ShuffledBatches, int]:
    """Rankings per optimizer step, micro-steps per step, the batch order and the step count."""
    per_step = cfg.batch_rankings or cfg.micro_batch * dist.world
    if per_step % (cfg.micro_batch * dist.world):
        raise ValueError(f"batch_rankings={per_step} is not a multiple of micro_batch*processes={cfg.micro_batch * dist.world}")
    accum = per_step // (cfg.micro_batch * dist.world)
    batches = ShuffledBatches(n_train, cfg.micro_batch, accum, cfg.seed, dist.rank, dist.world)
    return per_step, accum, batches, cfg.max_steps or max(1, math.ceil(cfg.epochs * n_train / per_step))


def run_log(cfg: RankingsTrainConfig, model: GPT, train: TokenizedRankings, lora, dist: C.Dist, out: Path, start_step: int):
    """FLOPs per token (for MFU), the peak to divide by, the run's log and its training pair count."""
    mean_len = sum(len(s) for row in train.seqs for s in row) / max(1, sum(len(row) for row in train.seqs))
    fpt = flops_per_token(model.cfg, int(mean_len)) * (4 / 6 if lora is not None else 1.0)  # LoRA: no weight gradients
    peak = C.peak_flops(dist.device, cfg.dtype, cfg.peak_flops) * dist.world
    n_pairs = sum(len(r) * (len(r) - 1) // 2 for r in train.rankings)
    return fpt, peak, C.RunLog(out, dist, resume_step=start_step if cfg.resume else None), n_pairs


RESUME_KEYS = ("base", "data", "val_data", "val_fraction", "max_len", "micro_batch", "batch_rankings", "epochs", "max_steps", "lora_rank", "lora_alpha", "lora_layers", "seed")


def load_policy(name_or_path: str, device: torch.device) -> tuple[GPT, Tokenizer, Path]:
    """A checkpoint (folder or known name) as an fp32 GPT for training (LoRA checkpoints load merged)."""
    from ..convert.registry import resolve

    path = resolve(name_or_path)
    ck = ckpt_io.load(path)
    return ck.model.float().to(device), ck.tokenizer, Path(path)


@torch.no_grad()
def evaluate_rankings(rm: RewardModel, data: TokenizedRankings, batch: int, device, dtype: str, dist: C.Dist | None = None) -> dict:
    """Held-out loss (per ranking) and pairwise accuracy: the share of (better, worse) pairs the
    reward model orders like the labeler."""
    dist = dist or C.Dist(device=torch.device(device))
    was = rm.training
    rm.eval()
    sums = torch.zeros(3, device=device)  # loss, correct pairs, pairs
    mine = list(range(dist.rank, len(data), dist.world))
    for i in range(0, len(mine), batch):
        ids, last, groups = collate(data, mine[i : i + batch])
        with C.autocast(dist.device, dtype):
            scores = rm(ids.to(device), last.to(device))
        loss, correct, pairs = R.ranking_loss(scores, groups)
        sums += torch.tensor([loss.item(), correct, pairs], device=device)
    sums = C.all_reduce_sum(sums, dist)
    rm.train(was)
    return {"val_loss": sums[0].item() / max(1, len(data)), "val_accuracy": sums[1].item() / max(1.0, sums[2].item()), "val_pairs": int(sums[2].item())}


@torch.no_grad()
def score_all(rm: RewardModel, seqs: list[list[int]], batch: int, device, dtype: str) -> torch.Tensor:
    """Reward of every sequence (fp32, on the CPU)."""
    was = rm.training
    rm.eval()
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        T = max(map(len, chunk))
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for n, s in enumerate(chunk):
            ids[n, : len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in chunk])
        with C.autocast(torch.device(device), dtype):
            out.append(rm(ids.to(device), last.to(device)).float().cpu())
    rm.train(was)
    return torch.cat(out)


def main(cfg: RewardConfig) -> Path:
    dist, out, state = C.begin_run(cfg, RESUME_KEYS)
    gpt, tok, base_path = load_policy(cfg.base, dist.device)
    base_snapshot = ckpt_io.snapshot_id(base_path)
    lora = LoRA(gpt, cfg.lora_rank, cfg.lora_alpha, 0.0, DEFAULT_TARGETS, cfg.seed, cfg.lora_layers) if cfg.lora_rank else None
    rm = RewardModel(gpt, seed=cfg.seed)
    start_step = 0
    if state is not None:
        C.check_parent(out, base_snapshot, base_path, "base")
        extra = ckpt_io.load_extra(out)
        with torch.no_grad():
            if lora is not None:
                lora.load(extra, str(out / "extra.safetensors"))
            else:
                gpt.load_state_dict(ckpt_io.load(out).model.state_dict())
            rm.value_head.weight.copy_(extra["value_head.weight"])
            rm.value_head.bias.copy_(extra["value_head.bias"])
        start_step = state["step"]

    # Data: every line checked before training starts.
    train_r, val_r = read_split(cfg)
    max_len = min(cfg.max_len, gpt.cfg.max_seq_len)
    train, val = tokenize_rankings(train_r, tok, max_len), tokenize_rankings(val_r, tok, max_len)
    per_step, accum, batches, max_steps = step_layout(cfg, len(train), dist)

    trainable_module = nn.ModuleList([lora, rm.value_head]) if lora is not None else rm
    optimizer = C.make_optimizer(trainable_module, cfg.lr, cfg.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        C.set_rng_state(state["rng"])
    train_model: nn.Module = rm
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(rm)
    fpt, peak, log, n_pairs = run_log(cfg, gpt, train, lora, dist, out, start_step)
    ks = sorted({len(r) for r in train.rankings})
    log.print(
        f"rm: base {base_path} ({gpt.num_params() / 1e6:.1f}M params"
        + (f", LoRA r={cfg.lora_rank}: {lora.num_params() / 1e6:.2f}M trainable + head" if lora is not None else ", all trained")
        + f"), {len(train)} train rankings (K in {ks}, {n_pairs} pairs) / {len(val)} held out, "
        f"{per_step} rankings/step = {cfg.micro_batch} x {accum} accum x {dist.world} proc, {max_steps} steps"
        + (f", resuming at step {start_step}" if cfg.resume else "")
    )
    if train.truncated or val.truncated:
        log.print(f"rm: {train.truncated} train / {val.truncated} held-out answers cut to {max_len} tokens")
    meta = {
        "stage": "rm",
        "parent": str(base_path.resolve()),
        "parent_snapshot": base_snapshot,
        "data": [str(Path(d).resolve()) for d in cfg.data],
        "rankings": {"train": len(train), "val": len(val), "train_pairs": n_pairs},
        "lora": lora.meta() if lora is not None else None,
        "reward_shift": 0.0,
        "normalised": False,
    }
    if state is not None:  # a finished run's head already carries its shift
        saved_meta = ckpt_io.load_json(out / "meta.json")
        meta.update(reward_shift=saved_meta.get("reward_shift", 0.0), normalised=saved_meta.get("normalised", False))

    def extra_tensors() -> dict:
        t = rm.head_tensors()
        if lora is not None:
            t.update(lora.tensors())
        return t

    def save(step: int, metrics: dict) -> None:
        meta.update(step=step, metrics=metrics)
        C.save_training(out, gpt, tok, meta, optimizer, step, to_dict(cfg), dist, extra_tensors=extra_tensors())
        log.plot(out / "loss.png", keys=("loss", "val_loss", "accuracy", "val_accuracy"), title=f"reward model from {base_path.name}")

    def loss_fn(module: nn.Module, batch) -> tuple[torch.Tensor, None]:
        ids, last, groups = batch
        loss, correct, pairs = R.ranking_loss(module(ids, last), groups)
        stats[0] += correct
        stats[1] += pairs
        return loss, None

    rm.train()
    progress = C.Progress(fpt, peak, max_steps, start_step)
    t_start = time.time()
    metrics: dict = {}
    step = start_step
    if step == 0:
        metrics.update(evaluate_rankings(rm, val, cfg.micro_batch, dist.device, cfg.dtype, dist))
        log.log({"step": 0, **metrics})
        log.print(f"step 0: held-out accuracy {metrics['val_accuracy']:.3f} over {metrics['val_pairs']} pairs (untrained head)")
    while step < max_steps:
        if step > start_step and step % cfg.eval_every == 0:
            metrics.update(evaluate_rankings(rm, val, cfg.micro_batch, dist.device, cfg.dtype, dist))
            log.log({"step": step, **metrics})
            log.print(f"step {step}: held-out loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}")
        if step > start_step and step % cfg.save_every == 0:
            save(step, metrics)
        lr = C.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = []
        for i in range(accum):
            ids, last, groups = collate(train, batches.get(step, i))
            micro.append((ids.to(dist.device), last.to(dist.device), groups))
        stats = [0, 0]
        r = C.train_step(train_model, micro, loss_fn, optimizer, dist, cfg.dtype, cfg.grad_clip, count_fn=lambda b: len(b[2]))
        acc = C.all_reduce_sum(torch.tensor([float(stats[0]), float(stats[1])], device=dist.device), dist)
        tokens = C.all_reduce_sum(torch.tensor(float(sum(b[0].numel() for b in micro)), device=dist.device), dist).item()
        p = progress.update(step, tokens)
        step += 1
        rec = {"step": step, "loss": r["loss"], "accuracy": acc[0].item() / max(1.0, acc[1].item()), "lr": lr, "grad_norm": r["grad_norm"], "tok_per_s": p["tok_per_s"]}
        if step % cfg.log_every == 0 or step == max_steps:
            log.log(rec)
            log.print(
                f"step {step}/{max_steps} | loss {r['loss']:.4f} | pair acc {rec['accuracy']:.3f} | lr {lr:.2e} | "
                f"{p['tok_per_s']:,.0f} tok/s | ETA {C.fmt_time(p['eta_s'])}"
            )
    metrics.update(evaluate_rankings(rm, val, cfg.micro_batch, dist.device, cfg.dtype, dist))

    # Normalise: the SFT policy's answers (the training rankings' responses) score 0 on average.
    if dist.main:
        scores = score_all(rm, [s for row in train.seqs for s in row], cfg.micro_batch * 4, dist.device, cfg.dtype)
        shift = scores.mean().item()
        with torch.no_grad():
            rm.value_head.bias -= shift
        meta.update(reward_shift=meta["reward_shift"] + shift, normalised=True, reward_std=scores.std().item())
        metrics["reward_std"] = scores.std().item()
    log.log({"step": step, **metrics})
    log.print(
        f"step {step}: held-out loss {metrics['val_loss']:.4f}, pairwise accuracy {metrics['val_accuracy']:.3f} "
        f"({metrics['val_pairs']} pairs); reward shifted by {-meta['reward_shift']:+.4f} so SFT answers score mean 0 (std {meta.get('reward_std', 0):.3f})"
    )
    save(step, metrics)
    log.print(f"rm: checkpoint {out}, {time.time() - t_start:.0f}s")
    C.teardown_dist()
    return out
