"""Error budgets for comparing an attention implementation with the oracle.

Two rules, both derived rather than guessed:

* any dtype against the same dtype (``rounding_bound``): a first-order rounding-error bound of
  the textbook algorithm, so two correct float64 implementations can differ by at most
  twice it;
* lower precisions (``baseline_budget``): the flash-attention authors' rule, "at most
  ``factor`` times the error of a plain implementation in the same precision, plus a
  floor", with the plain implementation computed by refattn itself.

These helpers take NumPy arrays: they serve test harnesses and the ``refattn check``
command, not the array-API core.
"""

from __future__ import annotations

import numpy as np

__all__ = ["baseline_budget", "gradient_rounding_bound", "max_abs_error", "rounding_bound"]


def _finite_max(x: np.ndarray) -> float:
    a = np.abs(np.asarray(x, dtype=np.float64))
    return float(np.max(np.where(np.isfinite(a), a, 0.0), initial=0.0))


def _logit_error(q: np.ndarray, k: np.ndarray, *, scale: float, bias: np.ndarray | None,
                 u: float) -> float:
    # delta <= (E + 2) u A: A bounds |scale| sum_e |q_ie||k_je| (plus |bias|), the size of
    # the terms whose rounding a logit carries (E products, E - 1 additions, the scale
    # and the bias addition).
    E = q.shape[-1]
    qa = np.abs(q.astype(np.float64))
    qa = np.where(np.isfinite(qa), qa, 0.0)
    # Head counts may differ (grouped-query); the largest |q| row against the largest
    # |k| entry bounds every pairing.
    A = abs(scale) * float(np.max(qa.sum(axis=-1), initial=0.0) if E else 0.0) * _finite_max(k)
    if bias is not None:
        A += _finite_max(bias)
    return (E + 2) * u * A


def rounding_bound(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    bias: np.ndarray | None = None,
    dropout_p: float = 0.0,
    dtype: np.dtype | type = np.float64,
) -> float:
    """Bound on ``|out - exact|`` of one attention in ``dtype``, times two (for a comparison).

    With unit roundoff u, a logit ``scale * q_i . k_j`` (plus bias) carries an error
    ``delta <= (E + 2) u A``, A the largest ``|scale| sum_e |q_ie||k_je|`` (plus the
    largest ``|bias|``). A logit error delta changes each softmax weight by a relative
    2 delta (first order); exp, the row sum and the division add (S + 3) u relative;
    the weighted sum over S values adds S u. So one implementation is off by at most
    ``max|V| (2 delta + (2S + 3) u) / (1 - dropout_p)``; two, by twice that.

    Parameters
    ----------
    q, k, v : numpy.ndarray
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev) (heads may be grouped or
        broadcast; only magnitudes matter).
    scale : float
        The softmax scale actually used.
    bias : numpy.ndarray, optional
        Additive bias; its finite magnitude adds to the logit error.
    dropout_p : float
        Dropout probability; kept weights are scaled by 1 / (1 - dropout_p).
    dtype : numpy dtype
        Precision of the computation (float64 by default); sets u.

    Returns
    -------
    float
        The bound for comparing two float64 implementations (0 when there is nothing
        to compute).

    Examples
    --------
    >>> import numpy as np
    >>> q = np.ones((1, 2, 4)); k = np.ones((1, 3, 4)); v = np.ones((1, 3, 2))
    >>> b = rounding_bound(q, k, v, scale=0.5)
    >>> 0 < b < 1e-13
    True
    """
    S = k.shape[-2]
    u = float(np.finfo(dtype).eps) / 2
    if q.shape[-2] == 0 or S == 0 or v.size == 0:
        return 0.0
    delta = _logit_error(q, k, scale=scale, bias=bias, u=u)
    vmax = _finite_max(v)
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    one = vmax * (2 * delta + (2 * S + 3) * u) * keep_scale
    return 2.0 * one


def max_abs_error(actual: np.ndarray, desired: np.ndarray) -> float:
    """Largest ``|actual - desired|`` over entries where both are finite (0 if none)."""
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(d)
    return float(np.max(np.abs(a - d)[both], initial=0.0))


def baseline_budget(baseline_error: float, *, factor: float, dtype: np.dtype,
                    vmax: float) -> float:
    """The flash-attention rule: ``factor * baseline_error + floor``.

    The floor, one unit roundoff of the dtype times max|V|, keeps the budget from
    collapsing to 0 when the plain baseline happens to be exact (tiny cases).

    Examples
    --------
    >>> import numpy as np
    >>> baseline_budget(1e-7, factor=2.0, dtype=np.dtype(np.float32), vmax=1.0) > 2e-7
    True
    """
    return factor * baseline_error + float(np.finfo(dtype).eps) / 2 * vmax


def gradient_rounding_bound(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    grad_out: np.ndarray,
    *,
    scale: float,
    bias: np.ndarray | None = None,
    bias_shape: tuple[int, ...] | None = None,
    dropout_p: float = 0.0,
    dtype: np.dtype | type = np.float64,
) -> dict[str, float]:
    """Bounds on the errors of dQ, dK, dV (and d bias) in ``dtype``, times two.

    The first-order analysis of ``rounding_bound`` carried through the backward pass
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - rowsum(dO O))``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``, with u the unit roundoff, delta the logit error of
    ``rounding_bound``, c = 1 / (1 - dropout_p), g = max|dO|, and R the number of query
    rows that reach one key row (L, times the query heads of a group, times the batch
    entries a broadcast key serves):

    * the weights carry a relative error rho = 2 delta + (S + 3) u (logit error through
      exp; exp, row sum and division);
    * ``|dS_ij| <= P_ij M`` with ``M = 2 Ev g c max|V|`` (``|dP_ij|`` and
      ``|rowsum(dO O)_i|`` are both at most ``Ev g c max|V|``), and dS_ij is off by at
      most P_ij M sigma, sigma = 2 delta + (2S + Ev + 6) u (the weights, the forward
      output inside the row sum, the dot products of length Ev, the product and
      difference, a softcap's slope);
    * a row of P sums to 1, a column to at most R, so ``|dQ err| <= |scale| M max|K|
      (sigma + (S + 1) u)``, ``|dK err| <= R |scale| M max|Q| (sigma + (R + 1) u)`` and
      ``|dV err| <= R c g (rho + (R + 1) u)``; d bias sums dS over the n entries that
      share one bias entry: ``n M (sigma + n u)``. A query broadcast over batch dims
      multiplies its bound by the n_q rows summed into one.

    Parameters
    ----------
    q, k, v : numpy.ndarray
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev), as for ``rounding_bound``.
    grad_out : numpy.ndarray
        (..., H, L, Ev), the gradient of the loss with respect to the output.
    scale : float
        The softmax scale actually used.
    bias : numpy.ndarray, optional
        Additive bias (or any array whose largest finite magnitude bounds the terms
        added to the scaled scores); enters the logit error.
    bias_shape : tuple of int, optional
        Shape of the bias whose gradient is compared; gives the ``"dbias"`` entry.
    dropout_p : float
        Dropout probability.
    dtype : numpy dtype
        Precision of the computation.

    Returns
    -------
    dict
        ``{"dq": ..., "dk": ..., "dv": ...}`` and ``"dbias"`` when ``bias_shape`` is given:
        bounds for comparing two implementations in ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((2, 4, 8)) for _ in range(4))
    >>> b = gradient_rounding_bound(q, k, v, do, scale=8 ** -0.5)
    >>> sorted(b), all(0 < x < 1e-10 for x in b.values())
    (['dk', 'dq', 'dv'], True)
    """
    u = float(np.finfo(dtype).eps) / 2
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    names = ["dq", "dk", "dv"] + (["dbias"] if bias_shape is not None else [])
    if L == 0 or S == 0:
        return dict.fromkeys(names, 0.0)
    scores = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]) + (
        q.shape[-3] if q.ndim >= 3 else 1, L, S)
    pairs = float(np.prod(scores))
    # Rows reaching one key (value) row, and query rows summed into one q row.
    R_k = pairs / float(np.prod(k.shape[:-1]))
    R_v = pairs / float(np.prod(v.shape[:-1]))
    n_q = pairs / S / float(np.prod(q.shape[:-1]))
    c = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    g = _finite_max(grad_out)
    delta = _logit_error(q, k, scale=scale, bias=bias, u=u)
    rho = 2 * delta + (S + 3) * u
    sigma = 2 * delta + (2 * S + Ev + 6) * u
    M = 2 * Ev * g * c * _finite_max(v)
    one = {
        "dq": n_q * abs(scale) * M * _finite_max(k) * (sigma + (n_q * S + 1) * u),
        "dk": R_k * abs(scale) * M * _finite_max(q) * (sigma + (R_k + 1) * u),
        "dv": R_v * c * g * (rho + (R_v + 1) * u),
    }
    if bias_shape is not None:
        n_b = pairs / max(float(np.prod(bias_shape)), 1.0)
        one["dbias"] = n_b * M * (sigma + n_b * u)
    return {name: 2.0 * one[name] for name in names}
