"""The arithmetic of RLHF as pure functions on tensors: no models, no I/O, each one tested
against hand-computed values (tests/test_reward.py, test_ppo.py, test_dpo.py).

- Reward-model loss over rankings (Ouyang et al. 2022, eq. 1): for a prompt with K ranked
  responses, loss = -1/C(K,2) * sum over its pairs of log sigmoid(r(y_w) - r(y_l)). All pairs of
  one ranking form ONE batch element: InstructGPT found that shuffling a prompt's pairs into
  separate elements makes the reward model overfit within an epoch.
- KL estimators between the policy and the frozen reference on sampled tokens (Schulman 2020,
  "Approximating KL divergence"): k1 = log p - log q (unbiased, can be negative per token),
  k3 = (q/p - 1) - log(q/p) (unbiased and never negative).
- The adaptive KL coefficient of Ziegler et al. 2019 (eq. 2).
- Generalised advantage estimation (Schulman et al. 2016), advantage whitening, PPO's clipped
  policy and value losses (Schulman et al. 2017), entropy.
- Group-relative advantages without a value model: GRPO (Shao et al. 2024) and RLOO (Ahmadian
  et al. 2024).
- The DPO loss (Rafailov et al. 2023).

Masks are 0/1 float or bool tensors of the same shape as the values they select; "masked mean"
is over the selected entries only.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# ---- reward model ---------------------------------------------------------------------------


def ranking_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """All C(K,2) (better, worse) pairs of a ranking given best first: [2, 0, 1] ->
    [(2, 0), (2, 1), (0, 1)]."""
    return list(itertools.combinations(ranking, 2))


def ranking_loss(scores_N: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, int, int]:
    """InstructGPT's reward-model loss for a batch of rankings.

    `scores_N` holds one scalar reward per response in the batch; each group is one ranking as
    indices into `scores_N`, best first. Returns (sum over groups of the group's mean pair loss,
    number of correctly ordered pairs, number of pairs). Divide the first by the number of groups
    (rankings) for the batch loss: each ranking weighs the same whatever its K."""
    better, worse, weight = [], [], []
    for g in groups:
        assert len(g) >= 2 and len(set(g)) == len(g), f"a ranking needs >= 2 distinct responses, got {g}"
        pairs = ranking_pairs(g)
        for w, lo in pairs:
            better.append(w)
            worse.append(lo)
            weight.append(1.0 / len(pairs))
    dev = scores_N.device
    diff = scores_N[torch.tensor(better, device=dev)] - scores_N[torch.tensor(worse, device=dev)]
    w = torch.tensor(weight, device=dev, dtype=diff.dtype)
    loss = -(F.logsigmoid(diff.float()) * w).sum()
    return loss, int((diff > 0).sum()), len(better)


# ---- KL between policy and reference --------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log p(x) - log q(x) for x ~ p: unbiased; what the reward penalises
    (Ziegler et al. 2019; InstructGPT), so that its sum over a response is log p(y)/q(y)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate (r - 1) - log r with r = q(x)/p(x): unbiased, >= 0, lower variance
    than k1 when p and q are close. Logged beside k1 to show the real divergence."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


class FixedKL:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = s["value"]


class AdaptiveKL:
    """Ziegler et al. 2019, eq. 2: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon,
    where KL is the batch's mean per-response KL and n the responses seen since the last update.
    Beta grows when the policy drifts past the target and shrinks when it stays close."""

    def __init__(self, beta: float, target: float, horizon: int):
        assert target > 0 and horizon > 0
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = s["value"]


# ---- per-token rewards, advantages ------------------------------------------------------------


def group_baseline(score_B: torch.Tensor, group: int) -> torch.Tensor:
    """Scores minus a per-prompt baseline: rows come in consecutive groups of `group` answers to
    the same prompt, and each answer's baseline is the mean score of the other answers in its
    group (leave-one-out, so the baseline does not depend on the answer itself and the policy
    gradient stays unbiased; Kool et al. 2019). What is left is how much better an answer is
    than its siblings: a prompt the reward model scores high or low across the board (a
    language it favours, a task it finds easy) no longer pushes the policy. group=1: unchanged."""
    if group <= 1:
        return score_B
    if score_B.shape[0] % group:
        raise ValueError(f"group_baseline: {score_B.shape[0]} scores are not groups of {group}")
    s = score_B.view(-1, group)
    others = (s.sum(1, keepdim=True) - s) / (group - 1)
    return (s - others).reshape(-1)


GROUP_ALGOS = ("grpo", "rloo")


def group_advantages(reward_B: torch.Tensor, group: int, algo: str, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per answer from the rewards of its group (consecutive rows answering the
    same prompt), the baseline that replaces PPO's value model:
    - "grpo" (Shao et al. 2024, DeepSeekMath eq. 3): (r - mean of the group) / (std of the group
      + eps), std unbiased; a group whose answers all score the same teaches nothing (0);
    - "rloo" (Ahmadian et al. 2024; Kool et al. 2019): r minus the mean of the OTHER answers of
      its group, unbiased because the baseline does not depend on the answer itself."""
    if algo not in GROUP_ALGOS:
        raise ValueError(f"group_advantages: unknown algo {algo!r}; expected one of {', '.join(GROUP_ALGOS)}")
    if group < 2 or reward_B.shape[0] % group:
        raise ValueError(f"group_advantages: {reward_B.shape[0]} rewards are not groups of {group} >= 2")
    if algo == "rloo":
        return group_baseline(reward_B, group)
    r = reward_B.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).reshape(-1)


def token_rewards(score_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, beta: float) -> torch.Tensor:
    """InstructGPT's reward as per-token rewards: -beta * KL_t on every response token, plus the
    reward model's score on each response's last token. (B,T) with zeros outside the mask."""
    mask = mask_BT.to(kl_BT.dtype)
    r = -beta * kl_BT * mask
    last = last_index(mask_BT)
    r[torch.arange(r.shape[0], device=r.device), last] += score_B.to(r.dtype)
    return r


def last_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of the last selected position of each row (rows must select at least one)."""
    m = mask_BT.to(torch.long)
    assert bool((m.sum(1) > 0).all()), "every row needs at least one selected position"
    T = m.shape[1]
    return (T - 1) - torch.flip(m, dims=[1]).argmax(dim=1)


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's selected positions (a contiguous span):
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V = 0 after
    the last token (the episode ends). Returns (advantages, returns = advantages + values), both
    zero outside the mask."""
    mask = mask_BT.to(values_BT.dtype)
    B, T = rewards_BT.shape
    adv = torch.zeros_like(values_BT)
    next_value = torch.zeros(B, dtype=values_BT.dtype, device=values_BT.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards_BT[:, t] + gamma * next_value - values_BT[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # Outside the span carry nothing backwards: positions after the end contribute 0.
        next_value = values_BT[:, t] * m
        next_adv = a * m
    return adv, (adv + values_BT) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the selected entries."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    return (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale the selected entries to unit variance (and zero mean unless shift_mean=False), so
    the policy step size does not depend on the reward's scale. Zero outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---- PPO losses ------------------------------------------------------------------------------


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token: max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)).
    Returns (sum over selected tokens, clip fraction, approximate KL(old || new) = mean of
    0.5 * (log ratio)^2) — divide the sum by the number of selected tokens."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    m = mask.to(logp.dtype)
    loss = (torch.maximum(unclipped, clipped) * m).sum()
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, per token: 0.5 * max((V - R)^2, (V_clipped - R)^2) with
    V_clipped = V_old + clip(V - V_old, -eps, eps). Returns (sum over selected tokens, fraction
    of tokens where the clipped term was larger)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    m = mask.to(values.dtype)
    loss = 0.5 * (torch.maximum(a, b) * m).sum()
    with torch.no_grad():
        clipfrac = masked_mean((b > a).to(values.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis, in nats, computed in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) under the logits, fp32, (B,T)."""
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logp.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def answer_logprobs(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor, entropy: bool = False, stem=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token t+1 | ids[:t+1]) where mask (B,T-1) is set, 0 elsewhere, fp32 (B,T-1); with
    `entropy`, the entropy of those distributions too. The output head and softmax run only at
    the masked positions: with a 49k vocabulary the prompt's logits would cost as much as the
    answer's and are never used. `stem`: see GPT.hidden."""
    keep = mask_BT > 0
    logp_NV = torch.log_softmax(model.head(model.hidden(ids_BT, stem=stem)[:, :-1][keep]).float(), dim=-1)
    logp = torch.zeros(keep.shape, device=ids_BT.device)
    logp[keep] = logp_NV.gather(-1, ids_BT[:, 1:][keep].unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logp, None
    ent = torch.zeros(keep.shape, device=ids_BT.device)
    ent[keep] = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp, ent


# ---- DPO -------------------------------------------------------------------------------------


def dpo_loss(
    logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rafailov et al. 2023, eq. 7: -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
    per pair, from sequence log-probabilities. `label_smoothing` > 0 is the conservative variant
    that assumes a share of the labels is flipped (cDPO; Mitchell 2023). Returns (per-pair loss,
    implicit reward of y_w, implicit reward of y_l), rewards = beta * log-ratio."""
    rw = beta * (logp_w - ref_w)
    rl = beta * (logp_l - ref_l)
    margin = rw - rl
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, rw.detach(), rl.detach()

