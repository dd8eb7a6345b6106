"""The classic attention forms found in older code and textbooks.

Three shapes of attention that predate ``scaled_dot_product_attention`` and still appear
in code bases that refattn is asked to check:

* ``attention_scores``: the raw energies ``scale * q @ k^T`` (e.g. the einsum
  ``"nqhd,nkhd->nhqk"`` of BLHD inputs), before any softmax;
* ``bmm_attention``: unscaled dot-product attention whose values are its keys,
  ``softmax(x1 @ x2^T) @ x2`` (the ``torch.bmm`` form of early sequence-to-sequence models);
* ``attention_pooling``: one learned or given score per position, softmax over the
  sequence, and the weighted sum of the positions (attention pooling / additive-attention
  readout).

Each computes in float64 and casts back to the input dtype; the softmax forms are
``refattn.attention`` calls, so their masking and fully-masked-row policies are the same.
"""

from __future__ import annotations

import numbers
from typing import Any

from . import _validate
from ._agnostic._direct import repeat_heads
from ._arrays import swap_head_axis
from ._front_door import attention
from ._namespace import infer_namespace
from ._types import LAYOUTS, MASKED_ROW_POLICIES

__all__ = ["attention_pooling", "attention_scores", "bmm_attention"]


def _check_bool_mask(name: str, mask: Any, xp: Any, meaning: str) -> None:
    if mask is not None and not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"{name} must be a boolean array ({meaning}); got dtype {mask.dtype}")


def attention_scores(
    q: Any, k: Any, *, layout: str = "BHLD", scale: float | None = 1.0, xp: Any = None
) -> Any:
    """The raw attention energies ``scale * q @ k^T``, before any mask or softmax.

    Parameters
    ----------
    q, k : array
        Queries and keys of one real floating dtype: (..., H, L, E) and (..., K, S, E)
        in the "BHLD" layout, (..., L, H, E) and (..., S, K, E) in "BLHD". K must divide
        H (key head k serves query heads k*G .. k*G+G-1); 2-D inputs (L, E), (S, E) have
        no head axis. Leading dims broadcast.
    layout : {"BHLD", "BLHD"}
        Axis order of the inputs. The scores are (..., H, L, S) in both.
    scale : float or None
        Multiplies the dot products; default 1 (raw energies). None means 1/sqrt(E).
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array
        (..., H, L, S) (or (L, S) for 2-D inputs) in the dtype of ``q``.

    Examples
    --------
    The einsum contraction of BLHD inputs:

    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 6, 3, 4))
    >>> s = refattn.attention_scores(q, k, layout="BLHD", scale=0.5)
    >>> s.shape
    (2, 3, 5, 6)
    >>> bool(np.allclose(s, 0.5 * np.einsum("nqhd,nkhd->nhqk", q, k)))
    True
    """
    xp, _ = infer_namespace({"q": q, "k": k}, xp=xp, required=("q", "k"))
    _validate.check_choice("layout", layout, LAYOUTS)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype; got q {q.dtype}, k {k.dtype}")
    for name, x in (("q", q), ("k", k)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must be at least 2-D (..., positions, head dim); got shape "
                f"{tuple(x.shape)}"
            )
    if layout == "BLHD":
        q, k = (swap_head_axis(x, xp) for x in (q, k))
    # v = k: the value checks then hold by construction and the q/k checks are the ones
    # attention() makes, with the same messages.
    shapes = _validate.check_qkv(q, k, k)
    factor = _validate.check_scale(scale, shapes.E)
    qc = xp.astype(q, xp.float64)
    kc = xp.astype(k, xp.float64)
    if kc.ndim >= 3:
        kc = repeat_heads(kc, shapes.H // shapes.K, xp=xp)
    scores = (qc @ xp.matrix_transpose(kc)) * factor
    return xp.astype(scores, q.dtype)


def bmm_attention(
    x1: Any, x2: Any, *, mask: Any = None, masked_rows: str = "nan", xp: Any = None
) -> tuple[Any, Any]:
    """Unscaled dot-product attention whose values are the keys: softmax(x1 x2^T) x2.

    The ``torch.bmm`` form: ``w = softmax(bmm(x1, x2.transpose(1, 2)), -1)``,
    ``out = bmm(w, x2)``, with no 1/sqrt(F) scaling.

    Parameters
    ----------
    x1 : array
        Queries (B, L, F) (any leading dims, or none: (L, F)).
    x2 : array
        Keys, which are also the values: (B, S, F), the same leading dims as ``x1``.
    mask : bool array, optional
        True where query i may attend key j; broadcastable to (B, L, S).
    masked_rows : {"nan", "zero", "uniform"}
        Result for a query whose every key is masked: the textbook softmax's NaN (as
        ``softmax(scores.masked_fill(~mask, -inf))``), 0, or the mean of ``x2``.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    out, weights : array
        (B, L, F) and the softmax weights (B, L, S), in the dtype of ``x1``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> x1, x2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    >>> out, w = refattn.bmm_attention(x1, x2)
    >>> e = np.exp(x1 @ x2.transpose(0, 2, 1))
    >>> bool(np.allclose(w, e / e.sum(-1, keepdims=True))), bool(np.allclose(out, w @ x2))
    (True, True)
    """
    xp, _ = infer_namespace({"x1": x1, "x2": x2}, {"mask": mask}, xp=xp,
                            required=("x1", "x2"))
    _validate.check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if x1.ndim < 2 or x1.ndim != x2.ndim or x1.shape[:-2] != x2.shape[:-2]:
        raise ValueError(
            "x1 (..., L, F) and x2 (..., S, F) must be at least 2-D with the same leading "
            f"(batch) dims; got x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}"
        )
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(
            f"x1 and x2 must have the same feature dim F; got x1 {tuple(x1.shape)}, "
            f"x2 {tuple(x2.shape)}"
        )
    _check_bool_mask("mask", mask, xp, "True = take part")
    # The batch axis plays attention's head axis (one key head per query head).
    res = attention(
        x1, x2, x2, mask=mask, scale=1.0, masked_rows=masked_rows, return_weights=True, xp=xp
    )
    return res.out, res.weights


def _scorer_logits(x: Any, weight: Any, bias: Any, *, xp: Any) -> Any:
    # A linear scorer F -> 1 applied to every position: (..., S, F) @ (F,) + b -> (..., S).
    F = x.shape[-1]
    if tuple(weight.shape) not in ((F,), (F, 1), (1, F)):
        raise ValueError(
            f"scorer_weight must have shape (F,), (F, 1) or torch Linear's (1, F) with "
            f"F = {F} (x has shape {tuple(x.shape)}); got {tuple(weight.shape)}"
        )
    w = xp.reshape(xp.astype(weight, xp.float64), (F,))
    logits = xp.astype(x, xp.float64) @ w
    if bias is None:
        return logits
    if isinstance(bias, numbers.Real) and not isinstance(bias, bool):
        return logits + float(bias)
    if not hasattr(bias, "shape") or tuple(bias.shape) not in ((), (1,)):
        raise ValueError(
            "scorer_bias must be a real number or an array of shape () or (1,); got "
            f"{getattr(bias, 'shape', type(bias).__name__)}"
        )
    return logits + xp.reshape(xp.astype(bias, xp.float64), ())


def attention_pooling(
    x: Any,
    *,
    scores: Any = None,
    scorer_weight: Any = None,
    scorer_bias: Any = None,
    mask: Any = None,
    masked_rows: str = "nan",
    xp: Any = None,
) -> tuple[Any, Any]:
    """Attention pooling: softmax over positions of one score each, weighted sum of x.

    ``weights = softmax(scores, axis=-1)`` over the valid positions and
    ``pooled = sum_s weights[..., s] * x[..., s, :]``, where the scores are given or
    come from a linear scorer ``x @ scorer_weight + scorer_bias``.

    Parameters
    ----------
    x : array
        (B, S, F) (any leading dims, or none: (S, F)).
    scores : array, optional
        (B, S) per-position scores, any real floating dtype.
    scorer_weight : array, optional
        (F,), (F, 1) or (1, F) (torch ``nn.Linear(F, 1).weight``). Exactly one of
        ``scores`` and ``scorer_weight`` must be given.
    scorer_bias : float or array, optional
        Scalar, () or (1,) added to every score; only with ``scorer_weight``. It does
        not change the weights (softmax is shift invariant) but is accepted so a linear
        scorer can be passed as it is.
    mask : bool array, optional
        (B, S), True = a valid position (False = padding).
    masked_rows : {"nan", "zero", "uniform"}
        Result for a sequence with no valid position: the textbook softmax's NaN, 0, or
        the plain mean of x.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    pooled, weights : array
        (B, F) and (B, S), in the dtype of ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> x = np.arange(12.0).reshape(1, 4, 3)                 # B=1, S=4, F=3
    >>> valid = np.array([[True, True, False, False]])
    >>> pooled, w = refattn.attention_pooling(x, scores=np.zeros((1, 4)), mask=valid)
    >>> w
    array([[0.5, 0.5, 0. , 0. ]])
    >>> pooled                                               # mean of the valid rows
    array([[1.5, 2.5, 3.5]])
    """
    floating = {"x": x, "scores": scores, "scorer_weight": scorer_weight}
    if scorer_bias is not None and hasattr(scorer_bias, "shape"):
        floating["scorer_bias"] = scorer_bias
    xp, device = infer_namespace(floating, {"mask": mask}, xp=xp, required=("x",))
    _validate.check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (..., S, F); got shape {tuple(x.shape)}")
    if (scores is None) == (scorer_weight is None):
        raise ValueError("give exactly one of scores and scorer_weight")
    if scorer_bias is not None and scorer_weight is None:
        raise ValueError("scorer_bias is only used with scorer_weight")
    if scores is not None:
        if tuple(scores.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"scores must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (..., S); got "
                f"{tuple(scores.shape)}"
            )
        logits = xp.astype(scores, xp.float64)
    else:
        logits = _scorer_logits(x, scorer_weight, scorer_bias, xp=xp)
    _check_bool_mask("mask", mask, xp, "True = valid position")
    if mask is not None:
        _validate.check_broadcastable("mask", mask, tuple(x.shape[:-1]), "(..., S)")
        mask = mask[..., None, :]
    # Pooling is attention of a single query whose logits are given: with an empty head
    # dim the product q @ k^T is exactly 0, so the scores are the bias, i.e. the logits,
    # and attention() supplies the masked softmax and the weighted sum over positions.
    lead, S = tuple(x.shape[:-2]), x.shape[-2]
    q = xp.zeros((*lead, 1, 0), dtype=x.dtype, device=device)
    k = xp.zeros((*lead, S, 0), dtype=x.dtype, device=device)
    res = attention(
        q, k, x, bias=logits[..., None, :], mask=mask, scale=1.0, masked_rows=masked_rows,
        return_weights=True, xp=xp,
    )
    return res.out[..., 0, :], res.weights[..., 0, :]
