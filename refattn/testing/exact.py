"""Attention in arbitrary precision (mpmath): the ground truth for accuracy tests.

Every float input, the scale included, is taken as the exact binary number it
represents; every operation is then carried with ``digits`` significant decimal digits
and each result is rounded once, correctly, to float64. The evaluation is a plain,
element-by-element reading of the formulas on NumPy object arrays of mpmath numbers:
slow, and meant for inputs of a few thousand scores.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from .._arrays import to_numpy
from .._namespace import infer_namespace
from .._problem import build_problem
from .._validate import check_softcap

__all__ = ["MAX_SCORES", "ExactResult", "exact_attention"]

#: The largest number of score entries (batch * H * L * S) ``exact_attention`` accepts.
MAX_SCORES = 100_000


class ExactResult(NamedTuple):
    """What ``exact_attention`` returns when a ``return_*`` flag or ``grad_out`` is given.

    The field names are those of ``refattn.AttentionResult`` (out, lse, weights) and of
    the gradients of ``refattn.attention_backward`` (dq, dk, dv, dbias), so results can be
    compared field by field. Fields that were not asked for are None; ``dbias`` is None
    without a bias.
    """

    out: Any
    lse: Any
    weights: Any
    dq: Any
    dk: Any
    dv: Any
    dbias: Any


def _import_mpmath() -> Any:
    try:
        import mpmath
    except ImportError as exc:
        raise ImportError(
            "refattn.testing.exact_attention needs mpmath, an optional dependency; "
            "install it with: pip install 'refattn[exact]'"
        ) from exc
    return mpmath


def _check_digits(digits: Any) -> int:
    if isinstance(digits, bool) or not isinstance(digits, numbers.Integral):
        raise TypeError(f"digits must be an int; got {type(digits).__name__} {digits!r}")
    if digits < 17:
        # Fewer than 17 digits cannot even hold a float64 input exactly, let alone give
        # a correctly rounded float64 result.
        raise ValueError(f"digits must be at least 17 (float64 needs 17); got {digits}")
    return int(digits)


def _sum_to_shape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # Undo broadcasting: sum the axes that broadcasting added or stretched.
    extra = a.ndim - len(shape)
    if extra:
        a = a.sum(axis=tuple(range(extra)))
    stretched = tuple(
        i for i, (n, m) in enumerate(zip(a.shape, shape, strict=True)) if m == 1 and n != 1
    )
    if stretched:
        a = a.sum(axis=stretched, keepdims=True)
    return a


class _Exact:
    """Vectorised mpmath helpers bound to one private context (no global state)."""

    def __init__(self, mpmath: Any, digits: int) -> None:
        ctx = mpmath.MPContext()
        ctx.dps = digits
        self.ctx = ctx
        self.mpf = np.frompyfunc(ctx.mpf, 1, 1)
        self.exp = np.frompyfunc(ctx.exp, 1, 1)
        self.log = np.frompyfunc(ctx.log, 1, 1)
        self.tanh = np.frompyfunc(ctx.tanh, 1, 1)
        self.to_float = np.frompyfunc(self._to_float, 1, 1)

    def _to_float(self, x: Any) -> float:
        # Correct rounding: x = man * 2^exp exactly, and int -> float conversion and
        # int / int true division in Python are correctly rounded (subnormals included).
        if isinstance(x, numbers.Integral):
            return float(x)
        ctx = self.ctx
        if ctx.isnan(x):
            return math.nan
        if ctx.isinf(x):
            return math.inf if x > 0 else -math.inf
        man, exp = x.man_exp
        man = -abs(man) if x < 0 else abs(man)
        try:
            return float(man << exp) if exp >= 0 else man / (1 << -exp)
        except OverflowError:
            return math.inf if man > 0 else -math.inf

    def rounded(self, a: Any) -> np.ndarray:
        return np.asarray(self.to_float(np.asarray(a, dtype=object)), dtype=np.float64)


def exact_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    alignment: str = "top_left",
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    masked_rows: str = "zero",
    return_lse: bool = False,
    return_weights: bool = False,
    grad_out: Any = None,
    digits: int = 50,
    xp: Any = None,
) -> Any:
    """Attention (and its gradients) evaluated in arbitrary precision with mpmath.

    The ground truth to measure float64 implementations against: each input, the
    scale included, is read as the exact number its float represents; the formulas of
    ``refattn.attention`` are evaluated with ``digits`` significant decimal digits and
    every result is rounded once, correctly, to float64. Inputs, options and errors are
    those of ``refattn.attention`` (layout BHLD), checked by the same code.

    Scores are ``softcap * tanh(scale * q @ k^T / softcap) + bias``, masked (mask,
    causal) to -inf, then ``softmax``, dropout and ``@ v``. With ``grad_out`` the exact
    gradients of ``sum(grad_out * out)`` are returned too: ``dS = P * (dP - rowsum(P * dP))``
    with ``dP`` the dropout-scaled ``grad_out @ v^T``; fully masked rows have zero
    gradient for the "zero" and "uniform" policies (their weights do not depend on the
    scores) and NaN for "nan"; ``dropout_p=1`` makes the output identically zero and the
    gradients of q, k and bias zero. These are the conventions of
    ``refattn.attention_backward``.

    Parameters
    ----------
    q, k, v : array
        Queries (..., H, L, E), keys (..., K, S, E), values (..., Kv, S, Ev), as for
        ``refattn.attention``; K and Kv divide H (grouped-query attention).
    mask : bool array, optional
        True where a query may attend a key; broadcastable to (..., H, L, S).
    bias : float array, optional
        Added to the (soft-capped) scaled scores; -inf entries mask.
    causal : bool
        Restrict query i to keys j <= i + shift, shift given by ``alignment``.
    alignment : {"top_left", "bottom_right"}
        shift = 0 or S - L.
    scale : float, optional
        Multiplies q @ k^T, taken as the exact value of the float; 1/sqrt(E) (rounded
        to float64, as ``refattn.attention`` rounds it) when None.
    softcap : float, optional
        Positive cap c: scaled scores s become ``c * tanh(s / c)`` before the bias.
    dropout_p : float
        Kept weights are multiplied by the exact ``1 / (1 - dropout_p)``.
    dropout_mask : bool array, optional
        Keep-mask (True = kept), required when ``dropout_p > 0``.
    masked_rows : {"zero", "nan", "uniform"}
        Result for rows whose every score is -inf, as in ``refattn.attention``.
    return_lse, return_weights : bool
        Fill the ``lse`` (..., H, L) and ``weights`` (..., H, L, S, before dropout)
        fields of the result.
    grad_out : array, optional
        Gradient of a loss with respect to the output, shaped like the output; when
        given, dq, dk, dv (shaped like q, k, v) and dbias (shaped like bias) are
        returned.
    digits : int
        Significant decimal digits carried (at least 17). 50 leave every result
        correctly rounded unless the data cancel by more than about 30 digits (a sum of
        terms of size 1e30 that comes to 1); raise it for such data.
    xp : namespace or str, optional
        The array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or ExactResult
        The float64 output (..., H, L, Ev) alone, or an ``ExactResult`` when a
        ``return_*`` flag or ``grad_out`` is given. Results are float64 whatever the
        input dtype, in the inputs' namespace and on their device.

    Raises
    ------
    ImportError
        mpmath is not installed (``pip install 'refattn[exact]'``).
    ValueError
        More than ``MAX_SCORES`` score entries, ``digits`` below 17, a non-positive
        softcap, ``grad_out`` of the wrong shape, or any input ``refattn.attention``
        rejects.
    TypeError
        Non-integer ``digits`` or inputs of the wrong kind, as for ``refattn.attention``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import exact_attention
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]])      # L=2, E=2 (no head axis)
    >>> k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> v = np.array([[1.0], [2.0], [3.0]])
    >>> res = exact_attention(q, k, v, scale=1.0, return_lse=True)

    Query 0 scores the keys (1, 0, 1), so its output is (1 e + 2 + 3 e) / (2 e + 1),
    exactly 2; query 1 scores them (0, 1, 1): (1 + 5 e) / (1 + 2 e). Both LSEs are
    log(2 e + 1).

    >>> res.out
    array([[2.        ],
           [2.26695639]])
    >>> res.lse
    array([1.8619948, 1.8619948])
    """
    mpmath = _import_mpmath()
    digits = _check_digits(digits)
    cap = check_softcap(softcap)
    prep = build_problem(
        q, k, v, mask=mask, bias=bias, causal=causal, alignment=alignment, scale=scale,
        dropout_p=dropout_p, dropout_mask=dropout_mask, masked_rows=masked_rows, xp=xp,
    )
    xp, device, shapes = prep.xp, prep.device, prep.shapes
    n_scores = math.prod(shapes.scores)
    if n_scores > MAX_SCORES:
        raise ValueError(
            f"exact_attention evaluates every score in software and accepts at most "
            f"{MAX_SCORES} score entries; got score shape {shapes.scores} "
            f"({n_scores} entries). Use a smaller batch, fewer heads or shorter sequences"
        )
    d_out = None
    if grad_out is not None:
        infer_namespace({"q": q, "grad_out": grad_out}, xp=xp)
        if tuple(grad_out.shape) != shapes.out:
            raise ValueError(
                f"grad_out must have the output's shape {shapes.out} (..., H, L, Ev); "
                f"got {tuple(grad_out.shape)}"
            )
        d_out = xp.astype(grad_out, xp.float64)
        if shapes.ndim == 2:
            d_out = xp.reshape(d_out, (1, *d_out.shape))

    ex = _Exact(mpmath, digits)
    ctx = ex.ctx
    Q, K, V = (ex.mpf(to_numpy(x)) for x in (prep.q, prep.k, prep.v))
    H, S = shapes.H, shapes.S
    Kr = np.repeat(K, H // shapes.K, axis=-3)
    Vr = np.repeat(V, H // shapes.Kv, axis=-3)
    scale_mp = ctx.mpf(prep.scale)
    T = scale_mp * (Q @ np.swapaxes(Kr, -1, -2))
    capped = None
    if cap is not None:
        cap_mp = ctx.mpf(cap)
        capped = ex.tanh(T / cap_mp)
        scores = cap_mp * capped
    else:
        scores = T
    if prep.bias_with_alibi is not None:
        scores = scores + ex.mpf(to_numpy(prep.bias_with_alibi))
    if prep.visible is not None:
        scores = np.where(to_numpy(prep.visible), scores, ctx.ninf)
    scores = np.broadcast_to(scores, shapes.scores)

    if S == 0:
        zeros_rows = np.zeros(shapes.scores[:-1], dtype=object)
        P = scores
        lse = zeros_rows + ctx.ninf
        row_masked = np.ones((*shapes.scores[:-1], 1), dtype=bool)
    else:
        e_s = ex.exp(scores)
        Z = e_s.sum(axis=-1, keepdims=True)
        # exp of a finite number is never 0 in mpmath (unbounded exponent), so Z == 0
        # exactly when the whole row is masked.
        row_masked = np.asarray(Z == 0, dtype=bool)
        lse = ex.log(Z)[..., 0]
        P = e_s / np.where(row_masked, 1, Z)
        if masked_rows == "nan":
            P = np.where(row_masked, ctx.nan, P)
        elif masked_rows == "uniform":
            P = np.where(row_masked, ctx.mpf(1) / S, P)
    keep = None
    Pd = P
    if prep.keep is not None:
        keep = to_numpy(prep.keep)
        if prep.dropout_p >= 1.0:
            Pd = np.zeros(P.shape, dtype=object)
        else:
            factor = 1 / (1 - ctx.mpf(prep.dropout_p))
            Pd = np.where(keep, P * factor, 0)
    out = Pd @ Vr

    def finish(a: Any, shape: tuple[int, ...]) -> Any:
        arr = ex.rounded(a).reshape(shape)
        return xp.asarray(arr, device=device)

    user_out = shapes.out
    out_x = finish(out, user_out)
    if not (return_lse or return_weights or d_out is not None):
        return out_x
    user_lse = shapes.user_scores[:-1]
    result = {
        "out": out_x,
        "lse": finish(lse, user_lse) if return_lse else None,
        "weights": finish(P, shapes.user_scores) if return_weights else None,
        "dq": None, "dk": None, "dv": None, "dbias": None,
    }
    if d_out is not None:
        dO = ex.mpf(to_numpy(d_out))
        dP = dO @ np.swapaxes(Vr, -1, -2)
        if keep is not None:
            if prep.dropout_p >= 1.0:
                dP = np.zeros(dP.shape, dtype=object)
            else:
                dP = np.where(keep, dP * factor, 0)
        dP = np.broadcast_to(dP, shapes.scores)
        dS = P * (dP - (P * dP).sum(axis=-1, keepdims=True))
        if masked_rows == "uniform":
            dS = np.where(row_masked, 0, dS)
        if keep is not None and prep.dropout_p >= 1.0:
            # The output is identically zero then (even on "nan" rows): nothing flows back.
            dS = np.zeros(dS.shape, dtype=object)
        dS = np.broadcast_to(dS, shapes.scores)
        dT = dS if capped is None else dS * (1 - capped * capped)
        G, Gv = H // shapes.K, H // shapes.Kv
        batch = shapes.scores[:-3]
        dq = scale_mp * (dT @ Kr)
        dk = scale_mp * (np.swapaxes(dT, -1, -2) @ Q)
        # Query head h used key head h // G: sum each group back onto its key/value head.
        dk = np.broadcast_to(dk, (*batch, H, S, shapes.E))
        dk = dk.reshape(*batch, shapes.K, G, S, shapes.E).sum(axis=-3)
        dv = np.swapaxes(np.broadcast_to(Pd, shapes.scores), -1, -2) @ dO
        dv = np.broadcast_to(dv, (*batch, H, S, shapes.Ev))
        dv = dv.reshape(*batch, shapes.Kv, Gv, S, shapes.Ev).sum(axis=-3)
        for name, grad, x, user in (("dq", dq, prep.q, q), ("dk", dk, prep.k, k),
                                    ("dv", dv, prep.v, v)):
            summed = _sum_to_shape(np.asarray(grad), tuple(x.shape))
            result[name] = finish(summed, tuple(user.shape))
        if bias is not None:
            result["dbias"] = finish(_sum_to_shape(dS, tuple(bias.shape)), tuple(bias.shape))
    return ExactResult(**result)
