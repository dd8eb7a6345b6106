"""flash-attn 2's packed forms: ``flash_attn_qkvpacked_func``,
``flash_attn_kvpacked_func`` and their varlen forms, unpacked and passed to
:func:`flash_attn_func` / :func:`flash_attn_varlen_func`."""

from __future__ import annotations

from typing import Any

from ..._namespace import infer_namespace
from ._dense import flash_attn_func
from ._varlen import flash_attn_varlen_func

# --- unpacking -------------------------------------------------------------------------------


def _unstack(name: str, x: Any, n: int, axis: int, legend: str, *,
             others: dict[str, Any], xp: Any) -> tuple[Any, ...]:
    """The n arrays stacked along ``axis`` of ``x`` (views where the library gives views).

    The packed arguments are checked first under their own names (``others`` too: the
    offsets), so that an error names what the caller passed, not the unpacked q, k, v.
    """
    infer_namespace({name: x}, others, xp=xp, required=(name, *others))
    if x.ndim != len(legend.split(",")) or x.shape[axis] != n:
        seen = tuple(x.shape)
        raise ValueError(f"{name} must have shape {legend} with {n} along axis {axis}; got "
                         f"{seen}")
    index: list[Any] = [slice(None)] * x.ndim
    parts = []
    for i in range(n):
        index[axis] = i
        parts.append(x[tuple(index)])
    return tuple(parts)


def flash_attn_qkvpacked_func(
    qkv: Any,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **keywords: Any,
) -> Any:
    """``flash_attn.flash_attn_qkvpacked_func``: :func:`flash_attn_func` on q, k, v
    stacked along axis 2.

    Parameters
    ----------
    qkv : array
        (B, L, 3, H, E): q = qkv[:, :, 0], k = qkv[:, :, 1], v = qkv[:, :, 2].
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, \
return_attn_probs :
        As for :func:`flash_attn_func`.
    **keywords
        Keyword only: ``dropout_mask``, ``rng``, ``lse_convention``, ``xp`` as for
        :func:`flash_attn_func`.

    Returns
    -------
    array or tuple
        As :func:`flash_attn_func`.

    Raises
    ------
    ValueError
        ``qkv`` not (B, L, 3, H, E); the rest as :func:`flash_attn_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func, flash_attn_qkvpacked_func
    >>> qkv = np.random.default_rng(0).standard_normal((2, 5, 3, 4, 8))
    >>> out = flash_attn_qkvpacked_func(qkv, causal=True)
    >>> q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    >>> bool(np.array_equal(out, flash_attn_func(q, k, v, causal=True)))
    True
    """
    q, k, v = _unstack("qkv", qkv, 3, 2, "(B, L, 3, H, E)", others={},
                       xp=keywords.get("xp"))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, **keywords)


def flash_attn_kvpacked_func(
    q: Any,
    kv: Any,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **keywords: Any,
) -> Any:
    """``flash_attn.flash_attn_kvpacked_func``: :func:`flash_attn_func` with k and v
    stacked along axis 2.

    Parameters
    ----------
    q : array
        (B, L, H, E).
    kv : array
        (B, S, 2, K, E): k = kv[:, :, 0], v = kv[:, :, 1].
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, \
return_attn_probs :
        As for :func:`flash_attn_func`.
    **keywords
        Keyword only: ``dropout_mask``, ``rng``, ``lse_convention``, ``xp`` as for
        :func:`flash_attn_func`.

    Returns
    -------
    array or tuple
        As :func:`flash_attn_func`.

    Raises
    ------
    ValueError
        ``kv`` not (B, S, 2, K, E); the rest as :func:`flash_attn_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func, flash_attn_kvpacked_func
    >>> rng = np.random.default_rng(0)
    >>> q, kv = rng.standard_normal((1, 3, 4, 8)), rng.standard_normal((1, 6, 2, 2, 8))
    >>> out = flash_attn_kvpacked_func(q, kv, window_size=(2, 0))
    >>> bool(np.array_equal(out, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1],
    ...                                          window_size=(2, 0))))
    True
    """
    k, v = _unstack("kv", kv, 2, 2, "(B, S, 2, K, E)", others={}, xp=keywords.get("xp"))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, **keywords)


def flash_attn_varlen_qkvpacked_func(
    qkv: Any,
    cu_seqlens: Any,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **keywords: Any,
) -> Any:
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: :func:`flash_attn_varlen_func`
    on packed q, k, v stacked along axis 1, with one set of offsets for all three.

    Parameters
    ----------
    qkv : array
        (total, 3, H, E).
    cu_seqlens : integer array
        (B + 1,) offsets, for queries and keys alike.
    max_seqlen : int
        At least the longest sequence.
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, \
return_attn_probs :
        As for :func:`flash_attn_varlen_func`.
    **keywords
        Keyword only: ``dropout_mask``, ``rng``, ``lse_convention``, ``xp`` as for
        :func:`flash_attn_varlen_func`.

    Returns
    -------
    array or tuple
        As :func:`flash_attn_varlen_func`.

    Raises
    ------
    ValueError
        ``qkv`` not (total, 3, H, E); the rest as :func:`flash_attn_varlen_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import (flash_attn_varlen_func,
    ...                                        flash_attn_varlen_qkvpacked_func)
    >>> qkv = np.random.default_rng(0).standard_normal((7, 3, 2, 8))
    >>> cu = np.asarray([0, 3, 7], dtype=np.int32)
    >>> out = flash_attn_varlen_qkvpacked_func(qkv, cu, 4, causal=True)
    >>> want = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 4, 4,
    ...                               causal=True)
    >>> bool(np.array_equal(out, want))
    True
    """
    q, k, v = _unstack("qkv", qkv, 3, 1, "(total, 3, H, E)",
                       others={"cu_seqlens": cu_seqlens}, xp=keywords.get("xp"))
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs, **keywords)


def flash_attn_varlen_kvpacked_func(
    q: Any,
    kv: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **keywords: Any,
) -> Any:
    """``flash_attn.flash_attn_varlen_kvpacked_func``: :func:`flash_attn_varlen_func`
    with packed k and v stacked along axis 1.

    Parameters
    ----------
    q : array
        (total_q, H, E).
    kv : array
        (total_k, 2, K, E).
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, \
causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs :
        As for :func:`flash_attn_varlen_func`.
    **keywords
        Keyword only: ``dropout_mask``, ``rng``, ``lse_convention``, ``xp`` as for
        :func:`flash_attn_varlen_func`.

    Returns
    -------
    array or tuple
        As :func:`flash_attn_varlen_func`.

    Raises
    ------
    ValueError
        ``kv`` not (total_k, 2, K, E); the rest as :func:`flash_attn_varlen_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import (flash_attn_varlen_func,
    ...                                        flash_attn_varlen_kvpacked_func)
    >>> rng = np.random.default_rng(0)
    >>> q, kv = rng.standard_normal((5, 2, 8)), rng.standard_normal((9, 2, 1, 8))
    >>> cu_q, cu_k = np.asarray([0, 2, 5]), np.asarray([0, 4, 9])
    >>> out = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 3, 5)
    >>> want = flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu_k, 3, 5)
    >>> bool(np.array_equal(out, want))
    True
    """
    k, v = _unstack("kv", kv, 2, 1, "(total_k, 2, K, E)", others={}, xp=keywords.get("xp"))
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs,
                                  **keywords)
