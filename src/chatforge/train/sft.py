"""Stage 1: supervised fine-tuning on demonstrations (InstructGPT step 1; Ouyang et al. 2022).

Maximise log P(assistant tokens | conversation so far): the loss covers every assistant turn and
the end-of-turn token closing it (the mask comes from Tokenizer.render), normalised by the
number of such tokens in the global batch. Optionally GPT-1's auxiliary objective
(Radford et al. 2018, eq. 3): L = L_sft + lm_coef * L_lm on pretraining token shards, each term
normalised by its own token count.

Full fine-tuning, or LoRA adapters (train/lora.py) with the base weights frozen.
main(cfg) reads like pretraining's and shares its helpers (train/common.py) and its cadence
(train/loop.py): build or resume, then per step: eval (validation loss + fixed-prompt samples),
save, step, log.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..data.chat import ChatBatches, read_conversations, tokenize, val_batches
from ..engine import Engine, SamplingParams
from ..model import flops_per_token
from ..sample import sample_tokens
from . import common as C
from .lora import LoRA, LoRAConfig
from .loop import Loop, ScheduleConfig, StepCompiler, check_compile_mode

SAMPLE_PROMPTS = ["What is 12 + 7?", "Hello! How are you today?", "「床前明月光」的下一句是什么？", "3米等于多少厘米？"]


@dataclass
class SFTConfig(LoRAConfig, ScheduleConfig):
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
    time_budget_s: float = 0.0  # stop (and save) after this many seconds; 0 = no limit
    lr: float = 1e-4  # peak learning rate (LoRA usually wants ~10x a full fine-tune's)
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0 trains rank-r adapters with the base frozen
    merge: bool = False  # LoRA: fold the adapters into the weights in the final checkpoint (no resume after)
    lm_data: str = ""  # token-shard folder for the pretraining-loss mix; empty = no mix
    lm_coef: float = 0.0  # lambda in L = L_sft + lambda * L_lm (GPT-1 used 0.5)
    compile: str = "auto"  # torch.compile the training step: "on", "off", or "auto" (compile when the run is long enough and keep it only if measured faster: loop.StepCompiler)
    sample_every: int = 0  # steps between printed samples; 0 = at each evaluation
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))  # user turns answered at each sample
    sample_tokens: int = 48  # new tokens per sample (greedy)
    seed: int = 0  # validation split, data order, adapter init
    fsdp: str = "auto"  # "on": shard weights, gradients and AdamW state over torchrun's processes (FSDP2, full fine-tuning); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("SFTConfig.base is required: a checkpoint folder or a known model name")
        if not self.data:
            raise ValueError("SFTConfig.data is required: .jsonl/.parquet files or folders of conversations")
        for name in ("seq_len", "micro_batch", "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be positive")
        if self.batch_rows < 0 or self.epochs <= 0 or self.time_budget_s < 0 or self.sample_every < 0:
            raise ValueError(f"SFTConfig: batch_rows={self.batch_rows}, time_budget_s={self.time_budget_s} and sample_every={self.sample_every} "
                             f"must be >= 0, epochs={self.epochs} > 0")
        if not self.val_data and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"SFTConfig.val_fraction={self.val_fraction} must be in (0, 1) when no val_data is given")
        if self.merge and not self.lora_rank:
            raise ValueError("SFTConfig.merge only applies to LoRA; set --lora-rank too")
        if self.lm_coef < 0 or bool(self.lm_coef) != bool(self.lm_data):
            raise ValueError(f"SFTConfig: the pretraining mix needs both lm_data and lm_coef > 0 (got {self.lm_data!r}, {self.lm_coef})")
        if self.fsdp not in ("on", "off", "auto") or (self.fsdp == "on" and self.lora_rank):
            raise ValueError(f"SFTConfig.fsdp={self.fsdp!r}: 'on', 'off' or 'auto', and 'on' only for full fine-tuning (LoRA's adapters are small: DDP)")
        check_compile_mode(self.compile, "SFTConfig.compile")
        super().__post_init__()


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
        h = self.model.hidden(x, pos, mask)
        if torch.compiler.is_compiling():  # static shapes (no boolean indexing); inductor fuses the head with the loss
            sft, _ = C.token_loss_sum(self.model.head(h), y)
        else:
            keep = y != -100
            sft = F.cross_entropy(self.model.head(h[keep]).float(), y[keep], reduction="sum")
        if lm_x is None:
            return sft, torch.zeros((), device=sft.device)
        lm, _ = C.token_loss_sum(self.model(lm_x), lm_y)
        return sft, lm


def split_validation(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` of the conversations (at least one)."""
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(fraction * len(convs)))
    if n_val >= len(convs):
        raise ValueError(f"{len(convs)} conversations are too few to hold out {fraction:.0%} for validation; add data or pass --val-data")
    val = set(idx[:n_val])
    return [c for i, c in enumerate(convs) if i not in val], [c for i, c in enumerate(convs) if i in val]


def check_plain_base(path: Path) -> None:
    """SFT fine-tunes plain weights: a LoRA checkpoint with unmerged adapters is refused."""
    if ckpt_io.load_json(path / "meta.json").get("lora"):
        raise ValueError(f"{path}: a LoRA checkpoint with unmerged adapters; fine-tune its merged form (train it with --merge)")


def load_base(cfg: SFTConfig, device: torch.device):
    """The base checkpoint (a folder or a known name, imported on first use), as fp32 for training."""
    model, tok, path = C.load_policy(cfg.base, device)
    check_plain_base(path)
    return model, tok, path


class SFTStage:
    """One SFT run: set up in __init__ (model and adapters, data, optimizer, log), then what the
    loop calls (evaluate, eval_line, sample, save) and the training step."""

    def __init__(self, cfg: SFTConfig):
        dist, out, state = C.begin_run(cfg, RESUME_KEYS)  # processes, seeds, and the train state to resume from
        self.cfg, self.dist, self.out = cfg, dist, out
        # Model: the base (plus adapters), then the saved state when resuming.
        model, self.tok, self.base_path = load_base(cfg, dist.device)
        self.model = model
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's context ({model.cfg.max_seq_len})")
        base_snapshot = ckpt_io.snapshot_id(self.base_path)
        self.lora = lora = cfg.make_lora(model, cfg.seed)
        self.start = 0
        if state is not None:
            C.check_parent(out, base_snapshot, self.base_path, "base")
            C.restore_weights(out, model, lora)
            self.start = state["step"]
        self._data()

        self.sharded = lora is None and C.use_fsdp(cfg.fsdp, model.num_params(non_embedding=False), dist)
        if self.sharded:  # SFTLoss runs hidden() then head(), not forward()
            C.fsdp_shard(model, dist, cfg.dtype, forward_methods=("hidden",))
        self.optimizer = C.make_optimizer(lora if lora is not None else model, cfg.lr, cfg.weight_decay)
        if state is not None:
            C.restore_training(self.optimizer, model, state, out)
        self.compiler = StepCompiler(cfg.compile, dist.device, dist.world)
        self.train_model: nn.Module = self.compiler.setup(SFTLoss(model, lora))
        if dist.world > 1 and not self.sharded:
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.train_model)
        # LoRA skips the weight gradients: ~4N FLOPs per token (forward 2N, input gradients 2N), not 6N.
        self.fpt = flops_per_token(model.cfg, cfg.seq_len) * (4 / 6 if lora is not None else 1.0)
        self.peak = C.peak_flops(dist.device, cfg.dtype, cfg.peak_flops) * dist.world
        self.log = C.RunLog(out, dist, resume_step=self.start if cfg.resume else None)
        train, val = self.train, self.val
        self.meta = {
            "stage": "sft",
            "parent": str(Path(self.base_path).resolve()),
            "parent_snapshot": base_snapshot,
            "data": [str(Path(d).resolve()) for d in cfg.data],
            "params": model.num_params(),
            "conversations": {"train": len(train), "val": len(val), "truncated": train.truncated + val.truncated,
                              "dropped": train.dropped + val.dropped},
            "lora": lora.meta() if lora is not None else None,
        }

    def _data(self) -> None:
        """Read and check every conversation first, so a bad line fails before any training;
        then the batch layout and the step count (and the pretraining mix's batches)."""
        cfg, dist = self.cfg, self.dist
        convs = read_conversations(cfg.data)
        if cfg.val_data:
            train_convs, val_convs = convs, read_conversations(cfg.val_data)
        else:
            train_convs, val_convs = split_validation(convs, cfg.val_fraction, cfg.seed)
        self.train = tokenize(train_convs, self.tok, cfg.seq_len + 1)
        self.val = tokenize(val_convs, self.tok, cfg.seq_len + 1)
        if len(self.train) == 0:
            raise ValueError(f"no training conversation has an assistant token within seq_len={cfg.seq_len}; raise --seq-len")
        self.rows_per_step = cfg.batch_rows or cfg.micro_batch * dist.world
        if self.rows_per_step % (cfg.micro_batch * dist.world):
            raise ValueError(f"batch_rows={self.rows_per_step} is not a multiple of micro_batch*processes={cfg.micro_batch * dist.world}")
        self.accum = self.rows_per_step // (cfg.micro_batch * dist.world)
        self.batches = ChatBatches(self.train, cfg.seq_len, cfg.pack, cfg.micro_batch, self.accum, cfg.seed, dist.rank, dist.world)
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches.rows_per_epoch() / self.rows_per_step))
        self.lm_batches = None
        if cfg.lm_data:
            self.lm_batches = C.mix_batches(cfg.lm_data, self.model, cfg.seq_len, cfg.micro_batch, self.accum, cfg.seed, dist.rank, dist.world)

    def describe(self) -> None:
        cfg, lora, train, val, rows = self.cfg, self.lora, self.train, self.val, self.batches.rows_per_epoch()
        trainable = sum(p.numel() for p in (lora if lora is not None else self.model).parameters() if p.requires_grad)
        fill = sum(len(i) - 1 for i in train.ids) / (rows * cfg.seq_len)
        self.log.print(
            f"sft: base {self.base_path} ({self.model.num_params() / 1e6:.1f}M params), "
            + (f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} on {len(lora.names)} layers ({lora.num_params() / 1e6:.2f}M trainable), "
               if lora is not None else f"full fine-tuning ({trainable / 1e6:.1f}M trainable), ")
            + f"{len(train):,} train / {len(val):,} val conversations ({train.tokens:,} tokens, {train.target_tokens:,} trained on), "
            f"{rows:,} {'packed' if cfg.pack else 'padded'} rows of {cfg.seq_len} ({fill:.0%} full), "
            f"{self.rows_per_step} rows/step = {cfg.micro_batch} x {self.accum} accum x {self.dist.world} proc, {self.max_steps} steps"
            + (f", LM mix lambda={cfg.lm_coef}" if cfg.lm_data else "")
            + (f", resuming at step {self.start}" if cfg.resume else "")
        )
        if note := C.attention_choice(self.dist.device, cfg.dtype):
            self.log.print(f"sft: {note}")
        if train.truncated or val.truncated or train.dropped or val.dropped:
            self.log.print(
                f"sft: truncated to {cfg.seq_len + 1} tokens: {train.truncated} train / {val.truncated} val conversations; "
                f"left with no assistant token (not used): {train.dropped} train / {val.dropped} val"
            )

    def begin(self) -> Loop:
        """The run's header line, the model in training mode, and the loop that drives it."""
        self.describe()
        self.model.train()
        return Loop("sft", self, self.cfg, self.dist, self.log, self.max_steps, self.start,
                    flops_per_token=self.fpt, peak_flops=self.peak, optimizer=self.optimizer,
                    sample_every=self.cfg.sample_every, budget_s=self.cfg.time_budget_s, eval_first=True)

    def evaluate(self) -> dict:
        cfg = self.cfg
        batches = val_batches(self.val, cfg.seq_len, cfg.pack, cfg.micro_batch, self.dist.rank, self.dist.world)
        loss_sum, count = C.eval_loss(self.model, batches, self.dist, cfg.dtype)
        return {"val_loss": (loss_sum / count.clamp(min=1)).item()} if count.item() else {}

    def eval_line(self, step: int, m: dict) -> str:
        return f"step {step}: val loss {m.get('val_loss', float('nan')):.4f}" + (" (base)" if step == 0 else "")

    def sample(self, step: int) -> None:
        cfg = self.cfg
        if not cfg.sample_prompts or not (self.dist.main or self.sharded):
            return
        prompts = [self.tok.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in cfg.sample_prompts]
        if self.sharded:
            # The engine reads the weights directly, which FSDP holds in shards: every process runs
            # the recompute sampler instead, whose forwards gather them (as many on each process).
            self.model.eval()
            texts = [self.tok.decode(sample_tokens(self.model, p, cfg.sample_tokens, temperature=0.0, stop_ids=tuple(self.tok.stop_ids()), lockstep=True))
                     for p in prompts]
            self.model.train()
        else:
            max_seq_len = min(self.model.cfg.max_seq_len, max(map(len, prompts)) + cfg.sample_tokens + 1)
            engine = Engine(self.model, self.tok, max_batch=len(prompts), max_seq_len=max_seq_len)
            texts = [c.text for c in engine.complete(prompts, SamplingParams(temperature=0.0, max_new_tokens=cfg.sample_tokens))]
        for p, text in zip(cfg.sample_prompts, texts):
            self.log.print(f"  sample | {p} -> {text!r}")

    def save(self, step: int, metrics: dict) -> None:
        self.meta.update(step=step, metrics=metrics)
        extra = self.lora.tensors() if self.lora is not None else None
        C.save_training(self.out, self.model, self.tok, self.meta, self.optimizer, step, to_dict(self.cfg), self.dist, extra_tensors=extra)
        self.log.plot(self.out / "loss.png", keys=("loss", "val_loss", "lm_loss"), title=f"sft from {Path(self.base_path).name}")

    def train_step(self, step: int) -> tuple[dict, float]:
        """One optimizer step: step_with_mix's result and the token positions it trained on (all ranks)."""
        dev = self.dist.device
        micro, positions = [], 0
        for i in range(self.accum):
            x, y, *rest = self.batches.get(step, i, pad_to=self.cfg.seq_len if self.compiler.compiled else 0)
            pos, mask = rest if rest else (None, None)
            lm = self.lm_batches.get(step, i) if self.lm_batches is not None else (None, None)
            micro.append(tuple(None if t is None else t.to(dev) for t in (x, y, pos, mask, *lm)))
            positions += self.batches.positions(step, i)
        r = step_with_mix(self.train_model, micro, self.optimizer, self.dist, self.cfg)
        return r, C.all_reduce_sum(torch.tensor(float(positions), device=dev), self.dist).item()

    def merge(self) -> None:
        """--merge: fold the adapters into the weights and write a plain checkpoint (no adapters, no train_state)."""
        if not (self.cfg.merge and self.lora is not None and self.dist.main):
            return
        self.lora.merge(self.model)
        self.meta.update(lora=None, merged_lora=self.lora.meta())
        ckpt_io.save(self.out, self.model, self.tok, self.meta)
        self.log.print(f"sft: adapters merged into the weights of {self.out}")


def main(cfg: SFTConfig) -> Path:
    run = SFTStage(cfg)
    loop = run.begin()
    for step in loop:
        r, positions = run.train_step(step)
        mix = {"sft_loss": r["sft_loss"], "lm_loss": r["lm_loss"]} if "lm_loss" in r else {}
        loop.done(positions, {"loss": r["loss"], **mix}, r["grad_norm"],
                  f"loss {r['loss']:.4f}" + (f" (sft {mix['sft_loss']:.4f}, lm {mix['lm_loss']:.4f})" if mix else ""))
        run.train_model = run.compiler.after_step(loop, run.train_model)
    loop.finish(lambda: {"train_loss": loop.last["loss"]} if loop.last else {})
    run.merge()
    run.log.print(f"sft: checkpoint {run.out}, log {run.out / 'log.jsonl'}, plot {run.out / 'loss.png'}")
    C.teardown_dist()
    return run.out


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
