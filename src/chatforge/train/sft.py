"""Stage 1: supervised fine-tuning on demonstrations (InstructGPT step 1; Ouyang et al. 2022).

Maximise log P(assistant tokens | conversation so far): the loss covers every assistant turn and
the end-of-turn token closing it (the mask comes from Tokenizer.render), normalised by the
number of such tokens in the global batch. Optionally GPT-1's auxiliary objective
(Radford et al. 2018, eq. 3): L = L_sft + lm_coef * L_lm on pretraining token shards, each term
normalised by its own token count.

Full fine-tuning, or LoRA adapters (train/lora.py) with the base weights frozen.
main(cfg) reads top to bottom like pretraining and shares its helpers (train/common.py):
build or resume, then per step: eval (validation loss + fixed-prompt samples), save, step, log.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..data.chat import ChatBatches, read_conversations, tokenize, val_batches
from ..model import flops_per_token
from . import common as C
from .lora import DEFAULT_TARGETS, LoRA

SAMPLE_PROMPTS = ["What is 12 + 7?", "Hello! How are you today?", "「床前明月光」的下一句是什么？", "3米等于多少厘米？"]


@dataclass
class SFTConfig:
    base: str = ""  # checkpoint folder or known model name (`chatforge models`) to fine-tune
    data: list[str] = field(default_factory=list)  # conversation files/folders: .jsonl, .parquet, `datasets` save_to_disk folders
    val_data: list[str] = field(default_factory=list)  # held-out conversations; empty = hold out val_fraction of data
    val_fraction: float = 0.05  # share of `data` held out for validation when val_data is empty
    out: str = "runs/sft"  # checkpoint folder (also holds log.jsonl and loss.png)
    seq_len: int = 512  # tokens per row; longer conversations are truncated (and counted)
    pack: bool = True  # several conversations per row (block-diagonal attention); --no-pack pads one per row
    micro_batch: int = 8  # rows per forward/backward on each process
    batch_rows: int = 0  # rows per optimizer step over all processes; 0 = one micro-batch per process
    epochs: float = 2.0  # passes over the training conversations; sets the number of steps
    max_steps: int = 0  # optimizer steps; 0 derives them from epochs
    time_budget_s: float = 0.0  # stop (and save) after this many seconds; 0 = no limit
    lr: float = 1e-4  # peak learning rate (LoRA usually wants ~10x a full fine-tune's)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0 trains rank-r adapters with the base frozen
    lora_alpha: float = 32.0  # adapter scale is lora_alpha / lora_rank
    lora_layers: int = 0  # adapters only in the last N transformer blocks (0 = every block); the backward stops below them
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # linear layers that get adapters
    merge: bool = False  # LoRA: fold the adapters into the weights in the final checkpoint (no resume after)
    lm_data: str = ""  # token-shard folder for the pretraining-loss mix; empty = no mix
    lm_coef: float = 0.0  # lambda in L = L_sft + lambda * L_lm (GPT-1 used 0.5)
    dtype: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the device runs it natively (dtypes.py)
    compile: bool = False  # torch.compile the model
    eval_every: int = 50  # steps between validation runs (and at the end)
    sample_every: int = 0  # steps between printed samples; 0 = at each evaluation
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))  # user turns answered at each sample
    sample_tokens: int = 48  # new tokens per sample (greedy)
    save_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between progress lines
    resume: bool = False  # continue from out/'s train_state.pt
    seed: int = 0  # validation split, data order, adapter init
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"...
    peak_flops: float = 0.0  # FLOP/s for MFU; 0 measures this device with a matmul probe
    fsdp: str = "auto"  # "on": shard weights, gradients and AdamW state over torchrun's processes (FSDP2, full fine-tuning); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("SFTConfig.base is required: a checkpoint folder or a known model name")
        if not self.data:
            raise ValueError("SFTConfig.data is required: .jsonl/.parquet files or folders of conversations")
        for name in ("seq_len", "micro_batch", "eval_every", "save_every", "log_every", "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be positive")
        if self.max_steps < 0 or self.batch_rows < 0 or self.epochs <= 0:
            raise ValueError(f"SFTConfig: max_steps={self.max_steps} and batch_rows={self.batch_rows} must be >= 0, epochs={self.epochs} > 0")
        if not self.val_data and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"SFTConfig.val_fraction={self.val_fraction} must be in (0, 1) when no val_data is given")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"SFTConfig: lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        if self.lora_rank < 0:
            raise ValueError(f"SFTConfig.lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        if self.merge and not self.lora_rank:
            raise ValueError("SFTConfig.merge only applies to LoRA; set --lora-rank too")
        if self.lm_coef < 0 or bool(self.lm_coef) != bool(self.lm_data):
            raise ValueError(f"SFTConfig: the pretraining mix needs both lm_data and lm_coef > 0 (got {self.lm_data!r}, {self.lm_coef})")
        C.parse_dtype(self.dtype)
        if self.fsdp not in ("on", "off", "auto") or (self.fsdp == "on" and self.lora_rank):
            raise ValueError(f"SFTConfig.fsdp={self.fsdp!r}: 'on', 'off' or 'auto', and 'on' only for full fine-tuning (LoRA's adapters are small: DDP)")


# Fields that must match to resume: they decide the model, the adapters and the data stream.
RESUME_KEYS = (
    "base", "data", "val_data", "val_fraction", "seq_len", "pack", "micro_batch", "batch_rows", "epochs", "max_steps",
    "lora_rank", "lora_alpha", "lora_layers", "lora_targets", "lm_data", "lm_coef", "seed",
)


class SFTLoss(nn.Module):
    """The model (with its adapters, when LoRA is on) and the losses as one module, so DDP and
    torch.compile see a single forward per micro-step even when the pretraining mix adds a
    second pass. Returns (sum of SFT token losses, sum of LM token losses or 0)."""

    def __init__(self, model: nn.Module, lora: LoRA | None):
        super().__init__()
        self.model, self.lora = model, lora  # lora registered so DDP syncs the adapters' gradients

    def forward(self, x, y, pos=None, mask=None, lm_x=None, lm_y=None) -> tuple[torch.Tensor, torch.Tensor]:
        # The output head and softmax run only where there is a target (the assistant tokens):
        # prompts, system turns and padding cost the transformer body but not the (wide) head.
        keep = y != -100
        sft = F.cross_entropy(self.model.head(self.model.hidden(x, pos, mask)[keep]).float(), y[keep], reduction="sum")
        if lm_x is None:
            return sft, torch.zeros((), device=sft.device)
        lm, _ = C.token_loss_sum(self.model(lm_x), lm_y)
        return sft, lm


def split_validation(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` of the conversations (at least one)."""
    import random

    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(fraction * len(convs)))
    if n_val >= len(convs):
        raise ValueError(f"{len(convs)} conversations are too few to hold out {fraction:.0%} for validation; add data or pass --val-data")
    val = set(idx[:n_val])
    return [c for i, c in enumerate(convs) if i not in val], [c for i, c in enumerate(convs) if i in val]


def load_base(cfg: SFTConfig, device: torch.device):
    """The base checkpoint (a folder or a known name, imported on first use), as fp32 for training."""
    from ..convert.registry import resolve

    path = resolve(cfg.base)
    ck = ckpt_io.load(path)
    if ck.meta.get("lora"):
        raise ValueError(f"{path}: a LoRA checkpoint with unmerged adapters; fine-tune its merged form (train it with --merge)")
    return ck.model.float().to(device), ck.tokenizer, path


def main(cfg: SFTConfig) -> Path:
    dist, out, state = C.begin_run(cfg, RESUME_KEYS)

    # Model: the base (plus adapters), then the saved state when resuming.
    model, tok, base_path = load_base(cfg, dist.device)
    mcfg = model.cfg
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's context ({mcfg.max_seq_len})")
    base_snapshot = ckpt_io.snapshot_id(base_path)
    lora = LoRA(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed, cfg.lora_layers) if cfg.lora_rank else None
    start_step = 0
    if state is not None:
        C.check_parent(out, base_snapshot, base_path, "base")
        C.restore_weights(out, model, lora)
        start_step = state["step"]

    # Data: read and check everything first, so a bad line fails before any training.
    convs = read_conversations(cfg.data)
    if cfg.val_data:
        train_convs, val_convs = convs, read_conversations(cfg.val_data)
    else:
        train_convs, val_convs = split_validation(convs, cfg.val_fraction, cfg.seed)
    train = tokenize(train_convs, tok, cfg.seq_len + 1)
    val = tokenize(val_convs, tok, cfg.seq_len + 1)
    if len(train) == 0:
        raise ValueError(f"no training conversation has an assistant token within seq_len={cfg.seq_len}; raise --seq-len")
    rows_per_step = cfg.batch_rows or cfg.micro_batch * dist.world
    if rows_per_step % (cfg.micro_batch * dist.world):
        raise ValueError(f"batch_rows={rows_per_step} is not a multiple of micro_batch*processes={cfg.micro_batch * dist.world}")
    accum = rows_per_step // (cfg.micro_batch * dist.world)
    batches = ChatBatches(train, cfg.seq_len, cfg.pack, cfg.micro_batch, accum, cfg.seed, dist.rank, dist.world)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.rows_per_epoch() / rows_per_step))
    lm_batches = None
    if cfg.lm_data:
        from ..data.loader import Shards, TrainBatches

        shards = Shards(cfg.lm_data)
        if shards.meta["vocab_size"] > mcfg.vocab_size:
            raise ValueError(f"{cfg.lm_data}: shards use {shards.meta['vocab_size']} tokens, the model has {mcfg.vocab_size}; use shards of the base's tokenizer")
        lm_batches = TrainBatches(shards, cfg.seq_len, cfg.micro_batch, accum, cfg.seed, dist.rank, dist.world)

    sharded = lora is None and C.use_fsdp(cfg.fsdp, model.num_params(non_embedding=False), dist)
    if sharded:
        from torch.distributed.fsdp import register_fsdp_forward_method

        C.fsdp_shard(model, dist, cfg.dtype)
        register_fsdp_forward_method(model, "hidden")  # SFTLoss runs hidden() then head(), not forward()
    trainable = [p for p in (lora.parameters() if lora is not None else model.parameters()) if p.requires_grad]
    optimizer = C.make_optimizer(lora if lora is not None else model, cfg.lr, cfg.weight_decay)
    if state is not None:
        C.load_optimizer(optimizer, model, state, out)
        C.set_rng_state(state["rng"])
    train_model: nn.Module = SFTLoss(model, lora)
    if cfg.compile:
        train_model = torch.compile(train_model)
    if dist.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    # LoRA skips the weight gradients: ~4N FLOPs per token (forward 2N, input gradients 2N), not 6N.
    fpt = flops_per_token(mcfg, cfg.seq_len) * (4 / 6 if lora is not None else 1.0)
    peak = C.peak_flops(dist.device, cfg.dtype, cfg.peak_flops) * dist.world
    log = C.RunLog(out, dist, resume_step=start_step if cfg.resume else None)
    fill = sum(len(i) - 1 for i in train.ids) / (batches.rows_per_epoch() * cfg.seq_len)
    log.print(
        f"sft: base {base_path} ({model.num_params() / 1e6:.1f}M params), "
        + (f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} on {len(lora.names)} layers ({lora.num_params() / 1e6:.2f}M trainable), "
           if lora is not None else f"full fine-tuning ({sum(p.numel() for p in trainable) / 1e6:.1f}M trainable), ")
        + f"{len(train):,} train / {len(val):,} val conversations ({train.tokens:,} tokens, {train.target_tokens:,} trained on), "
        f"{batches.rows_per_epoch():,} {'packed' if cfg.pack else 'padded'} rows of {cfg.seq_len} ({fill:.0%} full), "
        f"{rows_per_step} rows/step = {cfg.micro_batch} x {accum} accum x {dist.world} proc, {max_steps} steps"
        + (f", LM mix lambda={cfg.lm_coef}" if cfg.lm_data else "")
        + (f", resuming at step {start_step}" if cfg.resume else "")
    )
    if train.truncated or val.truncated or train.dropped or val.dropped:
        log.print(
            f"sft: truncated to {cfg.seq_len + 1} tokens: {train.truncated} train / {val.truncated} val conversations; "
            f"left with no assistant token (not used): {train.dropped} train / {val.dropped} val"
        )
    meta = {
        "stage": "sft",
        "parent": str(Path(base_path).resolve()),
        "parent_snapshot": base_snapshot,
        "data": [str(Path(d).resolve()) for d in cfg.data],
        "params": model.num_params(),
        "conversations": {"train": len(train), "val": len(val), "truncated": train.truncated + val.truncated,
                          "dropped": train.dropped + val.dropped},
        "lora": lora.meta() if lora is not None else None,
    }

    def evaluate() -> dict:
        model.eval()
        loss_sum = torch.zeros((), device=dist.device)
        count = torch.zeros((), device=dist.device)
        with torch.no_grad(), C.autocast(dist.device, cfg.dtype):
            for batch in val_batches(val, cfg.seq_len, cfg.pack, cfg.micro_batch, dist.rank, dist.world):
                x, y, *rest = (t.to(dist.device) for t in batch)
                s, n = C.token_loss_sum(model(x, *rest), y)
                loss_sum += s
                count += n
        model.train()
        count = C.all_reduce_sum(count, dist)
        return {"val_loss": (C.all_reduce_sum(loss_sum, dist) / count.clamp(min=1)).item()} if count.item() else {}

    def show_samples() -> None:
        if not dist.main or not cfg.sample_prompts or sharded:  # sharded, rank 0 alone cannot run the model (the engine is not FSDP-aware)
            return
        from ..engine import Engine, SamplingParams

        prompts = [tok.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in cfg.sample_prompts]
        engine = Engine(model, tok, max_batch=len(prompts), max_seq_len=min(mcfg.max_seq_len, max(map(len, prompts)) + cfg.sample_tokens + 1))
        texts = [""] * len(prompts)
        for ev in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=cfg.sample_tokens)):
            texts[ev.request_id] += ev.text
        for p, t in zip(cfg.sample_prompts, texts):
            log.print(f"  sample | {p} -> {t!r}")
        model.train()

    def save(step: int, metrics: dict) -> None:
        meta.update(step=step, metrics=metrics)
        extra = lora.tensors() if lora is not None else None
        C.save_training(out, model, tok, meta, optimizer, step, to_dict(cfg), dist, extra_tensors=extra)
        log.plot(out / "loss.png", keys=("loss", "val_loss", "lm_loss"), title=f"sft from {Path(base_path).name}")

    model.train()
    progress = C.Progress(fpt, peak, max_steps, start_step)
    t_start = time.time()
    metrics: dict = {}
    step = start_step
    r: dict = {}
    if step == 0:
        metrics.update(evaluate())  # the base model's validation loss: the number SFT has to beat
        log.log({"step": 0, **metrics})
        log.print(f"step 0: val loss {metrics.get('val_loss', float('nan')):.4f} (base)")
    while step < max_steps:
        if step > start_step and step % cfg.eval_every == 0:
            metrics.update(evaluate())
            log.log({"step": step, **metrics})
            log.print(f"step {step}: val loss {metrics.get('val_loss', float('nan')):.4f}")
        if step > start_step and (step % cfg.sample_every == 0 if cfg.sample_every else step % cfg.eval_every == 0):
            show_samples()
        if step > start_step and step % cfg.save_every == 0:
            save(step, metrics)
        lr = C.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro, positions = [], 0
        for i in range(accum):
            x, y, *rest = batches.get(step, i)
            pos, mask = rest if rest else (None, None)
            lm = lm_batches.get(step, i) if lm_batches is not None else (None, None)
            micro.append(tuple(None if t is None else t.to(dist.device) for t in (x, y, pos, mask, *lm)))
            positions += batches.positions(step, i)
        r = step_with_mix(train_model, micro, optimizer, dist, cfg)
        positions = C.all_reduce_sum(torch.tensor(float(positions), device=dist.device), dist).item()
        p = progress.update(step, positions)
        step += 1
        rec = {"step": step, "loss": r["loss"], "lr": lr, "grad_norm": r["grad_norm"], "tok_per_s": p["tok_per_s"], "mfu": p["mfu"]}
        if "lm_loss" in r:
            rec.update(sft_loss=r["sft_loss"], lm_loss=r["lm_loss"])
        if step % cfg.log_every == 0 or step == max_steps:
            log.log(rec)
            log.print(
                f"step {step}/{max_steps} | loss {r['loss']:.4f}"
                + (f" (sft {r['sft_loss']:.4f}, lm {r['lm_loss']:.4f})" if "lm_loss" in r else "")
                + f" | lr {lr:.2e} | {p['tok_per_s']:,.0f} tok/s | MFU {100 * p['mfu']:.1f}% | ETA {C.fmt_time(p['eta_s'])}"
            )
        if cfg.time_budget_s and C.any_rank(time.time() - t_start > cfg.time_budget_s, dist):  # every rank stops at the same step
            log.print(f"sft: time budget of {cfg.time_budget_s:.0f}s reached at step {step}")
            break
    metrics.update(evaluate())
    if r:
        metrics["train_loss"] = r["loss"]
    log.log({"step": step, **metrics})
    log.print(f"step {step}: val loss {metrics.get('val_loss', float('nan')):.4f}")
    show_samples()
    save(step, metrics)
    if cfg.merge and lora is not None and dist.main:
        lora.merge(model)
        meta.update(lora=None, merged_lora=lora.meta())
        ckpt_io.save(out, model, tok, meta)  # a plain checkpoint: no adapters, no train_state
        log.print(f"sft: adapters merged into the weights of {out}")
    log.print(f"sft: checkpoint {out}, log {out / 'log.jsonl'}, plot {out / 'loss.png'}")
    C.teardown_dist()
    return out


def step_with_mix(train_model: nn.Module, micro: list, optimizer, dist: C.Dist, cfg: SFTConfig) -> dict:
    """common.train_step with L = L_sft + lambda * L_lm. train_step divides the summed loss by the
    global count of SFT targets (N_sft), so the LM sum is scaled by lambda * N_sft / N_lm to leave
    each term normalised by its own tokens; the two parts are also reported on their own."""
    parts = {"sft": torch.zeros(()), "lm": torch.zeros(())}
    n_sft = C.all_reduce_sum(torch.tensor(float(sum(int((b[1] != -100).sum()) for b in micro)), device=dist.device), dist).item()
    n_lm = float(sum(b[5].numel() for b in micro if b[5] is not None) * dist.world)
    lm_scale = cfg.lm_coef * n_sft / n_lm if n_lm else 0.0

    def loss_fn(module: nn.Module, batch) -> tuple[torch.Tensor, None]:
        sft, lm = module(*batch)
        parts["sft"] = parts["sft"] + sft.detach().cpu()
        parts["lm"] = parts["lm"] + lm.detach().cpu()
        return sft + lm_scale * lm, None

    r = C.train_step(train_model, micro, loss_fn, optimizer, dist, cfg.dtype, cfg.grad_clip)
    if n_lm:
        sums = C.all_reduce_sum(torch.stack([parts["sft"], parts["lm"]]).to(dist.device), dist)
        r.update(sft_loss=sums[0].item() / n_sft, lm_loss=sums[1].item() / n_lm)
    return r


def speedrun_sft(base: Path, out: Path, budget_s: float, seed: int = 0, device: str = "auto") -> Path:
    """The speedrun's SFT stage: the default demonstration set (built without the teacher when it
    is not cached yet, to keep the run short), then full fine-tuning of `base` sized to finish in
    about `budget_s` seconds: steps = budget x the pretraining run's measured tokens/s (read from
    its log.jsonl) / tokens per step, so the cosine schedule ends when the time does. An
    interrupted run resumes."""
    import json

    from ..data.sft_default import SFTDefaultConfig, build_sft_default, default_sft_dir

    data = default_sft_dir()
    if not (data / "manifest.json").is_file():
        data = build_sft_default(SFTDefaultConfig(teacher_prompts=0))
    seq_len, micro_batch = min(256, ckpt_io.load_config(base).max_seq_len), 16
    rates = [r["tok_per_s"] for r in map(json.loads, (Path(base) / "log.jsonl").read_text().splitlines()) if "tok_per_s" in r] \
        if (Path(base) / "log.jsonl").is_file() else []
    max_steps = max(20, int(0.85 * budget_s * rates[-1] / (micro_batch * seq_len))) if rates else 0  # 15% for evals and saves
    cfg = SFTConfig(
        base=str(base), data=[str(data / "train")], val_data=[str(data / "heldout")], out=str(out), seq_len=seq_len,
        micro_batch=micro_batch, epochs=3.0, max_steps=max_steps, lr=1e-3, warmup_steps=20, time_budget_s=max(30.0, budget_s),
        eval_every=max(1, max_steps // 4) if max_steps else 100, save_every=max(1, max_steps // 4) if max_steps else 100,
        log_every=10, resume=(Path(out) / "train_state.pt").is_file(), seed=seed, device=device,
    )
    return main(cfg)
