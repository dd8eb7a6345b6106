"""The compensated attention path: forward (``compensated_attention``) and backward
(``compensated_backward``) with double-float logits, exponentials and sums."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._arrays import all_finite
from ..._results import AttentionGrads, AttentionResult
from ..._types import Array
from .._backward import direct_backward
from .._direct import group_size, repeat_heads, scaled_product
from .._qv import fold_qv, unfold_qv_grads
from .._softmax import sink_column
from ._eft import (
    _df_div,
    _mul_df,
    _sum_to_shape_df,
    exp_df,
    fast_two_sum,
    log_df,
    sum_df,
    two_product,
    two_sum,
)
from ._ozaki import (
    _a_parts,
    _b_parts3,
    _b_slices,
    _product3_df,
    _product_df,
    _slices,
    slice_bits,
)

if TYPE_CHECKING:
    from ..._problem import AttentionProblem

# ----------------------------------------------------------------- the attention path

# Query rows are processed in chunks of about this many score entries (4 MiB arrays):
# the double-float work makes a few dozen temporaries per score, and arrays this size
# are recycled by the allocator instead of being mapped afresh (three times faster on
# NumPy), while memory stays bounded whatever L is.
_CHUNK_SCORES = 2**19


def _group_rows(x: Any, heads: int, *, xp: Any) -> Any:
    # (..., H, L, D) -> (..., heads, G*L, D), G = H // heads: the query heads that share a
    # key/value head become one taller matrix, so matmul broadcasting does GQA.
    *lead, h, l_, d = x.shape
    return xp.reshape(x, (*lead, heads, group_size(h, heads) * l_, d))


def _ungroup_rows(x: Any, H: int, *, xp: Any) -> Any:
    *lead, kh, gl, d = x.shape
    return xp.reshape(x, (*lead, H, (kh * gl) // H if H else gl, d))


def _sum_groups_df(hi: Any, lo: Any, heads: int, *, xp: Any) -> tuple[Any, Any]:
    # (..., H, S, D) -> (..., heads, S, D), summing each group of H // heads query heads.
    *lead, h, s, d = hi.shape
    if h == heads:
        return hi, lo
    hi, lo = (xp.reshape(x, (*lead, heads, group_size(h, heads), s, d)) for x in (hi, lo))
    return sum_df(hi, lo, axis=-3, xp=xp)


def _accumulate(acc: tuple[Any, Any] | None, hi: Any, lo: Any) -> tuple[Any, Any]:
    # Double-float running sum over row chunks.
    if acc is None:
        return hi, lo
    h, e = two_sum(acc[0], hi)
    return h, (acc[1] + lo) + e


def _dropout_factor(dropout_p: float) -> tuple[float, float]:
    # 1 / (1 - p) as a double-float of Python floats; 1 - p itself is exact by TwoSum.
    ch, cl = two_sum(1.0, -float(dropout_p))
    return _df_div(1.0, 0.0, ch, cl)


def _row_chunks(q: Any, S: int) -> list[slice]:
    L = q.shape[-2]
    per = max(1, _CHUNK_SCORES // max(1, math.prod(q.shape[:-2]) * S))
    return [slice(i, min(i + per, L)) for i in range(0, L, per)] or [slice(0, 0)]


def _rows(x: Any, rows: slice, L: int) -> Any:
    # The rows of an optional (..., L or 1, S) array (mask, bias, keep) for one chunk.
    if x is None or x.ndim < 2 or x.shape[-2] != L or L == 1:
        return x
    return x[..., rows, :]


@dataclass
class _Side:
    """What keys and values contribute, sliced once for every row chunk."""

    k_parts: tuple[Any, Any, Any]  # k^T for the logits (_b_parts3, bits s_bits)
    s_bits: int
    v_slices: tuple[Any, Any, Any, Any, Any]  # v for P @ V (_b_slices, bits w_bits)
    w_bits: int
    K: int
    Kv: int
    S: int


def _side(k: Any, v: Any, rows: int, *, xp: Any) -> _Side:
    s_bits = slice_bits(2 * k.shape[-1])
    # Weights are sliced once for P @ V (inner length S) and, in the backward,
    # P^T dO (inner length: the chunk's rows).
    w_bits = slice_bits(max(k.shape[-2], rows, 1))
    return _Side(
        k_parts=_b_parts3(xp.matrix_transpose(k), bits=s_bits, xp=xp), s_bits=s_bits,
        v_slices=_b_slices(v, bits=w_bits, xp=xp), w_bits=w_bits,
        K=k.shape[-3], Kv=v.shape[-3], S=k.shape[-2],
    )


@dataclass
class _Forward:
    """One row chunk of the compensated forward pass, double-floats as (hi, lo)."""

    wh: Any  # exp(score - shift) (..., H, rows, S), before dropout and before the "nan"
    wl: Any  # policy (0 on fully masked rows then)
    w: tuple[Any, Any, Any]  # wh + wl in three Ozaki slices (w_bits), keep applied
    zh: Any  # row sums of w (..., rows, 1); 1 where the row is empty
    zl: Any
    nh: Any  # (w * keep) @ v (..., rows, Ev)
    nl: Any
    lse: Any  # float (..., rows), -inf on fully masked rows
    row_masked: Any  # (..., rows, 1) bool
    eh: Any = None  # exp(sink - shift) (..., H, rows, 1) with sinks, part of z
    el: Any = None


def _forward(
    q: Any, side: _Side, *, scale: float, bias: Any, allowed: Any, keep: Any,
    masked_rows: str, xp: Any, sinks: Any = None,
) -> _Forward:
    dtype, device = q.dtype, q.device
    H, S, K = q.shape[-3], side.S, side.K
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    neg_inf = xp.asarray(-xp.inf, dtype=dtype, device=device)

    # scale * q = qh + ql exactly (TwoProduct); then the error-free product with k^T, q's
    # slices the small, concatenated side; GQA groups of query heads as taller matrices.
    qh, ql = two_product(q, xp.asarray(float(scale), dtype=dtype, device=device))
    qh, ql = (_group_rows(x, K, xp=xp) for x in (qh, ql))
    sh, sl = _product_df(_a_parts(qh, ql, bits=side.s_bits, xp=xp), side.k_parts, xp=xp)
    sh, sl = (_ungroup_rows(x, H, xp=xp) for x in (sh, sl))
    ok = allowed  # None or bool: False marks a masked score
    if bias is not None:
        # -inf entries mask; they enter as 0, so the TwoSum never meets inf - inf.
        finite = xp.isfinite(bias)
        sh, t = two_sum(sh, xp.where(finite, bias, zero))
        sl = sl + t
        ok = finite if ok is None else xp.logical_and(ok, finite)

    # Any shift near the row maximum keeps exp in range; the shift is exact (a float) and
    # the subtraction is carried in double-float, so the choice costs no accuracy.
    if S:
        shift = xp.max(sh if ok is None else xp.where(ok, sh, neg_inf), axis=-1, keepdims=True)
    else:
        shift = xp.full((*sh.shape[:-1], 1), -xp.inf, dtype=dtype, device=device)
    sink = None
    if sinks is not None:
        # The sink is one more score (exact, a float): it takes part in the shift.
        sink = xp.broadcast_to(sink_column(sinks), shift.shape)
        shift = xp.maximum(shift, sink)
    row_masked = shift == neg_inf
    shift = xp.where(row_masked, zero, shift)
    xh, t = two_sum(sh, -shift)
    xl = t + sl
    if ok is not None:
        xh = xp.where(ok, xh, neg_inf)  # exp_df gives exactly 0 there
    if masked_rows == "uniform":
        # Weight 1 on every key of a fully masked row: its output is the mean of V.
        xh = xp.where(row_masked, zero, xh)
        xl = xp.where(row_masked, zero, xl)
    wh, wl = exp_df(xh, xl, xp=xp)

    # Weights lie in [0, 1 + 2^-40]: one fixed bound (2) serves every row, so the
    # slicing is element-wise and serves P @ V and the backward's P^T dO alike.
    w1, w2, w3 = _slices(wh, axis=-1, bits=side.w_bits,
                         bound=xp.asarray(2.0, dtype=dtype, device=device), xp=xp)
    w3 = w3 + wl  # rounds by u 2^-2bits: far below what the results need
    # The sums of w1 and w2 are exact (at most S terms of w_bits bits on one grid).
    zh, zl = two_sum(xp.sum(w1, axis=-1, keepdims=True), xp.sum(w2, axis=-1, keepdims=True))
    zh, zl = fast_two_sum(zh, zl + xp.sum(w3, axis=-1, keepdims=True))
    eh = el = None
    if sink is not None:
        # exp(sink - shift) in double-float joins z; a -inf sink adds 0 (and no
        # -inf - -inf inside the TwoSum).
        finite = sink > neg_inf
        xh, t = two_sum(xp.where(finite, sink, shift), -shift)
        eh, el = exp_df(xp.where(finite, xh, neg_inf), xp.where(finite, t, zero), xp=xp)
        th, tl = two_sum(zh, eh)
        zh, zl = fast_two_sum(th, tl + (zl + el))
    # Fully masked rows have z = 0 (but under the "uniform" policy): divide them by 1.
    zh = xp.where(zh == 0, xp.ones_like(zh), zh)
    lh, ll = log_df(zh, zl, xp=xp)
    lh, t = two_sum(shift, lh)
    lse = xp.where(row_masked, neg_inf, lh + (t + ll))[..., 0]
    if masked_rows == "nan":
        # The plain softmax's NaN weights; like the standard path, dropout's keep-mask
        # then zeroes the dropped ones (a NaN row that drops every key gives 0). wh
        # itself stays finite: z is formed from it.
        w1 = xp.where(row_masked, xp.asarray(xp.nan, dtype=dtype, device=device), w1)
    if keep is not None:
        w1, w2, w3 = (xp.where(keep, x, zero) for x in (w1, w2, w3))

    parts = tuple(_group_rows(x, side.Kv, xp=xp) for x in (w1, w2, w3))
    nh, nl = _product3_df(parts, side.v_slices, None, xp=xp)
    return _Forward(
        wh=wh, wl=wl, w=(w1, w2, w3), zh=zh, zl=zl,
        nh=_ungroup_rows(nh, H, xp=xp), nl=_ungroup_rows(nl, H, xp=xp), lse=lse,
        row_masked=row_masked, eh=eh, el=el,
    )


def compensated_attention(problem: AttentionProblem, *, need_weights: bool
                          ) -> AttentionResult:
    """Attention with double-float logits, exponentials and sums; one rounding at the end.

    The problem and semantics of ``direct_attention`` (q, k, v float64), plus
    ``need_weights``: the weights, a double-float division per score, are only formed
    when asked for (``AttentionResult.weights`` is None otherwise). Query rows are
    processed in chunks, so the extra memory is bounded (a few dozen arrays of
    ``_CHUNK_SCORES`` entries) whatever L is.

    Error (first order, u = 2^-53): a logit is off by at most
    ``delta = (60 E^3 + 12 E + 32) u^2 C``, ``C = |scale| max|q| max|k| + max|bias|``, a
    weight by ``eps <= 2^-64 + delta`` relative, the output by
    ``ulp(out)/2 + (2 eps + u 2^-b) max|V| / (1 - p)`` with ``b = slice_bits(S)``, the
    LSE by ``ulp(lse)/2 + 2^-63 + delta``: about half an ulp of max|V| for E <= 256,
    S <= 4096, C <= 2^12. The derivation is in docs/accuracy.rst. Sinks join the
    double-float row sums; ``qv`` is folded into q and k (``_qv.fold_qv``).
    """
    problem = fold_qv(problem)
    q, k, xp, scale = problem.q, problem.k, problem.xp, problem.scale
    bias, allowed, keep = problem.bias_with_alibi, problem.visible, problem.keep
    dropout_p, masked_rows = problem.dropout_p, problem.masked_rows
    L, S = q.shape[-2], k.shape[-2]
    chunks = _row_chunks(q, S)
    nf = _NonFinite.of(problem)
    side = _side(nf.k, nf.v, chunks[0].stop - chunks[0].start, xp=xp)
    factor = _dropout_factor(dropout_p) if keep is not None and dropout_p < 1.0 else None
    outs, lses, weights = [], [], []
    for rows in chunks:
        bias_r, allowed_r, keep_r = (_rows(x, rows, L) for x in (bias, allowed, keep))
        poisoned, allowed_r = nf.scores(q[..., rows, :], bias_r, allowed_r, scale)
        f = _forward(nf.q[..., rows, :], side, scale=scale, bias=bias_r, allowed=allowed_r,
                     keep=keep_r, masked_rows=masked_rows, xp=xp, sinks=problem.sinks)
        lses.append(nf.rows_nan(f.lse, poisoned))
        if S == 0:
            # No keys: there is nothing to weigh, every policy gives the empty sum 0.
            outs.append(f.nh)
            weights.append(f.wh)
            continue
        if keep is not None and dropout_p >= 1.0:
            out = xp.zeros_like(f.nh)
        else:
            # out = n / (z (1 - p)): divide by z, then multiply by 1/(1 - p).
            oh, ol = _df_div(f.nh, f.nl, f.zh, f.zl)
            if factor is not None:
                oh, ol = _mul_df(oh, ol, *factor, xp=xp)
            out = oh + ol
        outs.append(nf.rows_nan(nf.with_values(out, f, keep_r, masked_rows), poisoned))
        if need_weights:
            ph, pl = _df_div(f.wh, f.wl, f.zh, f.zl)
            w = ph + pl
            if masked_rows == "nan":
                w = xp.where(f.row_masked, xp.asarray(xp.nan, dtype=w.dtype, device=w.device), w)
            weights.append(nf.rows_nan(w, poisoned))
    return AttentionResult(
        out=xp.concat(outs, axis=-2), lse=xp.concat(lses, axis=-1),
        weights=xp.concat(weights, axis=-2) if need_weights else None,
    )


@dataclass
class _NonFinite:
    """NaN and infinity in the inputs, held to the direct path's rule.

    docs/semantics.rst ("Non-finite values"): a pre-mask score that is NaN or +inf makes
    its row NaN, masked or not; a -inf one masks; a non-finite value entry reaches its
    column of every output row through the product with V (0 * inf is NaN). The
    error-free transformations cannot carry inf (TwoSum of inf gives NaN, and an inf
    would spoil the slices of its whole column), so they run on the inputs with their
    non-finite entries replaced by 0, and the plain arithmetic of the direct path
    supplies the non-finite part: the scores ``(scale q) k^T + bias`` to find the
    poisoned rows and the -inf scores, ``P @ V_bad`` (V_bad the non-finite entries, 0
    elsewhere) for the values. When every entry is finite (one pass over each input)
    nothing of this runs.
    """

    problem: AttentionProblem
    q: Any  # q, k, v with their non-finite entries replaced by 0
    k: Any
    v: Any
    scores_bad: bool  # q or k has a non-finite entry, or the bias a NaN or +inf
    v_bad: Any  # v's non-finite entries (0 elsewhere), or None when v is finite

    @staticmethod
    def of(problem: AttentionProblem) -> _NonFinite:
        xp, bias = problem.xp, problem.bias_with_alibi
        zero = xp.asarray(0.0, dtype=problem.q.dtype, device=problem.q.device)
        fin = [xp.isfinite(x) for x in (problem.q, problem.k, problem.v)]
        bad = [not bool(xp.all(f)) for f in fin]
        q, k, v = (xp.where(f, x, zero) if b else x
                   for f, b, x in zip(fin, bad, (problem.q, problem.k, problem.v), strict=True))
        bias_bad = bias is not None and not bool(xp.all(bias < xp.inf))
        return _NonFinite(problem=problem, q=q, k=k, v=v,
                          scores_bad=bad[0] or bad[1] or bias_bad,
                          v_bad=xp.where(fin[2], zero, problem.v) if bad[2] else None)

    def scores(self, q: Any, bias: Any, allowed: Any, scale: float) -> tuple[Any, Any]:
        """``(poisoned, allowed)`` for one row chunk: (..., rows, 1) True where a
        pre-mask score is NaN or +inf (None when none can be), and the mask with the
        -inf scores hidden too."""
        if not self.scores_bad:
            return None, allowed
        p, xp = self.problem, self.problem.xp
        kr = repeat_heads(p.k, group_size(q.shape[-3], p.k.shape[-3]), xp=xp)
        plain = scaled_product(q, kr, scale, xp=xp)
        if bias is not None:
            plain = plain + bias
        poisoned = xp.any(xp.logical_or(xp.isnan(plain), plain == xp.inf), axis=-1,
                          keepdims=True)
        shown = plain > -xp.inf
        return poisoned, shown if allowed is None else xp.logical_and(allowed, shown)

    def rows_nan(self, x: Any, poisoned: Any) -> Any:
        """``x`` (..., rows[, n]) with NaN on the poisoned rows."""
        if poisoned is None:
            return x
        xp = self.problem.xp
        rows = poisoned if x.ndim == poisoned.ndim else poisoned[..., 0]
        return xp.where(rows, xp.asarray(xp.nan, dtype=x.dtype, device=x.device), x)

    def with_values(self, out: Any, f: _Forward, keep: Any, masked_rows: str) -> Any:
        """``out`` plus ``P @ V_bad``: the non-finite values' terms, with the pattern
        of the direct path's products (any positive weight stands for P: only which
        weights are 0, positive or NaN decides inf or NaN)."""
        if self.v_bad is None:
            return out
        p, xp = self.problem, self.problem.xp
        zero = xp.asarray(0.0, dtype=out.dtype, device=out.device)
        pattern = f.wh
        if masked_rows == "nan":
            pattern = xp.where(f.row_masked, xp.asarray(xp.nan, dtype=out.dtype,
                                                        device=out.device), pattern)
        if keep is not None:
            pattern = (xp.zeros_like(pattern) if p.dropout_p >= 1.0
                       else xp.where(keep, pattern, zero))
        vr = repeat_heads(self.v_bad, group_size(out.shape[-3], self.v_bad.shape[-3]), xp=xp)
        return out + pattern @ vr


def compensated_backward(problem: AttentionProblem, grad_out: Array) -> AttentionGrads:
    """The gradients of ``direct_backward`` with double-float intermediates.

    NaN and infinity follow the direct backward (docs/semantics.rst, "Non-finite
    values"): the error-free transformations cannot carry them (see ``_NonFinite``), so
    when q, k, v, dO or the bias hold one (one pass over each decides), the compensated
    gradients are those of the inputs with the non-finite entries replaced by 0 and the
    -inf scores masked, and every entry that the plain direct backward makes NaN or
    infinite takes its value from it: a float64 evaluation far cheaper than this path's
    own, run only then. The finite entries are those the non-finite inputs do not
    reach, where both problems agree. ``qv`` is folded into q and k (``_qv``).
    """
    if problem.qv is not None:
        return unfold_qv_grads(problem, compensated_backward(fold_qv(problem), grad_out))
    xp = problem.xp
    nf = _NonFinite.of(problem)
    go_bad = not all_finite(xp, grad_out)
    if not (nf.scores_bad or nf.v_bad is not None or go_bad):
        return _compensated_backward(problem, grad_out, None)
    plain = direct_backward(problem, grad_out, out=None, lse=None)
    bias = problem.bias
    if bias is not None:
        # NaN and +inf entries make their rows NaN: the plain backward's; -inf masks.
        bias = xp.where(bias < xp.inf, bias,
                        xp.asarray(0.0, dtype=bias.dtype, device=bias.device))
    finite = dataclasses.replace(problem, q=nf.q, k=nf.k, v=nf.v, bias=bias)
    zero = xp.asarray(0.0, dtype=grad_out.dtype, device=grad_out.device)
    grads = _compensated_backward(finite, xp.where(xp.isfinite(grad_out), grad_out, zero)
                                  if go_bad else grad_out, nf)

    def take(accurate: Any, direct: Any) -> Any:
        return None if accurate is None else xp.where(xp.isfinite(direct), accurate, direct)

    return AttentionGrads(dq=take(grads.dq, plain.dq), dk=take(grads.dk, plain.dk),
                          dv=take(grads.dv, plain.dv), dbias=take(grads.dbias, plain.dbias),
                          dsinks=take(grads.dsinks, plain.dsinks))


def _compensated_backward(problem: AttentionProblem, grad_out: Array,
                          nf: _NonFinite | None) -> AttentionGrads:
    """``compensated_backward`` on finite inputs; ``nf`` (the original problem's
    non-finite entries, or None) adds its -inf scores to the mask.

    With w the unnormalised weights and z their row sums from the compensated forward
    (P = w / z), ``dP = dO V^T``, ``D = rowsum(P dP keep) = dO . n / z`` (n the forward's
    numerator: a product over Ev, not over S) and ``G = w (dP keep - D) = z dS (1 - p)``;
    then ``dQ = scale G K / z``, ``dK = scale G^T (Q / z)``, ``dV = (w keep)^T (dO / z)``
    and ``d bias = G / z``, all divided by 1 - p. Every product is an error-free Ozaki
    product, G a TwoProduct, the sums over row chunks, grouped heads and broadcast axes
    compensated; each gradient is rounded once. Same arguments and conventions as
    ``direct_backward`` (without the saved ``out``/``lse``: they would carry the rounding
    this path avoids).
    """
    q, k, v, xp, scale = problem.q, problem.k, problem.v, problem.xp, problem.scale
    bias, allowed, keep = problem.bias_with_alibi, problem.visible, problem.keep
    dropout_p, masked_rows = problem.dropout_p, problem.masked_rows
    dtype, device = q.dtype, q.device
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    H, K, Kv, L, S = q.shape[-3], k.shape[-3], v.shape[-3], q.shape[-2], k.shape[-2]
    # No keys (the output is the constant 0) or dropout_p = 1 (the output is identically
    # zero): nothing flows back.
    if (keep is not None and dropout_p >= 1.0) or S == 0:
        dq, dk, dv = (xp.zeros(x.shape, dtype=dtype, device=device) for x in (q, k, v))
        dbias = None if bias is None else xp.zeros(bias.shape, dtype=dtype, device=device)
        dsinks = None if problem.sinks is None else xp.zeros_like(problem.sinks)
        return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias, dsinks=dsinks)
    ch, cl = _dropout_factor(dropout_p) if keep is not None else (1.0, 0.0)
    chunks = _row_chunks(q, S)
    side = _side(k, v, chunks[0].stop - chunks[0].start, xp=xp)
    vt_bits = slice_bits(2 * v.shape[-1])
    vt_parts = _b_parts3(xp.matrix_transpose(v), bits=vt_bits, xp=xp)  # for dP = dO V^T
    q_bits = slice_bits(S)
    k_slices = _b_slices(k, bits=q_bits, xp=xp)  # for dQ = G K
    bias_rows = bias is not None and bias.ndim >= 2 and bias.shape[-2] == L and L != 1

    dq_rows, db_rows, ds_rows = [], [], []
    dv_acc = dk_acc = db_acc = None
    for rows in chunks:
        q_r, go = q[..., rows, :], grad_out[..., rows, :]
        keep_r, allowed_r = _rows(keep, rows, L), _rows(allowed, rows, L)
        if nf is not None:
            # The original scores' -inf entries mask, as on the direct path.
            _, allowed_r = nf.scores(nf.problem.q[..., rows, :],
                                     _rows(nf.problem.bias_with_alibi, rows, L), allowed_r,
                                     scale)
        f = _forward(q_r, side, scale=scale, bias=_rows(bias, rows, L), allowed=allowed_r,
                     keep=keep_r, masked_rows=masked_rows, xp=xp, sinks=problem.sinks)
        zh, zl, nh, nl = f.zh, f.zl, f.nh, f.nl

        # dV += (w keep)^T (dO / z), per query head (inner length: the chunk's rows).
        gh, gl = _df_div(go, zero, zh, zl)
        part = _product3_df(tuple(xp.matrix_transpose(x) for x in f.w),
                            _b_slices(gh, bits=side.w_bits, xp=xp), gl, xp=xp)
        dv_acc = _accumulate(dv_acc, *part)

        # dP = dO V^T (before dropout's keep), and D (1 - p) = rowsum(P dP keep) = dO.n/z.
        dph, dpl = _product_df(_a_parts(_group_rows(go, Kv, xp=xp), None, bits=vt_bits, xp=xp),
                               vt_parts, xp=xp)
        dph, dpl = (_ungroup_rows(x, H, xp=xp) for x in (dph, dpl))
        if keep_r is not None:
            dph, dpl = (xp.where(keep_r, x, zero) for x in (dph, dpl))
        th, tl = two_product(go, nh)
        eh, el = sum_df(th, tl + go * nl, axis=-1, xp=xp)
        dh, dl = _df_div(eh[..., None], el[..., None], zh, zl)
        if f.eh is not None:
            # d sink = -sum P_sink D; P_sink = e / z, D (1 - p) = d (the 1/(1-p) is
            # applied with dV's). Summed in float64: the sinks' gradient is not carried
            # in double-float to the end, unlike dQ, dK and dV.
            ph, pl = _df_div(f.eh, f.el, zh, zl)
            ds_rows.append(xp.sum(-((ph + pl) * (dh + dl)), axis=(-2, -1)))
        # G = w (dP keep - D (1 - p)) = z dS (1 - p).
        rh, rl = two_sum(dph, -dh)
        rl = rl + (dpl - dl)
        Gh, Gl = two_product(f.wh, rh)
        Gh, Gl = fast_two_sum(Gh, Gl + (f.wh * rl + f.wl * rh))
        if masked_rows == "uniform":
            # Weights 1/S on fully masked rows are constants of q, k and bias.
            Gh, Gl = (xp.where(f.row_masked, zero, x) for x in (Gh, Gl))
        elif masked_rows == "nan":
            # The plain softmax's NaN propagates through its gradient.
            Gh = xp.where(f.row_masked, xp.asarray(xp.nan, dtype=dtype, device=device), Gh)

        # dQ rows = G K / z: G sliced per query row (inner length S).
        parts = _a_parts(Gh, Gl, bits=q_bits, xp=xp)
        dqh, dql = _product3_df(tuple(_group_rows(x, K, xp=xp) for x in parts), k_slices,
                                None, xp=xp)
        dqh, dql = (_ungroup_rows(x, H, xp=xp) for x in (dqh, dql))
        dq_rows.append(_df_div(dqh, dql, zh, zl))

        # dK += G^T (Q / z): G sliced per key column (inner length: the chunk's rows).
        r_bits = slice_bits(rows.stop - rows.start)
        g1, g2, gr = _slices(Gh, axis=-2, bits=r_bits, bound=None, xp=xp)
        parts = tuple(xp.matrix_transpose(x) for x in (g1, g2, gr + Gl))
        qzh, qzl = _df_div(q_r, zero, zh, zl)
        part = _product3_df(parts, _b_slices(qzh, bits=r_bits, xp=xp), qzl, xp=xp)
        dk_acc = _accumulate(dk_acc, *part)

        if bias is not None:
            bh, bl = _df_div(Gh, Gl, zh, zl)
            if bias_rows:
                shape = (*bias.shape[:-2], rows.stop - rows.start, bias.shape[-1])
                db_rows.append(_sum_to_shape_df(bh, bl, shape, xp=xp))
            else:
                db_acc = _accumulate(db_acc, *_sum_to_shape_df(bh, bl, tuple(bias.shape),
                                                               xp=xp))

    # The common factors: scale / (1 - p) of dQ and dK, 1 / (1 - p) of dV and d bias.
    sh_, sl_ = two_product(float(scale), ch)
    sh_, sl_ = fast_two_sum(sh_, sl_ + float(scale) * cl)

    def rounded(hi: Any, lo: Any, shape: tuple[int, ...], c: tuple[Any, Any]) -> Any:
        hi, lo = _sum_to_shape_df(hi, lo, shape, xp=xp)
        hi, lo = _mul_df(hi, lo, *c, xp=xp)
        return hi + lo

    dq = rounded(xp.concat([x[0] for x in dq_rows], axis=-2),
                 xp.concat([x[1] for x in dq_rows], axis=-2), tuple(q.shape), (sh_, sl_))
    assert dk_acc is not None and dv_acc is not None  # there is at least one chunk
    dkh, dkl = _sum_groups_df(dk_acc[0], dk_acc[1], K, xp=xp)
    dk = rounded(dkh, dkl, tuple(k.shape), (sh_, sl_))
    dvh, dvl = _sum_groups_df(dv_acc[0], dv_acc[1], Kv, xp=xp)
    dv = rounded(dvh, dvl, tuple(v.shape), (ch, cl))
    dbias = None
    if bias is not None:
        if bias_rows:
            db_acc = (xp.concat([x[0] for x in db_rows], axis=-2),
                      xp.concat([x[1] for x in db_rows], axis=-2))
        assert db_acc is not None
        dbias = rounded(db_acc[0], db_acc[1], tuple(bias.shape), (ch, cl))
    dsinks = None
    if problem.sinks is not None:
        total = sum(ds_rows[1:], ds_rows[0])  # (..., H)
        total = xp.sum(xp.reshape(total, (-1, H)), axis=0) * (ch + cl)
        dsinks = total
    return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias, dsinks=dsinks)
