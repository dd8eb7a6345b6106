"""Derived error bounds for the fused kernels against the float64 array-API path.

Every bound here is a first-order rounding-error bound of ONE implementation, built
from the data (unit roundoff u, lengths, magnitudes). A kernel in dtype T and the
float64 reference each obey it with their own u, so the comparison tolerance is the
sum of the two, doubled because first-order bounds drop the higher-order terms:

    tol = 2 * (bound(u_T) + bound(u_64)).

The kernels' transcendental functions (exp, log, tanh) are accurate to 2 ulp in float
and 1 ulp in double on CUDA (CUDA Math API, "Mathematical Functions" accuracy tables)
and to 1 ulp in glibc (the CPU shim): ``N_F = 4`` units of u (half an ulp) covers each
call. Shape legend: B batch, H query heads, K / Kv key / value heads, G = H / K, L, S,
E, Ev.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import refattn

U64 = float(np.finfo(np.float64).eps) / 2
#: Units of u one exp, log or tanh call may be off by (2 ulp).
N_F = 4
#: Key tile of the forward and dQ kernels (each tile rescales the running sums once).
TILE = 32


def unit_roundoff(dtype: str | np.dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).eps) / 2


def smallest_subnormal(dtype: str | np.dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).smallest_subnormal)


@dataclass
class Problem:
    """One attention problem in NumPy float64, materialised at (B, H, L, S) for the bounds.

    q (B, H, L, E), k (B, K, S, E), v (B, Kv, S, Ev); the options in the form
    ``refattn.attention`` takes them (mask, bias, dropout_mask broadcastable).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    scale: float
    options: dict

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, H, L, _ = self.q.shape
        return B, H, L, self.k.shape[2]

    def reference(self, dout: np.ndarray | None = None):
        """The direct array-API path in float64: (out, lse) and, with dout, the grads."""
        res = refattn.attention(self.q, self.k, self.v, scale=self.scale,
                                implementation="direct", return_lse=True, **self.options)
        grads = None
        if dout is not None:
            grads = refattn.attention_backward(dout, self.q, self.k, self.v, scale=self.scale,
                                               implementation="direct", **self.options)
        return res.out, res.lse, grads

    # ---------------------------------------------------------------- materialised parts
    def _full(self, x: np.ndarray | None, fill) -> np.ndarray:
        shape = self.shape
        if x is None:
            return np.full(shape, fill)
        return np.broadcast_to(np.asarray(x), shape)

    def allowed(self) -> np.ndarray:
        """mask AND the positional window (causal merged in), (B, H, L, S)."""
        B, H, L, S = self.shape
        opts = self.options
        shift = 0 if opts.get("alignment", "top_left") == "top_left" else S - L
        left, right = opts.get("window") or (None, None)
        left = None if left == -1 else left
        right = None if right == -1 else right
        if opts.get("causal"):
            right = 0 if right is None else min(right, 0)
        offset = np.arange(S)[None, :] - np.arange(L)[:, None] - shift
        ok = np.ones((L, S), bool)
        if right is not None:
            ok &= offset <= right
        if left is not None:
            ok &= offset >= -left
        return self._full(opts.get("mask"), True) & ok

    def keep_factor(self) -> np.ndarray:
        """keep / (1 - p) at (B, H, L, S): 1 without dropout, 0 when p = 1."""
        p = float(self.options.get("dropout_p", 0.0))
        keep = self._full(self.options.get("dropout_mask"), True)
        return keep * (1.0 / (1.0 - p) if p < 1 else 0.0)

    def magnitudes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A (B, H, L) the row's largest |score| bound, |scale| sum |q||k| + |bias|;
        P (B, H, L, S) the weights (masked-row policy applied, NaN as 0); lse."""
        B, H, L, S = self.shape
        K = self.k.shape[1]
        kr = np.repeat(self.k, H // K, axis=1) if K else self.k
        a = abs(self.scale) * (np.abs(self.q) @ np.swapaxes(np.abs(kr), -1, -2))
        bias = self.options.get("bias")
        if bias is not None:
            b = np.abs(self._full(bias, 0.0))
            a = a + np.where(np.isfinite(b), b, 0.0)
        allowed = self.allowed()
        A = np.max(np.where(allowed, a, 0.0), axis=-1, initial=0.0)
        out, lse, _ = self.reference()
        del out
        s = scale_scores(self)
        s = np.where(allowed, s, -np.inf)
        empty = np.isneginf(lse)[..., None]
        with np.errstate(invalid="ignore", over="ignore"):
            P = np.exp(s - np.where(empty, 0.0, lse[..., None]))
        policy = self.options.get("masked_rows", "zero")
        if policy == "uniform" and S:
            P = np.where(empty, 1.0 / S, P)
        P = np.nan_to_num(np.where(empty & (policy == "nan"), 0.0, P), nan=0.0)
        return A, P, lse


def scale_scores(prob: Problem) -> np.ndarray:
    """The scores before the masks: scale, softcap, bias (float64, NumPy)."""
    H, K = prob.q.shape[1], prob.k.shape[1]
    kr = np.repeat(prob.k, H // K, axis=1) if K else prob.k
    s = prob.scale * (prob.q @ np.swapaxes(kr, -1, -2))
    cap = prob.options.get("softcap")
    if cap is not None:
        s = cap * np.tanh(s / cap)
    bias = prob.options.get("bias")
    if bias is not None:
        s = s + bias
    return s


def _forward_one(prob: Problem, A: np.ndarray, lse: np.ndarray, u: float):
    """Per-row bounds (out (B, H, L, 1), lse (B, H, L)) and the weight error rho.

    - a score carries delta <= (E + 2 N_F + 6) u A: E for the dot product, 1 for the
      scale (and 1 for rounding the scale itself to T), the softcap's 1/c, s/c, tanh
      and c*t (N_F + 3, its slope being at most 1 the raw score's error passes
      through), 1 for the bias;
    - a weight exp(s - m) / l is then off by a relative rho = 2 delta (softmax is
      2-Lipschitz in relative terms) + u (2A + N_F + 1) (s - m rounded, |s - m| <= 2A,
      and exp) + (S + 2T + 2) u (the S-term sum, a rescale of sum and accumulator per
      tile of 32 keys, T tiles, and the division);
    - out = sum_j w_j kappa_j v_j adds (S + 3) u, relative to kappa max|v|
      (kappa = 1 / (1 - p) on kept weights, the only factor above 1);
    - lse = m + log(l): delta, plus rho (l's relative error), plus u |lse| for the
      add and N_F u log(S + 1) for the log.
    """
    E = prob.q.shape[-1]
    S = prob.shape[3]
    tiles = -(-S // TILE)
    delta = (E + 2 * N_F + 6) * u * A
    rho = 2 * delta + u * (2 * A + N_F + 1) + (S + 2 * tiles + 2) * u
    kappa = float(np.max(prob.keep_factor(), initial=0.0))
    vmax = float(np.max(np.abs(prob.v), initial=0.0))
    out = (rho + (S + 3) * u) * kappa * vmax
    finite_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    lse_b = delta + rho + u * (finite_lse + N_F * np.log(S + 1) + 2)
    return out[..., None], lse_b, delta, rho


def forward_tolerance(prob: Problem, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tolerances (out (B, H, L, 1), lse (B, H, L)) for a `dtype` kernel vs float64."""
    A, _, lse = prob.magnitudes()
    k_out, k_lse, *_ = _forward_one(prob, A, lse, unit_roundoff(dtype))
    r_out, r_lse, *_ = _forward_one(prob, A, lse, U64)
    return 2 * (k_out + r_out), 2 * (k_lse + r_lse)


def _sum_groups(x: np.ndarray, heads: int) -> np.ndarray:
    B, H, S, D = x.shape
    return x.reshape(B, heads, H // heads, S, D).sum(axis=2) if heads else x[:, :0]


def _sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _backward_one(prob: Problem, dout: np.ndarray, A, P, lse, u: float, eta: float,
                  bias_shape):
    """Elementwise bounds on dq, dk, dv, dbias of one implementation.

    With rho and delta of the forward (``_forward_one``):
    - a recomputed weight P = exp(s - lse) is off by a relative
      rhoP = 2 delta + rho + u (2A + 2|lse| + N_F log(S + 1) + N_F + 4): the score
      again, the forward's LSE (delta + rho + its roundings), s - lse rounded, exp;
    - dP = dO . v adds Ev u relative to dPm = |dO| |v| (times kappa, + u);
      D = rowsum(dO * O) carries the output's error plus Ev u, relative to
      Dm = sum |dO| (|P_drop| |v|); so dS = P (dP - D) is off by at most
      c_S dSm, dSm = P (kappa dPm + Dm), c_S = rhoP + rho + (S + 2 Ev + 8) u;
    - softcap's slope 1 - t^2 is off by at most 2 (delta / c + (N_F + 2) u)
      absolutely (t's error, |t| <= 1), which adds that times dSm;
    - dQ = scale dS K adds (S + 2) u, dK = scale dS^T Q adds (G L + 2) u (G grouped
      heads summed), dV = P_drop^T dO adds (G L + 2) u, each relative to the same sums
      of magnitudes; a bias broadcast over n entries adds n u;
    - each of the at most E + S + G L + Ev + 16 operations behind an entry may add
      eta / 2 absolutely where it underflows (eta the smallest subnormal).
    """
    B, H, L, S = prob.shape
    K, Kv = prob.k.shape[1], prob.v.shape[1]
    E, Ev = prob.q.shape[-1], prob.v.shape[-1]
    _, _, delta, rho = _forward_one(prob, A, lse, u)
    finite_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    rhoP = 2 * delta + rho + u * (2 * A + 2 * finite_lse + N_F * np.log(S + 1) + N_F + 4)
    c_s = rhoP + rho + (S + 2 * Ev + 8) * u
    cap = prob.options.get("softcap")
    c_raw = c_s + (2 * (delta / cap + (N_F + 2) * u) if cap is not None else 0.0)
    kappa = prob.keep_factor()
    vr = np.repeat(prob.v, H // Kv, axis=1) if Kv else prob.v
    kr = np.repeat(prob.k, H // K, axis=1) if K else prob.k
    p_drop = P * kappa
    dout_abs = np.abs(dout)
    dpm = dout_abs @ np.swapaxes(np.abs(vr), -1, -2)
    dm = np.sum(dout_abs * (p_drop @ np.abs(vr)), axis=-1, keepdims=True)
    dsm = P * (np.max(kappa, initial=0.0) * dpm + dm)
    s_abs = abs(prob.scale)
    G_L = (H // K if K else 1) * L
    ops = E + S + G_L + Ev + 16
    dq = (s_abs * ((c_raw[..., None] * dsm) @ np.abs(kr))
          + (S + 2) * u * s_abs * (dsm @ np.abs(kr)) + ops * eta)
    dk_e = s_abs * (np.swapaxes(c_raw[..., None] * dsm, -1, -2) @ np.abs(prob.q))
    dk_n = s_abs * (np.swapaxes(dsm, -1, -2) @ np.abs(prob.q))
    dk = _sum_groups(dk_e, K) + (G_L + 2) * u * _sum_groups(dk_n, K) + ops * eta
    dv_e = np.swapaxes(rhoP[..., None] * p_drop, -1, -2) @ dout_abs
    dv_n = np.swapaxes(p_drop, -1, -2) @ dout_abs
    dv = _sum_groups(dv_e, Kv) + (G_L + 2) * u * _sum_groups(dv_n, Kv) + ops * eta
    dbias = None
    if bias_shape is not None:
        n = max(B * H * L * S // max(int(np.prod(bias_shape)), 1), 1)
        dbias = (_sum_to(c_s[..., None] * dsm, bias_shape)
                 + n * u * _sum_to(dsm, bias_shape) + (ops + n) * eta)
    return dq, dk, dv, dbias


def backward_tolerance(prob: Problem, dout: np.ndarray, dtype: str) -> list:
    """Elementwise tolerances [dq, dk, dv, dbias or None] for a `dtype` kernel vs float64."""
    A, P, lse = prob.magnitudes()
    bias = prob.options.get("bias")
    bias_shape = None if bias is None else tuple(np.shape(bias))
    kern = _backward_one(prob, dout, A, P, lse, unit_roundoff(dtype),
                         smallest_subnormal(dtype), bias_shape)
    ref = _backward_one(prob, dout, A, P, lse, U64, smallest_subnormal(np.float64),
                        bias_shape)
    return [None if a is None else 2 * (a + b) for a, b in zip(kern, ref, strict=True)]


def mismatch(name: str, got, want: np.ndarray, tol) -> str | None:
    """Why `got` is not within `tol` of `want` (NaN and inf where `want` has them), or None."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"{name}: shape {got.shape}, expected {want.shape}"
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        if not np.array_equal(test(got), test(want)):
            where = np.argwhere(test(got) != test(want))[0].tolist()
            return f"{name}: {what} differs at {where}: got {got[tuple(where)]!r}, " \
                   f"expected {want[tuple(where)]!r}"
    finite = np.isfinite(want)
    tol = np.broadcast_to(tol, want.shape)
    err = np.where(finite, np.abs(got - np.where(finite, want, 0.0)), 0.0)
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        return (f"{name}{list(i)} = {got[i]!r}, expected {want[i]!r}, tolerance {tol[i]:.3g} "
                f"({int(bad.sum())} of {bad.size} entries off)")
    return None
