"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to the final validation losses of
small pretraining runs, and predict what a bigger run reaches (Kaplan et al. 2020; Hoffmann et al.
2022, "approach 3").

N is the number of parameters a token's matmuls use (every block and the output head; not the
embedding lookup, which costs no FLOPs), D the training tokens, and C = 6 N D the training FLOPs
(the attention scores' FLOPs are left out, as in both papers; at the context lengths of this
project they add ~10%).

The fit is a variable projection: for fixed exponents (alpha, beta) the law is linear in
(E, A, B), so those come from a non-negative least-squares solve and only the two exponents are
searched, on a grid and then on a finer grid around the best point. A grid cannot be trapped in a
local minimum the way one L-BFGS start can (Hoffmann et al. ran L-BFGS from a grid of starts for
that reason), and a 2-D grid is cheap enough to refit a few hundred times for the bootstrap. The
objective is the squared error of the loss in nats/token. Its limits: with a handful of runs the
exponents trade off against E and each other, which is what the bootstrap over runs shows; and a
law fitted on runs far from compute-optimal (all of this project's CPU ladders) extrapolates in D
less reliably than in C along the ladder's own diagonal.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

MIN_RUNS = 5  # five unknowns; fewer runs leave the law undetermined
EXPONENT_RANGE = (0.02, 2.0)  # searched range of alpha and beta


@dataclass
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta (nats/token)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n_params, tokens):
        return self.E + self.A / np.power(n_params, self.alpha) + self.B / np.power(tokens, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """The (N, D) with 6 N D = flops that minimise L: setting dL/dN = 0 along D = C / 6N gives
        N = G (C/6)^(beta/(alpha+beta)) with G = (alpha A / (beta B))^(1/(alpha+beta))
        (Hoffmann et al. 2022, eq. 4)."""
        if self.A <= 0 or self.B <= 0:
            raise ValueError(
                f"the fitted law has A={self.A:.3g}, B={self.B:.3g}: the loss does not depend on "
                f"{'model size' if self.A <= 0 else 'tokens'} in these runs, so no compute-optimal split exists"
            )
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (6 * n)


def _nnls3_grid(x_GN: np.ndarray, y_GN: np.ndarray, loss_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every grid point g, min over c >= 0 of |c0 + c1 x_g + c2 y_g - loss|^2, by solving the
    normal equations on each of the 7 column subsets and keeping the best feasible one.
    Returns (sse_G, coef_G3)."""
    ones = np.ones_like(x_GN)
    cols = np.stack([ones, x_GN, y_GN], axis=-1)  # (G, N, 3)
    gram = np.einsum("gni,gnj->gij", cols, cols)
    rhs = np.einsum("gni,n->gi", cols, loss_N)
    best_sse = np.full(x_GN.shape[0], np.inf)
    best_coef = np.zeros((x_GN.shape[0], 3))
    ll = float(loss_N @ loss_N)
    for k in (1, 2, 3):
        for subset in itertools.combinations(range(3), k):
            s = list(subset)
            g = gram[:, s][:, :, s] + 1e-12 * np.eye(k)  # a hair of ridge: x or y can be ~constant at extreme exponents
            h = rhs[:, s]
            c = np.linalg.solve(g, h[..., None])[..., 0]
            sse = ll - 2 * np.einsum("gi,gi->g", c, h) + np.einsum("gi,gij,gj->g", c, g, c)
            ok = (c >= 0).all(axis=1) & (sse < best_sse)
            best_sse = np.where(ok, sse, best_sse)
            full = np.zeros((x_GN.shape[0], 3))
            full[:, s] = c
            best_coef = np.where(ok[:, None], full, best_coef)
    return best_sse, best_coef


def fit_law(n_params, tokens, loss, grid_step: float = 0.02) -> Law:
    """Least-squares fit of L(N, D) to runs (arrays of equal length). Raises ValueError when the
    runs cannot determine the law (too few, or a single model size or token budget)."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (n_params, tokens, loss))
    if not (len(n) == len(d) == len(y)):
        raise ValueError(f"fit_law: {len(n)} sizes, {len(d)} token counts and {len(y)} losses; they must pair up")
    check_runs(n, d)
    # Scale N and D by their geometric means: N^-alpha for N ~ 1e7 and alpha ~ 2 underflows the
    # normal equations' conditioning; the constants are mapped back below.
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    ln, ld = np.log(n / n0), np.log(d / d0)

    def search(alphas: np.ndarray, betas: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        a_G, b_G = (g.ravel() for g in np.meshgrid(alphas, betas, indexing="ij"))
        sse, coef = _nnls3_grid(np.exp(-a_G[:, None] * ln), np.exp(-b_G[:, None] * ld), y)
        i = int(np.argmin(sse))
        return float(sse[i]), float(a_G[i]), float(b_G[i]), coef[i]

    lo, hi = EXPONENT_RANGE
    coarse = np.arange(lo, hi + 1e-9, grid_step)
    _, a, b, _ = search(coarse, coarse)
    fine = np.arange(-grid_step, grid_step + 1e-9, grid_step / 20)
    _, a, b, c = search(np.clip(a + fine, lo, hi), np.clip(b + fine, lo, hi))
    return Law(E=float(c[0]), A=float(c[1] * n0**a), alpha=a, B=float(c[2] * d0**b), beta=b)


def check_runs(n: np.ndarray, d: np.ndarray) -> None:
    if len(n) < MIN_RUNS:
        raise ValueError(f"a fit of L(N, D) needs at least {MIN_RUNS} runs (it has five unknowns); got {len(n)}")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError(
            f"a fit of L(N, D) needs at least 2 model sizes and 2 token budgets; got sizes {sorted(set(n.tolist()))} "
            f"and token budgets {sorted(set(d.tolist()))}"
        )


@dataclass
class Fit:
    """A fitted law, its bootstrap refits (for intervals) and what it was fitted on."""

    law: Law
    boot: list[Law] = field(default_factory=list)
    rmse: float = 0.0  # root mean squared error of the fit over its runs (nats/token)
    info: dict = field(default_factory=dict)  # data, tokenizer, the runs...

    def predict(self, n_params: float, tokens: float) -> dict:
        """Predicted loss with a 95% interval from the bootstrap refits."""
        out = {"n_params": float(n_params), "tokens": float(tokens), "flops": 6.0 * n_params * tokens, "loss": float(self.law.loss(n_params, tokens))}
        if self.boot:
            out["loss_lo"], out["loss_hi"] = (float(v) for v in np.percentile([b.loss(n_params, tokens) for b in self.boot], [2.5, 97.5]))
        return out

    def optimal(self, flops: float) -> dict:
        """The compute-optimal N and D for `flops` training FLOPs, their loss, and 95% intervals."""
        n, d = self.law.optimal(flops)
        out = {"flops": float(flops), "n_params": n, "tokens": d, "loss": float(self.law.loss(n, d))}
        ok = [b for b in self.boot if b.A > 0 and b.B > 0]
        if ok:
            ns = np.array([b.optimal(flops)[0] for b in ok])
            ls = np.array([b.loss(*b.optimal(flops)) for b in ok])
            out["n_params_lo"], out["n_params_hi"] = (float(v) for v in np.percentile(ns, [2.5, 97.5]))
            out["tokens_lo"], out["tokens_hi"] = flops / (6 * out["n_params_hi"]), flops / (6 * out["n_params_lo"])
            out["loss_lo"], out["loss_hi"] = (float(v) for v in np.percentile(ls, [2.5, 97.5]))
        return out

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% bootstrap interval of each constant of the law."""
        if not self.boot:
            return {}
        rows = np.array([[getattr(b, k) for k in ("E", "A", "alpha", "B", "beta")] for b in self.boot])
        lo, hi = np.percentile(rows, [2.5, 97.5], axis=0)
        return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("E", "A", "alpha", "B", "beta"))}

    def to_dict(self) -> dict:
        return {"law": asdict(self.law), "rmse": self.rmse, "intervals": self.intervals(),
                "bootstrap": [[b.E, b.A, b.alpha, b.B, b.beta] for b in self.boot], **self.info}

    @classmethod
    def from_dict(cls, d: dict, source: str = "fit") -> "Fit":
        try:
            law = Law(**d["law"])
            boot = [Law(*row) for row in d.get("bootstrap", [])]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a scaling-law fit ({e}); make one with `chatforge scale fit DIR`") from e
        info = {k: v for k, v in d.items() if k not in ("law", "bootstrap", "rmse", "intervals")}
        return cls(law=law, boot=boot, rmse=float(d.get("rmse", 0.0)), info=info)


def fit(n_params, tokens, loss, n_boot: int = 200, seed: int = 0) -> Fit:
    """fit_law plus `n_boot` refits on runs resampled with replacement (resamples that lose a
    second model size or token budget, or drop below MIN_RUNS distinct runs, are drawn again)."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (n_params, tokens, loss))
    law = fit_law(n, d, y)
    rmse = float(np.sqrt(np.mean((law.loss(n, d) - y) ** 2)))
    rng = np.random.default_rng(seed)
    boot: list[Law] = []
    tries = 0
    while len(boot) < n_boot and tries < 20 * n_boot:
        tries += 1
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(idx)) < MIN_RUNS - 1 or len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        # Duplicated runs keep their weight: the resample is a least-squares problem over len(n) rows.
        boot.append(fit_law(n[idx], d[idx], y[idx], grid_step=0.05))  # coarser first grid: 6x faster, same refined optimum here
    return Fit(law=law, boot=boot, rmse=rmse)


def frontier(f: Fit, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loss of the compute-optimal model at each compute, and its 95% band: (loss, lo, hi)."""
    mid = np.array([f.optimal(c)["loss"] for c in flops])
    ok = [b for b in f.boot if b.A > 0 and b.B > 0]
    if not ok:
        return mid, mid, mid
    curves = np.array([[b.loss(*b.optimal(c)) for c in flops] for b in ok])
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return mid, lo, hi


def fmt_count(x: float) -> str:
    """1.23M / 4.5B style, for parameters, tokens and FLOPs."""
    if abs(x) >= 1e15:
        return f"{x:.3g}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def describe(f: Fit) -> str:
    """The law with its 95% intervals, in the form a person reads."""
    law, iv = f.law, f.intervals()

    def pm(k: str, fmt: str) -> str:
        v = format(getattr(law, k), fmt)
        return f"{v} [{format(iv[k][0], fmt)}, {format(iv[k][1], fmt)}]" if k in iv else v

    lines = [
        f"L(N, D) = E + A / N^alpha + B / D^beta   (nats/token; 95% bootstrap intervals over {len(f.boot)} resamples)",
        f"  E = {pm('E', '.3f')}   A = {pm('A', '.4g')}   alpha = {pm('alpha', '.3f')}   B = {pm('B', '.4g')}   beta = {pm('beta', '.3f')}",
        f"  fit RMSE {f.rmse:.4f} nats over {len(f.info.get('runs', [])) or '?'} runs",
    ]
    if law.A > 0 and law.B > 0:
        a = law.beta / (law.alpha + law.beta)
        lines.append(f"  compute-optimal: N ~ C^{a:.2f}, D ~ C^{1 - a:.2f}")
    for k in ("alpha", "beta"):
        if math.isclose(getattr(law, k), EXPONENT_RANGE[0], abs_tol=1e-6) or math.isclose(getattr(law, k), EXPONENT_RANGE[1], abs_tol=1e-6):
            lines.append(f"  note: {k} sits at the edge of the searched range {EXPONENT_RANGE}; the runs barely constrain it")
    return "\n".join(lines)
