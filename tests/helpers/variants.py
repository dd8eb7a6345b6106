"""Reference helpers shared by the tests of the attention variants (mods, varlen, kvcache).

Everything here is NumPy (or torch autograd) written independently of refattn's
variant code: explicit masks and biases from positions, and the rounding-error bounds
the comparisons use, each derived in its docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._tolerance import rounding_bound

U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64
# Gradual underflow adds up to half the smallest subnormal per operation, absolutely.
ETA64 = float(np.finfo(np.float64).smallest_subnormal)


def window_mask(L: int, S: int, left: int | None, right: int | None, shift: int) -> np.ndarray:
    """(L, S) bool: key j visible to query i when i + shift - left <= j <= i + shift + right."""
    i = np.arange(L)[:, None] + shift
    j = np.arange(S)[None, :]
    ok = np.ones((L, S), dtype=bool)
    if right is not None:
        ok &= j <= i + right
    if left is not None:
        ok &= j >= i - left
    return ok


def alibi_bias(slopes: np.ndarray, L: int, S: int, shift: int) -> np.ndarray:
    """(..., H, L, S) bias -slope * |i + shift - j| for slopes (..., H)."""
    distance = np.abs(np.arange(L)[:, None] + shift - np.arange(S)[None, :]).astype(float)
    return -np.asarray(slopes, dtype=float)[..., None, None] * distance


def forward_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float,
                  logit_extra: float = 0.0, dtype: Any = np.float64) -> float:
    """Bound on |out_1 - out_2| for two evaluations of the same attention in ``dtype``.

    ``refattn._tolerance.rounding_bound`` (logit error (E + 2) u A, weights 2x that
    relative, reductions (2S + 3) u, doubled for two evaluations) with A grown by
    ``logit_extra``, the largest magnitude of what else is added to a logit: the
    ALiBi or relative-position bias, and the softcap c (the cap's division, tanh and
    product add at most 3 u c while tanh only shrinks the logit error before it).
    """
    extra = None if logit_extra == 0 else np.asarray(float(logit_extra))
    return rounding_bound(q, k, v, scale=scale, bias=extra, dtype=dtype)


def lse_bound(q: np.ndarray, k: np.ndarray, *, scale: float, logit_extra: float,
              lse: np.ndarray) -> np.ndarray:
    """Bound on |lse_1 - lse_2| per row for two evaluations.

    lse = m + log(sum_j exp(s_j - m)): a logit error delta ((E + 2) u A as above) moves
    it by at most delta; the S exps and the sum add S u relative to the sum, which the
    log turns into S u absolute; the log and the final addition add 2 u |lse|. Doubled
    for two evaluations.
    """
    E, S = q.shape[-1], k.shape[-2]
    A = abs(scale) * float(np.max(np.abs(q).sum(axis=-1), initial=0.0)) * float(
        np.max(np.abs(k), initial=0.0)) + logit_extra
    finite = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    return 2 * ((E + 2) * U64 * A + (S + 1) * U64 + 2 * U64 * finite)


def weight_bound(q: np.ndarray, k: np.ndarray, *, scale: float, logit_extra: float) -> float:
    """Bound on |w_1 - w_2| for a softmax weight from two evaluations.

    A logit error delta = (E + 2) u A moves a weight by at most 2 delta relative
    (softmax is 2-Lipschitz in relative terms); exp, the S-term sum and the division add
    (S + 3) u. Weights are at most 1, so relative is absolute; doubled for two.
    """
    E, S = q.shape[-1], k.shape[-2]
    A = abs(scale) * float(np.max(np.abs(q).sum(axis=-1), initial=0.0)) * float(
        np.max(np.abs(k), initial=0.0)) + logit_extra
    return 2 * (2 * (E + 2) * U64 * A + (S + 3) * U64)


def _softmax(s: np.ndarray) -> np.ndarray:
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    dead = m == -np.inf
    e = np.exp(s - np.where(dead, 0.0, m))
    return e / np.where(dead, 1.0, np.sum(e, axis=-1, keepdims=True))


def grad_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, *,
               scale: float, bias: np.ndarray | None = None, allowed: np.ndarray | None = None,
               softcap: float | None = None, keep: np.ndarray | None = None,
               dropout_p: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elementwise first-order bounds on |computed - exact| of dq, dk, dv, ONE evaluation.

    Arrays are (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev), (..., H, L, Ev) with the
    same batch dims (heads grouped: K and Kv divide H). With u the unit roundoff and A
    the largest |scale| sum_e |q_e||k_e| + |bias| + softcap:
    * a final score carries delta <= (E + 4) u A (E products and sums, scale, cap, bias);
    * a weight then carries a relative error rho = 2 delta + (S + 3) u (softmax is
      2-Lipschitz in relative terms; exp, the S-term sum and the division);
    * dP = dO V^T and D = rowsum(dO O) carry Ev u |dO||V| and (rho + (S + Ev) u) Dm with
      Dm = sum |dO| (|P_drop| |V|); so dS = P (dP - D) is off by at most
      c_S P (dPm + Dm), c_S = rho + (Ev + S + 2) u;
    * the chain factor of the raw score, scale (1 - t^2) with t = tanh(s / c) under a
      softcap, has |factor| <= |scale| and an error of at most |scale| (2 delta / c +
      3 u): t moves by delta / c, 1 - t^2 by twice that, and its three operations add
      3 u;
    * dQ = factor dS K adds S u, dK = factor dS^T Q adds L u, dV = P_drop^T dO adds L u
      (relative to the products of magnitudes), G u more for summing the G query heads
      of a key head, 4 u for the scale;
    * each of the at most E + S + L + Ev + G + 16 operations behind an entry may add
      ETA64 / 2 absolute where it underflows.
    """
    H, K, Kv = q.shape[-3], k.shape[-3], v.shape[-3]
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    kr = np.repeat(k, H // K, axis=-3)
    vr = np.repeat(v, H // Kv, axis=-3)
    raw = scale * (q @ np.swapaxes(kr, -1, -2))
    A = float(np.max(abs(scale) * (np.abs(q) @ np.swapaxes(np.abs(kr), -1, -2)), initial=0.0))
    s = raw
    c_f = 0.0
    if softcap is not None:
        s = softcap * np.tanh(raw / softcap)
        A += softcap
    if bias is not None:
        s = s + bias
        A += float(np.max(np.abs(bias[np.isfinite(bias)]), initial=0.0))
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    delta = (E + 4) * U64 * A
    if softcap is not None:
        c_f = 2 * delta / softcap + 3 * U64
    p = _softmax(s)
    rho = 2 * delta + (S + 3) * U64
    c_s = rho + (Ev + S + 2) * U64
    keep_scale = 1.0 if keep is None else keep / (1.0 - dropout_p)
    p_drop = p * keep_scale
    dout_abs = np.abs(dout)
    dp_mag = (dout_abs @ np.swapaxes(np.abs(vr), -1, -2)) * keep_scale
    d_mag = np.sum(dout_abs * (p_drop @ np.abs(vr)), axis=-1, keepdims=True)
    ds_mag = p * (dp_mag + d_mag)

    def groups(x: np.ndarray, heads: int) -> np.ndarray:
        *lead, h, n, d = x.shape
        return x.reshape(*lead, heads, h // heads, n, d).sum(axis=-3)

    dq_mag = abs(scale) * (ds_mag @ np.abs(kr))
    dk_mag = groups(abs(scale) * (np.swapaxes(ds_mag, -1, -2) @ np.abs(q)), K)
    dv_mag = groups(np.swapaxes(p_drop, -1, -2) @ dout_abs, Kv)
    G = H // min(K, Kv)
    ops = (E + S + L + Ev + G + 16) * ETA64
    return (
        (c_s + c_f + (S + 4) * U64) * dq_mag + ops,
        (c_s + c_f + (L + G + 4) * U64) * dk_mag + ops,
        (rho + (L + G + 4) * U64) * dv_mag + ops,
    )


def assert_within(got: Any, want: np.ndarray, bound: Any, what: str) -> None:
    """|got - want| <= bound elementwise; NaN must sit where it sits in ``want``."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    # Equal entries (the -inf LSE of a row that sees nothing included) differ by 0.
    same = nan | (got == want)
    err = np.where(same, 0.0, np.abs(got - np.where(same, 0.0, want)))
    bound = np.broadcast_to(bound, err.shape)
    bad = ~(err <= bound)
    if np.any(bad):
        worst = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries outside the derived bound; worst at {worst}: "
            f"got {got[worst]!r}, want {want[worst]!r}, bound {bound[worst]!r}"
        )
