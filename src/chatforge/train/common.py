"""Pieces every training stage shares: devices and DDP, optimizer and schedule, mixed precision,
the accumulate-and-step, progress/logging/plots, and checkpoints that resume exactly.

A stage's main(cfg) stays linear and visible (style.md rule 5): it calls these, and runs its
steps in loop.py's one cadence; nothing here knows which stage it serves. Loss functions return
(sum of token losses, number of valid tokens) so a step divides by the valid tokens of the whole
global batch, across micro-steps and ranks.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import increment_version

from .. import causal_attention, dtypes
from .. import checkpoint as ckpt_io
from ..config import to_dict
from ..convert.registry import resolve
from ..data.loader import Shards, TrainBatches
from ..model import GPT, RewardModel
from ..plots import figure
from ..tokenizer import Tokenizer

# ---- device, precision, processes -----------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device cpu")
    return torch.device(name)


def setup_dist(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def teardown_dist() -> None:
    # Ranks leave together: a rank that tears the group down while rank 0 still scores and saves
    # (rank-0-only work at the end of a DDP run) left a 2-process RM run hanging once in CI.
    if torch_dist.is_initialized():
        # A 2-process CI run hung here or at exit, rarely (after the checkpoint line, one rank
        # gone); a watchdog armed around destroy_process_group alone printed nothing, so it now
        # spans the barrier too: a rank still here two minutes on prints its threads' stacks to
        # stderr (rank-0-only work such as saving a large model can legitimately take that long;
        # the dump is then only noise). The CLI keeps one armed through interpreter exit.
        faulthandler.dump_traceback_later(120)
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank if `flag` is true on any: decisions such as "the time budget is spent"
    must be the same everywhere, or ranks run different collectives and hang."""
    if dist.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def parse_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of a `--dtype` name ("auto" resolves for `device`, see dtypes.py)."""
    return dtypes.torch_dtype(name, device)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CPU and CUDA (weights stay fp32 for the optimizer); fp32 is a no-op;
    "auto" is bf16 where the device runs it natively, else fp32."""
    dt = parse_dtype(dtype, device)
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def attention_choice(device: torch.device, dtype: str) -> str:
    """What was measured to choose the attention kernel of a bf16 step on this CPU (one with AMX:
    causal_attention.measure_bf16, about a second, done here so the run's header says it); ""
    where nothing needed measuring."""
    if device.type != "cpu" or parse_dtype(dtype, device) != torch.bfloat16:
        return ""
    causal_attention.paths()
    return causal_attention.decision


# ---- FSDP2: weights, gradients and AdamW state sharded over processes ------------------------

FSDP_AUTO_PARAMS = 1_000_000_000  # --fsdp auto shards models above this: DDP keeps 16 bytes/param of fp32 weights,
# gradients and AdamW moments on every process (16 GB at 1B), plus activations, so ~1B is where an 80 GB GPU stops


def use_fsdp(mode: str, n_params: int, dist: Dist) -> bool:
    """--fsdp on|off|auto: whether this run shards the model (only ever under torchrun)."""
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"fsdp={mode!r}; expected 'on', 'off' or 'auto'")
    if mode == "on" and dist.world == 1:
        raise ValueError("--fsdp on shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    return dist.world > 1 and (mode == "on" or (mode == "auto" and n_params > FSDP_AUTO_PARAMS))


def fsdp_shard(model: nn.Module, dist: Dist, dtype: str, forward_methods: tuple[str, ...] = ()) -> nn.Module:
    """Shard a GPT (or a RewardModel) in place with FSDP2 (torch.distributed.fsdp.fully_shard):
    one unit per block (all-gathered just before it runs, freed after) and the root for the
    embeddings, final norm and head (a RewardModel's scalar head too). Mixed precision: bf16
    copies for compute and all-gathers when the run is bf16, gradients reduced in fp32; the
    sharded fp32 weights are what AdamW updates. Build the optimizer after this call: its
    parameters are the shards (DTensors). `forward_methods`: methods a loss calls instead of
    forward() (e.g. "hidden", then head()), which must gather too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dt = parse_dtype(dtype, dist.device)
    mp = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32) if dt != torch.float32 else MixedPrecisionPolicy()
    for block in (model.gpt if isinstance(model, RewardModel) else model).blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in unwrap(model).parameters())


# ---- optimizer and schedule -----------------------------------------------------------------


class FusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW kernel, plus the version bump it leaves out: the kernel updates the
    weights in place without raising their version counters (measured on torch 2.13's CPU kernel),
    and the engine's decode-weight copies (engine/linears.py) are rebuilt only when a version
    changes, so PPO/GRPO rollouts after a step sampled from the weights before it."""

    def step(self, closure=None):
        loss = super().step(closure)
        increment_version([p for g in self.param_groups for p in g["params"] if p.grad is not None])
        return loss


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW with every stage's betas and eps (GPT-3's 0.9/0.95) over `groups` (each a dict with
    "params" and its own "weight_decay", and "lr" where it differs from `lr`). The fused kernel
    (one pass per tensor instead of ~8 foreach passes; several times faster on a CPU, same update to
    fp32 rounding) for plain tensors; foreach for FSDP's sharded ones (DTensors), the path tested
    there, and where this torch or device has no fused kernel."""
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if not any(is_dtensor(p) for g in groups for p in g["params"]):
        try:
            return FusedAdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype in this torch
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) and none on biases and
    norm gains, as in GPT-2/GPT-3 (decaying a gain pulls it toward 0, which changes the function).
    Embeddings are decayed like the other matrices (nanoGPT does the same): with tied embeddings
    the token table is also the output head, and the group rule stays "2-D or not", no name lists."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return adamw([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr)


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to lr*min_lr_ratio at max_steps (GPT-3 appendix B)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world: int) -> int:
    """Micro-steps per optimizer step so one step sees `total_batch_tokens` tokens over all ranks."""
    per = micro_batch * seq_len * world
    if total_batch_tokens % per:
        raise ValueError(
            f"total_batch_tokens={total_batch_tokens} is not a multiple of micro_batch*seq_len*world={per}; "
            f"use e.g. {per * max(1, round(total_batch_tokens / per))}"
        )
    return total_batch_tokens // per


# ---- the step -------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def token_loss_sum(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies (fp32) and the number of targets that are not -100."""
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets_BT != -100).sum()


class HeadCrossEntropy(torch.autograd.Function):
    """Sum of next-token cross-entropies of `h_NC @ w_VC.T` without the (N,V) fp32 logits: rows
    go through in chunks, and each chunk's gradients for h and w are made in the forward pass
    (softmax minus one-hot), while its logits are still in cache; backward only scales them by
    the incoming gradient. The same products as the unfused head + loss (logits in the matmul's
    dtype, log-softmax in fp32, gradients of the logits cast back to that dtype), fewer passes
    over memory: the loss's fp32 copies, log-softmax and their backward are a large share of an
    eager step (measured in benchmarks/README.md)."""

    # fp32 logits per chunk: on a CPU about one core's L2 (256 rows of an 8192 vocabulary);
    # elsewhere (a GPU) large chunks, for few kernel launches
    CHUNK_BYTES = {"cpu": 8 << 20}
    OTHER_CHUNK_BYTES = 512 << 20

    @staticmethod
    def forward(ctx, h_NC, w_VC, y_N):
        dt = torch.get_autocast_dtype(h_NC.device.type) if torch.is_autocast_enabled(h_NC.device.type) else h_NC.dtype
        h, w = h_NC.to(dt), w_VC.to(dt)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = max(1, HeadCrossEntropy.CHUNK_BYTES.get(h.device.type, HeadCrossEntropy.OTHER_CHUNK_BYTES) // (4 * w.shape[0]))
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], rows):
                hc, yc = h[s : s + rows], y_N[s : s + rows]
                logits = (hc @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                valid = yc != -100
                yi = torch.where(valid, yc, 0)
                loss += ((lse - logits.gather(1, yi[:, None])[:, 0]) * valid).sum()
                if need:
                    p = logits.sub_(lse[:, None]).exp_()
                    p[torch.arange(len(yi), device=p.device), yi] -= 1.0
                    g = p.mul_(valid[:, None]).to(dt)
                    if need_h:
                        grad_h[s : s + len(yi)] = g @ w
                    if need_w:
                        grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_NC.dtype, w_VC.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scaled = lambda g, dt: None if g is None else (g * grad_loss).to(dt)  # noqa: E731
        return scaled(grad_h, ctx.dtypes[0]), scaled(grad_w, ctx.dtypes[1]), None


def head_loss_sum(model: nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum(model(x), y) for a GPT, through HeadCrossEntropy where the head is a plain
    matrix (tied embeddings or an lm_head without hooks such as LoRA's); else the unfused path."""
    head = getattr(model, "lm_head", None)
    hooked = lambda m: bool(m._forward_hooks or m._forward_pre_hooks)  # noqa: E731
    if not hasattr(model, "output_weight") or hooked(model) or (head is not None and (hooked(head) or type(head) is not nn.Linear)):
        return token_loss_sum(model(x_BT), y_BT)
    h = model.hidden(x_BT)
    loss = HeadCrossEntropy.apply(h.flatten(0, 1), model.output_weight(), y_BT.flatten())
    return loss, (y_BT != -100).sum()


class LMLoss(nn.Module):
    """model + next-token loss as one module. Eager, the head and the loss run fused
    (HeadCrossEntropy); under torch.compile the plain head + loss, whose fp32 cast, log-softmax
    and gather inductor fuses with the output head itself, so the (B,T,V) fp32 logits are never
    materialised (faster than compiling the model alone: benchmarks/README.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return token_loss_sum(self.model(x_BT), y_BT)
        return head_loss_sum(self.model, x_BT, y_BT)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Iterable[tuple], dist: Dist, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed next-token loss of `model` over held-out `batches` ((x, y, *more forward
    arguments)) and the number of targets, both summed over ranks. Leaves the model in training mode."""
    model.eval()
    loss_sum = torch.zeros((), device=dist.device)
    count = torch.zeros((), device=dist.device)
    with autocast(dist.device, dtype):
        for batch in batches:
            x, y, *rest = (t.to(dist.device) for t in batch)
            s, n = token_loss_sum(model(x, *rest), y)
            loss_sum += s
            count += n
    model.train()
    count = all_reduce_sum(count, dist)
    return all_reduce_sum(loss_sum, dist), count


def lm_loss(module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """LossFn for a (possibly compiled or DDP-wrapped) LMLoss and an (x, y) batch."""
    return module(*batch)


def train_step(
    model: nn.Module,
    micro_batches: list,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    dist: Dist,
    dtype: str,
    grad_clip: float,
    count_fn: Callable[[Any], int] | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches. The loss is normalised by the valid
    tokens of the global batch (all micro-steps, all ranks), so the gradient is the same whatever
    the split across processes. `count_fn(batch)` counts a batch's valid tokens up front
    (default: targets != -100 of batch[1])."""
    count_fn = count_fn or (lambda b: int((b[1] != -100).sum()))
    n_local = torch.tensor(float(sum(count_fn(b) for b in micro_batches)), device=dist.device)
    n_global = all_reduce_sum(n_local.clone(), dist).item()
    if n_global == 0:
        raise ValueError("a training step has no tokens to learn from (every target is masked)")
    loss_total = torch.zeros((), device=dist.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP: reduce only after the last micro-step. FSDP reduce-scatters every micro-step, into
        # sharded gradients: no unsharded gradient of the whole model is ever held.
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        sync = model.no_sync() if (ddp and not last) else contextlib.nullcontext()
        with sync:
            with autocast(dist.device, dtype):
                loss_sum, _ = loss_fn(model, batch)
            # DDP and FSDP average gradients over ranks; multiply by world so the result is a sum / n_global.
            (loss_sum * (dist.world / n_global)).backward()
        loss_total += loss_sum.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total = all_reduce_sum(loss_total, dist)
    return {"loss": loss_total.item() / n_global, "grad_norm": float(norm), "tokens": n_global}


# ---- measuring ------------------------------------------------------------------------------


def peak_flops(device: torch.device, dtype: str, configured: float = 0.0) -> float:
    """FLOP/s to compute MFU against: a configured figure, or a short matmul probe of this device."""
    if configured > 0:
        return configured
    dt = parse_dtype(dtype, device)
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best = 0.0
    for _ in range(5):  # the best of 5 short bursts: the first runs pay for warmup and page faults
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 4 / (time.perf_counter() - t0))
    return best


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLog:
    """JSONL metrics log + progress lines + loss-curve PNG, written by rank 0 only."""

    def __init__(self, out: Path, dist: Dist, resume_step: int | None = None):
        self.path = Path(out) / "log.jsonl"
        self.main = dist.main
        self.records: list[dict] = []
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                # Keep what the resumed checkpoint had seen; drop records of steps it never saved.
                lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
                self.records = [r for r in lines if r.get("step", 0) <= resume_step]
            elif self.path.is_file():
                self.path.unlink()
            self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def print(self, msg: str) -> None:
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    def plot(self, path: Path, keys: Iterable[str] = ("loss", "val_loss"), title: str = "loss") -> None:
        """A PNG of the chosen metrics against step."""
        if not self.main or not self.records:
            return
        with figure(path) as (fig, ax):
            for k in keys:
                pts = [(r["step"], r[k]) for r in self.records if k in r]
                if pts:
                    ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None, markersize=3)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()


class Progress:
    """Tokens/s, MFU and ETA over the last `window` optimizer steps, counting training time only:
    wrap evaluations, samples and saves in `with progress.paused():` so they do not read as a
    slow-down, and so the first steps' warmup (or torch.compile) stops counting after `window` steps.
    The ETA is for the remaining steps at the current speed (pauses not included)."""

    def __init__(self, flops_per_token: float, peak: float, total_steps: int, start_step: int, window: int = 20):
        self.fpt, self.peak, self.total = flops_per_token, peak, total_steps
        self.t_last = time.perf_counter()
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)  # (seconds, tokens)

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t0

    def update(self, step: int, tokens: float) -> dict[str, float]:
        """Record that optimizer step `step` (0-based) just finished, having trained on `tokens`."""
        now = time.perf_counter()
        self.recent.append((max(1e-9, now - self.t_last), tokens))
        self.t_last = now
        seconds = sum(s for s, _ in self.recent)
        tps = sum(n for _, n in self.recent) / seconds
        eta = seconds / len(self.recent) * max(0, self.total - step - 1)
        return {"tok_per_s": tps, "mfu": self.fpt * tps / self.peak if self.peak else 0.0, "eta_s": eta}


def bits_per_byte(loss_nats: float, tokens: float, n_bytes: float) -> float:
    """Mean loss (nats/token) over `tokens` tokens that encode `n_bytes` UTF-8 bytes, in bits per
    byte: loss * tokens / (bytes * ln 2). Unlike the loss it does not depend on the tokenizer, so
    models with different vocabularies compare on it."""
    if tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"bits per byte needs positive token and byte counts, got tokens={tokens}, bytes={n_bytes}")
    return loss_nats * tokens / (n_bytes * math.log(2))


# ---- checkpoints that resume exactly --------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.model if isinstance(model, LMLoss) else model


def save_training(
    out: Path,
    model: nn.Module,
    tokenizer,
    meta: dict,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: dict,
    dist: Dist,
    extra_state: dict | None = None,
    extra_tensors: dict | None = None,
) -> None:
    """Checkpoint with everything --resume needs: weights, optimizer, RNG, step, the stage config.
    A RewardModel is stored as its GPT plus the scalar head in extra.safetensors (what
    checkpoint.load_reward_model reads). A sharded (FSDP) model is consolidated: every process
    sends its shards, rank 0 writes the ordinary checkpoint folder (chat, serve and export read it
    as any other), and the sharded AdamW state goes beside it through torch.distributed.checkpoint
    (each process writes its own)."""
    if is_sharded(model):
        _save_sharded(out, model, tokenizer, meta, optimizer, step, config, dist, extra_state, extra_tensors)
        return
    if not dist.main:
        return
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "config": config}
    state.update(extra_state or {})
    _save_folder(out, unwrap(model), tokenizer, meta, state, extra_tensors)


def _save_folder(out, model: nn.Module, tokenizer, meta, state: dict, extra_tensors, extra_dirs=None) -> None:
    """The checkpoint folder of a whole (unsharded) GPT or RewardModel: a RewardModel's head goes
    to extra.safetensors beside its GPT, under RewardModel.head_tensors' names."""
    if isinstance(model, RewardModel):
        model, extra_tensors = model.gpt, {**model.head_tensors(), **(extra_tensors or {})}
    ckpt_io.save(out, model, tokenizer, meta, train_state=state, extra_tensors=extra_tensors, extra_dirs=extra_dirs)


def _consolidated(bare: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded copy of `bare` (a GPT or a RewardModel) that holds the full state dict `full`
    (on the CPU; built on the meta device, so no second initialisation)."""
    gpt = bare.gpt if isinstance(bare, RewardModel) else bare
    with torch.device("meta"):
        plain = type(gpt)(gpt.cfg)
    if gpt is bare:
        ckpt_io.load_weights(plain, full, source="FSDP consolidation")
        return plain
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}  # noqa: E731
    ckpt_io.load_weights(plain, part("gpt."), source="FSDP consolidation")
    head = nn.Linear(gpt.cfg.d_model, 1, device="meta")
    head.load_state_dict(part("value_head."), strict=True, assign=True)
    return RewardModel(plain, head)


def _save_sharded(out, model, tokenizer, meta, optimizer, step, config, dist, extra_state, extra_tensors) -> None:
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    bare = unwrap(model)
    full = get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective; rank 0 gets it all
    # The optimizer shards are written next to the folder, then moved into the new version of it
    # by checkpoint.save's atomic rename: a crash leaves the last complete checkpoint (assumes a
    # file system every process sees, as torchrun on one machine has).
    staging = Path(out).with_name(f"{Path(out).name}.{ckpt_io.SHARDED_OPTIMIZER}-tmp")
    if dist.main and staging.exists():
        shutil.rmtree(staging)
    torch_dist.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(bare, optimizer)}, checkpoint_id=str(staging))
    torch_dist.barrier()
    if dist.main:
        state = {"step": step, "rng": rng_state(), "config": config, "world": dist.world, **(extra_state or {})}
        _save_folder(out, _consolidated(bare, full), tokenizer, meta, state, extra_tensors, extra_dirs={ckpt_io.SHARDED_OPTIMIZER: staging})
    torch_dist.barrier()


def load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict, out: Path) -> None:
    """Restore the optimizer of a resumed run: from train_state.pt, or, for a run saved sharded,
    from its torch.distributed.checkpoint folder (which reshards to this run's processes)."""
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(out) / ckpt_io.SHARDED_OPTIMIZER
    if not path.is_dir():
        raise ValueError(f"{out}: train_state.pt has no optimizer and {path} is missing; the checkpoint is incomplete")
    bare = unwrap(model)
    sd = {"optimizer": get_optimizer_state_dict(bare, optimizer)}  # the template: this run's shards, state initialised
    dcp.load(sd, checkpoint_id=str(path))
    set_optimizer_state_dict(bare, optimizer, sd["optimizer"])


def begin_run(cfg, resume_keys: Iterable[str]) -> tuple[Dist, Path, dict | None]:
    """The start every training stage shares: processes and device, seeds, and with `cfg.resume`
    the saved train state (refused if the config changed in one of `resume_keys`)."""
    dist = setup_dist(cfg.device)
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    state = None
    if cfg.resume:
        state = ckpt_io.load_train_state(out)
        check_resume_config(state["config"], to_dict(cfg), resume_keys, out)
    return dist, out, state


def load_policy(name_or_path: str, device: torch.device) -> tuple[GPT, Tokenizer, Path]:
    """A checkpoint (folder or known model name, imported on first use) as an fp32 GPT for
    training (a LoRA checkpoint loads with its adapters merged)."""
    path = resolve(name_or_path)
    ck = ckpt_io.load(path)
    return ck.model.float().to(device), ck.tokenizer, Path(path)


def mix_batches(path: str, model: GPT, seq_len: int, rows: int, accum: int, seed: int, rank: int = 0, world: int = 1) -> TrainBatches:
    """Pretraining batches for the loss a fine-tuning stage mixes in (SFT's --lm-data, PPO-ptx),
    from token shards made with the model's tokenizer."""
    shards = Shards(path)
    if shards.meta["vocab_size"] > model.cfg.vocab_size:
        raise ValueError(f"{path}: shards use {shards.meta['vocab_size']} tokens, the model has {model.cfg.vocab_size}; use shards of its tokenizer")
    return TrainBatches(shards, seq_len, rows, accum, seed, rank, world)


def check_parent(out: Path, snapshot: str, path: Path, what: str) -> None:
    """A run resumed on top of a different parent checkpoint (retrained in place) would mix two
    models: refuse. `what` names the parent in the message ("base", "policy")."""
    saved = ckpt_io.load_json(out / "meta.json")
    if saved.get("parent_snapshot") != snapshot:
        raise ValueError(f"{out}: was trained from {what} snapshot {saved.get('parent_snapshot')}, but {path} is now {snapshot}")


@torch.no_grad()
def restore_weights(out: Path, model: nn.Module, lora=None) -> None:
    """Put a resumed run's trained weights back: its LoRA adapters when it trains adapters on a
    frozen base, else the whole model from its checkpoint; and a RewardModel's head."""
    gpt = model.gpt if isinstance(model, RewardModel) else model
    if lora is not None:
        lora.load(ckpt_io.load_extra(out), str(out / ckpt_io.EXTRA))
    else:
        gpt.load_state_dict(ckpt_io.load(out).model.state_dict())
    if isinstance(model, RewardModel):
        ckpt_io.load_reward_head(out, model.value_head)


def restore_training(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict, out: Path) -> None:
    """A resumed run's optimizer (load_optimizer) and random number generators."""
    load_optimizer(optimizer, model, state, out)
    set_rng_state(state["rng"])


def check_resume_config(saved: dict, current: dict, keys: Iterable[str], source: Path) -> None:
    """Resuming with a different model or data config would silently train something else: refuse."""
    # A key the saved run predates (an option added since) counts as unchanged.
    diff = [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k, current.get(k)) != current.get(k)]
    if diff:
        raise ValueError(f"{source}: cannot resume with a different config ({'; '.join(diff)}); use a new --out")
