"""Our Q4_K / Q6_K quantizers (convert/kquants.py) against gguf-py's dequantizers of the same types."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from chatforge.convert.kquants import quantize_q4_k, quantize_q6_k


def _round_trip(w: np.ndarray, t: T) -> np.ndarray:
    blocks = quantize_q4_k(w) if t == T.Q4_K else quantize_q6_k(w) if t == T.Q6_K else quants.quantize(w, t)
    return quants.dequantize(blocks, t).reshape(w.shape)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dist,q4k_tol,q6k_tol", [("normal", 0.075, 0.018), ("heavy", 0.095, 0.025)])
def test_kquant_round_trip_error(dist, q4k_tol, q6k_tol):
    """Guards the byte layout (a misplaced scale bit or nibble gives errors of order 1) and the scale
    search: Q4_K lands below Q4_1 (same bits per weight for the codes, finer groups of scales), Q6_K
    between Q5_0 and Q8_0."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 1024)).astype(np.float32)
    if dist == "heavy":  # outliers as real weight matrices have them
        w = (rng.standard_t(3, size=w.shape) * 0.02).astype(np.float32)
    e = {t.name: _rel(_round_trip(w, t), w) for t in (T.Q4_K, T.Q6_K, T.Q4_1, T.Q5_0, T.Q8_0)}
    print(dist, {k: round(v, 4) for k, v in e.items()})
    assert e["Q4_K"] < e["Q4_1"] and e["Q4_K"] < q4k_tol, e
    assert e["Q8_0"] < e["Q6_K"] < e["Q5_0"] and e["Q6_K"] < q6k_tol, e
    assert quantize_q4_k(w).shape == (32, 1024 // 256 * 144) and quantize_q6_k(w).shape == (32, 1024 // 256 * 210)


def test_kquant_grid_values_exact():
    """Guards the scale search finding the grid of weights that are already K-quant values (as a
    K-quant GGUF import gives): every sub-block spans its full code range and one sub-block per
    super-block uses the largest scale, so the weights come back bit for bit."""
    rng = np.random.default_rng(1)
    rows, nb = 8, 2
    # Q4_K: w = d*sc*q - dmin*m, q in 0..15 with 0 and 15 present
    d = rng.uniform(1e-3, 4e-3, (rows, nb, 1, 1)).astype(np.float16).astype(np.float32)
    dmin = rng.uniform(1e-3, 4e-3, (rows, nb, 1, 1)).astype(np.float16).astype(np.float32)
    sc = rng.integers(1, 64, (rows, nb, 8, 1))
    m = rng.integers(0, 64, (rows, nb, 8, 1))
    sc[:, :, 0], m[:, :, 1] = 63, 63
    q = rng.integers(0, 16, (rows, nb, 8, 32))
    q[..., 0], q[..., 1] = 0, 15
    w = (d * sc * q - dmin * m).astype(np.float32).reshape(rows, nb * 256)
    assert np.array_equal(_round_trip(w, T.Q4_K), w)
    # Q6_K: w = d*sc*q, q in -32..31 with -32 present (the largest magnitude), sc > 0
    d = rng.uniform(1e-4, 4e-4, (rows, nb, 1, 1)).astype(np.float16).astype(np.float32)
    sc = rng.integers(1, 128, (rows, nb, 16, 1))
    sc[:, :, 3] = 127
    q = rng.integers(-31, 32, (rows, nb, 16, 16))
    q[..., 5] = -32
    w = (d * sc * q).astype(np.float32).reshape(rows, nb * 256)
    assert np.array_equal(_round_trip(w, T.Q6_K), w)


def test_kquant_edge_cases():
    """Guards zero, constant and all-positive blocks (no NaN, no division by zero; Q4_K's offset
    stays <= 0, the only sign its format stores) and rows that are not multiples of 256."""
    w = np.zeros((4, 256), dtype=np.float32)
    w[1] = 0.5  # constant positive
    w[2, :128] = np.linspace(0.1, 1.0, 128)  # positive, then zeros
    w[3] = -np.linspace(0, 2, 256)
    for t, tol in ((T.Q4_K, 0.06), (T.Q6_K, 2 / 32 / 2)):  # Q6_K: half a step where |w| reaches 2
        back = _round_trip(w, t)
        assert np.isfinite(back).all() and np.array_equal(back[0], w[0]), t
        assert np.abs(back - w).max() < tol, (t, np.abs(back - w).max())
    with pytest.raises(ValueError, match=r"multiple of 256 weights; got shape \(4, 576\)"):
        quantize_q4_k(np.zeros((4, 576), dtype=np.float32))
