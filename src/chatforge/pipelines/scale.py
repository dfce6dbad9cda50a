"""`chatforge scale`: predict a big pretraining run from small ones.

    ladder   short, ordinary (resumable) pretraining runs over model sizes x token budgets,
             sized from the measured step times to fill --minutes and span >= 30x in compute
    fit      L(N, D) = E + A/N^alpha + B/D^beta over a ladder's finished runs (eval/scaling.py),
             bootstrap intervals, a plot of loss vs compute with the fitted frontier, fit.json
    predict  the loss of (N, D), or the compute-optimal N and D for C FLOPs, or a finished run's
             measured loss against its prediction
    plan     model size, tokens, FLOPs, memory per device and hours for a tier of hardware

Model sizes come from one knob, k (as nanochat derives a model from its depth): n_layer = 2k,
d_model = 64k, n_head = k (head_dim 64), Llama blocks. Every ladder run uses the same batch,
context and validation windows, so that only N and D differ between runs; the peak learning rate
follows one rule of the size, lr * k^-lr_exponent (wider models need a smaller one: at one rate for
all sizes, bigger models were no better at the same tokens and the fit's size term vanished).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from .. import console
from ..config import load_json, save_json
from ..eval.scaling import MIN_RUNS, Fit, describe, fit, fmt_count, frontier
from ..model import GPT, flops_per_token, preset
from ..plots import colors, figure
from ..tokenizer import Tokenizer
from ..train import common as C
from ..train.pretrain import PretrainConfig
from ..train.pretrain import main as pretrain

LADDER_PLAN = "ladder.json"
FIT_FILE = "fit.json"
RATIO = 3  # token budgets of one size are RATIO x apart
MIN_STEPS = 10  # the smallest ladder run: fewer optimizer steps measure the warmup, not a model


say = functools.partial(console.say, "scale")  # say(msg): "[scale] msg" on stderr


def size_overrides(k: int) -> dict:
    """The model of size k: n_layer 2k, d_model 64k, n_head k (PretrainConfig overrides)."""
    if k < 1:
        raise ValueError(f"model size k={k} must be >= 1 (n_layer 2k, d_model 64k, n_head k)")
    return {"n_layer": 2 * k, "d_model": 64 * k, "n_head": k}


def model_config(k: int, vocab_size: int, seq_len: int = 256):
    return preset("cpu-small", vocab_size=64 * math.ceil(vocab_size / 64), max_seq_len=max(256, seq_len), **size_overrides(k))


def matmul_params(cfg) -> float:
    """N of the law: the weights a token's matmuls use, output head included (6N = FLOPs/token
    without attention scores)."""
    return flops_per_token(cfg, 0) / 6


def measure_seconds_per_token(vocab_size: int, size, seq_len: int, micro_batch: int, device: str = "auto", dtype: str = "auto",
                              steps: int = 2) -> float:
    """Seconds per training token of a model (ladder size k or a preset name) at this batch, from
    the best of `steps` timed optimizer steps after one warmup step, on random tokens (the speed
    does not depend on the text); the best, because the machine may be shared."""
    dist = C.Dist(device=C.pick_device(device))
    model = GPT(_candidate(size, vocab_size, seq_len)[1]).to(dist.device)
    model.init_weights(0)
    opt = C.make_optimizer(model, 1e-3, 0.1)
    step_model = C.LMLoss(model)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        x = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=g)
        t0 = time.perf_counter()
        C.train_step(step_model, [(x[:, :-1].to(dist.device), x[:, 1:].to(dist.device))], C.lm_loss, opt, dist, dtype, 1.0)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) / (micro_batch * seq_len)


# ---- the ladder -----------------------------------------------------------------------------


@dataclass
class LadderConfig:
    data: str = ""  # token-shard folder from `chatforge data prepare`; every run trains on it
    out: str = "runs/ladder"  # one folder per run, and ladder.json (the plan, reused on a re-run)
    minutes: float = 15.0  # wall-clock budget of all runs together; sizes the token budgets
    sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # model sizes k (n_layer 2k, d_model 64k, n_head k)
    budgets: int = 3  # token budgets per size, each 3x the one before
    tokens: int = 0  # the smallest token budget; 0 derives it from --minutes and measured step times
    seq_len: int = 256  # tokens per training window
    micro_batch: int = 16  # windows per optimizer step
    lr: float = 3e-3  # peak learning rate of size 1; size k trains at lr * k^-lr_exponent
    lr_exponent: float = 0.5  # 0 = one rate for every size; size 3 did best at 1.5e-3 of 0.75/1.5/3/6e-3 (README, scaling)
    eval_tokens: int = 65536  # validation tokens of each run's final loss (the same windows for all)
    seed: int = 0  # init and data order
    dtype: str = "auto"  # "bf16", "fp32" or "auto" (dtypes.py)
    device: str = "auto"  # "auto", "cpu", "cuda"...

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("LadderConfig.data is required: a folder made by `chatforge data prepare`")
        self.sizes = sorted({int(k) for k in self.sizes})
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"LadderConfig.sizes={self.sizes} must be model sizes k >= 1")
        if self.budgets < 1 or self.minutes <= 0 or self.tokens < 0:
            raise ValueError(f"LadderConfig: budgets={self.budgets} must be >= 1, minutes={self.minutes} > 0, tokens={self.tokens} >= 0")
        if len(self.sizes) < 2 or self.budgets < 2:
            raise ValueError(f"LadderConfig: sizes={self.sizes} and budgets={self.budgets}; a fit needs at least 2 model sizes and 2 token budgets")
        if len(self.sizes) * self.budgets < MIN_RUNS:
            raise ValueError(f"LadderConfig: {len(self.sizes)} sizes x {self.budgets} budgets = {len(self.sizes) * self.budgets} runs; a fit needs at least {MIN_RUNS}")
        for name in ("seq_len", "micro_batch", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LadderConfig.{name}={getattr(self, name)} must be positive")


def plan_ladder(cfg: LadderConfig) -> dict:
    """The runs: every size at budgets T0 * 3^j, T0 from the measured seconds per token so that
    all runs together take ~85% of --minutes (the rest goes to evaluations, saves and startup)."""
    vocab = Tokenizer.load(cfg.data).vocab_size
    step_tokens = cfg.micro_batch * cfg.seq_len
    mult = [RATIO**j for j in range(cfg.budgets)]
    sec_per_token = {}
    if cfg.tokens:
        t0 = cfg.tokens
    else:
        for k in cfg.sizes:
            sec_per_token[k] = measure_seconds_per_token(vocab, k, cfg.seq_len, cfg.micro_batch, cfg.device, cfg.dtype)
            say(f"size {k}: {1 / sec_per_token[k]:,.0f} tokens/s measured")
        t0 = 0.85 * cfg.minutes * 60 / (sum(sec_per_token.values()) * sum(mult))
    steps0 = int(t0 // step_tokens)
    if steps0 < MIN_STEPS:
        need = cfg.minutes * MIN_STEPS * step_tokens / max(t0, 1)
        raise ValueError(
            f"--minutes {cfg.minutes} leaves the smallest run {steps0} steps of {step_tokens} tokens; it needs >= {MIN_STEPS}: "
            f"raise --minutes to ~{need:.0f}, or use fewer or smaller --sizes"
        )
    runs = []
    for k in cfg.sizes:
        n = matmul_params(model_config(k, vocab, cfg.seq_len))
        for m in mult:
            tokens = steps0 * m * step_tokens
            runs.append({"name": f"k{k}-d{tokens}", "size": k, "n_params": n, "tokens": tokens, "flops": 6 * n * tokens,
                         "est_s": tokens * sec_per_token[k] if sec_per_token else None})
    span = max(r["flops"] for r in runs) / min(r["flops"] for r in runs)
    if span < 30:
        raise ValueError(f"the ladder spans {span:.1f}x in compute (sizes {cfg.sizes}, {cfg.budgets} budgets); a fit needs >= 30x: add sizes or budgets")
    peak = C.peak_flops(C.pick_device(cfg.device), cfg.dtype)  # once for the ladder, not in every run: it times matmuls
    return {"data": str(Path(cfg.data).resolve()), "peak_flops": peak, "seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch, "lr": cfg.lr,
            "lr_exponent": cfg.lr_exponent, "eval_tokens": cfg.eval_tokens, "seed": cfg.seed, "dtype": cfg.dtype, "sizes": cfg.sizes, "budgets": cfg.budgets,
            "vocab_size": vocab, "seconds_per_token": sec_per_token, "compute_span": span, "runs": runs}


def lr_rule(d: dict) -> dict:
    """The learning-rate rule ({"lr", "lr_exponent"}) of a ladder plan or a fit's info; those from
    before the rule ran one rate for every size (3e-3 where none was recorded)."""
    return {"lr": d.get("lr", 3e-3), "lr_exponent": d.get("lr_exponent", 0.0)}


def size_lr(plan: dict, k: int) -> float:
    """The peak learning rate of size k under the rule of a ladder plan or a fit's info (lr_rule)."""
    rule = lr_rule(plan)
    return rule["lr"] * k ** -rule["lr_exponent"]


def run_config(plan: dict, k: int, tokens: int, out: Path, device: str = "auto"):
    """The PretrainConfig of a ladder-style run (also used for a check run outside the ladder)."""
    steps = math.ceil(tokens / (plan["micro_batch"] * plan["seq_len"]))
    return PretrainConfig(
        data=plan["data"], out=str(out), preset="cpu-small", **size_overrides(k), seq_len=plan["seq_len"], micro_batch=plan["micro_batch"],
        max_steps=steps, max_tokens=tokens, lr=size_lr(plan, k), warmup_steps=max(1, min(50, steps // 10)), eval_every=steps,
        save_every=max(1, steps // 4), log_every=max(1, steps // 20), eval_tokens=plan["eval_tokens"], sample_every=10 * steps,
        dtype=plan["dtype"], seed=plan["seed"], device=device, peak_flops=plan.get("peak_flops", 0.0), resume=(out / "train_state.pt").is_file(),
    )


def run_state(out: Path) -> str:
    """"done", "partial" (resumable) or "new"."""
    meta = out / "meta.json"
    if meta.is_file():
        m = load_json(meta)
        if m.get("max_steps") and m.get("step") == m.get("max_steps"):
            return "done"
    return "partial" if (out / "train_state.pt").is_file() else "new"


def ladder(cfg: LadderConfig) -> Path:
    """Plan (or reload the plan of) a ladder and run what is not finished."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / LADDER_PLAN
    if plan_file.is_file():
        plan = load_json(plan_file)
        mine = {"data": str(Path(cfg.data).resolve()), "sizes": cfg.sizes, "budgets": cfg.budgets, "seq_len": cfg.seq_len,
                "micro_batch": cfg.micro_batch, "lr": cfg.lr, "lr_exponent": cfg.lr_exponent, "eval_tokens": cfg.eval_tokens, "seed": cfg.seed}
        planned = {**plan, **lr_rule(plan)}
        diff = [f"{k}: planned {planned.get(k)!r}, now {v!r}" for k, v in mine.items() if planned.get(k) != v]
        if diff:
            raise ValueError(f"{plan_file}: this folder holds a different ladder ({'; '.join(diff)}); use a new --out")
        say(f"continuing the ladder planned in {plan_file}")
    else:
        plan = plan_ladder(cfg)
        save_json(plan, plan_file)
    runs = plan["runs"]
    say(f"{len(runs)} runs, sizes {plan['sizes']} x {plan['budgets']} token budgets, compute {fmt_count(runs[0]['flops'])} .. "
        f"{fmt_count(max(r['flops'] for r in runs))} FLOPs ({plan['compute_span']:.0f}x) -> {out}")
    t0 = time.time()
    for i, r in enumerate(runs):
        d = out / r["name"]
        state = run_state(d)
        est = f", ~{r['est_s'] / 60:.1f} min" if r.get("est_s") else ""
        say(f"run {i + 1}/{len(runs)} {r['name']}: size {r['size']}, N {fmt_count(r['n_params'])}, D {fmt_count(r['tokens'])} tokens, lr {size_lr(plan, r['size']):.2e}{est} ({state})")
        if state != "done":
            pretrain(run_config(plan, r["size"], r["tokens"], d, cfg.device))
    say(f"ladder done in {(time.time() - t0) / 60:.1f} min; next: chatforge scale fit {out}")
    return out


# ---- fitting a ladder folder ----------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def read_run(d: Path) -> dict:
    """N, D, final validation loss and provenance of one finished pretraining run."""
    meta = load_json(d / "meta.json")
    if meta.get("stage") != "pretrain":
        raise ValueError(f"{d}: a {meta.get('stage')!r} checkpoint, not a pretraining run")
    if run_state(d) != "done" or "tokens" not in meta:
        raise ValueError(f"{d}: unfinished run (step {meta.get('step')}/{meta.get('max_steps', '?')}); re-run `chatforge scale ladder` to finish it")
    cfg = ckpt_io.load_config(d)
    train_cfg = ckpt_io.load_train_state(d)["config"]
    return {"name": d.name, "path": str(d), "n_params": matmul_params(cfg), "tokens": float(meta["tokens"]),
            "loss": float(meta["metrics"]["val_loss"]), "data": meta["data"], "tokenizer": _sha(d / "tokenizer.json"),
            "eval": [train_cfg["seq_len"], train_cfg["eval_tokens"]], "shape": [cfg.n_layer, cfg.d_model, cfg.n_head]}


def collect_runs(ladder_dir: str | Path) -> list[dict]:
    """The finished runs of a ladder folder; refuses unfinished runs and runs that differ in data,
    tokenizer or validation windows (their losses are not on one scale)."""
    root = Path(ladder_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: no such ladder folder; make one with `chatforge scale ladder`")
    runs = sorted((read_run(d) for d in root.iterdir() if (d / "meta.json").is_file()), key=lambda r: (r["n_params"], r["tokens"]))
    if len(runs) < MIN_RUNS:
        raise ValueError(f"{root}: {len(runs)} finished runs; a fit of L(N, D) needs at least {MIN_RUNS} (run `chatforge scale ladder`)")
    for key, what in (("data", "data"), ("tokenizer", "tokenizer"), ("eval", "validation windows [seq_len, eval_tokens]")):
        seen = {}
        for r in runs:
            seen.setdefault(json.dumps(r[key]), r["name"])
        if len(seen) > 1:
            raise ValueError(f"{root}: runs trained on different {what}: " + "; ".join(f"{n}: {v}" for v, n in seen.items()))
    return runs


def fit_dir(ladder_dir: str | Path, check: list[str] | None = None, n_boot: int = 200, plot: bool = True) -> Fit:
    """Fit a ladder folder, print the law, write DIR/fit.json and DIR/fit.png. `check` names runs
    outside the ladder (bigger ones) whose measured loss is compared with the prediction."""
    root = Path(ladder_dir)
    runs = collect_runs(root)
    f = fit([r["n_params"] for r in runs], [r["tokens"] for r in runs], [r["loss"] for r in runs], n_boot=n_boot)
    f.info.update(data=runs[0]["data"], tokenizer=runs[0]["tokenizer"], eval=runs[0]["eval"], runs=runs,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    plan_file = root / LADDER_PLAN
    if plan_file.is_file():
        p = load_json(plan_file)
        f.info.update(seq_len=p["seq_len"], micro_batch=p["micro_batch"], **lr_rule(p), vocab_size=p["vocab_size"])
    checks = []
    for c in check or []:
        r = read_run(Path(c))
        for key in ("data", "tokenizer", "eval"):
            if r[key] != f.info[key]:
                raise ValueError(f"{c}: its {key} ({r[key]}) differs from the ladder's ({f.info[key]}); its loss is not comparable")
        pred = f.predict(r["n_params"], r["tokens"])
        checks.append({**r, "predicted": pred["loss"], "predicted_lo": pred.get("loss_lo"), "predicted_hi": pred.get("loss_hi"),
                       "error": (pred["loss"] - r["loss"]) / r["loss"],
                       "compute_vs_ladder_max": 6 * r["n_params"] * r["tokens"] / max(6 * x["n_params"] * x["tokens"] for x in runs)})
    f.info["checks"] = checks
    print(describe(f))
    print(f"  {'run':<16} {'N':>8} {'D':>8} {'C':>9} {'loss':>7} {'fit':>7}")
    for r in runs:
        print(f"  {r['name']:<16} {fmt_count(r['n_params']):>8} {fmt_count(r['tokens']):>8} {6 * r['n_params'] * r['tokens']:>9.2e} "
              f"{r['loss']:>7.4f} {float(f.law.loss(r['n_params'], r['tokens'])):>7.4f}")
    for c in checks:
        print(f"  check {c['name']}: {c['compute_vs_ladder_max']:.1f}x the ladder's largest compute, predicted {c['predicted']:.4f} "
              f"[{c['predicted_lo']:.4f}, {c['predicted_hi']:.4f}], measured {c['loss']:.4f}: error {100 * c['error']:+.2f}%")
    save_json(f.to_dict(), root / FIT_FILE)
    if plot:
        plot_fit(f, root / "fit.png")
    say(f"wrote {root / FIT_FILE}" + (f" and {root / 'fit.png'}" if plot else ""))
    return f


def plot_fit(f: Fit, path: Path) -> None:
    """Loss vs compute: the runs (one colour per model size), each size's fitted curve, the
    compute-optimal frontier with its 95% band, and check runs as stars."""
    runs, checks = f.info.get("runs", []), f.info.get("checks", [])
    cs = [6 * r["n_params"] * r["tokens"] for r in runs + checks]
    grid = np.geomspace(min(cs) / 2, max(cs) * 4, 60)
    sizes = sorted({r["n_params"] for r in runs})
    with figure(path, figsize=(7.5, 4.5), dpi=90) as (fig, ax):
        _draw_fit(ax, f, runs, checks, sizes, grid)


def _draw_fit(ax, f: Fit, runs: list, checks: list, sizes: list, grid) -> None:
    for n, col in zip(sizes, colors(len(sizes))):
        rs = [r for r in runs if r["n_params"] == n]
        ax.scatter([6 * n * r["tokens"] for r in rs], [r["loss"] for r in rs], color=col, zorder=3, label=f"N={fmt_count(n)}")
        ax.plot(grid, f.law.loss(n, grid / (6 * n)), color=col, lw=0.8, alpha=0.7)
    if f.law.A > 0 and f.law.B > 0:
        mid, lo, hi = frontier(f, grid)
        ax.plot(grid, mid, "k--", lw=1.2, label="compute-optimal frontier")
        ax.fill_between(grid, lo, hi, color="k", alpha=0.1, label="95% bootstrap band")
    for c in checks:
        ax.scatter([6 * c["n_params"] * c["tokens"]], [c["loss"]], marker="*", s=160, color="red", zorder=4,
                   label=f"check {fmt_count(c['n_params'])}, {fmt_count(c['tokens'])} tok; x = predicted, {100 * c['error']:+.1f}%")
        ax.scatter([6 * c["n_params"] * c["tokens"]], [c["predicted"]], marker="x", s=60, color="red", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ys = [r["loss"] for r in runs + checks]
    ax.set_ylim(min(ys) - 0.3, max(ys) + 0.3)
    ax.set_title(f"L(N,D) = {f.law.E:.2f} + {f.law.A:.3g}/N^{f.law.alpha:.2f} + {f.law.B:.3g}/D^{f.law.beta:.2f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def load_fit(path: str | Path) -> Fit:
    """A fit from a ladder folder (its fit.json) or a fit.json file."""
    p = Path(path)
    if p.is_dir():
        p = p / FIT_FILE
    if not p.is_file():
        raise ValueError(f"{p}: no fit; make one with `chatforge scale fit {Path(path)}`")
    return Fit.from_dict(load_json(p), source=str(p))


def predict_lines(f: Fit, n_params: float = 0, tokens: float = 0, flops: float = 0, run: str = "") -> list[str]:
    """What `chatforge scale predict` prints."""
    def iv(d: dict, k: str) -> str:
        return f" [{d[k + '_lo']:.4f}, {d[k + '_hi']:.4f}]" if k + "_lo" in d else ""

    if run:
        r = read_run(Path(run))
        p = f.predict(r["n_params"], r["tokens"])
        err = (p["loss"] - r["loss"]) / r["loss"]
        return [f"{run}: N {fmt_count(r['n_params'])}, D {fmt_count(r['tokens'])} tokens, C {p['flops']:.3g} FLOPs: "
                f"predicted loss {p['loss']:.4f}{iv(p, 'loss')}, measured {r['loss']:.4f}, error {100 * err:+.2f}%"]
    if flops:
        o = f.optimal(flops)
        n_iv = f" [{fmt_count(o['n_params_lo'])}, {fmt_count(o['n_params_hi'])}]" if "n_params_lo" in o else ""
        return [f"C = {flops:.3g} FLOPs: compute-optimal N = {fmt_count(o['n_params'])}{n_iv} parameters, D = {fmt_count(o['tokens'])} tokens, "
                f"loss {o['loss']:.4f}{iv(o, 'loss')} nats/token"]
    if n_params <= 0 or tokens <= 0:
        raise ValueError(f"predict needs --params and --tokens (got {n_params}, {tokens}), or --flops, or --run")
    p = f.predict(n_params, tokens)
    return [f"N = {fmt_count(n_params)}, D = {fmt_count(tokens)} tokens (C = {p['flops']:.3g} FLOPs): predicted loss {p['loss']:.4f}{iv(p, 'loss')} nats/token"]


# ---- sizing a run from a fit: the speedrun's model, and plans for hardware not here ---------

DEFAULT_FIT = Path(__file__).parents[1] / "default_fit.json"  # measured on this project's CPU (README, "Scaling laws")


@dataclass
class Tier:
    name: str
    devices: int  # processes (one per GPU); sharded with FSDP when > 1
    peak_flops: float  # bf16 dense FLOP/s of one device; 0 = measure this machine
    memory_gb: float  # memory of one device; 0 = this machine's RAM
    mfu: float  # assumed model FLOPs utilisation; 0 = measure this machine
    seq_len: int
    micro_batch: int  # the most windows per forward/backward; halved until the plan fits memory
    sizes: tuple  # candidate models: ladder sizes k (int) or model.PRESETS names
    note: str


TIERS = {
    "cpu": Tier("cpu", 1, 0.0, 0.0, 0.0, 256, 16, (1, 2, 3, 4, 5, 6, 8), "this machine, throughput measured"),
    "1gpu": Tier("1gpu", 1, 989e12, 80, 0.40, 2048, 8, ("gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b"),
                 "one H100 SXM (989 TFLOP/s bf16 dense, 80 GB), MFU 40% assumed"),
    "8gpu": Tier("8gpu", 8, 989e12, 80, 0.40, 2048, 8, ("gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b"),
                 "8x H100 SXM (989 TFLOP/s bf16 dense, 80 GB each), FSDP, MFU 40% assumed"),
}


def _candidate(size, vocab: int, seq_len: int):
    if isinstance(size, int):
        return f"k{size}", model_config(size, vocab, seq_len), size_overrides(size)
    return size, preset(size, vocab_size=64 * math.ceil(vocab / 64)), {"preset": size}


def memory_gb(cfg, devices: int, micro_batch: int, seq_len: int) -> dict:
    """Bytes per device of a training step, in GB: fp32 weights, gradients and AdamW moments (16
    bytes/param, sharded over `devices` by FSDP), and the activations kept for backward: ~34 bytes
    per layer per token per unit of width in bf16 with a fused attention kernel (Korthikanti et al.
    2022, table 2, without the attention-matrix term), plus the logits' ~10 bytes per vocabulary
    entry per token (bf16 logits, fp32 log-softmax and its gradient)."""
    params = matmul_params(cfg) + cfg.d_model * (2 * cfg.n_layer + 1)  # the norms are all that is not a matmul (tied head)
    shard = params / devices
    tokens = micro_batch * seq_len
    out = {"weights": 4 * shard, "gradients": 4 * shard, "optimizer": 8 * shard,
           "activations": tokens * (34 * cfg.d_model * cfg.n_layer + 10 * cfg.vocab_size)}
    out = {k: v / 1e9 for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def plan_run(f: Fit, tier: Tier, seconds: float, vocab: int, flops_per_s: float = 0.0, mem_gb: float = 0.0) -> dict:
    """The model (from the tier's candidates) and token count that the fit predicts reach the lowest
    loss in `seconds` of training at `flops_per_s` (measured, or the tier's peak x MFU x devices),
    among those whose step fits the device memory. Raises ValueError if none fits."""
    rate = flops_per_s or tier.peak_flops * tier.mfu * tier.devices
    mem = mem_gb or tier.memory_gb
    if rate <= 0 or mem <= 0:
        raise ValueError(f"tier {tier.name}: needs a measured throughput and memory (got {rate} FLOP/s, {mem} GB)")
    rows = []
    for size in tier.sizes:
        name, cfg, overrides = _candidate(size, vocab, tier.seq_len)
        fpt = flops_per_token(cfg, tier.seq_len)
        n = matmul_params(cfg)
        d = seconds * rate / fpt
        mb = tier.micro_batch
        while mb > 1 and memory_gb(cfg, tier.devices, mb, tier.seq_len)["total"] > 0.9 * mem:
            mb //= 2
        m = memory_gb(cfg, tier.devices, mb, tier.seq_len)
        rows.append({"model": name, "overrides": overrides, "n_params": n, "tokens": d, "flops": d * fpt, "loss": float(f.law.loss(n, d)),
                     "micro_batch": mb, "memory_gb": m, "fits": m["total"] <= 0.9 * mem, "hours": d * fpt / rate / 3600})
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        small = min(rows, key=lambda r: r["memory_gb"]["total"])
        raise ValueError(f"tier {tier.name}: no candidate model fits {mem:.0f} GB per device; the smallest, {small['model']}, needs "
                         f"{small['memory_gb']['total']:.1f} GB at micro-batch 1 (weights, gradients, AdamW state, activations)")
    best = min(fitting, key=lambda r: r["loss"])
    c = seconds * rate
    try:
        opt = f.optimal(c * 6 * best["n_params"] / (best["flops"] / best["tokens"]))  # in 6ND terms, as the fit counts compute
    except ValueError:
        opt = None
    runs = f.info.get("runs") or []
    return {"tier": tier.name, "note": tier.note, "seconds": seconds, "flops_per_s": rate, "memory_per_device_gb": mem,
            "devices": tier.devices, "seq_len": tier.seq_len, "rows": rows, "best": best, "optimal": opt,
            "fit_n_range": [min(r["n_params"] for r in runs), max(r["n_params"] for r in runs)] if runs else None}


def plan_lines(p: dict) -> list[str]:
    """Why the plan chose its model: every candidate's tokens, predicted loss and memory."""
    b = p["best"]
    lines = [f"tier {p['tier']}: {p['note']}; {p['flops_per_s'] / 1e12:.3g} TFLOP/s for {p['seconds'] / 3600:.2f} h "
             f"= {p['flops_per_s'] * p['seconds']:.3g} FLOPs; {p['memory_per_device_gb']:.0f} GB per device",
             f"  {'model':<10} {'N':>7} {'tokens':>8} {'pred. loss':>10} {'micro':>5} {'GB/device':>9}  (weights+grads+AdamW+activations)"]
    for r in p["rows"]:
        m = r["memory_gb"]
        lines.append(f"  {r['model']:<10} {fmt_count(r['n_params']):>7} {fmt_count(r['tokens']):>8} {r['loss']:>10.3f} {r['micro_batch']:>5} "
                     f"{m['total']:>9.2f}  ({m['weights']:.2f}+{m['gradients']:.2f}+{m['optimizer']:.2f}+{m['activations']:.2f})"
                     + ("" if r["fits"] else "  does not fit") + ("  <- chosen" if r is b else ""))
    lines.append(f"  chosen: {b['model']}, N = {fmt_count(b['n_params'])}, {fmt_count(b['tokens'])} tokens, {b['flops']:.3g} FLOPs, "
                 f"~{b['hours']:.2f} h, predicted val loss {b['loss']:.3f}: the lowest predicted loss among the candidates that fit")
    if p["optimal"]:
        o = p["optimal"]
        lines.append(f"  the fit's continuous compute-optimum: N = {fmt_count(o['n_params'])}, D = {fmt_count(o['tokens'])} tokens")
    if p["fit_n_range"] and b["n_params"] > 2 * p["fit_n_range"][1]:
        lines.append(f"  caution: the fit saw N up to {fmt_count(p['fit_n_range'][1])}; this extrapolates {b['n_params'] / p['fit_n_range'][1]:.0f}x beyond it")
    return lines
