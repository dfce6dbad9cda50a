"""The gold labeler: a programmatic stand-in for InstructGPT's human labelers, because no human
preference data can be had offline (shared/docs/data-sources.md). THESE ARE SYNTHETIC
PREFERENCES: a fixed scoring rule over the default task families, not people. It reads the
answer key that the default prompts carry under "gold" ({"task", "answers", "reference", "lang"},
data/prompts.py), which no other stage reads: the reward model and PPO see only its rankings, so
PPO can over-optimise the reward model against it exactly as it could against people, and
`chatforge label judge` (pipelines/label.py) measures that with `judge_answers` here.

A gold score in [0, 1] is a weighted sum of:
- correct (0.6): a known answer appears in the response (numbers
  compared as numbers, see eval/tasks.py); for a dialogue turn, overlap with the reference reply; for an
  inappropriate request, a refusal. Refusing an ordinary request scores 0 here.
- language (0.15): the answer is in the asker's language (Chinese vs English, by script).
- concise (0.1): no longer than a budget (80 characters in Chinese, 200 otherwise).
- no_repetition (0.15): the share of distinct word (English) or character (Chinese) 3-grams.
Parts without data (no answer key) drop out and the rest are re-weighted. An empty answer is 0.

Human labelers disagree: InstructGPT's agreed with each other on ~73% of comparisons. The
labeler ranks by gold score, breaking ties at random, then perturbs the ranking with a Mallows
model whose dispersion is solved so that the expected share of pairs ordered against the gold
order equals `disagreement` ("gold" = 0, "gold-73" = 0.27).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import torch

from ..checkpoint import load_reward_model
from ..data.rankings import Prompt, Ranking
from ..data.text import script_lang
from ..train.common import pick_device
from ..train.rankings import score_all, tokenize_rankings
from .tasks import contains, group_indices, paired

# ---- the gold score --------------------------------------------------------------------------

WEIGHTS = {"correct": 0.6, "language": 0.15, "concise": 0.1, "no_repetition": 0.15}
BUDGET_CHARS = {"zh": 80, "en": 200}

# Phrases that open or carry a refusal, English and Chinese.
REFUSAL = re.compile(
    r"\b(i\s*(can ?not|can't|cannot|won't|will not|am not able to|'m not able to|must decline)|i'?m sorry|i am sorry|"
    r"sorry,? (but )?i|not able to help|can't help|cannot help|i refuse)\b|抱歉|对不起|不能帮|无法帮|不可以|我不能|我无法|拒绝",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """English words for counting repetition and overlap: lower case, NFKC (full-width to ASCII),
    punctuation (but "." and "-") as spaces. Not an answer matcher: that is eval/tasks.answer_present."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch if ch.isalnum() or ch.isspace() or ch in ".-" else " " for ch in text).split()


def _units(text: str) -> list[str]:
    """Words for English, characters for Han text: the units repetition is counted in."""
    if script_lang(text) == "zh":
        return [ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P")]
    return words(text)


def distinct_ngrams(text: str, n: int = 3) -> float:
    """Share of distinct n-grams of units (1.0 for text too short to repeat a whole n-gram)."""
    u = _units(text)
    grams = [tuple(u[i : i + n]) for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def overlap_f1(reference: str, response: str) -> float:
    """F1 of unit overlap (bag of words or characters): partial credit for a dialogue reply."""
    a, b = _units(reference), _units(response)
    if not a or not b:
        return 0.0
    common = sum(min(a.count(x), b.count(x)) for x in set(a))
    if common == 0:
        return 0.0
    p, r = common / len(b), common / len(a)
    return 2 * p * r / (p + r)


def gold_parts(messages: list[dict], response: str, gold: dict | None) -> dict[str, float]:
    """The gold score's parts for one answer (see the module docstring)."""
    gold = gold or {}
    asker = gold.get("lang") or script_lang(next(m["content"] for m in reversed(messages) if m["role"] == "user")) or "en"
    text = response.strip()
    if not text:
        return {k: 0.0 for k in WEIGHTS}
    parts: dict[str, float] = {}
    refused = REFUSAL.search(text) is not None
    task = gold.get("task", "")
    if task == "decline":
        parts["correct"] = float(refused)
    elif refused and (gold.get("answers") or gold.get("reference")):
        parts["correct"] = 0.0
    elif gold.get("answers"):
        parts["correct"] = float(contains(text, gold["answers"]))
    elif gold.get("reference"):
        parts["correct"] = overlap_f1(str(gold["reference"]), text)
    parts["language"] = float(script_lang(text) in (asker, None))
    parts["concise"] = min(1.0, BUDGET_CHARS.get(asker, 200) / len(text))
    parts["no_repetition"] = distinct_ngrams(text)
    return parts


def gold_score(messages: list[dict], response: str, gold: dict | None) -> float:
    return weighted(gold_parts(messages, response, gold))


def weighted(parts: dict[str, float]) -> float:
    """The gold score of its parts: their WEIGHTS-weighted mean (parts without data are absent)."""
    return sum(WEIGHTS[k] * v for k, v in parts.items()) / sum(WEIGHTS[k] for k in parts)


# ---- the labeler ----------------------------------------------------------------------------


def mallows_disagreement(phi: float, k: int) -> float:
    """Expected share of pairs that a Mallows ranking with dispersion phi orders against the
    reference. Repeated insertion: the i-th item (0-based) lands v places above its reference
    slot with probability phi^v / sum_{u<=i} phi^u, adding v discordant pairs."""
    total = 0.0
    for i in range(1, k):
        w = [phi**v for v in range(i + 1)]
        total += sum(v * wv for v, wv in enumerate(w)) / sum(w)
    return total / (k * (k - 1) / 2) if k > 1 else 0.0


def mallows_phi(disagreement: float, k: int) -> float:
    """The dispersion phi in [0, 1) whose expected disagreement over rankings of k items is
    `disagreement` (bisection; disagreement grows with phi, up to 0.5 at phi = 1)."""
    assert 0.0 <= disagreement < 0.5 and k >= 2
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mallows_disagreement(mid, k) < disagreement else (lo, mid)
    return (lo + hi) / 2


def mallows_sample(reference: list[int], phi: float, rng: random.Random) -> list[int]:
    """A ranking drawn from the Mallows model centred on `reference` (best first)."""
    out: list[int] = []
    for i, item in enumerate(reference):
        weights = [phi**v for v in range(i + 1)]  # v = places above the bottom of the current list
        v = rng.choices(range(i + 1), weights=weights)[0] if phi > 0 else 0
        out.insert(len(out) - v, item)
    return out


@dataclass
class GoldLabeler:
    """Ranks K answers by gold score, with Mallows noise of the given disagreement rate."""

    name: str = "gold"
    disagreement: float = 0.0  # expected share of pairs ordered against the gold score (0.27 ~ InstructGPT's 73% agreement)

    def __post_init__(self) -> None:
        if not 0.0 <= self.disagreement < 0.5:
            raise ValueError(f"disagreement={self.disagreement} must be in [0, 0.5); 0.5 would be a coin toss")

    def rank(self, messages: list[dict], responses: Sequence[str], gold: dict | None, rng: random.Random) -> list[int]:
        scores = [gold_score(messages, r, gold) for r in responses]
        tiebreak = [rng.random() for _ in responses]
        order = sorted(range(len(responses)), key=lambda i: (-scores[i], tiebreak[i]))
        if self.disagreement == 0.0:
            return order
        return mallows_sample(order, mallows_phi(self.disagreement, len(order)), rng)


ORACLES = {"gold": GoldLabeler("gold", 0.0), "gold-73": GoldLabeler("gold-73", 0.27)}


def get_oracle(name: str, disagreement: float | None = None) -> GoldLabeler:
    if name not in ORACLES:
        raise ValueError(f"unknown oracle {name!r}; known: {', '.join(ORACLES)}")
    o = ORACLES[name]
    return o if disagreement is None else GoldLabeler(name, disagreement)


# ---- judging answers ------------------------------------------------------------------------


def judge_answers(prompts: list[Prompt], answers: list[list[str]]) -> dict:
    """Mean gold score (and its parts) of answers to prompts that carry an answer key."""
    scores, parts_sum, by_task = [], {}, {}
    for p, ans in zip(prompts, answers):
        for a in ans:
            gold = p.extra.get("gold")
            parts = gold_parts(p.messages, a, gold)
            s = weighted(parts)
            scores.append(s)
            for k, v in parts.items():
                parts_sum.setdefault(k, []).append(v)
            by_task.setdefault((gold or {}).get("task", "other"), []).append(s)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    n = len(scores)
    std = math.sqrt(sum((s - mean(scores)) ** 2 for s in scores) / max(1, n - 1))
    per_prompt = [mean(scores[i * len(ans):(i + 1) * len(ans)]) for i, ans in enumerate(answers)] if len({len(a) for a in answers}) == 1 else []
    return {
        "gold_score": mean(scores),
        "stderr": std / math.sqrt(max(1, n)),
        "n": n,
        "samples": len(answers[0]) if answers else 0,
        "parts": {k: mean(v) for k, v in parts_sum.items()},
        "by_task": {k: mean(v) for k, v in sorted(by_task.items())},
        "mean_chars": mean([len(a) for ans in answers for a in ans]),
        "per_prompt": per_prompt,
        # (language, task family) of each prompt, for the paired table of `label judge`
        "groups": [f"{(p.extra.get('gold') or {}).get('lang', '?')}/{((p.extra.get('gold') or {}).get('task') or 'other').split('/')[0]}" for p in prompts],
    }


def paired_difference(new: dict, base: dict) -> dict:
    """Gold score of `new` minus `base` over the same held-out prompts, prompt by prompt: the mean
    difference, its standard error (paired, so prompt difficulty cancels) and how many prompts
    got better / worse. Both are `judge_answers` results for the same prompts and sample count."""
    a, b = new.get("per_prompt") or [], base.get("per_prompt") or []
    if not a or len(a) != len(b) or new.get("samples") != base.get("samples"):
        raise ValueError(f"paired difference needs per-prompt scores of the same prompts and samples per prompt "
                         f"(have {len(a)} x {new.get('samples')} vs {len(b)} x {base.get('samples')}); judge both again")
    return paired(a, b)


def paired_difference_by_group(new: dict, base: dict) -> dict:
    """`paired_difference` per (language, task family), per language and overall."""
    a, b = new["per_prompt"], base["per_prompt"]
    return {k: paired([a[i] for i in idx], [b[i] for i in idx]) for k, idx in group_indices(new.get("groups") or []).items()}


def format_group_table(table: dict, base_name: str, new_name: str) -> str:
    lines = [f"  gold score, {new_name} vs {base_name}, paired per prompt (+- one standard error)",
             f"  {'language/task':26s} {'n':>5s} {'base':>7s} {'new':>7s} {'diff':>8s} {'+-':>7s} {'better':>7s} {'worse':>6s}"]
    for k, v in table.items():
        lines.append(f"  {k:26s} {v['n']:5d} {v['base']:7.4f} {v['new']:7.4f} {v['mean']:+8.4f} {v['stderr']:7.4f} {v['better']:7d} {v['worse']:6d}")
    return "\n".join(lines)


def reward_scores(rm, tok, rows: list[Ranking], device, dtype: str = "fp32") -> torch.Tensor:
    """A reward model's score of every response of every row (prompt + response as it trained
    on them, cut to its context), in order: row 0's responses, then row 1's..."""
    seqs = [s for row in tokenize_rankings(rows, tok, rm.gpt.cfg.max_seq_len).seqs for s in row]
    return score_all(rm, seqs, 16, device, dtype)


def rm_gold_agreement(rm_dir: str, rankings: list[Ranking], min_gap: float = 0.01, device: str = "auto") -> dict:
    """How often a reward model orders two answers like the noise-free gold score, over the pairs
    whose gold scores differ by more than `min_gap` (ties and near-ties carry no preference). The
    labeler's rankings are noisy (gold-73 flips ~27% of pairs), so accuracy against them is capped
    well below 1; this is the reward model's accuracy against what the rankings were noisy
    readings of. For evaluation only: nothing trains on it."""
    dev = pick_device(device)
    rm, tok, _ = load_reward_model(rm_dir, device=dev)
    golds = [gold_score(r.messages, text, r.extra.get("gold")) for r in rankings for text in r.responses]
    scores = reward_scores(rm, tok, rankings, dev).tolist()
    agree = pairs = 0
    base = 0
    for r in rankings:
        for i, j in itertools.combinations(range(base, base + len(r.responses)), 2):
            if abs(golds[i] - golds[j]) > min_gap:
                pairs += 1
                agree += (golds[i] > golds[j]) == (scores[i] > scores[j])
        base += len(r.responses)
    return {"accuracy": agree / pairs if pairs else float("nan"), "pairs": pairs, "rankings": len(rankings)}
