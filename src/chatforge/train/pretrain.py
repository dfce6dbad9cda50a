"""Stage 0: unsupervised pretraining, maximise sum_i log P(u_i | u_<i) (Radford et al. 2018).

main(cfg) reads top to bottom: build or resume, then for each step: eval, sample, save, step, log.
"""

from __future__ import annotations

import math
import time
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

SAMPLE_PROMPTS = ["The meaning of life is", "def fibonacci(n):", "床前明月光，"]


@dataclass
class PretrainConfig:
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
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the device runs it natively (dtypes.py)
    compile: bool = False  # torch.compile the model
    eval_every: int = 100  # steps between validation runs (and at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation
    sample_every: int = 0  # steps between printed samples; 0 = at each evaluation
    save_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between progress lines
    resume: bool = False  # continue from out/'s train_state.pt
    seed: int = 0  # weights init and data order
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"...
    peak_flops: float = 0.0  # FLOP/s for MFU; 0 measures this device with a matmul probe
    fsdp: str = "auto"  # "on": shard weights, gradients and AdamW state over torchrun's processes (FSDP2); "off": DDP; "auto": on above 1B params

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("PretrainConfig.data is required: a folder made by `chatforge data prepare`")
        if self.preset not in PRESETS:
            raise ValueError(f"PretrainConfig.preset={self.preset!r}; known: {', '.join(PRESETS)}")
        for name in ("seq_len", "micro_batch", "max_steps", "eval_every", "save_every", "log_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be positive")
        for name in ("max_tokens", "total_batch_tokens", "time_budget_s", "warmup_steps", "weight_decay", "grad_clip", "sample_every", "peak_flops"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be >= 0 (0 means off/default)")
        for name in ("n_layer", "d_model", "n_head"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)} must be >= 0 (0 keeps the preset's value)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"PretrainConfig: lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        C.parse_dtype(self.dtype)
        if self.fsdp not in ("on", "off", "auto"):
            raise ValueError(f"PretrainConfig.fsdp={self.fsdp!r}; expected 'on', 'off' or 'auto'")

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


def main(cfg: PretrainConfig) -> Path:
    dist = C.setup_dist(cfg.device)
    out = Path(cfg.out)
    shards = Shards(cfg.data)
    tok = Tokenizer.load(cfg.data)
    C.seed_everything(cfg.seed)

    # Model: fresh from the preset, or the checkpoint being resumed.
    start_step, state = 0, None
    if cfg.resume:
        state = ckpt_io.load_train_state(out)
        C.check_resume_config(state["config"], to_dict(cfg), RESUME_KEYS, out)
        model = ckpt_io.load(out).model.float()
        start_step = state["step"]
    else:
        vocab = 64 * math.ceil(tok.vocab_size / 64)  # round up: matmuls like multiples of 64
        mcfg = preset(cfg.preset, vocab_size=vocab, **cfg.model_overrides())
        if cfg.seq_len > mcfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than preset {cfg.preset}'s context ({mcfg.max_seq_len})")
        mcfg.max_seq_len = cfg.seq_len if cfg.block == "gpt2" else mcfg.max_seq_len
        model = GPT(mcfg)
        model.init_weights(cfg.seed)
    model.to(dist.device)
    mcfg = model.cfg
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's context ({mcfg.max_seq_len})")

    accum = C.grad_accum_steps(cfg.total_batch_tokens or cfg.micro_batch * cfg.seq_len * dist.world, cfg.micro_batch, cfg.seq_len, dist.world)
    step_tokens = cfg.micro_batch * cfg.seq_len * accum * dist.world
    max_steps = math.ceil(cfg.max_tokens / step_tokens) if cfg.max_tokens else cfg.max_steps
    sharded = C.use_fsdp(cfg.fsdp, model.num_params(non_embedding=False), dist)
    if sharded:
        C.fsdp_shard(model, dist, cfg.dtype)  # before the optimizer: it holds the shards
    optimizer = C.make_optimizer(model, cfg.lr, cfg.weight_decay)
    if state is not None:
        C.load_optimizer(optimizer, model, state, out)
        C.set_rng_state(state["rng"])
    train_model: torch.nn.Module = C.LMLoss(model)
    if cfg.compile:
        train_model = torch.compile(train_model)
    if dist.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    batches = TrainBatches(shards, cfg.seq_len, cfg.micro_batch, accum, cfg.seed, dist.rank, dist.world)
    fpt = flops_per_token(mcfg, cfg.seq_len)
    peak = C.peak_flops(dist.device, cfg.dtype, cfg.peak_flops) * dist.world
    log = C.RunLog(out, dist, resume_step=start_step if cfg.resume else None)
    log.print(
        f"pretrain: {model.num_params() / 1e6:.2f}M params ({mcfg.block}, L{mcfg.n_layer} d{mcfg.d_model} "
        f"h{mcfg.n_head}/{mcfg.n_kv_head}, vocab {mcfg.vocab_size}), {fpt / 1e6:.1f} MFLOP/token, "
        f"{step_tokens:,} tokens/step = {cfg.micro_batch}x{cfg.seq_len} x {accum} accum x {dist.world} proc, "
        f"{max_steps} steps = {max_steps * step_tokens / 1e6:.1f}M tokens, peak {peak / 1e9:.0f} GFLOP/s, device {dist.device}, {cfg.dtype}"
        + (", FSDP" if sharded else ", DDP" if dist.world > 1 else "")
        + (f", resuming at step {start_step}" if cfg.resume else "")
    )
    val_bpt = shards.bytes_per_token("val")  # bits/byte uses the val split's average bytes per token
    meta = {"stage": "pretrain", "parent": None, "data": str(Path(cfg.data).resolve()), "params": model.num_params()}

    def evaluate() -> dict:
        model.eval()
        loss_sum = torch.zeros((), device=dist.device)
        count = torch.zeros((), device=dist.device)
        with torch.no_grad(), C.autocast(dist.device, cfg.dtype):
            for x, y in val_batches(shards, cfg.seq_len, cfg.micro_batch, cfg.eval_tokens, dist.rank, dist.world):
                s, n = C.token_loss_sum(model(x.to(dist.device)), y.to(dist.device))
                loss_sum += s
                count += n
        model.train()
        n = C.all_reduce_sum(count, dist).item()
        loss = C.all_reduce_sum(loss_sum, dist).item() / n
        return {"val_loss": loss, "val_bpb": C.bits_per_byte(loss, n, n * val_bpt)}

    def show_samples(step: int) -> None:
        if not dist.main and not sharded:  # sharded, every process runs the same forwards (their all-gathers must pair up)
            return
        model.eval()
        for p in SAMPLE_PROMPTS:
            ids = sample_tokens(model, tok.encode(p), 32, temperature=0.8, top_k=50, seed=step, stop_ids=(tok.eos_id,))
            log.print(f"  sample | {p}{tok.decode(ids)!r}")
        model.train()

    def save(step: int, metrics: dict) -> None:
        meta.update(step=step, max_steps=max_steps, tokens=step * step_tokens, metrics=metrics)  # tokens: D of a scaling-law fit
        C.save_training(out, model, tok, meta, optimizer, step, to_dict(cfg), dist)
        log.plot(out / "loss.png", title=f"pretrain {cfg.preset} ({mcfg.block})")

    model.train()
    progress = C.Progress(fpt, peak, max_steps, start_step)
    t_start = time.time()
    metrics: dict = {}
    step = start_step
    while step < max_steps:
        with progress.paused():
            if step > start_step and step % cfg.eval_every == 0:
                metrics.update(evaluate())
                log.log({"step": step, **metrics})
                log.print(f"step {step}: val loss {metrics['val_loss']:.4f}, {metrics['val_bpb']:.4f} bits/byte")
            if step > start_step and step % (cfg.sample_every or cfg.eval_every) == 0:
                show_samples(step)
            if step > start_step and step % cfg.save_every == 0:
                save(step, metrics)
        lr = C.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = [tuple(t.to(dist.device) for t in batches.get(step, i)) for i in range(accum)]
        r = C.train_step(train_model, micro, C.lm_loss, optimizer, dist, cfg.dtype, cfg.grad_clip)
        p = progress.update(step, r["tokens"])
        step += 1
        rec = {"step": step, "loss": r["loss"], "lr": lr, "grad_norm": r["grad_norm"], "tok_per_s": p["tok_per_s"], "mfu": p["mfu"]}
        if step % cfg.log_every == 0 or step == max_steps:
            log.log(rec)
            eta = min(p["eta_s"], cfg.time_budget_s - (time.time() - t_start)) if cfg.time_budget_s else p["eta_s"]
            log.print(
                f"step {step}/{max_steps} | loss {r['loss']:.4f} | lr {lr:.2e} | {p['tok_per_s']:,.0f} tok/s | "
                f"MFU {100 * p['mfu']:.1f}% | ETA {C.fmt_time(eta)}"
            )
        if cfg.time_budget_s and C.any_rank(time.time() - t_start > cfg.time_budget_s, dist):
            log.print(f"pretrain: time budget of {cfg.time_budget_s:.0f}s reached at step {step}")
            break
    metrics.update(evaluate())
    metrics["train_loss"] = r["loss"] if step > start_step else metrics.get("train_loss")
    log.log({"step": step, **metrics})
    log.print(f"step {step}: val loss {metrics['val_loss']:.4f}, {metrics['val_bpb']:.4f} bits/byte")
    show_samples(step)
    save(step, metrics)
    log.print(f"pretrain: checkpoint {out}, log {out / 'log.jsonl'}, plot {out / 'loss.png'}")
    C.teardown_dist()
    return out

