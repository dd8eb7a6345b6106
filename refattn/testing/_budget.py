"""The oracle and the error budgets that ``assert_attention_close`` judges against.

``compute_reference`` runs the float64 oracle on a problem and gathers what each
tensor's budget is made of: the float64 rounding bounds, or for lower precisions the
error of the plain baselines and the floor (one unit roundoff times the size of the
terms the tensor sums, plus what the rounding of the scores moves the tensor by).
``_Tensor`` holds one compared tensor and its verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _tolerance
from .._arrays import sum_to_shape, swap_head_axis, to_numpy
from .._front_door import attention, attention_backward
from .._types import Array, Namespace
from ._baseline import EPS, SCALE_PLACEMENTS, low_precision_baseline

__all__ = ["Reference", "compute_reference"]

_FLOAT_OPTIONS = ("bias", "alibi_slopes")
_GRAD_NAMES = ("dq", "dk", "dv", "dbias")
_NONADDITIVE = ("alibi_slopes", "softcap", "score_mod")
#: The unit roundoff of the scores: every low-precision kernel the rule is written for
#: accumulates q k^T in float32, as the baseline does (docs/testing.rst, "The floor").
_SCORE_U = 2.0**-24
#: Score roundings the output's floor allows for: the kernel's and the baseline's, which
#: are independent, so that one may cancel where the other does not (docs/testing.rst).
_SCORE_ROUNDINGS = 2.0
# Entries of the (rows, S, Ev) product formed at once by _score_rounding_size.
_CHUNK = 2**22


def _blhd_to_bhld(x: np.ndarray, layout: str) -> np.ndarray:
    return swap_head_axis(x, np) if layout == "BLHD" else x


class _Tensor:
    """One compared tensor: its name, values, oracle, budget and the verdict."""

    def __init__(self, name: str, actual: Array, oracle: Array) -> None:
        self.name = name
        self.actual = to_numpy(actual, float64=True)
        self.oracle = to_numpy(oracle, float64=True)
        self.error = 0.0
        self.index: tuple[int, ...] | None = None
        self.budget = 0.0
        self.how = ""
        self.problem = ""

    def measure(self) -> None:
        a, o = self.actual, self.oracle
        if a.shape != o.shape:
            self.problem = f"shape {a.shape} but the oracle's is {o.shape}"
            return
        # NaN or inf must sit where the oracle has them: anything else is a semantic
        # difference (a wrong masked-row value, an overflow), not a rounding error.
        differ = (np.isnan(a) != np.isnan(o)) | ((np.isinf(a) | np.isinf(o)) & (a != o)
                                                 & ~(np.isnan(a) & np.isnan(o)))
        if differ.any():
            where = tuple(int(i) for i in np.argwhere(differ)[0])
            self.problem = (f"{int(differ.sum())} entries non-finite where the oracle is "
                            f"not (or the reverse), first at {where}: actual {a[where]!r}, "
                            f"oracle {o[where]!r}")
            return
        diff = np.where(np.isfinite(a) & np.isfinite(o), np.abs(a - o), 0.0)
        if diff.size:
            flat = int(np.argmax(diff))
            self.index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
            self.error = float(diff.reshape(-1)[flat])

    @property
    def ok(self) -> bool:
        return not self.problem and self.error <= self.budget

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        where = ""
        if self.index is not None:
            where = (f" at index {self.index} (actual {self.actual[self.index]:.6g}, oracle "
                     f"{self.oracle[self.index]:.6g})")
        verdict = "ok" if self.ok else "FAILS"
        return (f"{self.name}: {verdict}: max |actual - oracle| = {self.error:.3e}{where}; "
                f"budget {self.budget:.3e} = {self.how}")


def _logit_extra(q: np.ndarray, k: np.ndarray, options: dict[str, Any], scale: float,
                 run_oracle: Any) -> np.ndarray | None:
    # The float64 bound's logit size A: |scale| sum |q||k| plus what is added to the
    # scaled scores. A bias alone adds max|bias|. ALiBi, softcap and score_mod add
    # terms of the size of the final scores themselves: read those off the oracle
    # (s = lse + log w where w > 0; zero weights carry no error) and add the product
    # term again, since final - product bounds everything added to it.
    nonadditive = any(options.get(n) is not None for n in ("alibi_slopes", "softcap",
                                                           "score_mod"))
    bias = options.get("bias")
    if not nonadditive:
        return None if bias is None else to_numpy(bias, float64=True)
    res = run_oracle(return_weights=True, return_lse=True)
    w, lse = to_numpy(res.weights, float64=True), to_numpy(res.lse, float64=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = lse[..., None] + np.log(w)
    s = np.where((w > 0) & np.isfinite(s), np.abs(s), 0.0)
    qa = np.abs(np.where(np.isfinite(q), q, 0.0))
    product = abs(scale) * float(np.max(qa.sum(axis=-1), initial=0.0)) * float(
        np.max(np.abs(np.where(np.isfinite(k), k, 0.0)), initial=0.0))
    extra = float(np.max(s, initial=0.0)) + product
    if bias is not None:
        finite = np.nan_to_num(to_numpy(bias, float64=True), posinf=0, neginf=0)
        extra += float(np.max(np.abs(finite), initial=0.0))
    return np.asarray([extra])


def _finite(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, 0.0)


def _rank3(x: np.ndarray) -> np.ndarray:
    # refattn's 2-D form (L, E) has no head axis; the sums below want one.
    return x[None] if x.ndim == 2 else x


class _ScoreRounding:
    """What the float32 rounding of the scores moves each tensor by (docs/testing.rst,
    "The floor"), to first order, with every score moved by A_ij and the signs that add
    up.

    A_ij = |scale| sum_e |q_ie| |k_je| plus |bias_ij|, plus the final score |s_ij| where
    ALiBi, softcap or a score_mod change the scores after the product (read off the
    oracle: s = lse + log P where P > 0): the size of the terms a score sums. Moving the
    scores by ds moves P = softmax(s) by dP_ij = P_ij (ds_ij - sum_l P_il ds_il), so by
    at most P_ij (A_ij + Abar_i) with Abar_i = sum_l P_il A_il. Masked keys have P = 0
    and add nothing; non-finite inputs (NaN query rows) add nothing either. Arrays are
    (..., H, L, S), keys and values repeated over grouped query heads.
    """

    def __init__(self, host: dict[str, np.ndarray], out: np.ndarray, weights: np.ndarray,
                 lse: np.ndarray | None, options: dict[str, Any], scale: float,
                 keep_scale: float) -> None:
        q, k, v = (_rank3(_finite(host[n])) for n in ("q", "k", "v"))
        self.o, self.p = _rank3(_finite(out)), _rank3(_finite(weights))
        H = q.shape[-3]
        # Grouped-query: key/value head g serves query heads g*G .. g*G+G-1.
        k, v = (x if x.shape[-3] == H else np.repeat(x, H // x.shape[-3], axis=-3)
                for x in (k, v))
        self.q, self.k, self.v, self.scale = q, k, v, abs(scale)
        size = self.scale * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2))
        bias = options.get("bias")
        if bias is not None:
            size = size + np.abs(_finite(to_numpy(bias, float64=True)))
        if lse is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                final = _rank3(to_numpy(lse, float64=True))[..., None] + np.log(self.p)
            size = size + np.where(self.p > 0, np.abs(_finite(final)), 0.0)
        self.size = size
        keep = options.get("dropout_mask")
        # c keep_ij: what weight ij is multiplied by on its way to the output.
        self.gain = np.asarray(keep_scale if keep is None else
                               keep_scale * _rank3(to_numpy(keep, float64=True)))

    def out(self) -> float:
        """max_(i, c) sum_j P_ij |c keep_ij V_jc - O_ic| A_ij.

        O_i = sum_j c keep_ij P_ij V_j moves by sum_j P_ij (c keep_ij V_j - O_i) ds_ij.
        """
        o, v, pa = self.o, self.v, self.p * self.size
        gain = self.gain[..., None] if self.gain.ndim else self.gain  # (..., L, S, 1)
        L, S, Ev = o.shape[-2], v.shape[-2], v.shape[-1]
        lead = int(np.prod(np.broadcast_shapes(pa.shape[:-2], v.shape[:-2])))
        step = max(1, _CHUNK // max(1, lead * S * Ev))
        worst = 0.0
        for l0 in range(0, L, step):
            rows = slice(l0, l0 + step)
            g = gain if gain.ndim == 0 or gain.shape[-3] == 1 else gain[..., rows, :, :]
            spread = np.abs(g * v[..., None, :, :] - o[..., rows, None, :])
            worst = max(worst, float(np.max(np.sum(pa[..., rows, :, None] * spread, axis=-2),
                                            initial=0.0)))
        return worst

    def gradients(self, do: np.ndarray, shapes: dict[str, tuple[int, ...]],
                  bias_shape: tuple[int, ...] | None) -> dict[str, float]:
        """The same for dQ, dK, dV and d bias, given the output gradient dO (BHLD).

        dV_j = sum_i c keep_ij P_ij dO_i moves by at most sum_i c keep_ij P_ij (A_ij +
        Abar_i) |dO_i|. dS_ij = P_ij (G_ij - D_i) with G_ij - D_i = dO_i . (c keep_ij V_j -
        O_i) =: Y_ij (signed); D_i = dO_i . O_i moves by dO_i . dO_i^out, at most sum_l
        P_il |Y_il| A_il, so dS_ij moves by at most Z_ij = P_ij ((A_ij + Abar_i) |Y_ij| +
        sum_l P_il |Y_il| A_il); dQ = scale dS K and dK = scale dS^T Q by |scale| Z |K|
        and |scale| Z^T |Q|, d bias by Z summed into its entries.
        """
        p, a, gain = self.p, self.size, self.gain
        do = _rank3(_finite(do))
        abar = np.sum(p * a, axis=-1, keepdims=True)
        moved = p * (a + abar)
        dv = np.swapaxes(gain * moved, -1, -2) @ np.abs(do)
        y = np.abs(gain * (do @ np.swapaxes(self.v, -1, -2))
                   - np.sum(do * self.o, axis=-1, keepdims=True))
        z = moved * y + p * np.sum(p * y * a, axis=-1, keepdims=True)
        dq = self.scale * (z @ np.abs(self.k))
        dk = self.scale * (np.swapaxes(z, -1, -2) @ np.abs(self.q))
        sizes = {"dq": _summed(dq, shapes["q"]), "dk": _summed(dk, shapes["k"]),
                 "dv": _summed(dv, shapes["v"])}
        if bias_shape is not None:
            sizes["dbias"] = _summed(z, bias_shape)
        return sizes


def _summed(x: np.ndarray, shape: tuple[int, ...]) -> float:
    """max|entry| of an input's gradient bound x (..., H, n, d), summed as the input was
    used: over the query heads a grouped key head serves, then over broadcast axes."""
    if len(shape) >= 3 and x.ndim >= 3 and shape[-3] != x.shape[-3]:
        *lead, H, n, d = x.shape
        x = np.sum(np.reshape(x, (*lead, shape[-3], H // shape[-3], n, d)), axis=-3)
    if len(shape) == 2 and x.ndim == 3:
        x = x[0]
    return float(np.max(sum_to_shape(x, shape, xp=np), initial=0.0))


def _finite_max(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=0.0))


def _row_norm_max(x: np.ndarray) -> float:
    x = np.where(np.isfinite(x), x, 0.0)
    return float(np.max(np.sqrt(np.sum(x * x, axis=-1)), initial=0.0))


def _gradient_term_sizes(host: dict[str, np.ndarray], grad_out: Array,
                         options: dict[str, Any], opts64: dict[str, Any], f64: dict[str, Array],
                         scale: float, keep_scale: float,
                         xp: Namespace) -> dict[str, tuple[float, str]]:
    """The size of the terms each gradient entry sums, for the floor of its budget.

    Gradient entries are sums of terms that cancel, so the rounding of the terms, not
    the size of the result, sets what any implementation in the dtype must lose. With
    c = 1 / (1 - p), dS_ij = P_ij (dP_ij - D_i), |dP_ij| = c |dO_i . V_j| and |D_i| =
    |dO_i . O_i| both at most c ||dO_i|| max_j ||V_j|| (Cauchy-Schwarz; O_i is a convex
    combination of rows of V, rescaled), so |dS_ij| <= 2 c P_ij ||dO|| ||V||:

    * dV_j = sum_i c keep_ij P_ij dO_i: its terms sum to sum_i c keep_ij P_ij |dO_i|,
      which is exactly the oracle's dV for the gradient |dO| (linear, weights >= 0);
    * dQ_i = scale sum_j dS_ij K_j: terms up to 2 c |scale| max|K| ||dO|| ||V|| (a row of
      P sums to 1), times the rows summed into one broadcast query row;
    * dK_j = scale sum_i dS_ij Q_i: the same with max|Q| and the column sum of P, which
      is the oracle's dV for a gradient of ones without dropout;
    * d bias: 2 c ||dO|| ||V|| times the score entries summed into one bias entry.
    """
    do = _blhd_to_bhld(to_numpy(grad_out, float64=True), options.get("layout", "BHLD"))
    q, k, v = host["q"], host["k"], host["v"]
    pair = 2.0 * keep_scale * _row_norm_max(do) * _row_norm_max(v)
    go = xp.astype(grad_out, xp.float64)
    dv_abs = attention_backward(xp.abs(go), f64["q"], f64["k"], f64["v"], **opts64).dv
    plain = {n: val for n, val in opts64.items() if n not in ("dropout_p", "dropout_mask")}
    colsum = attention_backward(xp.ones_like(go), f64["q"], f64["k"], f64["v"], **plain).dv
    L = q.shape[-2]
    rows = float(np.prod(np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])))
    rows *= (q.shape[-3] if q.ndim >= 3 else 1) * L
    n_q = rows / float(np.prod(q.shape[:-1])) if L else 1.0
    sizes = {
        "dv": (_finite_max(to_numpy(dv_abs, float64=True)), "max_j sum_i c P_ij |dO_i|"),
        "dq": (n_q * abs(scale) * _finite_max(k) * pair,
               "2 c |scale| max|K| max||dO_i|| max||V_j||"),
        "dk": (abs(scale) * _finite_max(q) * pair * _finite_max(to_numpy(colsum, float64=True)),
               "2 c |scale| max|Q| max||dO_i|| max||V_j|| max_j sum_i P_ij"),
    }
    bias = options.get("bias")
    if bias is not None:
        S = k.shape[-2]
        entries = float(np.prod(bias.shape))
        n_b = rows * S / entries if entries else 0.0
        sizes["dbias"] = (n_b * pair, "2 c max||dO_i|| max||V_j|| times the entries summed")
    return sizes


def _float64_options(options: dict[str, Any], xp: Namespace) -> dict[str, Any]:
    opts = dict(options)
    for name in _FLOAT_OPTIONS:
        if opts.get(name) is not None:
            opts[name] = xp.astype(opts[name], xp.float64)
    return opts


@dataclass
class Reference:
    """What a result of dtype ``kind`` is judged against, tensor by tensor.

    ``oracle`` holds the float64 oracle's tensors on the host ("out", "dq", "dk", "dv",
    "dbias"). For float64, ``bound`` holds the rounding bounds; for lower precisions,
    ``baseline_error`` the largest error of the plain baselines against the oracle and
    ``floor`` (with ``floor_how``) the floor of the budget.
    """

    kind: str
    oracle: dict[str, Any]
    bound: dict[str, float] = field(default_factory=dict)
    baseline_error: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    floor_how: dict[str, str] = field(default_factory=dict)

    def budget(self, name: str, factor: float) -> tuple[float, str]:
        """(budget, how it is made) of tensor ``name`` with this factor."""
        if self.kind == "float64":
            what = "gradient_rounding_bound" if name != "out" else "rounding_bound"
            return self.bound[name], f"2 x the float64 rounding bound ({what})"
        base, floor = self.baseline_error[name], self.floor[name]
        return factor * base + floor, (
            f"{factor:g} x baseline error {base:.3e} + floor {floor:.3e} ({self.floor_how[name]})")


def compute_reference(q: Array, k: Array, v: Array, *, kind: str, options: dict[str, Any],
                      grad_out: Array = None, round_to: Any = None,
                      xp: Namespace) -> Reference:
    """The oracle and the ingredients of the budgets for inputs q, k, v and ``options``.

    ``round_to`` rounds float32 arrays of ``xp`` to the dtype ``kind`` (None: float32 or
    float64, no rounding). ``options`` are ``refattn.attention``'s, a dropout given as a
    ``dropout_mask``. The inputs may hold any float dtype; their values are used exactly.
    """
    layout = options.get("layout", "BHLD")
    f64 = {name: xp.astype(x, xp.float64) for name, x in (("q", q), ("k", k), ("v", v))}
    opts64 = _float64_options(options, xp)

    def run_oracle(**extra: Any) -> Any:
        return attention(f64["q"], f64["k"], f64["v"], **opts64, **extra)

    low = kind != "float64"
    # Low precisions need the oracle's weights (and, where the scores are changed after
    # the product, its LSE) for the floor of the output.
    nonadditive = any(options.get(n) is not None for n in _NONADDITIVE)
    first = run_oracle(return_weights=low, return_lse=low and nonadditive)
    oracle: dict[str, Any] = {"out": to_numpy(first.out if low else first, float64=True)}
    if grad_out is not None:
        grads = attention_backward(xp.astype(grad_out, xp.float64), f64["q"], f64["k"],
                                   f64["v"], **opts64)
        oracle.update({n: None if g is None else to_numpy(g, float64=True)
                       for n, g in zip(_GRAD_NAMES, grads, strict=True)})
    ref = Reference(kind, oracle)
    host = {name: _blhd_to_bhld(to_numpy(x, float64=True), layout) for name, x in
            (("q", q), ("k", k), ("v", v))}
    E = host["q"].shape[-1]
    scale = options.get("scale")
    scale = float(scale) if scale is not None else (1.0 / math.sqrt(E) if E else 1.0)
    p = float(options.get("dropout_p", 0.0))
    keep_scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    names = [n for n, value in oracle.items() if value is not None]
    if kind == "float64":
        extra = _logit_extra(host["q"], host["k"], options, scale, run_oracle)
        ref.bound["out"] = _tolerance.rounding_bound(
            host["q"], host["k"], host["v"], scale=scale, bias=extra, dropout_p=p)
        if grad_out is not None:
            bias = options.get("bias")
            ref.bound.update(_tolerance.gradient_rounding_bound(
                host["q"], host["k"], host["v"],
                _blhd_to_bhld(to_numpy(grad_out, float64=True), layout),
                scale=scale, bias=extra, dropout_p=p,
                bias_shape=None if bias is None else tuple(bias.shape)))
        return ref
    u = EPS[kind] / 2
    rounder = round_to if round_to is not None else (lambda x: x)
    bases = [low_precision_baseline(q, k, v, round_to=rounder, options=options,
                                    grad_out=grad_out, placement=placement, xp=xp)
             for placement in SCALE_PLACEMENTS]
    sizes = {"out": (_finite_max(host["v"]) * keep_scale, "max|V| / (1 - dropout_p)")}
    scores = _ScoreRounding(
        host, _blhd_to_bhld(oracle["out"], layout), to_numpy(first.weights, float64=True),
        first.lse if nonadditive else None, options, scale, keep_scale)
    moved = {"out": scores.out()}
    if grad_out is not None:
        bias = options.get("bias")
        moved.update(scores.gradients(
            _blhd_to_bhld(to_numpy(grad_out, float64=True), layout),
            {n: host[n].shape for n in ("q", "k", "v")},
            None if bias is None else tuple(bias.shape)))
    if grad_out is not None:
        sizes.update(_gradient_term_sizes(host, grad_out, options, opts64, f64, scale,
                                          keep_scale, xp))
    for name in names:
        ref.baseline_error[name] = max(
            _tolerance.max_abs_error(to_numpy(getattr(b, name), float64=True), oracle[name])
            for b in bases)
        size, what = sizes[name]
        ref.floor[name] = u * size
        ref.floor_how[name] = (f"u = eps/2 of {kind} times {what} = {size:.4g}, the size of "
                               "the terms it sums")
        ref.floor[name] += _SCORE_ROUNDINGS * _SCORE_U * moved[name]
        ref.floor_how[name] += (
            f"; plus {_SCORE_ROUNDINGS:g} x 2^-24 x {moved[name]:.4g}, what one float32 "
            "rounding of each score at the size A of its terms moves it by")
    return ref
