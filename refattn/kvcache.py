"""Decoding with a key/value cache: flash-attn's ``flash_attn_with_kvcache``.

Sequence b of the batch has ``cache_seqlens[b]`` keys and values in its cache; the step's
new keys and values (if any) are written right after them, and the queries then
attend the valid prefix: the first ``cache_seqlens[b] + Lnew`` keys, with causal and
window positions aligned bottom-right to that prefix (the last query sits at the last
valid key). The cache is contiguous, (B, S_cache, K, E), or paged,
(num_blocks, page_size, K, E) with a ``block_table`` that lists each sequence's pages.

flash-attn writes the new entries into the cache in place; refattn returns new cache
arrays and never writes into its inputs (the array API has no in-place scatter that
every library shares): the writes are a gather plus ``where`` over index grids. A
contiguous cache is handled as a paged one with one page per sequence.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from . import _validate
from ._front_door import attention
from ._namespace import infer_namespace
from ._window import Window

__all__ = ["KVCacheResult", "attention_with_kvcache"]


class KVCacheResult(NamedTuple):
    """What ``attention_with_kvcache`` returns.

    Attributes
    ----------
    out : array
        (B, Lq, H, Ev) output.
    k_cache, v_cache : array
        The caches with the step's keys and values written in, in the layout given
        (the input arrays themselves when there was nothing to write).
    lse : array or None
        (B, H, Lq) log-sum-exp of the scores (-inf on rows that see no key), when asked
        for with ``return_lse``.
    """

    out: Any
    k_cache: Any
    v_cache: Any
    lse: Any


def _shape(name: str, x: Any, legend: str) -> tuple[int, ...]:
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D {legend}; got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _seqlens(cache_seqlens: Any, B: int, *, xp: Any, device: Any) -> Any:
    """``cache_seqlens`` as a (B,) int64 array (an int is shared by the batch)."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        n = int(cache_seqlens)
        if n < 0:
            raise ValueError(f"cache_seqlens must be non-negative; got {n}")
        return xp.full((B,), n, dtype=xp.int64, device=device)
    if not hasattr(cache_seqlens, "dtype"):
        raise TypeError(
            "cache_seqlens must be an int or a (B,) integer array; got "
            f"{type(cache_seqlens).__name__}"
        )
    if not xp.isdtype(cache_seqlens.dtype, "integral"):
        raise TypeError(f"cache_seqlens must have an integer dtype; got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(
            f"cache_seqlens must have shape (B,) = ({B},); got {tuple(cache_seqlens.shape)}"
        )
    lens = xp.astype(cache_seqlens, xp.int64)
    if bool(xp.any(lens < 0)):
        b = int(xp.argmax(xp.astype(lens < 0, xp.int8)))
        raise ValueError(f"cache_seqlens must be non-negative; got cache_seqlens[{b}] = "
                         f"{int(lens[b])}")
    return lens


def _first(flags: Any, xp: Any) -> int:
    # Flat index of the first True of a boolean array (which must have one).
    return int(xp.argmax(xp.astype(xp.reshape(flags, (-1,)), xp.int8)))


def _check_block_table(table: Any, valid: Any, num_blocks: int, page_size: int, *,
                       xp: Any) -> Any:
    """The block table with unused entries replaced by 0 (they are never read)."""
    if not xp.isdtype(table.dtype, "integral"):
        raise TypeError(f"block_table must have an integer dtype; got {table.dtype}")
    table = xp.astype(table, xp.int64)
    B, max_blocks = table.shape
    columns = xp.reshape(xp.arange(max_blocks, dtype=xp.int64, device=table.device),
                         (1, max_blocks))
    # Page c of sequence b is used when it holds a position below the valid length.
    used = columns * page_size < xp.reshape(valid, (B, 1))
    bad = used & ((table < 0) | (table >= num_blocks))
    if bool(xp.any(bad)):
        b, c = divmod(_first(bad, xp), max_blocks)
        raise ValueError(
            f"block_table[{b}, {c}] = {int(table[b, c])} is not a block of the cache "
            f"(0 .. {num_blocks - 1}); sequence {b} uses its first "
            f"ceil({int(valid[b])} / {page_size}) pages"
        )
    return xp.where(used, table, xp.zeros_like(table))


def _slots(table: Any, positions: Any, page_size: int, *, xp: Any) -> Any:
    """Flat cache slot (block * page_size + offset) of logical ``positions`` (B, n)."""
    B, max_blocks = table.shape
    rows = xp.reshape(xp.arange(B, dtype=xp.int64, device=table.device), (B, 1))
    page = xp.take(xp.reshape(table, (-1,)), xp.reshape(rows * max_blocks
                                                         + positions // page_size, (-1,)))
    return xp.reshape(page, positions.shape) * page_size + positions % page_size


def _write(cache: Any, new: Any, targets: Any, *, xp: Any) -> Any:
    """A copy of ``cache`` with ``new`` (B, Lnew, ...) written at flat slots ``targets``.

    ``targets`` (B * Lnew,) must be distinct. Every slot looks itself up in the sorted
    targets (searchsorted) and takes the new entry it finds, or keeps its old one.
    """
    num_blocks, page_size, heads, dim = cache.shape
    n_slots = num_blocks * page_size
    flat = xp.reshape(cache, (n_slots, heads, dim))
    entries = xp.reshape(new, (-1, heads, dim))
    n = targets.shape[0]
    order = xp.argsort(targets, stable=True)
    ordered = xp.take(targets, order)
    slots = xp.arange(n_slots, dtype=xp.int64, device=targets.device)
    where = xp.astype(xp.searchsorted(ordered, slots, side="left"), xp.int64)
    where = xp.clip(where, max=n - 1)
    hit = xp.take(ordered, where) == slots
    source = xp.take(entries, xp.take(order, where), axis=0)
    written = xp.where(xp.reshape(hit, (n_slots, 1, 1)), source, flat)
    return xp.reshape(written, cache.shape)


def _visibility(valid: Any, Lq: int, capacity: int,
                allowed_window: Window | None, *, xp: Any,
                device: Any) -> tuple[Any, Any]:
    """(B, 1, Lq, capacity) "may attend" mask and (B, 1, Lq, capacity) ALiBi distances.

    Query i of sequence b sits at key position i + valid_b - Lq (bottom-right); it may
    attend the valid keys (positions below valid_b) inside its window.
    """
    B = valid.shape[0]
    positions = xp.reshape(xp.arange(capacity, dtype=xp.int64, device=device),
                           (1, 1, 1, capacity))
    q_pos = (xp.reshape(xp.arange(Lq, dtype=xp.int64, device=device), (1, 1, Lq, 1))
             + xp.reshape(valid - Lq, (B, 1, 1, 1)))
    mask = positions < xp.reshape(valid, (B, 1, 1, 1))
    if allowed_window is not None:
        mask = mask & allowed_window.allows(q_pos, positions)
    return mask, xp.abs(q_pos - positions)


def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    k: Any = None,
    v: Any = None,
    cache_seqlens: Any,
    block_table: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    masked_rows: str = "zero",
    return_lse: bool = False,
    xp: Any = None,
) -> KVCacheResult:
    """Attention of new queries over a key/value cache, appending the step's keys first.

    For each sequence b: write ``k[b]``, ``v[b]`` (Lnew entries) at cache positions
    ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1``, then attend ``q[b]`` over the
    first ``n_b = cache_seqlens[b] + Lnew`` cached keys, with query i at key position
    ``i + n_b - Lq`` (bottom-right alignment) for ``causal``, ``window`` and ALiBi.
    Equal to ``refattn.attention`` over the concatenated keys with
    ``alignment="bottom_right"``, one sequence at a time.

    Parameters
    ----------
    q : array
        (B, Lq, H, E) queries (flash-attn's layout).
    k_cache, v_cache : array
        Contiguous caches (B, S_cache, K, E) and (B, S_cache, Kv, Ev), or paged caches
        (num_blocks, page_size, K, E) and (num_blocks, page_size, Kv, Ev) with
        ``block_table``. Entries past each sequence's valid length are never read (they
        may hold anything, NaN included). The dtype of q.
    k, v : array, optional
        The step's new keys (B, Lnew, K, E) and values (B, Lnew, Kv, Ev); both or neither.
    cache_seqlens : int or integer array
        Entries already in each sequence's cache, shared (int) or (B,).
    block_table : integer array, optional
        (B, max_blocks): page ``block_table[b, p // page_size]`` of the cache holds
        position p of sequence b at offset ``p % page_size``. Entries for pages past the
        valid length are ignored; the pages written by the step must not be shared.
    causal : bool
        Query i sees keys j <= i + n_b - Lq.
    window : (left, right), optional
        Query i sees keys i + n_b - Lq - left .. i + n_b - Lq + right; None or -1 =
        unlimited on that side. Intersected with ``causal``.
    scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E).
    softcap : float, optional
        ``softcap * tanh(s / softcap)`` on the scaled scores.
    alibi_slopes : float array, optional
        (H,) or (B, H): adds ``-slope * |i + n_b - Lq - j|``.
    masked_rows : {"zero", "nan"}
        Output of a query row that sees none of its sequence's keys (a window that
        misses them all): 0, or NaN (the plain softmax). A sequence with no keys at all
        (n_b = 0) gives 0 either way, as ``attention`` does for S = 0. JAX's "uniform"
        is not offered: it would average over the unused cache entries too.
    return_lse : bool
        Also return the LSE (B, H, Lq).
    xp : namespace or str, optional
        The array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    KVCacheResult
        ``(out, k_cache, v_cache, lse)``: the output (B, Lq, H, Ev), the updated caches
        (new arrays; the inputs are never written), and the LSE or None. Unpack all
        four, or use the field names.

    Raises
    ------
    TypeError
        Mixed libraries or dtypes, non-integer ``cache_seqlens`` or ``block_table``.
    ValueError
        Shapes that do not fit together, only one of k and v, positions that overflow
        the cache, negative ``cache_seqlens``, block table entries outside the cache,
        two new entries written to one slot; the rest as ``attention``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> B, H, E = 2, 2, 4
    >>> k_cache, v_cache = (rng.standard_normal((B, 8, H, E)) for _ in range(2))
    >>> q, k, v = (rng.standard_normal((B, 1, H, E)) for _ in range(3))   # one step
    >>> lens = np.asarray([3, 5])
    >>> res = refattn.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
    ...                                      cache_seqlens=lens, causal=True)
    >>> res.out.shape
    (2, 1, 2, 4)
    >>> bool(np.array_equal(res.k_cache[1, 5], k[1, 0]))       # written at position 5
    True
    >>> keys = np.concatenate([k_cache[1, :5], k[1]])             # sequence 1: 6 keys
    >>> values = np.concatenate([v_cache[1, :5], v[1]])
    >>> full = refattn.attention(q[1], keys, values, layout="BLHD")
    >>> bool(np.allclose(res.out[1], full))
    True
    """
    xp, device = infer_namespace(
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
         "alibi_slopes": alibi_slopes},
        {"cache_seqlens": cache_seqlens if hasattr(cache_seqlens, "dtype") else None,
         "block_table": block_table},
        xp=xp, required=("q", "k_cache", "v_cache"),
    )
    _validate.check_choice("masked_rows", masked_rows, ("zero", "nan"))
    B, Lq, H, E = _shape("q", q, "(B, Lq, H, E)")
    paged = block_table is not None
    cache_legend = "(num_blocks, page_size, {}, {})" if paged else "(B, S_cache, {}, {})"
    n_pages, page_size, K, Ek = _shape("k_cache", k_cache, cache_legend.format("K", "E"))
    vshape = _shape("v_cache", v_cache, cache_legend.format("Kv", "Ev"))
    Kv, Ev = vshape[2], vshape[3]
    if vshape[:2] != (n_pages, page_size):
        raise ValueError(
            f"k_cache and v_cache must agree on their first two axes; got shapes "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if Ek != E:
        raise ValueError(
            f"k_cache's head dim must equal q's E={E}; got shape {tuple(k_cache.shape)}"
        )
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {x.dtype}")
    if (k is None) != (v is None):
        raise ValueError("give both k and v (the step's new keys and values), or neither")
    L_new = 0
    if k is not None:
        kshape = _shape("k", k, "(B, Lnew, K, E)")
        vnew = _shape("v", v, "(B, Lnew, Kv, Ev)")
        L_new = kshape[1]
        if kshape != (B, L_new, K, E) or vnew != (B, L_new, Kv, Ev):
            raise ValueError(
                f"k and v must have shapes (B, Lnew, K, E) = {(B, L_new, K, E)} and "
                f"(B, Lnew, Kv, Ev) = {(B, L_new, Kv, Ev)} to fit q and the caches; got "
                f"{kshape} and {vnew}"
            )
        for name, x in (("k", k), ("v", v)):
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}; got {x.dtype}")
    if paged:
        if block_table.ndim != 2 or block_table.shape[0] != B:
            raise ValueError(
                f"block_table must have shape (B, max_blocks) with B={B}; got "
                f"{tuple(block_table.shape)}"
            )
        capacity = block_table.shape[1] * page_size
    else:
        if n_pages != B:
            raise ValueError(
                f"a contiguous k_cache must have B={B} rows (B, S_cache, K, E); got shape "
                f"{tuple(k_cache.shape)} (pass block_table for a paged cache)"
            )
        capacity = page_size
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(
            f"alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({B}, {H}); got "
            f"{tuple(alibi_slopes.shape)}"
        )
    allowed_window = Window.merge(
        causal=causal, window=None if window is None else Window.parse(window, typed=True))

    cached = _seqlens(cache_seqlens, B, xp=xp, device=device)
    valid = cached + L_new
    if bool(xp.any(valid > capacity)):
        b = _first(valid > capacity, xp)
        raise ValueError(
            f"sequence {b} would need {int(valid[b])} cache positions (cache_seqlens "
            f"{int(cached[b])} + {L_new} new) but the cache holds {capacity} per sequence"
        )
    if paged:
        table = _check_block_table(block_table, valid, n_pages, page_size, xp=xp)
    else:
        # Sequence b owns "page" b: the whole contiguous row.
        table = xp.reshape(xp.arange(B, dtype=xp.int64, device=device), (B, 1))

    if L_new:
        steps = xp.reshape(xp.arange(L_new, dtype=xp.int64, device=device), (1, L_new))
        targets = xp.reshape(
            _slots(table, xp.reshape(cached, (B, 1)) + steps, page_size, xp=xp), (-1,))
        ordered = xp.sort(targets)
        if B * L_new > 1 and bool(xp.any(ordered[1:] == ordered[:-1])):
            raise ValueError(
                "two new entries would be written to one cache slot: block_table gives "
                "sequences a shared page at positions the step writes"
            )
        k_cache = _write(k_cache, k, targets, xp=xp)
        v_cache = _write(v_cache, v, targets, xp=xp)

    # The logical cache of every sequence, (B, capacity, heads, dim), read through the
    # table; entries past the valid length are zeroed, so that garbage there (NaN from
    # uninitialised memory) cannot reach a row through the masked product.
    positions = xp.reshape(xp.arange(capacity, dtype=xp.int64, device=device), (1, capacity))
    slots = xp.reshape(_slots(table, positions + xp.zeros((B, 1), dtype=xp.int64,
                                                          device=device), page_size, xp=xp),
                       (-1,))
    present = positions < xp.reshape(valid, (B, 1))  # (B, capacity)

    def logical(cache: Any) -> Any:
        heads, dim = cache.shape[2], cache.shape[3]
        flat = xp.reshape(cache, (n_pages * page_size, heads, dim))
        rows = xp.reshape(xp.take(flat, slots, axis=0), (B, capacity, heads, dim))
        zero = xp.zeros((), dtype=cache.dtype, device=device)
        return xp.where(xp.reshape(present, (B, capacity, 1, 1)), rows, zero)

    keys, values = logical(k_cache), logical(v_cache)

    mask, distance = _visibility(valid, Lq, capacity, allowed_window, xp=xp, device=device)
    bias = None
    if alibi_slopes is not None:
        slopes = xp.astype(alibi_slopes, xp.float64)
        per_head = xp.reshape(slopes, (1, H, 1, 1) if slopes.ndim == 1 else (B, H, 1, 1))
        bias = -per_head * xp.astype(distance, xp.float64)  # (B, H, Lq, capacity)
    res = attention(
        q, keys, values, mask=mask, bias=bias, scale=scale, softcap=softcap,
        masked_rows="zero", layout="BLHD", return_lse=return_lse, xp=xp,
    )
    out = res.out if return_lse else res
    if masked_rows == "nan":
        # The plain softmax over a sequence's n_b keys is NaN on a row that sees none of
        # them, but an empty sum (0) when n_b = 0: the cache's unused entries must not
        # turn the latter into NaN, so the NaN is put in here, not by attention.
        sees = xp.any(mask, axis=-1)  # (B, 1, Lq or 1)
        blind = xp.logical_and(xp.reshape(valid > 0, (B, 1, 1)), ~sees)
        nan = xp.asarray(xp.nan, dtype=out.dtype, device=device)
        out = xp.where(xp.reshape(blind, (B, blind.shape[-1], 1, 1)), nan, out)
    return KVCacheResult(out, k_cache, v_cache, res.lse if return_lse else None)
