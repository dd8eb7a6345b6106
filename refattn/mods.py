"""Ready-made ``score_mod`` and ``mask_mod`` callables for ``refattn.attention``.

Each factory returns a plain callable that ``attention(score_mod=..., mask_mod=...)``
evaluates on broadcast integer index grids of the input's array library: ``b``
``(*batch, 1, 1, 1)`` holding the flat batch index (a (1, 1, 1) zero grid without batch
dims), ``h`` (H, 1, 1), ``q_idx`` (L, 1) and ``kv_idx`` (1, S). They use only the
indices they are given, so rows and columns of a block work as well. The mods use only
operators and array-API functions, so they run on every library; arrays they close over
(document ids, slopes, tables) must come from the library of the attention inputs.

A mask_mod returns a boolean array, True = take part. A score_mod returns the new
score; every score mod here carries a ``derivative(score, b, h, q_idx, kv_idx)``
attribute (d mod / d score), which ``attention_backward`` uses for the chain rule. The
additive mods have derivative exactly 1: giving it spares the backward pass its
numerical affinity check, whose difference f(s + 1) - f(s) is only 1 up to rounding.

Positions follow the core's conventions: query i sits at key position ``i + shift``,
with shift = 0 (``alignment="top_left"``) or S - L (``"bottom_right"``, which needs the
lengths L and S, since a mod only sees indices).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import array_api_compat

from . import _validate
from ._namespace import check_array, library_name
from ._window import Window

__all__ = [
    "alibi",
    "causal",
    "document_mask",
    "prefix_lm",
    "relative_position_bias",
    "sliding_window",
    "softcap",
]

Mod = Callable[..., Any]


# --- shared helpers (also used by refattn.varlen and refattn.kvcache) ----------------------


def _count(name: str, value: Any) -> int:
    # A non-negative Python int (numpy integers too; bool is not a count).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int; got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value}")
    return int(value)


def _shift(alignment: Any, L: Any, S: Any, who: str) -> int:
    _validate.check_alignment(alignment)
    L = None if L is None else _count("L", L)
    S = None if S is None else _count("S", S)
    if alignment == "top_left":
        return 0
    if L is None or S is None:
        raise ValueError(
            f"{who}(alignment='bottom_right') needs the lengths L and S (shift = S - L): a "
            f"mod sees only indices; got L={L!r}, S={S!r}"
        )
    return S - L


def _namespace(what: str, held: Any, grid: Any) -> Any:
    # The arrays a mod holds must come from the library attention runs on.
    if library_name(held) != library_name(grid):
        raise TypeError(
            f"{what} is a {library_name(held)} array but attention runs on "
            f"{library_name(grid)} arrays; build the mod from arrays of the input library"
        )
    return array_api_compat.array_namespace(grid)


def _array(name: str, x: Any, kind: str, ndims: tuple[int, ...]) -> Any:
    check_array(name, x)
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array of the attention inputs' library; got {type(x).__name__}"
        ) from None
    if not xp.isdtype(x.dtype, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise TypeError(f"{name} must have {article} {kind} dtype; got {x.dtype}")
    if x.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}; got shape {tuple(x.shape)}")
    return x


def _gather(xp: Any, values: Any, index: Any) -> Any:
    # values[index] for an integer index grid of any shape, with the standard's 1-D take.
    flat = xp.take(xp.reshape(values, (-1,)), xp.reshape(index, (-1,)), axis=0)
    return xp.reshape(flat, index.shape)


def _flat_batch(b: Any) -> int:
    # b is (*batch, 1, 1, 1) holding 0 .. prod(batch) - 1, or (1, 1, 1) without batch dims.
    return math.prod(b.shape)


def _check_block_index(grid: Any, size: int, what: str) -> None:
    # On one block of the blocked path a grid holds some of the indices only (the whole
    # grids were checked once before the blocks): those must be within the table.
    top = int(array_api_compat.array_namespace(grid).max(grid))
    if top >= size:
        raise ValueError(f"{what} but attention asked for index {top} on that axis")


def _check_batch(name: str, rows: int, b: Any, whole: bool) -> None:
    if not whole:
        _check_block_index(b, rows, f"{name} has {rows} batch rows")
        return
    n = _flat_batch(b)
    if rows != n:
        raise ValueError(
            f"{name} has {rows} batch rows but attention has {n} batch elements (the "
            f"product of the batch dims {tuple(b.shape[:-3]) or '()'}); give one row per "
            "flat batch index, or a 1-D array shared by the batch"
        )


def _check_index_range(name: str, length: int, idx: Any, xp: Any, axis: str) -> None:
    if idx.size and int(xp.max(idx)) >= length:
        raise ValueError(
            f"{name} covers {length} {axis} positions but attention asked for position "
            f"{int(xp.max(idx))}; its length must be the attention's {axis} length"
        )


def _ones_like(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    # d mod / d score of an additive mod: exactly 1.
    return array_api_compat.array_namespace(score).ones_like(score)


def _block_aware(make: Callable[[bool], Mod]) -> Mod:
    # make(whole) builds the mod; the one called on whole grids checks its tables
    # against the whole batch and every head, the ``on_block`` variant the blocked path
    # calls on one block's grids (a run of heads, one batch entry) checks only that the
    # indices it sees are within the tables (see refattn._agnostic._scores).
    mod = make(True)
    setattr(mod, "on_block", make(False))  # noqa: B010
    return mod


def _with_derivative(mod: Mod, derivative: Mod) -> Mod:
    # The attribute attention_backward looks for; set with setattr to keep the type
    # checker from treating function attributes as an error.
    setattr(mod, "derivative", derivative)  # noqa: B010
    return mod


# --- mask mods ---------------------------------------------------------------------------


def causal(alignment: str = "top_left", L: int | None = None, S: int | None = None) -> Mod:
    """Causal mask_mod: query i may attend key j when ``j <= i + shift``.

    Parameters
    ----------
    alignment : {"top_left", "bottom_right"}
        shift = 0 (torch's ``is_causal``) or S - L (flash-attn, decoding).
    L, S : int, optional
        Query and key lengths; needed for ``"bottom_right"`` only.

    Returns
    -------
    callable
        ``mask_mod(b, h, q_idx, kv_idx)`` -> bool array, True = take part. Equivalent to
        ``attention(causal=True, alignment=alignment)``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> q_idx, kv_idx = np.arange(2)[:, None], np.arange(4)[None, :]
    >>> mods.causal("bottom_right", L=2, S=4)(None, None, q_idx, kv_idx).astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1]])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    >>> out = refattn.attention(q, k, v, mask_mod=mods.causal())
    >>> bool(np.allclose(out, refattn.attention(q, k, v, causal=True)))
    True
    """
    shift = _shift(alignment, L, S, "causal")

    def causal_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= q_idx + shift

    return causal_mask_mod


def sliding_window(left: int | None, right: int | None = 0, *, alignment: str = "top_left",
                   L: int | None = None, S: int | None = None) -> Mod:
    """Sliding-window mask_mod: query i sees keys ``i + shift - left .. i + shift + right``.

    Parameters
    ----------
    left, right : int or None
        How many keys before and after the query's own position it sees; None or -1
        means unlimited on that side. ``right=0`` (the default) makes it causal.
    alignment : {"top_left", "bottom_right"}
        shift = 0 or S - L, as for ``attention(window=...)``.
    L, S : int, optional
        Query and key lengths; needed for ``"bottom_right"`` only.

    Returns
    -------
    callable
        ``mask_mod(b, h, q_idx, kv_idx)``; equivalent to
        ``attention(window=(left, right), alignment=alignment)``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn import mods
    >>> q_idx, kv_idx = np.arange(4)[:, None], np.arange(4)[None, :]
    >>> mods.sliding_window(1, 0)(None, None, q_idx, kv_idx).astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]])
    """
    band = Window.parse((left, right), name="(left, right)", typed=True)
    shift = _shift(alignment, L, S, "sliding_window")

    def sliding_window_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return band.allows(q_idx + shift, kv_idx)

    return sliding_window_mask_mod


def prefix_lm(prefix_length: Any) -> Mod:
    """Prefix-LM mask_mod: bidirectional within the prefix, causal after it.

    Query i may attend key j when ``j < prefix_length`` or ``j <= i`` (top-left
    positions: self-attention over one sequence, L = S).

    Parameters
    ----------
    prefix_length : int or integer array
        The prefix length, shared by the batch; or one per flat batch index: a 1-D
        integer array of the input library with one entry per batch element (batch dims
        flattened in C order).

    Returns
    -------
    callable
        ``mask_mod(b, h, q_idx, kv_idx)``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> q_idx, kv_idx = np.arange(4)[:, None], np.arange(4)[None, :]
    >>> mods.prefix_lm(2)(None, None, q_idx, kv_idx).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 1]])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1, 4, 8)) for _ in range(3))  # B=2
    >>> out = refattn.attention(q, k, v, mask_mod=mods.prefix_lm(np.asarray([1, 3])))
    >>> out.shape
    (2, 1, 4, 8)
    """
    if isinstance(prefix_length, numbers.Integral) and not isinstance(prefix_length, bool):
        fixed = _count("prefix_length", prefix_length)

        def prefix_lm_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (kv_idx <= q_idx) | (kv_idx < fixed)

        return prefix_lm_mask_mod
    lengths = _array("prefix_length", prefix_length, "integral", (1,))

    def make(whole: bool) -> Mod:
        def prefix_lm_batched_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            xp = _namespace("prefix_length", lengths, q_idx)
            _check_batch("prefix_length", lengths.shape[0], b, whole)
            per_batch = _gather(xp, lengths, b)  # (*batch, 1, 1, 1)
            return (kv_idx <= q_idx) | (kv_idx < per_batch)

        return prefix_lm_batched_mask_mod

    return _block_aware(make)


def document_mask(doc_ids_q: Any, doc_ids_kv: Any = None) -> Mod:
    """Document mask_mod: a query attends only keys of its own document.

    Query i may attend key j when ``doc_ids_q[i] == doc_ids_kv[j]`` (per batch row for
    2-D ids). Combine it with ``causal=True`` for packed causal language modelling.

    Parameters
    ----------
    doc_ids_q : integer array
        Document id of each query position, (L,) shared by the batch or (B, L) with one
        row per flat batch index; an array of the input library.
    doc_ids_kv : integer array, optional
        Document id of each key position, (S,) or (B, S), of the same rank as
        ``doc_ids_q``; defaults to ``doc_ids_q`` (self-attention).

    Returns
    -------
    callable
        ``mask_mod(b, h, q_idx, kv_idx)``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> doc = np.asarray([0, 0, 1, 1, 1])
    >>> idx = np.arange(5)
    >>> mods.document_mask(doc)(None, None, idx[:, None], idx[None, :]).astype(int)
    array([[1, 1, 0, 0, 0],
           [1, 1, 0, 0, 0],
           [0, 0, 1, 1, 1],
           [0, 0, 1, 1, 1],
           [0, 0, 1, 1, 1]])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 4)) for _ in range(3))
    >>> out = refattn.attention(q, k, v, causal=True, mask_mod=mods.document_mask(doc))
    >>> out.shape
    (1, 5, 4)
    """
    ids_q = _array("doc_ids_q", doc_ids_q, "integral", (1, 2))
    ids_kv = ids_q if doc_ids_kv is None else _array("doc_ids_kv", doc_ids_kv, "integral", (1, 2))
    if ids_kv.ndim != ids_q.ndim or (ids_q.ndim == 2 and ids_q.shape[0] != ids_kv.shape[0]):
        raise ValueError(
            "doc_ids_q and doc_ids_kv must both be 1-D, or both 2-D with the same batch "
            f"size; got shapes {tuple(ids_q.shape)} and {tuple(ids_kv.shape)}"
        )
    if library_name(ids_q) != library_name(ids_kv):
        raise TypeError(
            f"doc_ids_q is a {library_name(ids_q)} array but doc_ids_kv is a "
            f"{library_name(ids_kv)} array; give both from the input library"
        )

    def make(whole: bool) -> Mod:
        def document_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            xp = _namespace("doc_ids_q", ids_q, q_idx)
            nq, nk = ids_q.shape[-1], ids_kv.shape[-1]
            _check_index_range("doc_ids_q", nq, q_idx, xp, "query")
            _check_index_range("doc_ids_kv", nk, kv_idx, xp, "key")
            if ids_q.ndim == 1:
                return _gather(xp, ids_q, q_idx) == _gather(xp, ids_kv, kv_idx)
            _check_batch("doc_ids_q", ids_q.shape[0], b, whole)
            # Row b of a (B, n) array, flattened: b * n + position; (*batch, 1, L, 1) and
            # (*batch, 1, 1, S) grids, compared into (*batch, 1, L, S).
            return _gather(xp, ids_q, b * nq + q_idx) == _gather(xp, ids_kv, b * nk + kv_idx)

        return document_mask_mod

    return _block_aware(make)


# --- score mods --------------------------------------------------------------------------


def _check_heads(name: str, values: Any, heads: int, h: Any, whole: bool) -> None:
    # The table's head count against the grid's: h is (H, 1, 1) on whole grids, one run
    # of heads on a block of the blocked path (checked whole before the blocks).
    if not whole:
        _check_block_index(h, heads, f"{name} has {heads} heads (shape {tuple(values.shape)})")
    elif heads != h.shape[0]:
        raise ValueError(
            f"{name} has {heads} heads (shape {tuple(values.shape)}) but attention has "
            f"H={h.shape[0]} query heads"
        )


def _per_head(xp: Any, values: Any, b: Any, h: Any, name: str, whole: bool) -> Any:
    # values (H,) -> (H, 1, 1); (B, H) -> (*batch, H, 1, 1) by the flat batch index.
    H = values.shape[-1]
    _check_heads(name, values, H, h, whole)
    if values.ndim == 1:
        return _gather(xp, values, h)
    _check_batch(name, values.shape[0], b, whole)
    return _gather(xp, values, b * H + h)


def alibi(slopes: Any, *, alignment: str = "top_left", L: int | None = None,
          S: int | None = None) -> Mod:
    """ALiBi score_mod: adds ``-slope_h * |i + shift - j|`` to the score of (i, j).

    Parameters
    ----------
    slopes : float array
        One slope per query head, (H,), or per flat batch index and head, (B, H); an
        array of the input library.
    alignment : {"top_left", "bottom_right"}
        Where distance 0 lies: shift = 0 or S - L (flash-attn uses bottom-right).
    L, S : int, optional
        Query and key lengths; needed for ``"bottom_right"`` only.

    Returns
    -------
    callable
        ``score_mod(score, b, h, q_idx, kv_idx)`` with ``derivative`` 1. Equivalent to
        ``attention(alibi_slopes=slopes, alignment=alignment)``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> slopes = np.asarray([0.5, 0.25])
    >>> h, q_idx, kv_idx = np.arange(2)[:, None, None], np.arange(3)[:, None], np.arange(3)
    >>> mods.alibi(slopes)(np.zeros((3, 3)), None, h, q_idx, kv_idx[None, :])[0]
    array([[ 0. , -0.5, -1. ],
           [-0.5,  0. , -0.5],
           [-1. , -0.5,  0. ]])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    >>> out = refattn.attention(q, k, v, score_mod=mods.alibi(slopes))
    >>> bool(np.allclose(out, refattn.attention(q, k, v, alibi_slopes=slopes)))
    True
    """
    table = _array("slopes", slopes, "real floating", (1, 2))
    shift = _shift(alignment, L, S, "alibi")

    def make(whole: bool) -> Mod:
        def alibi_score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            xp = _namespace("slopes", table, score)
            slope = xp.astype(_per_head(xp, table, b, h, "slopes", whole), score.dtype)
            distance = xp.astype(xp.abs(q_idx + shift - kv_idx), score.dtype)
            return score - slope * distance

        return _with_derivative(alibi_score_mod, _ones_like)

    return _block_aware(make)


def softcap(cap: float) -> Mod:
    """Soft-capping score_mod ``cap * tanh(score / cap)`` (Gemma 2, Grok).

    As a score_mod it acts after bias and ALiBi; ``attention(softcap=cap)`` instead
    caps the scaled scores before them (flash-attn's order). Without a bias or ALiBi the
    two agree.

    Parameters
    ----------
    cap : float
        The cap, a finite positive number; scores map into (-cap, cap).

    Returns
    -------
    callable
        ``score_mod(score, b, h, q_idx, kv_idx)`` with ``derivative``
        ``1 - tanh(score / cap)**2``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> mod = mods.softcap(2.0)
    >>> s = np.asarray([0.0, 2.0, 100.0])
    >>> mod(s, None, None, None, None)
    array([0.        , 1.52318831, 2.        ])
    >>> mod.derivative(s, None, None, None, None)
    array([1.        , 0.41997434, 0.        ])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    >>> out = refattn.attention(q, k, v, score_mod=mod)
    >>> bool(np.allclose(out, refattn.attention(q, k, v, softcap=2.0)))
    True
    """
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
        raise TypeError(f"softcap cap must be a real number; got {type(cap).__name__} {cap!r}")
    c = float(cap)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap cap must be finite and positive; got {c}")

    def softcap_score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        xp = array_api_compat.array_namespace(score)
        return xp.tanh(score / c) * c

    def derivative(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        xp = array_api_compat.array_namespace(score)
        t = xp.tanh(score / c)
        return 1 - t * t

    return _with_derivative(softcap_score_mod, derivative)


def relative_position_bias(table: Any, max_distance: int | None = None, *,
                           alignment: str = "top_left", L: int | None = None,
                           S: int | None = None) -> Mod:
    """Learned relative-position bias score_mod: adds ``table[h, clip(j - i - shift) + m]``.

    The relative position ``j - (i + shift)`` of key j to query i is clipped to
    ``[-m, m]`` (m = ``max_distance``), so all keys further than m share the edge
    entries, as in Shaw et al. and T5 without T5's logarithmic buckets.

    Parameters
    ----------
    table : float array
        (H, 2m + 1) per head, or (2m + 1,) shared by the heads; entry m is relative
        position 0. An array of the input library.
    max_distance : int, optional
        m; defaults to ``(table.shape[-1] - 1) // 2`` (the width must be odd).
    alignment : {"top_left", "bottom_right"}
        shift = 0 or S - L.
    L, S : int, optional
        Query and key lengths; needed for ``"bottom_right"`` only.

    Returns
    -------
    callable
        ``score_mod(score, b, h, q_idx, kv_idx)`` with ``derivative`` 1.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> from refattn import mods
    >>> table = np.asarray([[-2.0, -1.0, 0.0, 1.0, 2.0]])     # H=1, m=2
    >>> h, i, j = np.zeros((1, 1, 1), dtype=int), np.arange(2)[:, None], np.arange(5)[None]
    >>> mods.relative_position_bias(table)(np.zeros((2, 5)), None, h, i, j)[0]
    array([[ 0.,  1.,  2.,  2.,  2.],
           [-1.,  0.,  1.,  2.,  2.]])
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4)) for _ in range(3))
    >>> k, v = (rng.standard_normal((1, 5, 4)) for _ in range(2))
    >>> out = refattn.attention(q, k, v, score_mod=mods.relative_position_bias(table))
    >>> out.shape
    (1, 2, 4)
    """
    values = _array("table", table, "real floating", (1, 2))
    width = values.shape[-1]
    if max_distance is None:
        if width % 2 == 0:
            raise ValueError(
                f"table's last axis must have odd length 2 * max_distance + 1; got shape "
                f"{tuple(values.shape)}"
            )
        m = (width - 1) // 2
    else:
        m = _count("max_distance", max_distance)
        if width != 2 * m + 1:
            raise ValueError(
                f"table's last axis must have length 2 * max_distance + 1 = {2 * m + 1}; "
                f"got shape {tuple(values.shape)}"
            )
    shift = _shift(alignment, L, S, "relative_position_bias")

    def make(whole: bool) -> Mod:
        def relative_position_score_mod(score: Any, b: Any, h: Any, q_idx: Any,
                                        kv_idx: Any) -> Any:
            xp = _namespace("table", values, score)
            column = xp.clip(kv_idx - (q_idx + shift), min=-m, max=m) + m  # (L, S)
            if values.ndim == 1:
                added = _gather(xp, values, column)
            else:
                _check_heads("table", values, values.shape[0], h, whole)
                added = _gather(xp, values, h * width + column)  # (H, L, S)
            return score + xp.astype(added, score.dtype)

        return _with_derivative(relative_position_score_mod, _ones_like)

    return _block_aware(make)
