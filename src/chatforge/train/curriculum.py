"""Which prompts a group-RL iteration asks: a curriculum over (language, task family) groups.

A group of G answers that all earn the same reward has zero advantage under GRPO and RLOO, so
it costs a rollout and teaches nothing. With verified rewards that is most groups of a family the
policy never solves (or always solves). The curriculum keeps, per (language, family), a decayed
count of correct and asked answers, estimates the family's pass rate p (with a uniform prior),
and draws each prompt's family with probability proportional to p (1 - p) + floor: the
variance of a verified reward, which is where a group's answers differ. The floor keeps every
family asked now and then, so one that starts to be solved (or forgotten) is noticed.
Deterministic for a seed and an iteration, and its state is saved with the run so a resumed run
draws the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

MODES = ("off", "signal")


class FamilyCurriculum:
    def __init__(self, keys: Sequence[str], decay: float = 0.9, floor: float = 0.02):
        if not keys:
            raise ValueError("FamilyCurriculum: no prompts to draw from")
        if not (0 < decay <= 1) or floor <= 0:
            raise ValueError(f"FamilyCurriculum: decay={decay} must be in (0, 1] and floor={floor} > 0")
        self.decay, self.floor = decay, floor
        self.pools: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            self.pools.setdefault(k, []).append(i)
        self.correct = {k: 0.0 for k in self.pools}
        self.asked = {k: 0.0 for k in self.pools}

    def pass_rate(self, key: str) -> float:
        return (self.correct[key] + 1.0) / (self.asked[key] + 2.0)

    def weights(self) -> dict[str, float]:
        w = {k: self.pass_rate(k) * (1 - self.pass_rate(k)) + self.floor for k in self.pools}
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}

    def draw(self, n: int, seed: int) -> list[int]:
        """n prompt indices: a family by weight, then a prompt of it uniformly (with replacement
        across iterations, without within one where the family has enough prompts)."""
        rng = random.Random(seed)
        w = self.weights()
        fams = rng.choices(list(w), weights=list(w.values()), k=n)
        out: list[int] = []
        for k in sorted(set(fams)):
            pool = self.pools[k]
            m = fams.count(k)
            out += rng.sample(pool, m) if m <= len(pool) else rng.choices(pool, k=m)
        rng.shuffle(out)
        return out

    def update(self, keys: Sequence[str], correct: Sequence[bool]) -> None:
        """One iteration's verdicts: decay each asked family's counts once, then add."""
        seen = set(keys)
        for k in seen:
            self.correct[k] *= self.decay
            self.asked[k] *= self.decay
        for k, c in zip(keys, correct):
            self.correct[k] += float(c)
            self.asked[k] += 1.0

    def state_dict(self) -> dict:
        return {"correct": dict(self.correct), "asked": dict(self.asked)}

    def load_state_dict(self, state: dict) -> None:
        for k in self.pools:
            self.correct[k] = float(state["correct"].get(k, 0.0))
            self.asked[k] = float(state["asked"].get(k, 0.0))

    def summary(self) -> str:
        return " ".join(f"{k} {self.pass_rate(k):.2f}" for k in sorted(self.pools))
