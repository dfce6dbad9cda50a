"""One cadence for every training stage (pretrain, SFT, RM, DPO, PPO) and the config fields it reads.

A stage's main(cfg) is: set up, then

    for step in loop:            # before each step: evaluate, sample, save when due; set the lr
        ...one step...           # the stage's own work
        loop.done(...)           # count it, log it
    loop.finish()                # a last evaluation, samples, the final checkpoint

The loop decides when: an evaluation (and samples) before every step that is a multiple of
eval_every (sample_every), a checkpoint before every multiple of save_every, never at the step a
run starts or resumes at, and all three at the end. It pauses the progress clock while they run,
so tokens/s and the ETA measure training only; it sets the scheduled lr of each step (given the
optimizer of a ScheduleConfig stage); and it stops on a time budget that every rank agrees on (a rank that stopped alone would leave the others waiting in
their next step's collectives). What it calls on the stage it drives is `Stage`.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch.utils._triton import has_triton

from . import common as C


class Stage(Protocol):
    """What a Loop calls on the stage it drives; a stage with a `sample(step)` method (print
    samples) is also asked for samples."""

    def evaluate(self) -> dict:
        """Held-out metrics ({} when there is nothing to evaluate)."""

    def eval_line(self, step: int, metrics: dict) -> str:
        """The line printed after an evaluation (`metrics`: the latest of every metric)."""

    def save(self, step: int, metrics: dict) -> None:
        """Write the checkpoint."""


@dataclass
class RunConfig:
    """The fields of every training stage: where the run lives, its cadence, its process."""

    out: str = ""  # checkpoint folder (also holds log.jsonl and loss.png)
    eval_every: int = 50  # steps between validation runs (and at the end)
    save_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between progress lines
    resume: bool = False  # continue from out/'s train_state.pt
    seed: int = 0  # data order and initialisation
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"...
    dtype: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the device runs it natively (dtypes.py)

    def __post_init__(self) -> None:
        for key in ("eval_every", "save_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{type(self).__name__}.{key}={getattr(self, key)} must be positive")
        C.parse_dtype(self.dtype)


@dataclass
class ScheduleConfig(RunConfig):
    """The optimizer steps of a stage that takes them on a schedule (all but PPO, whose lr is
    constant): warmup and cosine decay, AdamW's decay, clipping, and the peak for MFU."""

    max_steps: int = 0  # optimizer steps; 0 derives them from epochs
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    peak_flops: float = 0.0  # FLOP/s for MFU; 0 measures this device with a matmul probe

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{name}: lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        for key in ("max_steps", "warmup_steps", "weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, key) < 0:
                raise ValueError(f"{name}.{key}={getattr(self, key)} must be >= 0 (0 means off/default)")
        super().__post_init__()

    def lr_at(self, step: int, total: int) -> float:
        return C.lr_at(step, total, self.lr, self.warmup_steps, self.min_lr_ratio)


class Loop:
    """The cadence of one run from step `start` to `total` (see the module docstring)."""

    def __init__(self, name: str, stage: Stage, cfg: RunConfig, dist: C.Dist, log: C.RunLog, total: int, start: int, *,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
                 sample_every: int = 0, budget_s: float = 0.0, eval_first: bool = False):
        self.name, self.stage, self.cfg, self.dist, self.log = name, stage, cfg, dist, log
        self.optimizer = optimizer  # with a ScheduleConfig: the loop sets its lr
        self.lr = 0.0
        self.total, self.start, self.step = total, start, start
        self.progress = C.Progress(flops_per_token, peak_flops, total, start)  # MFU is 0 without a peak
        self.budget_s = budget_s
        self.sample_every = sample_every or cfg.eval_every
        self.eval_first = eval_first  # a fresh run evaluates at step 0: the number training has to beat
        self.metrics: dict = {}  # the latest of every metric, for the checkpoint's meta.json
        self.last: dict = {}  # the last step's record
        self.t0 = time.time()  # the session's clock: the time budget counts from here
        self.eta_s = float("inf")  # training seconds left at the current speed (capped by the time budget), after each step

    def __iter__(self) -> Iterator[int]:
        if self.step == 0 and self.eval_first:
            with self.progress.paused():
                self._evaluate(self.stage.evaluate())
        while self.step < self.total:
            with self.progress.paused():
                if self._due(self.cfg.eval_every):
                    self._evaluate(self.stage.evaluate())
                if self._due(self.sample_every) and hasattr(self.stage, "sample"):
                    self.stage.sample(self.step)
                if self._due(self.cfg.save_every):
                    self.stage.save(self.step, self.metrics)
            if self.optimizer is not None:
                self._set_lr()
            at = self.step
            yield at
            assert self.step == at + 1, "a loop body calls loop.done() or loop.tick() once per step"
            if self._out_of_time():
                self.log.print(f"{self.name}: time budget of {self.budget_s:.0f}s reached at step {self.step} of {self.total}; stopping")
                break

    def _due(self, every: int) -> bool:
        return self.step > self.start and self.step % every == 0

    def _out_of_time(self) -> bool:
        # Asked only while steps remain, so every rank asks the same number of times.
        return bool(self.budget_s) and self.step < self.total and C.any_rank(time.time() - self.t0 > self.budget_s, self.dist)

    def _evaluate(self, result: dict, extra: dict | None = None) -> None:
        self.metrics.update(result)
        self.metrics.update(extra or {})
        if result or extra:
            self.log.log({"step": self.step, **result, **(extra or {})})
            self.log.print(self.stage.eval_line(self.step, self.metrics))

    def _set_lr(self) -> None:
        """The scheduled lr of this step, in every parameter group."""
        self.lr = self.cfg.lr_at(self.step, self.total)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def tick(self, tokens: float) -> dict[str, float]:
        """This step is done, having trained on `tokens` (over all ranks): tokens/s, MFU and the ETA."""
        p = self.progress.update(self.step, tokens)
        self.step += 1
        if self.budget_s:
            p["eta_s"] = min(p["eta_s"], self.budget_s - (time.time() - self.t0))
        self.eta_s = p["eta_s"]
        return p

    def last_step_s(self) -> float:
        """Seconds the last step took (evaluations, samples and saves not counted)."""
        return self.progress.recent[-1][0]

    def log_due(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.total

    def done(self, tokens: float, values: dict, grad_norm: float, text: str) -> None:
        """tick(), then every log_every steps the step's record (its `values`: loss, ...; the lr,
        `grad_norm`, tokens/s, MFU) and a progress line, `text` being the stage's part of it
        ("loss 2.3456 | pair acc 0.812")."""
        p = self.tick(tokens)
        self.last = {"step": self.step, **values, "lr": self.lr, "grad_norm": grad_norm, "tok_per_s": p["tok_per_s"], "mfu": p["mfu"]}
        if self.log_due():
            self.log.log(self.last)
            self.log.print(
                f"step {self.step}/{self.total} | {text} | lr {self.lr:.2e} | {p['tok_per_s']:,.0f} tok/s | "
                f"MFU {100 * p['mfu']:.1f}% | ETA {C.fmt_time(p['eta_s'])}"
            )

    def finish(self, extra: Callable[[], dict] | None = None) -> dict:
        """The end of the run: a last evaluation, logged together with what `extra()` adds to it
        (computed after the evaluation), samples, the final checkpoint. Returns the metrics."""
        result = self.stage.evaluate()
        self._evaluate(result, extra() if extra is not None else None)
        if hasattr(self.stage, "sample"):
            self.stage.sample(self.step)
        self.stage.save(self.step, self.metrics)
        return self.metrics


# ---- torch.compile of the training step -----------------------------------------------------

COMPILE_MODES = ("auto", "on", "off")


def check_compile_mode(mode: str, field: str) -> None:
    """A clear error naming `field` (e.g. "SFTConfig.compile") for a mode that is not one of COMPILE_MODES."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{field}={mode!r}; expected one of {', '.join(COMPILE_MODES)}")


def compiler_missing(device: torch.device) -> str:
    """Why torch.compile cannot build kernels for `device` here, or "" when it can."""
    if device.type == "cuda":
        return "" if has_triton() else "Triton is not installed (inductor writes its CUDA kernels in it)"
    if device.type == "cpu":
        return "" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "no C++ compiler on PATH (inductor builds its CPU kernels with one)"
    return f"torch.compile is not tried on {device.type}"


class StepCompiler:
    """A stage's `--compile`: "on" compiles the training module at setup, "off" never does, and
    "auto" decides by measuring, on this machine, model and shape. After PROBE eager steps (and a
    warm-up one), when the run has more than MIN_LEFT_S seconds left (its ETA, capped by a time
    budget), it compiles the module (the next step pays for the compilation, and the one after it
    warms the compiled graph up: neither is timed), then runs PROBE pairs of steps, eager and
    compiled alternating, so that a machine drifting in speed (a busy neighbour, clocks) slows both
    sides of a pair alike, and keeps the compiled module for good only when the median of the
    pairs' eager/compiled time ratios is at least MIN_GAIN; otherwise eager for good. Short runs
    (tests, best-of-n rounds) never pay a compilation, and where inductor's kernels lose the
    eager step stays. Both modules share their parameters, so the optimizer and the checkpoints
    do not notice the switches. Multi-process runs compile only with "on" (DDP has to wrap the
    compiled module at setup)."""

    PROBE = 5  # eager steps before deciding to compile; eager/compiled pairs compared after
    MIN_LEFT_S = 900.0  # compiling took 15-52 s idle and up to ~100 s loaded on 2 cores and saved 6-35% of a step (benchmarks/README.md)
    MIN_GAIN = 1.03

    def __init__(self, mode: str, device: torch.device, world: int = 1):
        check_compile_mode(mode, "--compile")
        self.mode, self.device = mode, device
        self.phase = "eager" if mode == "auto" and world == 1 else "done"
        self.eager_module: torch.nn.Module | None = None
        self.compiled_module: torch.nn.Module | None = None
        self.steps = 0  # steps seen in the current phase
        self.pairs: list[list[float]] = []  # [eager seconds, compiled seconds] of each compared pair
        self.compile_s = 0.0
        self.compiled = False  # whether the module for the next step is the compiled one (a stage may then pad its batches to one shape)

    def setup(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to train with from the first step ("on": compiled)."""
        if self.mode != "on":
            return module
        why = compiler_missing(self.device)
        if why:
            raise ValueError(f"--compile on: {why}; use --compile off (or auto, which then stays eager)")
        self.compiled = True
        return torch.compile(module)

    def _use(self, compiled: bool) -> torch.nn.Module:
        self.compiled = compiled
        return self.compiled_module if compiled else self.eager_module

    def after_step(self, loop: "Loop", module: torch.nn.Module) -> torch.nn.Module:
        """The module to train with from the next step on, given the step `loop` just counted."""
        if self.phase == "done":
            return module
        self.steps += 1
        if self.phase == "eager":
            if self.steps <= self.PROBE:  # the ETA settles over the first steps
                return module
            left = loop.eta_s
            why = compiler_missing(self.device) if left > self.MIN_LEFT_S else f"{left / 60:.1f} min left, too short to repay it"
            if why:
                loop.log.print(f"{loop.name}: --compile auto: staying eager ({why})")
                self.phase = "done"
                return module
            loop.log.print(f"{loop.name}: --compile auto: {left / 60:.0f} min left; compiling the training step "
                           f"(the next step pays for it), then timing {self.PROBE} eager/compiled pairs of steps")
            self.eager_module, self.compiled_module = module, torch.compile(module)
            self.phase, self.steps = "compiling", 0
            return self._use(True)
        if self.phase == "compiling":
            if self.steps == 1:  # the compiling step
                self.compile_s = loop.last_step_s()
                return self._use(True)  # a warm-up compiled step
            self.phase, self.steps = "comparing", 0
            return self._use(False)
        # comparing: odd steps ran eager, even ones compiled
        if self.steps % 2:
            self.pairs.append([loop.last_step_s()])
            return self._use(True)
        self.pairs[-1].append(loop.last_step_s())
        if len(self.pairs) < self.PROBE:
            return self._use(False)
        ratios = [e / c for e, c in self.pairs]
        gain = statistics.median(ratios)
        keep = gain >= self.MIN_GAIN
        eager_s, compiled_s = (statistics.median(x) for x in zip(*self.pairs))
        loop.log.print(f"{loop.name}: --compile auto: compiled step {compiled_s:.3f} s vs eager {eager_s:.3f} s, {gain:.2f}x "
                       f"(median of {len(ratios)} alternating pairs, {min(ratios):.2f}-{max(ratios):.2f}; compiling took {self.compile_s:.0f} s): "
                       + ("keeping it" if keep else "back to eager"))
        loop.log.log({"step": loop.step, "compile_kept": keep, "compile_gain": gain, "eager_step_s": eager_s, "compiled_step_s": compiled_s,
                      "compile_s": self.compile_s})
        loop.progress.recent.clear()  # tok/s and the ETA restart at the speed kept
        self.phase = "done"
        return self._use(keep)
