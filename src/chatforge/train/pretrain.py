"""Stage 0: unsupervised pretraining, maximise sum_i log P(u_i | u_<i) (Radford et al. 2018).

main(cfg) reads top to bottom: build or resume, then for each step: eval, sample, save (when
train/loop.py says they are due), step, log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..data.loader import Shards, TrainBatches, val_batches
from ..model import GPT, PRESETS, flops_per_token, preset
from ..sample import sample_tokens
from ..tokenizer import Tokenizer
from . import common as C
from .loop import Loop, ScheduleConfig, StepCompiler, check_compile_mode

SAMPLE_PROMPTS = ["The meaning of life is", "def fibonacci(n):", "床前明月光，"]


@dataclass
class PretrainConfig(ScheduleConfig):
    data: str = ""  # token-shard folder from `chatforge data prepare`
    out: str = "runs/pretrain"  # checkpoint folder (also holds log.jsonl and loss.png)
    preset: str = "cpu-small"  # model size, see model.PRESETS
    block: str = "llama"  # "llama" (RoPE, RMSNorm, SwiGLU, GQA) or "gpt2" (learned positions, LayerNorm, GELU)
    n_layer: int = 0  # 0 keeps the preset's depth
    d_model: int = 0  # 0 keeps the preset's width
    n_head: int = 0  # 0 keeps the preset's heads
    seq_len: int = 256  # tokens per training window; at most the preset's context
    micro_batch: int = 16  # windows per forward/backward on each process
    total_batch_tokens: int = 0  # tokens per optimizer step over all processes; 0 = one micro-batch each
    max_steps: int = 1000  # optimizer steps; the cosine schedule ends here
    max_tokens: int = 0  # if > 0, train on this many tokens instead: max_steps = ceil(max_tokens / tokens per step)
    time_budget_s: float = 0.0  # stop (and save) after this many seconds; 0 = no limit
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices
    compile: str = "auto"  # torch.compile the training step: "on", "off", or "auto" (compile when the run is long enough and keep it only if measured faster: loop.StepCompiler)
    eval_every: int = 100  # steps between validation runs (and at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation
    sample_every: int = 0  # steps between printed samples; 0 = at each evaluation
    seed: int = 0  # weights init and data order
    fsdp: str = "auto"  # "on": shard weights, gradients and AdamW state over torchrun's processes (FSDP2); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("PretrainConfig.data is required: a folder made by `chatforge data prepare`")
        if self.preset not in PRESETS:
            raise ValueError(f"PretrainConfig.preset={self.preset!r}; known: {', '.join(PRESETS)}")
        for name in ("seq_len", "micro_batch", "max_steps", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be positive")
        for name in ("max_tokens", "total_batch_tokens", "time_budget_s", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be >= 0 (0 means off/default)")
        for name in ("n_layer", "d_model", "n_head"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be >= 0 (0 keeps the preset's value)")
        if self.fsdp not in ("on", "off", "auto"):
            raise ValueError(f"PretrainConfig.fsdp={self.fsdp!r}; expected 'on', 'off' or 'auto'")
        check_compile_mode(self.compile, "PretrainConfig.compile")
        super().__post_init__()

    def model_overrides(self) -> dict:
        o = {"block": self.block}
        for k in ("n_layer", "d_model", "n_head"):
            if getattr(self, k):
                o[k] = getattr(self, k)
        if "d_model" in o or "n_head" in o:
            o["n_kv_head"] = 0  # re-derive: the preset's kv heads may not divide the new head count
        return o


# Fields that must match to resume: they decide the model and the data stream.
RESUME_KEYS = ("data", "preset", "block", "n_layer", "d_model", "n_head", "seq_len", "micro_batch", "total_batch_tokens", "seed")


def build_model(cfg: PretrainConfig, tok: Tokenizer, out: Path, state: dict | None) -> GPT:
    """A fresh GPT from the preset, or the checkpoint being resumed."""
    if state is not None:
        return ckpt_io.load(out).model.float()
    vocab = 64 * math.ceil(tok.vocab_size / 64)  # round up: matmuls like multiples of 64
    mcfg = preset(cfg.preset, vocab_size=vocab, **cfg.model_overrides())
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} is longer than preset {cfg.preset}'s context ({mcfg.max_seq_len})")
    mcfg.max_seq_len = cfg.seq_len if cfg.block == "gpt2" else mcfg.max_seq_len
    model = GPT(mcfg)
    model.init_weights(cfg.seed)
    return model


class PretrainStage:
    """One pretraining run: set up in __init__ (model, optimizer, batches, log), then what the
    loop calls (evaluate, eval_line, sample, save) and the training step."""

    def __init__(self, cfg: PretrainConfig):
        dist, out, state = C.begin_run(cfg, RESUME_KEYS)  # processes, seeds, and the train state to resume from
        self.cfg, self.dist, self.out = cfg, dist, out
        self.shards = Shards(cfg.data)
        self.tok = Tokenizer.load(cfg.data)
        self.model = model = build_model(cfg, self.tok, out, state).to(dist.device)
        self.start = state["step"] if state is not None else 0
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's context ({model.cfg.max_seq_len})")

        self.accum = C.grad_accum_steps(cfg.total_batch_tokens or cfg.micro_batch * cfg.seq_len * dist.world, cfg.micro_batch, cfg.seq_len, dist.world)
        self.step_tokens = cfg.micro_batch * cfg.seq_len * self.accum * dist.world
        self.max_steps = math.ceil(cfg.max_tokens / self.step_tokens) if cfg.max_tokens else cfg.max_steps
        self.sharded = C.use_fsdp(cfg.fsdp, model.num_params(non_embedding=False), dist)
        if self.sharded:
            C.fsdp_shard(model, dist, cfg.dtype)  # before the optimizer: it holds the shards
        self.optimizer = C.make_optimizer(model, cfg.lr, cfg.weight_decay)
        if state is not None:
            C.restore_training(self.optimizer, model, state, out)
        self.compiler = StepCompiler(cfg.compile, dist.device, dist.world)
        self.train_model: torch.nn.Module = self.compiler.setup(C.LMLoss(model))
        if dist.world > 1 and not self.sharded:
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.train_model)
        self.batches = TrainBatches(self.shards, cfg.seq_len, cfg.micro_batch, self.accum, cfg.seed, dist.rank, dist.world)
        self.fpt = flops_per_token(model.cfg, cfg.seq_len)
        self.peak = C.peak_flops(dist.device, cfg.dtype, cfg.peak_flops) * dist.world
        self.log = C.RunLog(out, dist, resume_step=self.start if cfg.resume else None)
        self.val_bpt = self.shards.bytes_per_token("val")  # bits/byte uses the val split's average bytes per token
        self.meta = {"stage": "pretrain", "parent": None, "data": str(Path(cfg.data).resolve()), "params": model.num_params()}

    def describe(self) -> None:
        cfg, mcfg, dist = self.cfg, self.model.cfg, self.dist
        self.log.print(
            f"pretrain: {self.model.num_params() / 1e6:.2f}M params ({mcfg.block}, L{mcfg.n_layer} d{mcfg.d_model} "
            f"h{mcfg.n_head}/{mcfg.n_kv_head}, vocab {mcfg.vocab_size}), {self.fpt / 1e6:.1f} MFLOP/token, "
            f"{self.step_tokens:,} tokens/step = {cfg.micro_batch}x{cfg.seq_len} x {self.accum} accum x {dist.world} proc, "
            f"{self.max_steps} steps = {self.max_steps * self.step_tokens / 1e6:.1f}M tokens, peak {self.peak / 1e9:.0f} GFLOP/s, "
            f"device {dist.device}, {cfg.dtype}"
            + (", FSDP" if self.sharded else ", DDP" if dist.world > 1 else "")
            + (f", resuming at step {self.start}" if cfg.resume else "")
        )
        if note := C.attention_choice(dist.device, cfg.dtype):
            self.log.print(f"pretrain: {note}")

    def begin(self) -> Loop:
        """The run's header line, the model in training mode, and the loop that drives it."""
        self.describe()
        self.model.train()
        return Loop("pretrain", self, self.cfg, self.dist, self.log, self.max_steps, self.start,
                    flops_per_token=self.fpt, peak_flops=self.peak, optimizer=self.optimizer,
                    sample_every=self.cfg.sample_every, budget_s=self.cfg.time_budget_s)

    def evaluate(self) -> dict:
        cfg = self.cfg
        batches = val_batches(self.shards, cfg.seq_len, cfg.micro_batch, cfg.eval_tokens, self.dist.rank, self.dist.world)
        loss_sum, count = C.eval_loss(self.model, batches, self.dist, cfg.dtype)
        n = count.item()
        loss = loss_sum.item() / n
        return {"val_loss": loss, "val_bpb": C.bits_per_byte(loss, n, n * self.val_bpt)}

    def eval_line(self, step: int, m: dict) -> str:
        return f"step {step}: val loss {m['val_loss']:.4f}, {m['val_bpb']:.4f} bits/byte"

    def sample(self, step: int) -> None:
        if not self.dist.main and not self.sharded:  # sharded, every process runs the same forwards (their all-gathers must pair up)
            return
        self.model.eval()
        for p in SAMPLE_PROMPTS:
            ids = sample_tokens(self.model, self.tok.encode(p), 32, temperature=0.8, top_k=50, seed=step, stop_ids=(self.tok.eos_id,),
                                lockstep=self.sharded)
            self.log.print(f"  sample | {p}{self.tok.decode(ids)!r}")
        self.model.train()

    def save(self, step: int, metrics: dict) -> None:
        # tokens: D of a scaling-law fit
        self.meta.update(step=step, max_steps=self.max_steps, tokens=step * self.step_tokens, metrics=metrics)
        C.save_training(self.out, self.model, self.tok, self.meta, self.optimizer, step, to_dict(self.cfg), self.dist)
        self.log.plot(self.out / "loss.png", title=f"pretrain {self.cfg.preset} ({self.model.cfg.block})")

    def train_step(self, step: int) -> dict:
        micro = [tuple(t.to(self.dist.device) for t in self.batches.get(step, i)) for i in range(self.accum)]
        return C.train_step(self.train_model, micro, C.lm_loss, self.optimizer, self.dist, self.cfg.dtype, self.cfg.grad_clip)


def main(cfg: PretrainConfig) -> Path:
    run = PretrainStage(cfg)
    loop = run.begin()
    for step in loop:
        r = run.train_step(step)
        loop.done(r["tokens"], {"loss": r["loss"]}, r["grad_norm"], f"loss {r['loss']:.4f}")
        run.train_model = run.compiler.after_step(loop, run.train_model)
    loop.finish(lambda: {"train_loss": loop.last["loss"]} if loop.last else {})
    run.log.print(f"pretrain: checkpoint {run.out}, log {run.out / 'log.jsonl'}, plot {run.out / 'loss.png'}")
    C.teardown_dist()
    return run.out
