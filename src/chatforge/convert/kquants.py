"""Quantizers for GGUF's K-quant types Q4_K and Q6_K, which the `gguf` package reads but cannot
write. Written from the byte layout that gguf-py's dequantizers decode (gguf/quants.py); the
round trip through those dequantizers is what the tests check.

Both work on super-blocks of QK_K = 256 weights along a row:

    Q4_K  144 bytes  d fp16 | dmin fp16 | 12 bytes: 8 six-bit scales sc and 8 six-bit mins m |
                     128 bytes: 256 four-bit q.  Sub-block j (32 weights): w = d*sc_j*q - dmin*m_j
    Q6_K  210 bytes  128 bytes: low 4 bits of q | 64 bytes: high 2 bits of q | 16 int8 scales sc |
                     d fp16.  Sub-block j (16 weights): w = d*sc_j*(q - 32), q in 0..63

Scales are chosen in two steps. Per sub-block, a short search: a few candidate scales around the
min/max fit, each giving codes q, then the least-squares scale (and, for Q4_K, offset) for those
codes; the candidate with the smallest squared error wins (Q4_K's offset is kept <= 0, as the
format stores -dmin*m with m >= 0). Then the super-block's d (and dmin) is the largest sub-block
scale over 63 (Q4_K) or 127 (Q6_K), the sub-block scales are rounded to that grid, and the codes
are recomputed with the rounded scales. Weights that are already on a grid this search finds (each
sub-block spanning its full code range, one sub-block at the largest scale) come back exactly.
No importance weighting (llama.cpp's imatrix) and no search over d itself: expect somewhat larger
errors than llama-quantize's on the same weights.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights per super-block
Q4_K_BYTES = 144
Q6_K_BYTES = 210


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} weights; got shape {w.shape}")
    return w.reshape(-1, QK_K)


def _fit_asymmetric(x: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (n, k): scale s >= 0 and offset b <= 0 with x ~= s*q + b, q in 0..15."""
    lo = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - lo
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    best_s = np.zeros(x.shape[0], dtype=np.float32)
    best_b = lo.astype(np.float32)
    ok = span > 0
    n = x.shape[1]
    for levels in steps:
        iscale = np.where(ok, levels / np.where(ok, span, 1), 0)
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, 15)
        sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x.sum(1), (q * x).sum(1)
        det = n * sqq - sq * sq
        s = np.where(det > 0, (n * sqx - sq * sx) / np.where(det > 0, det, 1), 0)
        b = (sx - s * sq) / n
        pos = b > 0  # the format only subtracts: refit through zero
        s = np.where(pos, np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), 0), s)
        b = np.where(pos, 0, b)
        s = np.maximum(s, 0)
        err = ((s[:, None] * q + b[:, None] - x) ** 2).sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
    return best_s.astype(np.float32), best_b.astype(np.float32)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 * 144) uint8 Q4_K blocks; cols % 256 == 0."""
    rows = np.asarray(w).shape[0]
    x = _blocks(w)
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    s, b = _fit_asymmetric(sub, np.arange(13.5, 16.51, 0.25, dtype=np.float32))
    s, m = s.reshape(nb, 8), (-b).reshape(nb, 8)
    d, dmin = _fp16(s.max(1) / 63), _fp16(m.max(1) / 63)
    sc = np.clip(np.rint(s / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    mq = np.clip(np.rint(m / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    eff_s = (d[:, None] * sc).reshape(-1, 1)
    eff_m = (dmin[:, None] * mq).reshape(-1, 1)
    q = np.where(eff_s > 0, np.rint((sub + eff_m) / np.where(eff_s > 0, eff_s, 1)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(nb, 8, 32)
    # scales: bytes 0-3 sc[0..3] | high bits of sc[4..7] << 6; bytes 4-7 m[0..3] | high bits of m[4..7] << 6;
    # bytes 8-11 low 4 bits of sc[4..7] | low 4 bits of m[4..7] << 4
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mq[:, :4] | ((mq[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mq[:, 4:] & 0x0F) << 4)
    qs = q[:, 0::2, :] | (q[:, 1::2, :] << 4)  # 32 bytes per pair of sub-blocks: low nibble the first
    out = np.concatenate([
        d.astype(np.float16).view(np.uint8).reshape(nb, 2), dmin.astype(np.float16).view(np.uint8).reshape(nb, 2),
        packed, qs.reshape(nb, 128),
    ], axis=1)
    return out.reshape(rows, -1)


def _fit_symmetric(x: np.ndarray) -> np.ndarray:
    """Per row of x (n, k): scale s (either sign) with x ~= s*q, q in -32..31."""
    idx = np.abs(x).argmax(axis=1)
    v = x[np.arange(x.shape[0]), idx]  # the signed value of largest magnitude
    ok = v != 0
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    best_s = np.zeros(x.shape[0], dtype=np.float32)
    # v at -32 (the code range's long end) or at +31, and a little inside either
    divisors = np.concatenate([-np.arange(32, 27.4, -0.5), np.arange(31, 26.4, -0.5)]).astype(np.float32)
    for c in divisors:
        s0 = np.where(ok, v / c, 0)
        q = np.clip(np.rint(x / np.where(ok, s0, 1)[:, None]), -32, 31) * ok[:, None]
        sqq, sqx = (q * q).sum(1), (q * x).sum(1)
        s = np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), 0)
        for cand in (s0, s):  # the least-squares refit, and the plain fit in case it ties exactly
            err = ((cand[:, None] * q - x) ** 2).sum(1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, cand, best_s)
    return best_s.astype(np.float32)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 * 210) uint8 Q6_K blocks; cols % 256 == 0."""
    rows = np.asarray(w).shape[0]
    x = _blocks(w)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    s = _fit_symmetric(sub).reshape(nb, 16)
    d = _fp16(np.abs(s).max(1) / 127)
    sc = np.clip(np.rint(s / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    eff = (d[:, None] * sc).reshape(-1, 1)
    q = np.where(eff != 0, np.rint(sub / np.where(eff != 0, eff, 1)), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, QK_K)
    # q's 256 values in 2 halves of 128: low nibbles of 64 bytes hold values 0-63 of the half, high
    # nibbles values 64-127; 32 bytes of high bits hold values 0-31, 32-63, 64-95, 96-127 at bits 0, 2, 4, 6
    lo = (q & 0x0F).reshape(nb, 2, 2, 64)
    hi = (q >> 4).reshape(nb, 2, 4, 32)
    ql = lo[:, :, 0] | (lo[:, :, 1] << 4)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([
        ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(nb, 2),
    ], axis=1)
    return out.reshape(rows, -1)
