"""Variable-length packed batches: flash-attn's ``varlen`` interface.

B sequences of different lengths are packed end to end along one token axis: q
(total_q, H, E), k (total_k, K, E), v (total_k, Kv, Ev), with ``cu_seqlens_q`` and
``cu_seqlens_k`` (B + 1 offsets) marking where each sequence starts. Sequence b's
queries ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` attend only its keys
``cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1``, and positions (causal alignment,
windows, ALiBi distances) are local to the sequence.

The whole packed batch is ONE call of ``refattn.attention`` (layout BLHD, a batch of
one) with a block-diagonal boolean mask that also carries each sequence's positional
window, and the ALiBi distances as a bias; both are built from segment ids and local
positions, so the semantics of every option stay those of ``attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _validate
from ._front_door import AttentionGrads, AttentionResult, attention, attention_backward
from ._namespace import infer_namespace
from ._window import Window

__all__ = ["attention_varlen", "attention_varlen_backward"]

# "uniform" would average a fully masked row over every key of the packed batch, not
# over its own sequence: the packing would leak into the result.
_MASKED_ROWS = ("zero", "nan")


@dataclass(frozen=True)
class _Packed:
    """The packed problem as one ``attention`` call: arrays and keyword options."""

    xp: Any
    q: Any  # (1, total_q, H, E)
    k: Any
    v: Any
    options: dict[str, Any]
    nan_rows: Any  # (total_q,) bool: rows the "nan" policy makes NaN, or None
    nan_keys: Any  # (total_k,) bool: keys of the sequences holding such a row, or None
    H: int
    total_q: int
    total_k: int


def _check_cu_seqlens(name: str, cu: Any, total: int, what: str, xp: Any) -> Any:
    """Validate one offsets array; return it as int64."""
    if not xp.isdtype(cu.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype (int32 or int64); got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"{name} must be 1-D of length B + 1 >= 2 (offsets 0, ..., total); got shape "
            f"{tuple(cu.shape)}"
        )
    cu = xp.astype(cu, xp.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0] = {first}")
    if last != total:
        raise ValueError(
            f"{name} must end at the number of packed {what} ({total}, axis 0 of the "
            f"{'queries' if what == 'queries' else 'keys and values'}); got {name}[-1] = {last}"
        )
    steps = cu[1:] - cu[:-1]
    if bool(xp.any(steps < 0)):
        b = int(xp.argmax(xp.astype(steps < 0, xp.int8)))
        raise ValueError(
            f"{name} must be non-decreasing; got {name}[{b}] = {int(cu[b])} > "
            f"{name}[{b + 1}] = {int(cu[b + 1])}"
        )
    return cu


def _segments(cu: Any, total: int, *, xp: Any, device: Any) -> tuple[Any, Any]:
    """Segment id and position within the segment of each of the ``total`` tokens."""
    tokens = xp.arange(total, dtype=xp.int64, device=device)
    # Token t belongs to the sequence b with cu[b] <= t < cu[b + 1]: the number of ends
    # cu[1:] at or below t. Empty sequences (equal offsets) are skipped by "right".
    seg = xp.searchsorted(cu[1:], tokens, side="right")
    seg = xp.astype(seg, xp.int64)
    return seg, tokens - xp.take(cu, seg, axis=0)


def _check_packed(q: Any, k: Any, v: Any) -> None:
    for name, x, legend in (("q", q, "(total_q, H, E)"), ("k", k, "(total_k, K, E)"),
                            ("v", v, "(total_k, Kv, Ev)")):
        if x.ndim != 3:
            raise ValueError(
                f"{name} must be 3-D {legend} in the packed varlen layout; got shape "
                f"{tuple(x.shape)}"
            )


def _check_slopes(slopes: Any, B: int, H: int) -> None:
    shape = tuple(slopes.shape)
    if shape not in ((H,), (B, H)):
        raise ValueError(
            f"alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({B}, {H}); got {shape}"
        )


def _pack(
    q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, causal: Any,
    alignment: Any, window: Any, scale: Any, softcap: Any, alibi_slopes: Any, dropout_p: Any,
    dropout_mask: Any, rng: Any, masked_rows: Any, compute_dtype: Any, xp: Any,
) -> _Packed:
    xp, device = infer_namespace(
        {"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes},
        {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
         "dropout_mask": dropout_mask},
        xp=xp, required=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"),
    )
    _check_packed(q, k, v)
    _validate.check_alignment(alignment)
    _validate.check_choice("masked_rows", masked_rows, _MASKED_ROWS)
    allowed_window = Window.merge(
        causal=causal, window=None if window is None else Window.parse(window, typed=True))
    total_q, H = q.shape[0], q.shape[1]
    total_k = k.shape[0]
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, "queries", xp)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, "keys", xp)
    B = cu_q.shape[0] - 1
    if cu_k.shape[0] != B + 1:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; "
            f"got lengths {B + 1} and {cu_k.shape[0]}"
        )
    if dropout_mask is not None and (
        dropout_mask.ndim > 3
        or not all(s in (1, t) for s, t in zip(dropout_mask.shape[::-1],
                                                (H, total_q, total_k)[::-1], strict=False))
    ):
        raise ValueError(
            f"dropout_mask of shape {tuple(dropout_mask.shape)} does not broadcast to "
            f"(H, total_q, total_k) = {(H, total_q, total_k)}"
        )
    if alibi_slopes is not None:
        _check_slopes(alibi_slopes, B, H)

    seg_q, pos_q = _segments(cu_q, total_q, xp=xp, device=device)
    seg_k, pos_k = _segments(cu_k, total_k, xp=xp, device=device)
    if alignment == "bottom_right":
        lengths_q, lengths_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        # Query i of sequence b sits at local key position i + len_k_b - len_q_b.
        pos_q = pos_q + xp.take(lengths_k - lengths_q, seg_q, axis=0)
    row_seg, row_pos = xp.reshape(seg_q, (total_q, 1)), xp.reshape(pos_q, (total_q, 1))
    col_seg, col_pos = xp.reshape(seg_k, (1, total_k)), xp.reshape(pos_k, (1, total_k))
    block = row_seg == col_seg  # (total_q, total_k): block diagonal
    mask = block
    if allowed_window is not None:
        mask = mask & allowed_window.allows(row_pos, col_pos)
    bias = None
    if alibi_slopes is not None:
        distance = xp.astype(xp.abs(row_pos - col_pos), xp.float64)
        slopes = xp.astype(alibi_slopes, xp.float64)
        if slopes.ndim == 1:
            per_row = xp.reshape(slopes, (H, 1, 1))
        else:
            # The slopes of each query's own sequence: (total_q, H) -> (H, total_q, 1).
            rows = xp.take(slopes, seg_q, axis=0)
            per_row = xp.reshape(xp.permute_dims(rows, (1, 0)), (H, total_q, 1))
        bias = -per_row * distance  # (H, total_q, total_k); off-block entries are masked
    nan_rows = nan_keys = None
    if masked_rows == "nan":
        # Per sequence, the plain softmax makes a row NaN when it sees none of its
        # sequence's keys while there are some (no keys at all is an empty sum: 0). In
        # the packed problem its NaN would spread over every key, so attention runs with
        # zeros there and the NaN is put back where the sequences put it.
        has_keys = xp.take(cu_k[1:] - cu_k[:-1], seg_q, axis=0) > 0
        nan_rows = has_keys & ~xp.any(mask, axis=1)
        nan_keys = xp.any(block & xp.reshape(nan_rows, (total_q, 1)), axis=0)
    options = dict(
        mask=mask, bias=bias, scale=scale, softcap=softcap, dropout_p=dropout_p,
        dropout_mask=dropout_mask, rng=rng, masked_rows="zero", layout="BLHD",
        compute_dtype=compute_dtype,
    )
    q4, k4, v4 = (xp.reshape(x, (1, *x.shape)) for x in (q, k, v))
    return _Packed(xp=xp, q=q4, k=k4, v=v4, options=options, nan_rows=nan_rows,
                   nan_keys=nan_keys, H=H, total_q=total_q, total_k=total_k)


def _poison(x: Any, rows: Any, axis: int, *, xp: Any) -> Any:
    """``x`` with NaN along ``axis`` wherever ``rows`` is True (no-op for None)."""
    if rows is None:
        return x
    shape = [1] * x.ndim
    shape[axis] = rows.shape[0]
    nan = xp.asarray(xp.nan, dtype=x.dtype, device=x.device)
    return xp.where(xp.reshape(rows, tuple(shape)), nan, x)


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    compute_dtype: Any = None,
    return_lse: bool = False,
    return_weights: bool = False,
    return_dropout_mask: bool = False,
    xp: Any = None,
) -> Any:
    """Attention over a packed batch of variable-length sequences.

    Each sequence attends only within itself, with its own positions:
    ``attention_varlen`` equals calling ``refattn.attention`` on every sequence apart
    and concatenating the outputs.

    Parameters
    ----------
    q, k, v : array
        Packed queries (total_q, H, E), keys (total_k, K, E) and values
        (total_k, Kv, Ev): the sequences' tokens end to end, as in flash-attn's
        ``flash_attn_varlen_func``. K and Kv must divide H (grouped-query attention).
    cu_seqlens_q, cu_seqlens_k : integer array
        (B + 1,) offsets of the sequences: 0 first, non-decreasing, total_q (total_k)
        last; sequence b is ``cu[b] .. cu[b + 1] - 1``. Empty sequences are allowed.
        Arrays of the library of q.
    causal : bool
        Query i of a sequence sees its keys j <= i + shift_b (see ``alignment``).
    alignment : {"top_left", "bottom_right"}
        shift_b = 0, or len_k_b - len_q_b for each sequence (flash-attn's convention).
        Applies to ``causal``, ``window`` and the ALiBi distances alike.
    window : (left, right), optional
        Sliding window: query i sees keys i + shift_b - left .. i + shift_b + right of
        its sequence; None or -1 = unlimited on that side. Intersected with ``causal``.
    scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E).
    softcap : float, optional
        ``softcap * tanh(s / softcap)`` on the scaled scores, before ALiBi.
    alibi_slopes : float array, optional
        (H,) or (B, H): adds ``-slope * |i + shift_b - j|`` (local positions).
    dropout_p : float
        Dropout probability; needs ``dropout_mask`` or ``rng``.
    dropout_mask : bool array, optional
        Keep-mask over the packed scores, (H, total_q, total_k) or broadcastable to it
        (True = keep); only its entries within each sequence's block matter.
    rng : int or numpy.random.Generator, optional
        Seed or generator drawing the keep-mask at (H, total_q, total_k) with NumPy.
    masked_rows : {"zero", "nan"}
        Output of a query row that sees no key (an empty key sequence, a window that
        misses every key): 0, or NaN. JAX's "uniform" is not offered: in a packed batch
        it would average over the other sequences' values too.
    compute_dtype : {None, "float64", "float32"}
        As for ``attention``: None computes in float64.
    return_lse, return_weights, return_dropout_mask : bool
        Return an ``AttentionResult`` with the LSE (H, total_q) (flash-attn's varlen
        layout; -inf on rows that see nothing), the weights (H, total_q, total_k)
        (zero outside each sequence's block) and the keep-mask (H, total_q, total_k)
        as given or drawn.
    xp : namespace or str, optional
        The array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or AttentionResult
        The output (total_q, H, Ev), or an ``AttentionResult`` when a ``return_*`` flag
        is set.

    Raises
    ------
    TypeError
        As ``attention``; also offsets that are not integer arrays of the inputs' library.
    ValueError
        Inputs not 3-D, offsets that do not start at 0, end at the packed length or
        decrease, offsets of different lengths, slopes or keep-masks of the wrong shape,
        the "uniform" policy; the rest as ``attention``.

    Notes
    -----
    The packed batch is one ``attention`` call with a block-diagonal mask, so masked
    scores between different sequences are still computed: an inf or NaN in one
    sequence's q or k makes the rows of other sequences that meet it NaN, where a
    kernel that never reads across sequences would keep them finite. Memory is that of
    one (H, total_q, total_k) problem.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> cu = np.asarray([0, 3, 4, 8])              # three sequences of 3, 1 and 4 tokens
    >>> q, k, v = (rng.standard_normal((8, 2, 4)) for _ in range(3))
    >>> out = refattn.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> out.shape
    (8, 2, 4)
    >>> first = refattn.attention(q[:3], k[:3], v[:3], causal=True, layout="BLHD")
    >>> bool(np.allclose(out[:3], first))
    True
    >>> refattn.attention_varlen(q, k, v, cu, cu, return_lse=True).lse.shape
    (2, 8)
    """
    packed = _pack(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, alignment=alignment, window=window,
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        dropout_mask=dropout_mask, rng=rng, masked_rows=masked_rows,
        compute_dtype=compute_dtype, xp=xp,
    )
    res = attention(packed.q, packed.k, packed.v, return_lse=return_lse,
                    return_weights=return_weights, return_dropout_mask=return_dropout_mask,
                    **packed.options)
    pxp = packed.xp
    flags = return_lse or return_weights or return_dropout_mask
    out = (res.out if flags else res)[0, ...]
    if packed.options["dropout_p"] != 1.0:  # dropout_p=1 gives zeros, NaN rows or not
        out = _poison(out, packed.nan_rows, 0, xp=pxp)
    if not flags:
        return out
    keep = res.dropout_mask
    if keep is not None and keep.ndim == 4:  # drawn from rng at (1, H, total_q, total_k)
        keep = keep[0, ...]
    weights = None
    if res.weights is not None:
        weights = pxp.reshape(res.weights, (packed.H, packed.total_q, packed.total_k))
        if packed.nan_rows is not None:
            # A NaN row's weights are NaN over its own sequence's keys, 0 elsewhere.
            own = pxp.reshape(packed.nan_rows, (-1, 1)) & pxp.reshape(packed.nan_keys, (1, -1))
            weights = pxp.where(own, pxp.asarray(pxp.nan, dtype=weights.dtype,
                                                 device=weights.device), weights)
    return AttentionResult(
        out=out,
        lse=None if res.lse is None else pxp.reshape(res.lse, (packed.H, packed.total_q)),
        weights=weights,
        dropout_mask=keep,
    )


def attention_varlen_backward(
    grad_out: Any,
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    compute_dtype: Any = None,
    output: Any = None,
    lse: Any = None,
    xp: Any = None,
) -> AttentionGrads:
    """Gradients of ``attention_varlen`` with respect to the packed q, k and v.

    One call of ``refattn.attention_backward`` on the packed problem; equal to the
    per-sequence gradients concatenated. Under ``masked_rows="nan"`` a query row that
    sees no key has NaN in its dq, and the keys and values of its own sequence (only)
    get NaN in dk and dv, as the per-sequence computation gives.

    Parameters
    ----------
    grad_out : array
        Gradient with respect to the output, (total_q, H, Ev).
    q, k, v, cu_seqlens_q, cu_seqlens_k : array
        The forward inputs, as given to ``attention_varlen``.
    causal, alignment, window, scale, softcap, alibi_slopes, dropout_p, dropout_mask, rng, \
masked_rows, compute_dtype : optional
        Exactly as given to ``attention_varlen``.
    output : array, optional
        The forward output (total_q, H, Ev), used for rowsum(dO * O) as a fused kernel
        uses its saved output.
    lse : array, optional
        The forward LSE (H, total_q) to rebuild the weights from, as fused kernels do.
    xp : namespace or str, optional
        The array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    AttentionGrads
        ``(dq, dk, dv, None)`` in the shapes, dtype and library of q, k, v.

    Raises
    ------
    TypeError, ValueError
        As ``attention_varlen``; also ``grad_out``, ``output`` or ``lse`` of the wrong
        shape.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> cu_q, cu_k = np.asarray([0, 2, 5]), np.asarray([0, 3, 7])
    >>> q, dout = (rng.standard_normal((5, 2, 4)) for _ in range(2))
    >>> k, v = (rng.standard_normal((7, 2, 4)) for _ in range(2))
    >>> g = refattn.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, causal=True,
    ...                                       alignment="bottom_right")
    >>> g.dq.shape, g.dk.shape, g.dv.shape
    ((5, 2, 4), (7, 2, 4), (7, 2, 4))
    >>> g1 = refattn.attention_backward(dout[2:], q[2:], k[3:], v[3:], causal=True,
    ...                                 alignment="bottom_right", layout="BLHD")
    >>> bool(np.allclose(g.dk[3:], g1.dk))
    True
    """
    packed = _pack(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, alignment=alignment, window=window,
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        dropout_mask=dropout_mask, rng=rng, masked_rows=masked_rows,
        compute_dtype=compute_dtype, xp=xp,
    )
    pxp = packed.xp
    infer_namespace({"q": q, "grad_out": grad_out, "output": output, "lse": lse}, xp=xp,
                    required=("grad_out",))
    out_shape = (packed.total_q, packed.H, v.shape[-1])
    for name, x in (("grad_out", grad_out), ("output", output)):
        if x is not None and tuple(x.shape) != out_shape:
            raise ValueError(
                f"{name} must have the output's shape (total_q, H, Ev) = {out_shape}; got "
                f"{tuple(x.shape)}"
            )
    if lse is not None and tuple(lse.shape) != (packed.H, packed.total_q):
        raise ValueError(
            f"lse must have shape (H, total_q) = {(packed.H, packed.total_q)}; got "
            f"{tuple(lse.shape)}"
        )

    def batch_of_one(x: Any) -> Any:
        return None if x is None else pxp.reshape(x, (1, *x.shape))

    grads = attention_backward(
        batch_of_one(grad_out), packed.q, packed.k, packed.v, output=batch_of_one(output),
        lse=batch_of_one(lse), **packed.options,
    )
    dq, dk, dv = grads.dq[0, ...], grads.dk[0, ...], grads.dv[0, ...]
    if packed.options["dropout_p"] != 1.0:  # dropout_p=1: zero gradients, NaN rows or not
        dq = _poison(dq, packed.nan_rows, 0, xp=pxp)
        dk = _poison(dk, packed.nan_keys, 0, xp=pxp)
        dv = _poison(dv, packed.nan_keys, 0, xp=pxp)
    return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=None)
