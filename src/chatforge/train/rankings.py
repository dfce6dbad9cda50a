"""Training on rankings: what the reward model (train/reward.py) and DPO (train/dpo.py) share,
and what the tools that score answers with a reward model use (label, flywheel, best-of-n).

- the data: rankings tokenized as prompt + answer sequences, held out by prompt, dealt into
  batches that depend on the step number only (ShuffledBatches, also PPO's prompt order);
- RankingsTrainConfig, the fields of both stages, and the step layout they derive from it;
- RankingsStage: the trained model spread over processes (FSDP2 or DDP), the run's header line
  and the loop that drives it (evaluations deal held-out items with data/loader.rank_batches,
  as many batches on every process);
- score_all: a reward model's score of many sequences.

All C(K,2) pairs of one ranking form ONE batch element (InstructGPT): a batch is a set of
rankings, and every answer gets one forward pass however many pairs it is in.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data.rankings import Ranking, fit, prompt_ids, read_rankings, response_ids
from ..model import GPT, RewardModel, flops_per_token
from ..tokenizer import Tokenizer
from . import common as C
from .lora import LoRAConfig
from .loop import Loop, ScheduleConfig

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


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N,T) and the index of each sequence's last token (N,)."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def flatten(data: TokenizedRankings, idx: list[int]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """Every answer sequence of the chosen rankings, where each one's answer starts, and each
    ranking as indices into those sequences (best first)."""
    flat, starts, groups = [], [], []
    for i in idx:
        base = len(flat)
        flat += data.seqs[i]
        starts += data.prompt_lens[i]
        groups.append([base + j for j in data.rankings[i]])
    return flat, starts, groups


def collate(data: TokenizedRankings, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """pad() of every answer of the chosen rankings, and each ranking as row indices (best first)."""
    flat, _, groups = flatten(data, idx)
    ids, last = pad(flat)
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


# ---- the stages' shared config and layout ------------------------------------------------------


@dataclass
class RankingsTrainConfig(LoRAConfig, ScheduleConfig):
    """What every stage that trains on rankings shares (the reward model, DPO): the data, the
    held-out split and the step layout; the schedule, LoRA and the run's fields come from the
    groups it extends."""

    data: list[str] = field(default_factory=list)  # rankings / pairwise JSONL files
    val_data: list[str] = field(default_factory=list)  # held-out rankings; empty = hold out val_fraction of the prompts
    val_fraction: float = 0.1  # share of prompts held out when val_data is empty
    max_len: int = 512  # tokens per prompt + answer; longer ones are cut (and counted)
    micro_batch: int = 4  # rankings per forward/backward on each process
    batch_rankings: int = 0  # rankings per optimizer step over all processes; 0 = one micro-batch per process
    epochs: float = 1.0  # passes over the training rankings
    lr: float = 1e-5  # peak learning rate
    warmup_steps: int = 5  # linear warmup steps
    eval_every: int = 50  # steps between held-out evaluations (and at the end)
    seed: int = 0  # held-out split, data order, adapter and head init
    fsdp: str = "auto"  # "on": shard the trained model's weights, gradients and AdamW state over torchrun's processes (FSDP2, no LoRA); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.fsdp not in ("on", "off", "auto") or (self.fsdp == "on" and self.lora_rank):
            raise ValueError(f"{name}.fsdp={self.fsdp!r}: 'on', 'off' or 'auto', and 'on' only without LoRA (adapters are small: DDP)")
        if not self.data:
            raise ValueError(f"{name}.data is required: rankings or pairwise JSONL files")
        for key in ("max_len", "micro_batch"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{name}.{key}={getattr(self, key)} must be positive")
        if self.batch_rankings < 0 or self.epochs <= 0:
            raise ValueError(f"{name}: batch_rankings must be >= 0 and epochs > 0")
        if not self.val_data and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"{name}.val_fraction={self.val_fraction} must be in (0, 1) when no val_data is given")
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


def micro_tokens(micro: list, dist: C.Dist) -> float:
    """Token positions (padding included) of a step's micro-batches (ids first) over all ranks."""
    return C.all_reduce_sum(torch.tensor(float(sum(b[0].numel() for b in micro)), device=dist.device), dist).item()


class RankingsStage:
    """The reward model's and DPO's shared run skeleton: how the trained model is spread over
    processes, the header line and the loop. A subclass names itself (`name`), says what it
    trains (`trained`, `models_line`) and sets in __init__ what both compute alike: cfg, dist,
    log, lora, train, val, max_len, per_step, accum, max_steps, start, fpt, peak, optimizer (and
    calls `shard` before making the optimizer)."""

    name = ""
    sharded = False

    def shard(self, model: nn.Module, forward_methods: tuple[str, ...] = ()) -> None:
        """Shard `model` with FSDP2 when cfg.fsdp asks for it (C.use_fsdp; never with LoRA, whose
        adapters are small: they use DDP), and set `sharded`. Call before making the optimizer:
        its parameters are the shards. `forward_methods`: see C.fsdp_shard."""
        n_params = sum(p.numel() for p in model.parameters())
        self.sharded = self.lora is None and C.use_fsdp(self.cfg.fsdp, n_params, self.dist)
        if self.sharded:
            C.fsdp_shard(model, self.dist, self.cfg.dtype, forward_methods)

    def replicated(self, module: nn.Module) -> nn.Module:
        """`module` under DDP when several processes train it unsharded, else `module` itself."""
        return torch.nn.parallel.DistributedDataParallel(module) if self.dist.world > 1 and not self.sharded else module

    def trained(self) -> nn.Module:
        """The module that the loop puts in training mode."""
        raise NotImplementedError

    def models_line(self) -> str:
        """The header's start: the models and their sizes, up to the training rankings."""
        raise NotImplementedError

    def lora_note(self, also: str = "") -> str:
        cfg, lora = self.cfg, self.lora
        return f", LoRA r={cfg.lora_rank}: {lora.num_params() / 1e6:.2f}M trainable{also}" if lora is not None else ", all trained"

    def describe(self) -> None:
        cfg, train, val = self.cfg, self.train, self.val
        self.log.print(
            f"{self.name}: {self.models_line()} / {len(val)} held out, "
            f"{self.per_step} rankings/step = {cfg.micro_batch} x {self.accum} accum x {self.dist.world} proc, {self.max_steps} steps"
            + (f", resuming at step {self.start}" if cfg.resume else "")
        )
        if train.truncated or val.truncated:
            self.log.print(f"{self.name}: {train.truncated} train / {val.truncated} held-out answers cut to {self.max_len} tokens")

    def begin(self) -> Loop:
        """The run's header line, the model in training mode, and the loop that drives it."""
        self.describe()
        self.trained().train()
        return Loop(self.name, self, self.cfg, self.dist, self.log, self.max_steps, self.start,
                    flops_per_token=self.fpt, peak_flops=self.peak, optimizer=self.optimizer, eval_first=True)


# ---- scoring ----------------------------------------------------------------------------------


@torch.no_grad()
def score_all(rm: RewardModel, seqs: list[list[int]], batch: int, device, dtype: str) -> torch.Tensor:
    """Reward of every sequence (fp32, on the CPU)."""
    was = rm.training
    rm.eval()
    out = []
    for i in range(0, len(seqs), batch):
        ids, last = pad(seqs[i : i + batch])
        with C.autocast(torch.device(device), dtype):
            out.append(rm(ids.to(device), last.to(device)).float().cpu())
    rm.train(was)
    return torch.cat(out)
