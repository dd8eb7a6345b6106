"""First-order rounding-error bounds of the analytic backward pass, built in NumPy.

Shared by the backward tests and the blocked path's tests: ``grad_bounds`` bounds one
float64 implementation of the direct formulas, gradient by gradient and entry by entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64
# Gradual underflow: below the normal range an operation errs by up to half the smallest
# subnormal in absolute terms, which no relative bound covers (tiny scales reach there).
ETA64 = float(np.finfo(np.float64).smallest_subnormal)


def np_sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def np_sum_groups(x: np.ndarray, heads: int) -> np.ndarray:
    *lead, H, s, d = x.shape
    return x.reshape(*lead, heads, H // heads, s, d).sum(axis=-3)


@dataclass
class Bounds:
    """Per-gradient error bounds (one implementation) and the magnitudes they scale."""

    bounds: list[np.ndarray | None]
    mags: list[np.ndarray | None]
    p_drop: np.ndarray  # |P_drop|, full (..., H, L, S)
    rho: float  # relative error of one weight
    A: float  # the largest |score| bound: |scale| sum |q||k| + |bias|


def _weights(s: np.ndarray, masked_rows: str) -> np.ndarray:
    """Softmax weights in NumPy with a masked-row policy (for magnitudes only)."""
    m = s.max(axis=-1, keepdims=True)
    dead = m == -np.inf
    e = np.exp(s - np.where(dead, 0.0, m))
    p = e / np.where(dead, 1.0, e.sum(axis=-1, keepdims=True))
    if masked_rows == "uniform":
        p = np.where(dead, 1.0 / s.shape[-1], p)
    return p


def grad_bounds(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, *, scale: float,
    bias: np.ndarray | None = None, allowed: np.ndarray | None = None,
    keep: np.ndarray | None = None, dropout_p: float = 0.0, masked_rows: str = "zero",
    u: float = U64,
) -> Bounds:
    """Elementwise first-order bounds on |computed - exact| for ONE implementation.

    q, k, v, dout are (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev), (..., H, L, Ev)
    with NumPy broadcasting of the leading dims. With unit roundoff u and A the largest
    |scale| sum_e |q_e||k_e| + |bias|:
    * a score carries delta <= (E + 4) u A (E products and sums, the scale and bias,
      and torch's split of the scale into sqrt(|scale|) on q and on k);
    * a weight then carries a relative error rho = 2 delta + (S + 3) u (softmax is
      2-Lipschitz in relative terms; exp, the S-term sum and the division);
    * dP = dO V^T and D = rowsum(dO O) carry Ev u |dO||V| and (rho + (S + Ev) u) Dm, with
      Dm = sum |dO| (|P_drop| |V|), so dS = P (dP - D) is off by at most
      c_S P (dPm + Dm), c_S = rho + (Ev + S + 2) u;
    * dQ = scale dS K adds S u, dK = scale dS^T Q adds L u, dV = P_drop^T dO adds L u
      (relative to the same products of magnitudes), each n u more for the n terms
      summed over grouped heads and broadcast axes, and 4 u for the scale's rounding;
    * each of the at most E + S + L + Ev + n + 16 operations behind an entry may add
      ETA64 / 2 absolute where it underflows.
    """
    H, K, Kv = q.shape[-3], k.shape[-3], v.shape[-3]
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    s_abs = abs(scale)
    kr = np.repeat(k, H // K, axis=-3)
    vr = np.repeat(v, H // Kv, axis=-3)
    s = scale * (q @ np.swapaxes(kr, -1, -2))
    A = float(np.max(s_abs * (np.abs(q) @ np.swapaxes(np.abs(kr), -1, -2)), initial=0.0))
    if bias is not None:
        s = s + bias
        A += float(np.max(np.abs(bias[np.isfinite(bias)]), initial=0.0))
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    full = np.broadcast_shapes(s.shape, (*dout.shape[:-1], S))
    p = _weights(np.broadcast_to(s, full), masked_rows)
    delta = (E + 4) * u * A
    rho = 2 * delta + (S + 3) * u
    c_s = rho + (Ev + S + 2) * u
    keep_scale = 1.0 if keep is None else keep / (1.0 - dropout_p)
    p_drop = p * keep_scale
    dout_abs = np.abs(dout)
    dp_mag = (dout_abs @ np.swapaxes(np.abs(vr), -1, -2)) * keep_scale
    d_mag = np.sum(dout_abs * (p_drop @ np.abs(vr)), axis=-1, keepdims=True)
    ds_mag = p * (dp_mag + d_mag)

    def reduce(x: np.ndarray, shape: tuple[int, ...], heads: int | None) -> tuple:
        if heads is not None:
            x = np_sum_groups(x, heads)
        return np_sum_to(x, shape), x.size // max(int(np.prod(shape)), 1)

    dq_mag, nq = reduce(s_abs * (ds_mag @ np.abs(kr)), q.shape, None)
    dk_mag, nk = reduce(s_abs * (np.swapaxes(ds_mag, -1, -2) @ np.abs(q)), k.shape, K)
    dv_mag, nv = reduce(np.swapaxes(p_drop, -1, -2) @ dout_abs, v.shape, Kv)
    mags = [dq_mag, dk_mag, dv_mag, None]
    ops = E + S + L + Ev + 16
    bounds = [
        (c_s + (S + nq + 4) * u) * dq_mag + (ops + nq) * ETA64,
        (c_s + (L + nk + 4) * u) * dk_mag + (ops + nk) * ETA64,
        (rho + (L + nv + 4) * u) * dv_mag + (ops + nv) * ETA64,
        None,
    ]
    if bias is not None:
        db_mag, nb = reduce(ds_mag, bias.shape, None)
        mags[3] = db_mag
        bounds[3] = (c_s + nb * u) * db_mag + (ops + nb) * ETA64
    return Bounds(bounds=bounds, mags=mags, p_drop=p_drop, rho=rho, A=A)
