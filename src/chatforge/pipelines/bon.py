"""`chatforge bon`: best-of-n and rejection-sampling fine-tuning, in rounds (InstructGPT's
best-of-n baseline; Llama 2's rejection sampling, Touvron et al. 2023, section 3.2.3).

Round r (1-based), all under OUT/round<r>/:
    samples.jsonl   K answers per prompt from the newest policy (this round's slice of the prompts)
    kept.jsonl      per prompt the best answer by the verifier (--scorer tasks: train/verify.py)
                    or the reward model (--scorer rm), as SFT conversations, when its reward
                    reaches --min-reward (a wrong answer is better left untaught)
    sft/            the newest policy fine-tuned on kept.jsonl (cross-entropy on the kept answers)
Every step is skipped when its output is complete, so an interrupted run continues where it
stopped. With --time-budget-s no round starts that would not fit in what is left of the budget
(judged by the longest round so far; each round's seconds are kept in its stats.json). The
sampling temperature is 1 (the policy's own distribution), so what is kept is the best of what
the policy can already say: each round moves it towards its own best answers.
"""

from __future__ import annotations

import collections
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from .. import console
from ..checkpoint import load_reward_model
from ..config import load_json, save_json
from ..convert.registry import resolve
from ..data.rankings import Ranking, prompt_ids, read_prompts, write_jsonl
from ..engine import Engine
from ..eval.gold import reward_scores
from ..train import rl_math as R
from ..train.common import pick_device
from ..train.ppo import generate, to_rollouts
from ..train.sft import SFTConfig, check_plain_base
from ..train.sft import main as sft_main
from ..train.verify import check_prompt, verify
from .label import load_policy, sample_answers

SCORERS = ("tasks", "rm")


@dataclass
class BoNConfig:
    policy: str = ""  # SFT checkpoint folder (or known model name) to start from
    prompts: list[str] = field(default_factory=list)  # prompt JSONL files; --scorer tasks needs "gold" answer keys (`label prompts --verifiable`)
    out: str = "runs/bon"  # everything goes under this folder
    rounds: int = 2  # sample -> keep the best -> SFT repetitions
    k: int = 4  # answers sampled per prompt
    prompts_per_round: int = 128  # prompts sampled per round (a different slice of the prompts each round)
    scorer: str = "tasks"  # "tasks" (a program checks the answer) or "rm" (a reward model scores it)
    rm: str = ""  # reward model checkpoint, for --scorer rm
    min_reward: float = 1.0  # keep a prompt's best answer only if its reward is at least this (tasks: 1 = a correct answer)
    format_weight: float = 0.2  # tasks: bonus for the answer alone (so the shortest right answer wins)
    language_weight: float = 0.1  # tasks: bonus for answering in the asker's language
    max_new_tokens: int = 48  # answer length limit
    temperature: float = 1.0  # sampling temperature
    epochs: float = 2.0  # SFT passes over each round's kept answers
    lr: float = 1e-5  # SFT learning rate (LoRA wants ~10x)
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0 trains rank-r adapters
    lora_layers: int = 0  # with lora_rank: adapters only in the last N blocks (0 = all)
    dtype: str = "auto"  # autocast for training: "bf16", "fp32" or "auto"
    seed: int = 0  # sampling seeds and SFT order derive from it
    device: str = "auto"  # "auto", "cpu", "cuda"
    time_budget_s: float = 0.0  # 0 = every round; else start no round that would end past it (judged by the longest round so far)

    def __post_init__(self) -> None:
        if not self.policy or not self.prompts:
            raise ValueError("BoNConfig: policy (a checkpoint) and prompts (JSONL files) are required")
        if self.scorer not in SCORERS:
            raise ValueError(f"BoNConfig.scorer={self.scorer!r} is unknown; use one of {', '.join(SCORERS)}")
        if self.scorer == "rm" and not self.rm:
            raise ValueError("BoNConfig.rm is required with --scorer rm: a reward model from `chatforge rm`")
        if self.rounds < 1 or self.k < 2 or self.prompts_per_round < 1 or self.max_new_tokens < 1:
            raise ValueError(f"BoNConfig: rounds={self.rounds} >= 1, k={self.k} >= 2 (best of one is no choice), "
                             f"prompts_per_round={self.prompts_per_round} >= 1 and max_new_tokens >= 1")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"BoNConfig: epochs={self.epochs} and lr={self.lr} must be positive")
        if self.time_budget_s < 0:
            raise ValueError(f"BoNConfig.time_budget_s={self.time_budget_s} must be >= 0 (0 = no limit)")


say = functools.partial(console.say, "bon")  # say(msg): "[bon] msg" on stderr


def best_of(rewards: list[list[float]], min_reward: float) -> list[int | None]:
    """Index of each prompt's best answer (the first of equals), or None when even the best is
    below `min_reward`."""
    out: list[int | None] = []
    for row in rewards:
        j = max(range(len(row)), key=lambda i: (row[i], -i))
        out.append(j if row[j] >= min_reward else None)
    return out


def task_rewards(prompts, answers: list[list[str]], format_weight: float, language_weight: float) -> list[list[float]]:
    return [[verify(a, p.extra["gold"]).reward(format_weight, language_weight) for a in ans] for p, ans in zip(prompts, answers)]


def rm_rewards(rm_path: str, prompts, answers: list[list[str]], dtype: str, device: str) -> list[list[float]]:
    dev = pick_device(device)
    rm, tok, _ = load_reward_model(rm_path, device=dev)
    flat = reward_scores(rm, tok, [Ranking(p.messages, a, []) for p, a in zip(prompts, answers)], dev, dtype).tolist()
    k = len(answers[0])
    return [flat[i * k : (i + 1) * k] for i in range(len(answers))]


@torch.no_grad()
def kl_to_start(policy: str, start: str, prompts, max_new_tokens: int, seed: int, device: str) -> dict:
    """How far the rounds moved the policy, in PPO's units: one answer per prompt sampled from
    `policy` (temperature 1), KL = the mean over answers of sum over their tokens of
    log policy - log start (the k1 estimate of KL(policy || start) per answer), and the answers'
    mean length in tokens."""
    new, ref = load_policy(policy, device), load_policy(start, device)
    ids = [prompt_ids(new.tokenizer, p.messages) for p in prompts]
    engine = Engine(new.model, new.tokenizer, max_batch=min(32, len(ids)))
    answers, finished, texts = generate(engine, ids, max_new_tokens, [seed * 1000 + i for i in range(len(ids))])
    ro = to_rollouts(ids, answers, finished, texts, None)
    dev = next(new.model.parameters()).device
    ids_BT, mask = ro.ids.to(dev), ro.amask.to(dev)
    lp_new = R.answer_logprobs(new.model, ids_BT, mask)[0]
    lp_ref = R.answer_logprobs(ref.model, ids_BT, mask)[0]
    kl = ((lp_new - lp_ref) * mask).sum(1)
    return {"kl": kl.mean().item(), "length": mask.sum(1).mean().item(), "n": len(ids)}


def main(cfg: BoNConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_plain_base(resolve(cfg.policy))  # the first round's SFT would refuse it, after the sampling: refused now
    prompts = read_prompts(cfg.prompts)
    if cfg.scorer == "tasks":
        for p in prompts:
            check_prompt(p.extra.get("gold"), p.source)
    report: dict = {"rounds": []}
    policy = cfg.policy
    spent, longest = 0.0, 0.0  # seconds of the finished rounds (kept in their stats.json, so a resumed run counts them)
    for r in range(1, cfg.rounds + 1):
        d = out / f"round{r}"
        if cfg.time_budget_s and r > 1 and not (out / f".done-round{r}").is_file() and spent + longest > cfg.time_budget_s:
            say(f"round {r}: not started: {spent:.0f}s spent, a round takes up to {longest:.0f}s, budget {cfg.time_budget_s:.0f}s")
            break
        t0 = time.time()
        d.mkdir(exist_ok=True)
        n = len(prompts)
        start = ((r - 1) * cfg.prompts_per_round) % n
        chosen = [prompts[(start + i) % n] for i in range(min(cfg.prompts_per_round, n))]
        samples = d / "samples.jsonl"
        if not samples.is_file():
            say(f"round {r}: sampling {cfg.k} answers to {len(chosen)} prompts from {policy}")
            ck = load_policy(policy, cfg.device)
            answers = sample_answers(ck.model, ck.tokenizer, chosen, cfg.k, cfg.max_new_tokens, cfg.temperature, 1.0, cfg.seed * 1000 + r, 32, f"bon round {r}")
            del ck
            write_jsonl(samples, [{"messages": p.messages, "responses": a, **p.extra} for p, a in zip(chosen, answers)])
        answers = [json.loads(line)["responses"] for line in samples.read_text(encoding="utf-8").splitlines()]
        kept_file = d / "kept.jsonl"
        stats_file = d / "stats.json"
        if not stats_file.is_file():
            if cfg.scorer == "tasks":
                rewards = task_rewards(chosen, answers, cfg.format_weight, cfg.language_weight)
            else:
                rewards = rm_rewards(cfg.rm, chosen, answers, cfg.dtype, cfg.device)
            best = best_of(rewards, cfg.min_reward)
            kept = [{"messages": p.messages + [{"role": "assistant", "content": a[j]}], "metadata": {"bon_round": r, "reward": row[j]}}
                    for p, a, row, j in zip(chosen, answers, rewards, best) if j is not None]
            write_jsonl(kept_file, kept)
            flat = [x for row in rewards for x in row]
            stats = {"prompts": len(chosen), "kept": len(kept), "mean_reward": sum(flat) / len(flat),
                     "best_of_k_reward": sum(max(row) for row in rewards) / len(rewards)}
            if cfg.scorer == "tasks":  # where the kept answers come from: the families the policy can already solve sometimes
                by = collections.Counter(f"{p.extra['gold'].get('lang', '?')}/{p.extra['gold']['task']}" for p, j in zip(chosen, best) if j is not None)
                stats["kept_by_family"] = dict(sorted(by.items()))
            save_json(stats, stats_file)
        stats = load_json(stats_file)
        say(f"round {r}: mean reward {stats['mean_reward']:.3f}, best of {cfg.k} {stats['best_of_k_reward']:.3f}; "
            f"kept {stats['kept']} of {stats['prompts']} prompts (reward >= {cfg.min_reward})")
        sft_dir = d / "sft"
        if stats["kept"] == 0:
            say(f"round {r}: nothing reached --min-reward {cfg.min_reward}; stopping (lower it, raise --k, or start from a stronger policy)")
            report["rounds"].append({"round": r, **stats})
            break
        if not (ckpt_io.is_checkpoint(sft_dir) and (out / f".done-round{r}").is_file()):
            say(f"round {r}: SFT of {policy} on the {stats['kept']} kept answers -> {sft_dir}")
            # Every kept answer is worth teaching, so none is held out: the validation line is the
            # loss on the kept answers themselves (the held-out measure is `eval tasks` / `label judge`).
            # With LoRA the adapters are merged into the round's checkpoint: the next round fine-tunes it, and SFT starts only from plain weights.
            sft_main(SFTConfig(base=policy, data=[str(kept_file)], val_data=[str(kept_file)], out=str(sft_dir), epochs=cfg.epochs, lr=cfg.lr,
                               seq_len=min(512, 64 + 4 * cfg.max_new_tokens), micro_batch=8, warmup_steps=2, lora_rank=cfg.lora_rank, merge=cfg.lora_rank > 0,
                               lora_layers=cfg.lora_layers, dtype=cfg.dtype, eval_every=10**6, save_every=10**6, log_every=10,
                               sample_prompts=[chosen[0].messages[-1]["content"]], seed=cfg.seed + r, device=cfg.device,
                               resume=(sft_dir / "train_state.pt").is_file()))
            (out / f".done-round{r}").write_text("done\n")
            stats["seconds"] = time.time() - t0
            save_json(stats, stats_file)
        spent += stats.get("seconds", 0.0)
        longest = max(longest, stats.get("seconds", 0.0))
        policy = str(sft_dir)
        report["rounds"].append({"round": r, **stats, "policy": policy})
    report["policy"] = policy
    report["seconds"] = round(spent, 1)
    if policy != cfg.policy:
        measured = kl_to_start(policy, cfg.policy, prompts[:64], cfg.max_new_tokens, cfg.seed, cfg.device)
        report.update(kl_to_start=measured["kl"], length=measured["length"])
        say(f"KL to {cfg.policy} {measured['kl']:.3f} nats per answer, answers {measured['length']:.1f} tokens "
            f"(one sampled answer to each of the first {measured['n']} prompts)")
    save_json(report, out / "report.json")
    say(f"done: newest policy {policy}, report {out / 'report.json'}")
    return report
