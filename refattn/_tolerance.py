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

__all__ = ["baseline_budget", "rounding_bound", "max_abs_error"]


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
    E, S = q.shape[-1], k.shape[-2]
    u = float(np.finfo(dtype).eps) / 2
    if q.shape[-2] == 0 or S == 0 or v.size == 0:
        return 0.0
    qa = np.abs(q.astype(np.float64))
    ka = np.abs(k.astype(np.float64))
    finite = np.isfinite
    qa = np.where(finite(qa), qa, 0.0)
    ka = np.where(finite(ka), ka, 0.0)
    # Head counts may differ (grouped-query); the largest |q| row against the largest
    # |k| row bounds every pairing.
    A = abs(scale) * float(np.max(qa.sum(axis=-1) if E else 0.0)) * float(
        np.max(ka) if ka.size else 0.0
    )
    if bias is not None:
        b = np.abs(np.asarray(bias, dtype=np.float64))
        A += float(np.max(np.where(finite(b), b, 0.0), initial=0.0))
    delta = (E + 2) * u * A
    va = np.abs(v.astype(np.float64))
    vmax = float(np.max(np.where(finite(va), va, 0.0), initial=0.0))
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
