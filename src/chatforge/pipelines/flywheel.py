"""`chatforge flywheel --policy CKPT`: one turn of the data flywheel (design.md step 4).

    export   the store's feedback -> OUT/round<n>/export (new demonstrations, since --since)
             and OUT/round<n>/all (every ranking and thumbs pair so far)
    sft      (--sft) fine-tune the policy on the new demonstrations
    rm       a reward model from the SFT model on all rankings so far (InstructGPT step 2)
    ppo      PPO from the (fine-tuned) policy against that reward model, KL to the SFT model (step 3)
    evaluate the candidate against the current policy on held-out prompts with the same sampling
             seeds: gold score (eval/gold.py's programmatic labeler, never a reward model) and the new
             RM's score; the gold score decides, the RM score is reported
    register if the candidate beats the current policy by more than --min-gain, it goes in the
             store's snapshot registry with a share of chat traffic (--traffic): a server that
             loads both checkpoints (`chatforge serve CURRENT CANDIDATE`) starts that share of new
             chat conversations on the candidate, and `chatforge feedback stats` shows each
             snapshot's thumbs-up rate, so people's ratings confirm (or not) what the gold
             labeler measured.

The candidate's folder is named `<policy>-r<n>` (the served model name is the folder's name).
Each round gets a fresh folder; a finished round is never redone.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from .. import console, feedback
from ..checkpoint import load_reward_model
from ..config import load_json, save_json
from ..convert.registry import KNOWN, resolve
from ..data.rankings import Ranking, read_prompts, write_jsonl
from ..eval.gold import judge_answers, paired_difference, reward_scores
from ..store import Store, parse_since
from ..train.common import pick_device
from ..train.ppo import PPOConfig
from ..train.ppo import main as ppo_main
from ..train.reward import RewardConfig
from ..train.reward import main as rm_main
from ..train.sft import SFTConfig
from ..train.sft import main as sft_main
from .label import load_policy, sample_answers


@dataclass
class FlywheelConfig:
    policy: str = ""  # the policy being served now: checkpoint folder
    ref: str = ""  # SFT model: reward model start and PPO's KL reference; empty = the policy
    db: str = ""  # SQLAlchemy URL of the store; "" = SQLite at <cache>/chatforge.db
    out: str = "runs/flywheel"  # rounds go under this folder (round1, round2, ...)
    since: str = ""  # demonstrations given since (ISO date/time or 30m/24h/7d); "" = all; rankings: always all
    sft: bool = False  # fine-tune on the new demonstrations before the reward model and PPO
    sft_epochs: float = 2.0  # SFT passes over the demonstrations
    sft_lr: float = 1e-5  # SFT peak learning rate
    prompts: list[str] = field(default_factory=list)  # PPO prompt files; empty = the prompts people gave feedback on
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompts with gold answer keys (`chatforge label prompts`)
    eval_samples: int = 2  # answers per held-out prompt and policy
    max_eval_prompts: int = 0  # judge at most this many held-out prompts (0 = all)
    sample_tokens: int = 48  # answer length in rollouts and evaluation
    rm_epochs: float = 1.0  # reward model passes over the rankings
    rm_lr: float = 1e-5  # reward model learning rate
    ppo_iterations: int = 20  # PPO iterations
    rollout_batch: int = 16  # PPO prompts per iteration
    minibatch: int = 8  # PPO answers per optimizer step
    ppo_epochs: int = 4  # PPO passes over each rollout batch
    lr: float = 1e-5  # PPO policy learning rate
    kl_coef: float = 0.02  # PPO beta
    min_gain: float = 0.0  # the candidate must beat the current gold score by more than this to be registered
    traffic: float = 0.1  # share of new chat conversations a registered candidate answers (A/B)
    dtype: str = "auto"  # autocast for training: "bf16", "fp32" or "auto" (dtypes.py)
    seed: int = 0  # everything random derives from it
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("FlywheelConfig.policy is required: the checkpoint being served")
        if not self.eval_prompts:
            raise ValueError("FlywheelConfig.eval_prompts is required: held-out prompts with gold answer keys "
                             "(`chatforge label prompts --out DIR` writes DIR/heldout.jsonl)")
        if not 0.0 < self.traffic <= 1.0:
            raise ValueError(f"FlywheelConfig.traffic={self.traffic} must be in (0, 1]")
        if self.eval_samples < 1 or self.sample_tokens < 1:
            raise ValueError(f"FlywheelConfig: eval_samples={self.eval_samples} and sample_tokens={self.sample_tokens} must be >= 1")


say = functools.partial(console.say, "flywheel")  # say(msg): "[flywheel] msg" on stderr


def _next_round(out: Path) -> int:
    done = [int(m.group(1)) for p in out.glob("round*") if (m := re.fullmatch(r"round(\d+)", p.name))]
    return max(done, default=0) + 1


def _snapshot(path: str | Path) -> str:
    meta = load_json(Path(path) / "meta.json")
    return meta.get("snapshot") or ckpt_io.snapshot_id(path)


def prompts_of(files: list[Path], out: Path) -> Path:
    """The distinct prompts of exported SFT and rankings files, as a PPO prompts file."""
    seen, lines = set(), []
    for f in files:
        for raw in f.read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            obj = json.loads(raw)
            msgs = obj["messages"]
            if msgs and msgs[-1]["role"] == "assistant":  # an SFT line: the prompt is everything before the answer
                msgs = msgs[:-1]
            key = json.dumps(msgs, ensure_ascii=False)
            if msgs and msgs[-1]["role"] == "user" and key not in seen:
                seen.add(key)
                lines.append({"messages": msgs})
    if not lines:
        raise ValueError(f"no prompts in {', '.join(map(str, files))}: collect feedback first, or pass --prompts")
    return write_jsonl(out, lines)


def evaluate(policies: dict[str, str], rm_dir: Path, eval_prompts: list[str], samples: int, max_new_tokens: int, max_prompts: int,
             seed: int, device: str) -> dict:
    """Answers of each policy to the held-out prompts (same seeds for all), scored by the gold
    labeler and by the reward model."""
    dev = pick_device(device)
    prompts = read_prompts(eval_prompts)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not any("gold" in p.extra for p in prompts):
        raise ValueError(f"{eval_prompts}: no prompt carries a 'gold' answer key; the flywheel's evaluation needs them")
    rm, rm_tok, _ = load_reward_model(rm_dir, device=dev)
    out = {}
    for role, path in policies.items():
        ck = load_policy(path, device)
        answers = sample_answers(ck.model, ck.tokenizer, prompts, samples, max_new_tokens, 1.0, 1.0, seed, 32, f"evaluate {role}")
        r = judge_answers(prompts, answers)
        r["rm_score"] = float(reward_scores(rm, rm_tok, [Ranking(p.messages, ans, []) for p, ans in zip(prompts, answers)], dev).mean())
        r["path"] = str(path)
        out[role] = r
        say(f"{role} {path}: gold {r['gold_score']:.4f} ± {r['stderr']:.4f} (n={r['n']}), RM {r['rm_score']:+.3f}")
    return out


def decide(result: dict, min_gain: float) -> tuple[bool, float]:
    """Register the candidate when its gold score beats the current policy's by more than min_gain."""
    gain = result["candidate"]["gold_score"] - result["current"]["gold_score"]
    return gain > min_gain, gain


def main(cfg: FlywheelConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = _next_round(out)
    d = out / f"round{n}"
    d.mkdir()
    policy = str(resolve(cfg.policy))
    store = Store(cfg.db or None)
    try:
        # 1. export: the new demonstrations, and every ranking so far
        new = feedback.export(store, d / "export", parse_since(cfg.since) if cfg.since else None)
        everything = feedback.export(store, d / "all")
        say(f"round {n}: {sum(new.demonstrations.values())} new demonstrations, {sum(everything.rankings.values())} rankings in all")
        if not sum(everything.rankings.values()):
            raise ValueError("the store holds no rankings or thumbs pairs yet: the reward model has nothing to learn from")
        ref = cfg.ref or policy
        start = policy
        # 2. optional SFT on the new demonstrations
        if cfg.sft:
            if sum(new.demonstrations.values()) < 2:
                say(f"round {n}: fewer than 2 new demonstrations; skipping SFT")
            else:
                say(f"round {n}: SFT on {new.sft_path}")
                seq_len = min(512, ckpt_io.load_config(policy).max_seq_len)
                start = str(sft_main(SFTConfig(base=policy, data=[new.sft_path], out=str(d / "sft"), epochs=cfg.sft_epochs, lr=cfg.sft_lr,
                                               seq_len=seq_len, dtype=cfg.dtype, seed=cfg.seed, device=cfg.device, warmup_steps=1)))
                ref = start
        # 3. reward model from the SFT model on all rankings
        say(f"round {n}: reward model from {ref} on {everything.rankings_path}")
        rm_dir = d / "rm"
        rm_main(RewardConfig(base=ref, data=[everything.rankings_path], out=str(rm_dir), epochs=cfg.rm_epochs, lr=cfg.rm_lr,
                             dtype=cfg.dtype, seed=cfg.seed, device=cfg.device, warmup_steps=1))
        # 4. PPO
        prompts = list(cfg.prompts) or [str(prompts_of([Path(everything.rankings_path), Path(everything.sft_path)], d / "prompts.jsonl"))]
        served = cfg.policy if cfg.policy in KNOWN else Path(policy).resolve().name  # the name `serve` gives the policy
        name = re.sub(r"-r\d+$", "", served) + f"-r{n}"
        cand = d / name
        say(f"round {n}: PPO from {start} -> {cand}")
        ppo_main(PPOConfig(policy=start, rm=str(rm_dir), prompts=prompts, ref=ref, out=str(cand), iterations=cfg.ppo_iterations,
                           rollout_batch=cfg.rollout_batch, minibatch=cfg.minibatch, ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.sample_tokens,
                           lr=cfg.lr, kl_coef=cfg.kl_coef, dtype=cfg.dtype, seed=cfg.seed + n, device=cfg.device))
        # 5. evaluate candidate vs current on held-out prompts
        result = evaluate({"current": policy, "candidate": str(cand)}, rm_dir, cfg.eval_prompts, cfg.eval_samples, cfg.sample_tokens,
                          cfg.max_eval_prompts, cfg.seed + 1000, cfg.device)
        better, gain = decide(result, cfg.min_gain)
        paired = paired_difference(result["candidate"], result["current"])
        report = {"round": n, "export": new.as_dict(), "all": everything.as_dict(), "sft": start if start != policy else None,
                  "rm": str(rm_dir), "candidate": str(cand), "evaluation": {k: {x: v for x, v in r.items() if x != "examples"}
                                                                         for k, r in result.items()},
                  "gold_gain": gain, "gold_gain_paired": paired, "min_gain": cfg.min_gain, "registered": better}
        # 6. register
        if better:
            snap = _snapshot(cand)
            feedback.register_snapshot(store, name, snap, str(cand.resolve()), _snapshot(policy), cfg.traffic, report)
            report["snapshot"] = snap
            say(f"round {n}: candidate {name}@{snap} beats the current policy by {gain:+.4f} ± {paired['stderr']:.4f} gold; registered for "
                f"{cfg.traffic:.0%} of new chats. Serve it next to the current one: chatforge serve {cfg.policy} {cand}")
        else:
            say(f"round {n}: candidate gains {gain:+.4f} ± {paired['stderr']:.4f} gold (needs > {cfg.min_gain:+.4f}); not registered")
        save_json(report, d / "report.json")
        return report
    finally:
        store.close()
