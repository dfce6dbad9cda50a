"""Stage 3: PPO against the reward model (InstructGPT step 3; Ouyang et al. 2022, section 3.5;
Ziegler et al. 2019; Schulman et al. 2017).

Each iteration:
1. rollout  - the engine samples `samples_per_prompt` answers per prompt from the current
              policy (KV cache, batched, temperature 1 so the samples follow the policy's own
              distribution);
2. scoring  - one forward each of the policy (old log-probs), the frozen SFT reference, the
              value model and the frozen reward model over prompt + answer; per-token reward
              = -beta * KL_t (k1 = log pi - log ref) with the RM score added on the last token
              (with several answers per prompt: minus the mean score of the prompt's other
              answers, a baseline that removes the RM's per-prompt offsets);
              GAE(gamma, lambda) gives advantages and returns; advantages are whitened;
3. training - `ppo_epochs` passes over the rollouts in shuffled minibatches: PPO's clipped
              policy loss plus the clipped value loss (policy and value are separate models,
              each with its own gradient clipping), plus PPO-ptx: `ptx_coef` times the
              pretraining loss on token shards (InstructGPT's gamma), which keeps the policy
              from losing what pretraining taught it.
beta is fixed, or adapted towards a target KL per answer (Ziegler et al. 2019, eq. 2).

The value model starts as a copy of the reward model (InstructGPT). With `lora_rank` > 0 the
policy and the value model train rank-r adapters (and the value head) with their bodies
frozen, and the reference is the policy with its adapters switched off: one model fewer in
memory, which is what lets this run on a CPU.

Logged per iteration: RM score, reward, KL, entropy, clip fraction, value loss, answer length,
the time split rollout / scoring / training, a few samples; plots of the curves and of RM
score against KL. Checkpoints resume exactly (weights, value model, optimizer, RNG, KL
controller; rollout seeds and minibatch order are functions of the iteration).

Group methods (`--algo grpo|rloo`, `chatforge rl`): the same loop without a value model. Each
prompt is answered `samples_per_prompt` = G times, an answer's advantage is its reward against
its group (GRPO: minus the group mean, over the group std; RLOO: minus the mean of its G-1
siblings; rl_math.group_advantages) on every one of its tokens, and the policy loss is the same
clipped per-token ratio. The KL to the reference is either subtracted from each answer's reward
(`--kl-mode reward`: beta * sum of k1 over its tokens) or added to the loss (`--kl-mode loss`:
beta * k3 per token, DeepSeekMath's choice).

Rewards (`--reward`): "rm" the reward model's score; "tasks" a program's check of the answer to
a generated task (train/verify.py: correct + format + language terms), for prompts that carry an
answer key of a verifiable family; "rm+tasks" rm_weight * RM + task_weight * verified.

Single process: rollouts and updates here are not split across ranks (a torchrun launch is
refused rather than silently duplicating work).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..checkpoint import load_reward_model
from ..config import mix_seed, to_dict
from ..convert.registry import resolve
from ..data.rankings import prompt_ids, read_prompts
from ..engine import Engine, SamplingParams
from ..model import GPT, RewardModel, shared_depth
from ..plots import figure
from . import common as C
from . import rl_math as R
from .common import load_policy
from .loop import Loop, RunConfig
from .lora import LoRA, LoRAConfig
from .rankings import ShuffledBatches
from .curriculum import MODES as CURRICULA
from .curriculum import FamilyCurriculum
from .verify import FAMILIES, check_prompt, family_of, verify


@dataclass
class PPOConfig(LoRAConfig, RunConfig):
    policy: str = ""  # SFT checkpoint folder (or known model name) to start from
    rm: str = ""  # reward model checkpoint (`chatforge rm`); also initialises the value model (not needed by grpo/rloo with --reward tasks)
    prompts: list[str] = field(default_factory=list)  # prompt JSONL files ({"messages"} or {"prompt"})
    ref: str = ""  # KL reference checkpoint; empty = the policy checkpoint (the SFT model)
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompts: RM score of greedy answers at each eval
    out: str = "runs/ppo"  # checkpoint folder (log.jsonl, plots)
    iterations: int = 20  # rollout + update rounds
    rollout_batch: int = 16  # answers per iteration
    samples_per_prompt: int = 1  # answers per prompt in a rollout batch (G); > 1 scores each against its siblings; grpo/rloo need >= 2
    algo: str = "ppo"  # "ppo" (value model + GAE), "grpo" (advantage = reward against its group's mean and std) or "rloo" (against its siblings' mean); no value model for the last two
    reward: str = "rm"  # "rm" (the reward model), "tasks" (verified answers to the prompts' task families, train/verify.py) or "rm+tasks"
    rm_weight: float = 1.0  # weight of the RM score in the reward
    task_weight: float = 1.0  # weight of the verified-answer reward in the reward
    format_weight: float = 0.2  # verified reward: bonus for a correct answer with nothing else in it
    language_weight: float = 0.1  # verified reward: bonus for answering in the asker's language
    kl_mode: str = "reward"  # where the KL to the reference enters: "reward" (-beta * k1 in the reward) or "loss" (+beta * k3 per token in the loss)
    max_new_tokens: int = 48  # answer length limit during rollouts
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch: int = 8  # answers per optimizer step
    lr: float = 1e-5  # learning rate of the policy (constant)
    value_lr: float = 0.0  # learning rate of the value model; 0 = same as lr
    kl_coef: float = 0.02  # beta: weight of the per-token KL penalty (InstructGPT: 0.02)
    kl_target: float = 0.0  # > 0: adapt beta so the KL per answer approaches this many nats
    kl_horizon: int = 10000  # answers over which the adaptive controller can move beta by at most a fifth
    gamma: float = 1.0  # discount over answer tokens
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # PPO clip range of the probability ratio
    value_clip: float = 0.2  # clip range of the value update
    grad_clip: float = 1.0  # max gradient norm of each model; 0 disables
    no_eot_penalty: float = 0.0  # subtracted from the RM score of answers cut at max_new_tokens
    ptx_data: str = ""  # token-shard folder for PPO-ptx; empty = no pretraining mix
    ptx_coef: float = 0.0  # gamma in InstructGPT's objective: weight of the pretraining loss
    ptx_rows: int = 4  # pretraining windows per optimizer step
    ptx_seq_len: int = 128  # tokens per pretraining window
    lora_rank: int = 0  # 0 = train all weights; r > 0 = rank-r adapters on policy and value
    dtype: str = "auto"  # autocast for scoring and training: "bf16", "fp32" or "auto" (dtypes.py)
    eval_every: int = 5  # iterations between held-out RM evaluations (and at the end)
    save_every: int = 5  # iterations between checkpoints (and at the end)
    log_every: int = 1  # iterations between progress lines
    show_samples: int = 2  # answers printed with each progress line
    curriculum: str = "off"  # "signal": draw prompts by (language, family) where the verified pass rate p makes groups differ, weight p(1-p) + floor (train/curriculum.py); "off": a shuffled order
    time_budget_s: float = 0.0  # stop (evaluate and save) after the iteration that passes this many seconds; 0 = no limit
    seed: int = 0  # prompt order, rollout seeds, minibatch order, adapter init

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("PPOConfig.policy is required: the SFT checkpoint")
        if self.algo not in ALGOS:
            raise ValueError(f"PPOConfig.algo={self.algo!r} is unknown; use one of {', '.join(ALGOS)}")
        if self.reward not in REWARDS:
            raise ValueError(f"PPOConfig.reward={self.reward!r} is unknown; use one of {', '.join(REWARDS)}")
        if self.kl_mode not in ("reward", "loss"):
            raise ValueError(f"PPOConfig.kl_mode={self.kl_mode!r} is unknown; use reward or loss")
        if not self.rm and ("rm" in self.reward or self.algo == "ppo"):
            why = "the value model starts from it" if "rm" not in self.reward else "--reward " + self.reward
            raise ValueError(f"PPOConfig.rm is required: a reward model from `chatforge rm` ({why}); --algo grpo or rloo with --reward tasks needs none")
        if self.algo in R.GROUP_ALGOS and self.samples_per_prompt < 2:
            raise ValueError(f"PPOConfig.samples_per_prompt={self.samples_per_prompt}: --algo {self.algo} compares answers within a group; use G >= 2")
        if min(self.rm_weight, self.task_weight, self.format_weight, self.language_weight) < 0:
            raise ValueError("PPOConfig: rm_weight, task_weight, format_weight and language_weight must be >= 0")
        if not self.prompts:
            raise ValueError("PPOConfig.prompts is required: prompt JSONL files")
        if self.time_budget_s < 0:
            raise ValueError(f"PPOConfig.time_budget_s={self.time_budget_s} must be >= 0 (0 = no limit)")
        for name in ("iterations", "rollout_batch", "max_new_tokens", "ppo_epochs", "minibatch", "kl_horizon", "ptx_rows", "ptx_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)} must be positive")
        if self.rollout_batch % self.minibatch:
            raise ValueError(f"PPOConfig.rollout_batch={self.rollout_batch} is not a multiple of minibatch={self.minibatch}")
        if self.samples_per_prompt < 1 or self.rollout_batch % self.samples_per_prompt:
            raise ValueError(f"PPOConfig.samples_per_prompt={self.samples_per_prompt} must be >= 1 and divide rollout_batch={self.rollout_batch}")
        if self.lr <= 0 or self.value_lr < 0 or self.kl_coef < 0 or self.kl_target < 0:
            raise ValueError("PPOConfig: lr must be > 0; value_lr, kl_coef, kl_target >= 0")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1 and self.clip > 0 and self.value_clip > 0):
            raise ValueError(f"PPOConfig: gamma={self.gamma} in (0,1], lam={self.lam} in [0,1], clip and value_clip > 0")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"PPOConfig.curriculum={self.curriculum!r} is unknown; use one of {', '.join(CURRICULA)}")
        if self.curriculum != "off" and "tasks" not in self.reward:
            raise ValueError(f"PPOConfig.curriculum={self.curriculum!r} weighs task families by their verified pass rate; it needs --reward tasks or rm+tasks")
        if self.ptx_coef < 0 or bool(self.ptx_coef) != bool(self.ptx_data):
            raise ValueError(f"PPOConfig: PPO-ptx needs both ptx_data and ptx_coef > 0 (got {self.ptx_data!r}, {self.ptx_coef})")
        super().__post_init__()


ALGOS = ("ppo",) + R.GROUP_ALGOS
STATS = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy", "grad_norm", "ptx_loss", "kl_loss")  # per minibatch, averaged
REWARDS = ("rm", "tasks", "rm+tasks")
RESUME_KEYS = ("curriculum", "policy", "rm", "prompts", "ref", "rollout_batch", "samples_per_prompt", "algo", "reward", "kl_mode", "max_new_tokens", "ppo_epochs",
               "minibatch", "ptx_data", "ptx_rows", "ptx_seq_len", "lora_rank", "lora_alpha", "lora_layers", "lora_targets", "seed")


# ---- rollouts as tensors ----------------------------------------------------------------------


@dataclass
class Rollouts:
    """A batch of prompt + answer sequences, right-padded, with per-token quantities aligned to
    the answer tokens: position t of the (B, T-1) tensors is the prediction of token t+1."""

    ids: torch.Tensor  # (B,T) prompt + answer tokens
    amask: torch.Tensor  # (B,T-1) 1 where token t+1 is an answer token
    last: torch.Tensor  # (B,) index in ids of each answer's last token
    finished: torch.Tensor  # (B,) the answer ended with a stop token (not cut by the length limit)
    texts: list[str]  # answers as text, for logs
    rm_last: torch.Tensor | None = None  # (B,) where the RM reads its score: the end-of-turn token after each answer
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    score: torch.Tensor | None = None  # RM score (B,); None without an RM in the reward
    task: torch.Tensor | None = None  # verified-answer reward (B,); None without tasks in the reward
    verdicts: list | None = None  # verify.Verdict per answer, with tasks in the reward
    total: torch.Tensor | None = None  # the reward before the KL term: weighted RM + tasks, minus no_eot_penalty (B,)
    adv: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def to_rollouts(prompts: list[list[int]], answers: list[list[int]], finished: list[bool], texts: list[str], eot: int | None = None) -> Rollouts:
    """Right-padded prompt + answer rows. With `eot`, an answer cut by the length limit gets the
    end-of-turn token after it (outside amask: the policy did not sample it) and the RM reads its
    score there: the reward model was trained on answers followed by that token, the cut ones as
    labelers saw them included (data.rankings.response_ids), and a score read at a mid-answer
    token it never learned to score rewards stopping early rather than a better answer."""
    B = len(prompts)
    cut = eot is not None and not all(finished)
    T = max(len(p) + len(a) for p, a in zip(prompts, answers)) + int(cut)
    ids = torch.zeros(B, T, dtype=torch.long)
    amask = torch.zeros(B, T - 1)
    last = torch.zeros(B, dtype=torch.long)
    rm_last = torch.zeros(B, dtype=torch.long)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        assert a, "every rollout has at least one answer token"
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        amask[b, len(p) - 1 : len(p) + len(a) - 1] = 1.0
        last[b] = rm_last[b] = len(p) + len(a) - 1
        if cut and not finished[b]:
            rm_last[b] = last[b] + 1
            ids[b, rm_last[b]] = eot
    return Rollouts(ids, amask, last, torch.tensor(finished), texts, rm_last)


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int, seeds: list[int], temperature: float = 1.0) -> tuple[list[list[int]], list[bool], list[str]]:
    """One answer per prompt: its tokens, whether it ended with a stop token, its text.
    Temperature 1 (no truncation of the distribution) samples the policy itself; 0 is greedy."""
    sps = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=s) for s in seeds]
    done = engine.complete(prompts, sps)
    return [c.ids for c in done], [c.finish_reason == "stop" for c in done], [c.text for c in done]


def policy_logprobs(model: GPT, ids: torch.Tensor, amask: torch.Tensor, entropy: bool = False, stem=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token t+1 | ids[:t+1]) at the answer tokens (amask), and (when asked) the entropy of
    that distribution, (B,T-1) fp32, 0 outside the answers."""
    return R.answer_logprobs(model, ids, amask, entropy, stem)


@contextlib.contextmanager
def adapters_off(lora: LoRA | None):
    """The model without its adapters (scale 0), i.e. the frozen model they were added to."""
    if lora is None:
        yield
        return
    scale, lora.scale = lora.scale, 0.0
    try:
        yield
    finally:
        lora.scale = scale


# ---- the stage ---------------------------------------------------------------------------------


class PPOStage:
    """One PPO (or GRPO, RLOO) run: set up in __init__ (models, optimizer, prompts, engine, log),
    then what the loop calls (evaluate, eval_line, save) and one iteration: rollout, scoring,
    training."""

    def __init__(self, cfg: PPOConfig):
        dist, out, state = C.begin_run(cfg, RESUME_KEYS)  # processes, seeds, and the train state to resume from
        self.cfg, self.dist, self.out, self.dev = cfg, dist, out, dist.device
        self.use_rm, self.use_tasks, self.group_algo = "rm" in cfg.reward, "tasks" in cfg.reward, cfg.algo in R.GROUP_ALGOS
        self._models()
        policy, lora, value = self.policy, self.lora, self.value
        self.kl_ctl = R.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else R.FixedKL(cfg.kl_coef)
        self.policy_params = list(lora.parameters()) if lora is not None else list(policy.parameters())
        self.value_module = (nn.ModuleList([self.value_lora, value.value_head]) if self.value_lora is not None else value) if value is not None else None
        self.value_params = [p for p in self.value_module.parameters() if p.requires_grad] if self.value_module is not None else []
        groups = [{"params": self.policy_params, "lr": cfg.lr}] + ([{"params": self.value_params, "lr": cfg.value_lr or cfg.lr}] if self.value_params else [])
        self.optimizer = C.adamw(groups, cfg.lr)
        self.start = 0
        if state is not None:
            C.check_parent(out, self.policy_snapshot, self.policy_path, "policy")
            C.restore_weights(out, policy, lora)
            if self.value_module is not None:
                with torch.no_grad():
                    self.value_module.load_state_dict(state["value"])
            C.restore_training(self.optimizer, policy, state, out)
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.start = state["step"]
        self._prompts()
        if state is not None and self.curriculum is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        self.engine = Engine(policy, self.tok, max_batch=cfg.rollout_batch)
        self.log = C.RunLog(out, dist, resume_step=self.start if cfg.resume else None)
        self.meta = {
            "stage": "ppo",
            "algo": cfg.algo,
            "reward": cfg.reward,
            "parent": str(self.policy_path.resolve()),
            "parent_snapshot": self.policy_snapshot,
            "rm": str(Path(cfg.rm).resolve()) if self.rm is not None else None,
            "ref": str(self.ref_path.resolve()),
            "prompts": [str(Path(p).resolve()) for p in cfg.prompts],
            "lora": lora.meta() if lora is not None else None,
        }
        # Blocks that policy, reference, value model and reward model hold alike and frozen (LoRA in
        # the top blocks only, a reward model trained the same way): run once per batch, not 4 times.
        frozen_rm = self.rm if self.use_rm else None  # loaded only to start the value model from: never run
        ref = [self.ref] if self.ref is not None else []
        self.shared = shared_depth([policy] + [m.gpt for m in (value, frozen_rm) if m is not None] + ref)

    def _models(self) -> None:
        """Policy (trainable), reference (frozen), reward model (frozen), value (trainable, from the
        RM). Group methods have no value model; the RM is loaded when the reward or the value model needs it."""
        cfg, dev = self.cfg, self.dev
        self.policy, self.tok, self.policy_path = load_policy(cfg.policy, dev)
        policy, tok = self.policy, self.tok
        self.rm: RewardModel | None = None
        self.value: RewardModel | None = None
        self.rm_meta: dict = {}
        if self.use_rm or not self.group_algo:
            self.rm, rm_tok, self.rm_meta = load_reward_model(cfg.rm, dev)
            if rm_tok.hf.to_str() != tok.hf.to_str():
                raise ValueError(f"{cfg.rm}: the reward model's tokenizer differs from the policy's; train the RM from this policy's SFT checkpoint")
            if not self.group_algo:  # copied before the RM is frozen: the value model trains
                self.value = RewardModel(copy.deepcopy(self.rm.gpt), copy.deepcopy(self.rm.value_head))
            for p in self.rm.parameters():
                p.requires_grad_(False)
        self.lora = cfg.make_lora(policy, cfg.seed)
        self.value_lora = cfg.make_lora(self.value.gpt, cfg.seed + 1) if self.value is not None else None
        self.ref_path = resolve(cfg.ref) if cfg.ref else self.policy_path  # a known model name resolves to its cached folder
        self.ref: GPT | None = None
        if self.lora is None or self.ref_path.resolve() != self.policy_path.resolve():
            self.ref = load_policy(str(self.ref_path), dev)[0].eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        if self.ref is not None and self.ref.cfg.vocab_size != policy.cfg.vocab_size:
            raise ValueError(f"{self.ref_path}: the reference's vocabulary ({self.ref.cfg.vocab_size}) differs from the policy's ({policy.cfg.vocab_size})")
        self.policy_snapshot = ckpt_io.snapshot_id(self.policy_path)

    def _prompts(self) -> None:
        """Prompts: all checked (and fitted to the context) before the first rollout; the
        prompt order and the pretraining mix's batches."""
        cfg, tok = self.cfg, self.tok
        self.prompts = read_prompts(cfg.prompts)
        self.eval_prompts = read_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
        max_len = self.policy.cfg.max_seq_len
        for lst in (self.prompts, self.eval_prompts):
            for p in lst:
                n = len(prompt_ids(tok, p.messages))
                if n + cfg.max_new_tokens + 1 > max_len:  # + the end-of-turn token the RM reads after a cut answer
                    raise ValueError(f"{p.source}: prompt of {n} tokens + max_new_tokens={cfg.max_new_tokens} + 1 end-of-turn token exceeds "
                                     f"the context ({max_len}); shorten it or lower --max-new-tokens")
        if self.use_tasks:
            for p in self.prompts:
                check_prompt(p.extra.get("gold"), p.source)
        self.prompt_tokens = [prompt_ids(tok, p.messages) for p in self.prompts]
        self.G = cfg.samples_per_prompt
        self.order = ShuffledBatches(len(self.prompts), cfg.rollout_batch // self.G, 1, cfg.seed)
        self.curriculum = FamilyCurriculum([self.family_key(p.extra["gold"]) for p in self.prompts]) if cfg.curriculum != "off" else None
        self.ptx = C.mix_batches(cfg.ptx_data, self.policy, min(cfg.ptx_seq_len, max_len), cfg.ptx_rows, 1, cfg.seed) if cfg.ptx_data else None

    @staticmethod
    def family_key(gold: dict) -> str:
        return f"{gold.get('lang', '?')}/{family_of(gold)}"

    def draw(self, it: int) -> list[int]:
        """This iteration's prompts: the shuffled order's next batch, or the curriculum's draw."""
        n = self.cfg.rollout_batch // self.G
        return self.curriculum.draw(n, mix_seed(self.cfg.seed, it, -1)) if self.curriculum is not None else self.order.get(it, 0)

    def describe(self) -> None:
        cfg, G = self.cfg, self.G
        n_train = sum(p.numel() for p in self.policy_params) + sum(p.numel() for p in self.value_params)
        rewards_desc = " + ".join(([f"{cfg.rm_weight} x reward model {cfg.rm} (shift {self.rm_meta.get('reward_shift', 0):+.3f})"] if self.use_rm else [])
                                  + ([f"{cfg.task_weight} x verified answers (format {cfg.format_weight}, language {cfg.language_weight})"] if self.use_tasks else []))
        self.log.print(
            f"{cfg.algo}: policy {self.policy_path} ({self.policy.num_params() / 1e6:.1f}M), reward {rewards_desc}, "
            f"reference {'policy without adapters' if self.ref is None else self.ref_path}, "
            + (f"LoRA r={cfg.lora_rank} " if self.lora is not None else "full ")
            + f"({n_train / 1e6:.2f}M trainable{' incl. value' if self.value is not None else ', no value model'}), {len(self.prompts)} prompts, "
            f"{cfg.iterations} iterations x {cfg.rollout_batch} rollouts"
            + (f" ({cfg.rollout_batch // G} prompts x {G}, scored against their siblings)" if G > 1 else "") + ", "
            f"{cfg.ppo_epochs} epochs of minibatches of {cfg.minibatch}, beta {self.kl_ctl.value}"
            + (f" adaptive to KL {cfg.kl_target}" if cfg.kl_target else " fixed") + f" (KL in the {cfg.kl_mode})"
            + (f", PPO-ptx gamma={cfg.ptx_coef}" if self.ptx else "")
            + (f", resuming at iteration {self.start}" if cfg.resume else "")
        )
        self.log.print(f"{cfg.algo}: the lowest {self.shared} of {self.policy.cfg.n_layer} blocks are shared by the policy and the frozen models"
                       if self.shared else f"{cfg.algo}: no block is shared by the policy and the frozen models")

    def begin(self) -> Loop:
        """The run's header lines and the loop that drives it."""
        self.describe()
        # No MFU (rollouts, scoring and updates have no one FLOP count); the clock gives the ETA.
        loop = Loop(self.cfg.algo, self, self.cfg, self.dist, self.log, self.cfg.iterations, self.start,
                    budget_s=self.cfg.time_budget_s, eval_first=True)
        self.t0 = loop.t0  # the session's clock, for the seconds a checkpoint records
        return loop

    def ref_logprobs(self, ids: torch.Tensor, amask: torch.Tensor, stem) -> torch.Tensor:
        if self.ref is not None:
            return policy_logprobs(self.ref, ids, amask, stem=stem)[0]
        with adapters_off(self.lora):
            return policy_logprobs(self.policy, ids, amask, stem=stem)[0]

    def stem_of(self, ids: torch.Tensor):
        if not self.shared:
            return None
        with torch.no_grad():
            return self.policy.stem(ids, self.shared)

    @torch.no_grad()
    def score(self, ro: Rollouts, beta: float, golds: list[dict | None]) -> None:
        """Old log-probs, reference log-probs, values, RM scores, verified answers; then the
        advantages: rewards, GAE and whitening (ppo), or each answer against its group (grpo, rloo)."""
        cfg, dev = self.cfg, self.dev
        self.policy.eval()
        ids, amask = ro.ids.to(dev), ro.amask.to(dev)
        with C.autocast(dev, cfg.dtype):
            stem = self.stem_of(ids)
            ro.old_logp = policy_logprobs(self.policy, ids, amask, stem=stem)[0].cpu()
            ro.ref_logp = self.ref_logprobs(ids, amask, stem).cpu()
            if self.value is not None:
                self.value.eval()
                ro.old_values = self.value.values(ids, stem=stem)[:, :-1].cpu()
            if self.use_rm:
                ro.score = self.rm(ids, ro.rm_last.to(dev), stem=stem).cpu()
        total = -cfg.no_eot_penalty * (~ro.finished).float()
        if self.use_rm:
            total = total + cfg.rm_weight * ro.score
        if self.use_tasks:
            ro.verdicts = [verify(text, gold) for text, gold in zip(ro.texts, golds)]
            ro.task = torch.tensor([v.reward(cfg.format_weight, cfg.language_weight) for v in ro.verdicts])
            total = total + cfg.task_weight * ro.task
        ro.total = total
        kl = R.kl_k1(ro.old_logp, ro.ref_logp) * ro.amask
        beta_r = beta if cfg.kl_mode == "reward" else 0.0
        if self.group_algo:
            ro.adv = R.group_advantages(total - beta_r * kl.sum(1), self.G, cfg.algo)[:, None] * ro.amask
            return
        rewards = R.token_rewards(R.group_baseline(total, self.G), kl, ro.amask, beta_r)
        adv, ro.returns = R.gae(rewards, ro.old_values * ro.amask, ro.amask, cfg.gamma, cfg.lam)
        ro.adv = R.whiten(adv, ro.amask)

    def minibatch_loss(self, ro: Rollouts, mb: torch.Tensor, ptx_step: int, beta: float) -> tuple[torch.Tensor, dict]:
        """PPO's clipped policy loss + the clipped value loss (+ beta * k3 with --kl-mode loss,
        + ptx_coef * the pretraining loss) of one minibatch, and its statistics."""
        cfg, dev = self.cfg, self.dev
        ids, m = ro.ids[mb].to(dev), ro.amask[mb].to(dev)
        n = m.sum()
        with C.autocast(dev, cfg.dtype):
            stem = self.stem_of(ids)
            logp, ent = policy_logprobs(self.policy, ids, m, entropy=True, stem=stem)
            pg, clipfrac, approx_kl = R.policy_loss(logp, ro.old_logp[mb].to(dev), ro.adv[mb].to(dev), m, cfg.clip)
            vf = vf_clipfrac = torch.zeros((), device=dev)
            if self.value is not None:
                v = self.value.values(ids, stem=stem)[:, :-1]
                vf, vf_clipfrac = R.value_loss(v, ro.old_values[mb].to(dev), ro.returns[mb].to(dev), m, cfg.value_clip)
            # Policy and value are separate models: their losses add without interacting.
            loss = (pg + vf) / n
            kl_loss = torch.zeros((), device=dev)
            if cfg.kl_mode == "loss":  # k3 of the current policy against the reference: >= 0, its gradient pulls towards the reference
                kl_loss = (R.kl_k3(logp, ro.ref_logp[mb].to(dev)) * m).sum() / n
                loss = loss + beta * kl_loss
            ptx_loss = torch.zeros((), device=dev)
            if self.ptx is not None:
                x, y = self.ptx.get(ptx_step, 0)  # a function of the step: resumes exactly
                s, cnt = C.token_loss_sum(self.policy(x.to(dev)), y.to(dev))
                ptx_loss = s / cnt
                loss = loss + cfg.ptx_coef * ptx_loss
        stats = {"pg_loss": pg.detach() / n, "vf_loss": vf.detach() / n, "clipfrac": clipfrac, "approx_kl": approx_kl, "vf_clipfrac": vf_clipfrac,
                 "entropy": R.masked_mean(ent.detach(), m), "ptx_loss": ptx_loss.detach(), "kl_loss": kl_loss.detach()}
        return loss, stats

    def train_on(self, ro: Rollouts, it: int, beta: float) -> dict:
        """ppo_epochs passes of shuffled minibatches; returns the mean statistics."""
        cfg = self.cfg
        self.policy.train()
        if self.value is not None:
            self.value.train()
        stats: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, it))
        steps_per_iter = cfg.ppo_epochs * (cfg.rollout_batch // cfg.minibatch)
        n_steps = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(ro.ids.shape[0], generator=gen)
            for i in range(0, len(perm), cfg.minibatch):
                loss, st = self.minibatch_loss(ro, perm[i : i + cfg.minibatch], it * steps_per_iter + n_steps, beta)
                loss.backward()
                if cfg.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.grad_clip)
                    if self.value_params:
                        torch.nn.utils.clip_grad_norm_(self.value_params, cfg.grad_clip)
                else:
                    gn = torch.zeros(())
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_steps += 1
                st["grad_norm"] = gn
                for k in STATS:
                    stats.setdefault(k, []).append(float(st[k]))
        skip = {k for k, used in (("ptx_loss", self.ptx is not None), ("kl_loss", cfg.kl_mode == "loss"), ("vf_loss", self.value is not None),
                                  ("vf_clipfrac", self.value is not None)) if not used}
        return {k: sum(v) / len(v) for k, v in stats.items() if k not in skip}

    def iteration(self, it: int) -> tuple[dict, list[str]]:
        """Rollout, scoring, training: the iteration's record and lines showing its first answers."""
        cfg, G = self.cfg, self.G
        t0 = time.perf_counter()
        idx = [i for i in self.draw(it) for _ in range(G)]  # each prompt G times, siblings adjacent
        batch_prompts = [self.prompt_tokens[i] for i in idx]
        answers, finished, texts = generate(self.engine, batch_prompts, cfg.max_new_tokens, [mix_seed(cfg.seed, it, j) for j in range(len(idx))])
        ro = to_rollouts(batch_prompts, answers, finished, texts, self.tok.eot_id)
        t1 = time.perf_counter()
        beta = self.kl_ctl.value
        self.score(ro, beta, [self.prompts[i].extra.get("gold") for i in idx])
        if self.curriculum is not None:
            self.curriculum.update([self.family_key(self.prompts[i].extra["gold"]) for i in idx], [v.correct for v in ro.verdicts])
        t2 = time.perf_counter()
        train_stats = self.train_on(ro, it, beta)
        t3 = time.perf_counter()
        kl_seq = (R.kl_k1(ro.old_logp, ro.ref_logp) * ro.amask).sum(1)
        self.kl_ctl.update(kl_seq.mean().item(), len(idx))
        n_tokens = int(ro.amask.sum())
        verdicts = ro.verdicts or []
        rec = {
            "step": it + 1,
            **({"rm_score": ro.score.mean().item()} if self.use_rm else {}),
            **({"task_reward": ro.task.mean().item(), "task_correct": sum(v.correct for v in verdicts) / len(idx),
                "task_format": sum(v.format for v in verdicts) / len(idx), "task_language": sum(v.language for v in verdicts) / len(idx)}
               if self.use_tasks else {}),
            "score": ro.total.mean().item(),
            "reward": (ro.total - beta * kl_seq).mean().item(),
            "kl": kl_seq.mean().item(),
            "kl_k3": (R.kl_k3(ro.old_logp, ro.ref_logp) * ro.amask).sum(1).mean().item(),
            "beta": beta,
            "length": n_tokens / len(idx),
            "finished": ro.finished.float().mean().item(),
            **train_stats,
            **({"curriculum": {k: round(v, 4) for k, v in self.curriculum.weights().items()}} if self.curriculum is not None else {}),
            "t_rollout": t1 - t0,
            "t_score": t2 - t1,
            "t_train": t3 - t2,
            "rollout_tok_per_s": n_tokens / max(1e-9, t1 - t0),
        }
        samples = [f"  sample | {self.prompts[idx[j]].messages[-1]['content'][:60]!r} -> {texts[j][:100]!r} (reward {ro.total[j].item():+.3f})"
                   for j in range(min(cfg.show_samples, len(idx)))]
        if self.curriculum is not None:
            samples.append(f"  curriculum | pass rates {self.curriculum.summary()}")
        return rec, samples

    def progress_line(self, rec: dict, eta_s: float) -> str:
        cfg = self.cfg
        return (f"iter {rec['step']}/{cfg.iterations} |" + (f" RM {rec['rm_score']:+.3f} |" if self.use_rm else "")
                + (f" correct {rec['task_correct']:.3f} alone {rec['task_format']:.3f} |" if self.use_tasks else "")
                + f" reward {rec['reward']:+.3f} | KL {rec['kl']:.3f} "
                f"(beta {rec['beta']:.4f}) | entropy {rec['entropy']:.3f} | clip {rec['clipfrac']:.3f} |"
                + (f" vf loss {rec['vf_loss']:.4f} |" if self.value is not None else "")
                + f" len {rec['length']:.1f} | time rollout/score/train {rec['t_rollout']:.1f}/{rec['t_score']:.1f}/{rec['t_train']:.1f}s | ETA {C.fmt_time(eta_s)}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """RM score (with an RM in the reward) and verified correctness (prompts of verifiable
        families) of greedy answers to the held-out prompts; never the gold labeler's score:
        `chatforge label judge` measures it afterwards."""
        cfg, dev = self.cfg, self.dev
        if not self.eval_prompts:
            return {}
        ids = [prompt_ids(self.tok, p.messages) for p in self.eval_prompts]
        scores, lengths, all_texts = [], [], []
        for i in range(0, len(ids), cfg.rollout_batch):
            chunk = ids[i : i + cfg.rollout_batch]
            toks, finished, texts = generate(self.engine, chunk, cfg.max_new_tokens, [0] * len(chunk), temperature=0.0)
            if self.use_rm:
                ro = to_rollouts(chunk, toks, finished, texts, self.tok.eot_id)
                with C.autocast(dev, cfg.dtype):
                    scores += self.rm(ro.ids.to(dev), ro.rm_last.to(dev)).cpu().tolist()
            lengths += [len(t) for t in toks]
            all_texts += texts
        out = {"val_length": sum(lengths) / len(lengths)}
        if scores:
            out["val_rm_score"] = sum(scores) / len(scores)
        checked = [verify(t, p.extra["gold"]) for p, t in zip(self.eval_prompts, all_texts) if family_of(p.extra.get("gold")) in FAMILIES]
        if checked:
            out["val_task_correct"] = sum(v.correct for v in checked) / len(checked)
            out["val_task_format"] = sum(v.format for v in checked) / len(checked)
        return out

    def eval_line(self, it: int, m: dict) -> str:
        return (f"iteration {it}: held-out" + (f" RM score {m['val_rm_score']:+.4f}," if "val_rm_score" in m else "")
                + (f" verified correct {m['val_task_correct']:.3f} (answer alone {m['val_task_format']:.3f})," if "val_task_correct" in m else "")
                + f" length {m['val_length']:.1f}" + (" (the policy before RL)" if it == 0 else ""))

    def save(self, it: int, metrics: dict) -> None:
        # seconds: this session's wall clock (a resumed run counts from its restart)
        self.meta.update(step=it, metrics={**metrics, "seconds": round(time.time() - self.t0, 1)}, kl_coef=self.kl_ctl.value)
        extra = self.lora.tensors() if self.lora is not None else None
        extra_state = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.curriculum is not None:
            extra_state["curriculum"] = self.curriculum.state_dict()
        if self.value_module is not None:
            extra_state["value"] = {k: v.detach().cpu().clone() for k, v in self.value_module.state_dict().items()}
        C.save_training(self.out, self.policy, self.tok, self.meta, self.optimizer, it, to_dict(self.cfg), self.dist,
                        extra_state=extra_state, extra_tensors=extra)
        keys = ("rm_score", "task_reward", "reward", "kl", "val_rm_score", "val_task_correct")
        self.log.plot(self.out / "ppo.png", keys=keys, title=f"{self.cfg.algo.upper()} from {self.policy_path.name}")
        plot_reward_vs_kl(self.log.records, self.out / "reward_vs_kl.png")


def main(cfg: PPOConfig) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("chatforge ppo runs in one process; launch it without torchrun")
    run = PPOStage(cfg)
    loop = run.begin()
    for it in loop:
        rec, samples = run.iteration(it)
        p = loop.tick(rec["length"] * cfg.rollout_batch)  # answer tokens
        run.log.log(rec)
        if loop.log_due():
            run.log.print(run.progress_line(rec, p["eta_s"]))
            for line in samples:
                run.log.print(line)
        loop.metrics.update({k: rec[k] for k in ("rm_score", "task_correct", "score", "kl", "reward", "length") if k in rec})
    loop.finish()
    out = run.out
    run.log.print(f"{cfg.algo}: checkpoint {out}, log {out / 'log.jsonl'}, plots {out / 'ppo.png'} and {out / 'reward_vs_kl.png'}, "
                  f"{time.time() - loop.t0:.0f}s")
    return out


def plot_reward_vs_kl(records: list[dict], path: Path) -> None:
    """Reward (before the KL term: RM score and/or verified answers) against KL to the
    reference, one point per iteration (coloured by iteration): the trade-off PPO walks along,
    and where over-optimisation would show as a bend."""
    pts = [(r["kl"], r["score"], r["step"]) for r in records if "kl" in r and "score" in r]
    if not pts:
        return
    with figure(path, figsize=(6, 4)) as (fig, ax):
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=18)
        fig.colorbar(sc, ax=ax, label="iteration")
        ax.set_xlabel("KL(policy || reference) per answer, nats")
        ax.set_ylabel("reward before the KL term")
        ax.set_title("reward vs KL")
        ax.grid(alpha=0.3)
