"""`chatforge rlhf --rounds R`: InstructGPT's steps 2 and 3 repeated with fresh comparisons from
the newest policy (Ouyang et al. 2022, section 3.1: "steps 2 and 3 can be iterated").

Round r (1-based), all under OUT/round<r>/:
    samples.jsonl   K answers per prompt from the newest policy (the SFT model in round 1)
    rankings.jsonl  the gold labeler's rankings (`oracle`), or ones a person made with
                    `chatforge label rank OUT/round<r>/samples.jsonl --out OUT/round<r>/rankings.jsonl`
    rm/             a reward model trained from the SFT checkpoint on the rankings of rounds 1..r
    ppo/            PPO from the newest policy against that reward model, KL to the SFT model
    judge.json      (with an oracle and eval_prompts) gold score of the new policy on held-out prompts
Every step is skipped when its output is complete, so an interrupted run (or one that stopped
for people to rank) continues where it stopped when run again with the same arguments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from .. import console
from ..config import load_json, save_json
from ..data.rankings import read_prompts, read_rankings, write_jsonl
from ..eval.gold import get_oracle, paired_difference, rm_gold_agreement
from ..train.ppo import PPOConfig
from ..train.ppo import main as ppo_main
from ..train.rankings import split_by_prompt
from ..train.reward import RewardConfig
from ..train.reward import main as rm_main
from .label import SampleConfig, judge, judged, rank_with_oracle, sample


@dataclass
class RLHFConfig:
    sft: str = ""  # SFT checkpoint: round 1's policy, the KL reference and every reward model's start
    prompts: list[str] = field(default_factory=list)  # prompt files to sample comparisons from and to run PPO on
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompts with answer keys, judged after each round
    out: str = "runs/rlhf"  # everything goes under this folder
    rounds: int = 2  # sample -> rank -> RM -> PPO repetitions
    oracle: str = ""  # gold labeler ("gold", "gold-73"); empty = stop after sampling for people to rank
    k: int = 4  # answers per compared prompt
    compare_prompts: int = 64  # prompts ranked per round (a different slice of `prompts` each round)
    sample_tokens: int = 48  # answer length limit for comparisons, rollouts and judging
    rm_epochs: float = 1.0  # reward model passes over the rankings
    rm_lr: float = 1e-5  # reward model learning rate
    ppo_iterations: int = 20  # PPO iterations per round
    rollout_batch: int = 16  # PPO answers per iteration
    samples_per_prompt: int = 1  # PPO answers per prompt, each scored against its siblings' mean (> 1)
    minibatch: int = 8  # PPO answers per optimizer step
    ppo_epochs: int = 4  # PPO passes over each rollout batch
    lr: float = 1e-5  # PPO policy learning rate
    kl_coef: float = 0.02  # PPO beta (the starting value when kl_target > 0)
    kl_target: float = 0.0  # > 0: adaptive beta aiming at this KL per answer
    ptx_data: str = ""  # token shards for PPO-ptx; empty = none
    ptx_coef: float = 0.0  # PPO-ptx gamma
    lora_rank: int = 0  # LoRA rank for the reward model and PPO; 0 = full training
    lora_layers: int = 0  # with lora_rank: adapters only in the last N transformer blocks (0 = every block)
    judge_samples: int = 1  # answers per held-out prompt when judging (more = a tighter paired comparison)
    dtype: str = "auto"  # autocast for training: "bf16", "fp32" or "auto" (dtypes.py)
    seed: int = 0  # everything random derives from it
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if not self.sft or not self.prompts:
            raise ValueError("RLHFConfig: sft (a checkpoint) and prompts (JSONL files) are required")
        if self.rounds < 1 or self.k < 2 or self.compare_prompts < 1:
            raise ValueError(f"RLHFConfig: rounds={self.rounds} >= 1, k={self.k} >= 2, compare_prompts={self.compare_prompts} >= 1")
        if self.oracle:
            get_oracle(self.oracle)
        if self.eval_prompts and not self.oracle:
            raise ValueError("RLHFConfig.eval_prompts are judged by the gold labeler: set --oracle too")


say = functools.partial(console.say, "rlhf")  # say(msg): "[rlhf] msg" on stderr


def _done(path: Path, stage_steps: int | None = None) -> bool:
    """A stage's checkpoint is complete (and, for step-counted stages, reached its last step)."""
    if not ckpt_io.is_checkpoint(path):
        return False
    meta = load_json(path / "meta.json")
    if meta.get("stage") == "rm":
        return bool(meta.get("normalised"))
    return stage_steps is None or meta.get("step") == stage_steps


def main(cfg: RLHFConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(cfg.prompts)
    report: dict = {"rounds": []}
    if cfg.eval_prompts:
        j0 = out / "judge_sft.json"
        if not j0.is_file() or load_json(j0).get(cfg.sft, {}).get("samples") != cfg.judge_samples:
            judge([cfg.sft], cfg.eval_prompts, samples=cfg.judge_samples, max_new_tokens=cfg.sample_tokens, device=cfg.device, out=str(j0))
        report["sft"] = load_json(j0)[cfg.sft]
    policy = cfg.sft
    rankings_so_far: list[str] = []
    for r in range(1, cfg.rounds + 1):
        d = out / f"round{r}"
        d.mkdir(exist_ok=True)
        # 1. comparisons from the newest policy, on this round's slice of the prompts
        samples = d / "samples.jsonl"
        if not samples.is_file():
            n = len(prompts)
            start = ((r - 1) * cfg.compare_prompts) % n
            chosen = [prompts[(start + i) % n] for i in range(min(cfg.compare_prompts, n))]
            subset = write_jsonl(d / "compare_prompts.jsonl", [{"messages": p.messages, **p.extra} for p in chosen])
            say(f"round {r}: sampling {cfg.k} answers to {len(chosen)} prompts from {policy}")
            sample(SampleConfig(policy=policy, prompts=[str(subset)], out=str(samples), k=cfg.k, max_new_tokens=cfg.sample_tokens,
                                seed=cfg.seed * 1000 + r, device=cfg.device))
        # 2. rankings
        rankings = d / "rankings.jsonl"
        if not rankings.is_file():
            if not cfg.oracle:
                say(f"round {r}: rank the samples, then run this command again:\n"
                    f"    chatforge label rank {samples} --out {rankings}")
                report["waiting_for_rankings"] = str(rankings)
                return report
            lines = rank_with_oracle(read_rankings([samples], require_ranking=False), get_oracle(cfg.oracle), cfg.seed * 1000 + r)
            write_jsonl(rankings, lines)
            say(f"round {r}: {len(lines)} rankings by the {cfg.oracle} labeler (synthetic preferences)")
        rankings_so_far.append(str(rankings))
        # 3. reward model from SFT on every ranking so far
        rm_dir = d / "rm"
        if not _done(rm_dir):
            say(f"round {r}: reward model on {len(rankings_so_far)} round(s) of rankings")
            rm_main(RewardConfig(base=cfg.sft, data=list(rankings_so_far), out=str(rm_dir), epochs=cfg.rm_epochs, lr=cfg.rm_lr,
                                 lora_rank=cfg.lora_rank, lora_layers=cfg.lora_layers, dtype=cfg.dtype, seed=cfg.seed, device=cfg.device, max_len=512,
                                 resume=(rm_dir / "train_state.pt").is_file()))
        # 4. PPO from the newest policy, KL to the SFT model
        ppo_dir = d / "ppo"
        if not _done(ppo_dir, cfg.ppo_iterations):
            say(f"round {r}: PPO from {policy}")
            ppo_main(PPOConfig(policy=policy, rm=str(rm_dir), prompts=list(cfg.prompts), ref=cfg.sft, out=str(ppo_dir),
                               iterations=cfg.ppo_iterations, rollout_batch=cfg.rollout_batch, samples_per_prompt=cfg.samples_per_prompt, minibatch=cfg.minibatch,
                               ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.sample_tokens, lr=cfg.lr, kl_coef=cfg.kl_coef,
                               kl_target=cfg.kl_target, ptx_data=cfg.ptx_data, ptx_coef=cfg.ptx_coef, lora_rank=cfg.lora_rank, lora_layers=cfg.lora_layers,
                               dtype=cfg.dtype, seed=cfg.seed + r, device=cfg.device, resume=(ppo_dir / "train_state.pt").is_file()))
        policy = str(ppo_dir)
        rm_meta = load_json(rm_dir / "meta.json")
        ppo_meta = load_json(ppo_dir / "meta.json")
        row = {"round": r, "rm_val_accuracy": rm_meta["metrics"].get("val_accuracy"), "ppo_kl": ppo_meta["metrics"].get("kl"),
               "ppo_rm_score": ppo_meta["metrics"].get("rm_score")}
        if cfg.oracle:
            # The reward model against the noise-free gold order on its held-out prompts (evaluation only).
            rg = d / "rm_gold.json"
            if not rg.is_file():
                all_samples = read_rankings([Path(x).parent / "samples.jsonl" for x in rankings_so_far], require_ranking=False)
                held = split_by_prompt(all_samples, RewardConfig.val_fraction, cfg.seed)[1]
                save_json(rm_gold_agreement(str(rm_dir), held, device=cfg.device), rg)
            row["rm_gold_accuracy"] = load_json(rg)
        if cfg.eval_prompts:
            row["gold"] = judged(policy, d / "judge.json", cfg.eval_prompts, samples=cfg.judge_samples, max_new_tokens=cfg.sample_tokens,
                                 device=cfg.device)
            row["gold_vs_sft"] = paired_difference(row["gold"], report["sft"])
        report["rounds"].append(row)
        say(f"round {r}: RM held-out accuracy {row['rm_val_accuracy']:.3f}"
            + (f" (against the noise-free gold order {row['rm_gold_accuracy']['accuracy']:.3f})" if "rm_gold_accuracy" in row else "")
            + f", PPO KL {row['ppo_kl']:.3f}, RM score {row['ppo_rm_score']:+.3f}"
            + (f", gold {row['gold']['gold_score']:.4f} (SFT {report['sft']['gold_score']:.4f}, paired difference "
               f"{row['gold_vs_sft']['mean']:+.4f} ± {row['gold_vs_sft']['stderr']:.4f})" if "gold" in row else ""))
    save_json(report, out / "report.json")
    say(f"done: {out / 'report.json'}")
    return report
