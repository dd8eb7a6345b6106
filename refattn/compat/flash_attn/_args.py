"""Argument checks shared by the flash-attn front-ends: ``window_size``/``causal``
normalisation (``flash_window``), softcap, the LSE convention, shapes, and the LSE and
``S_dmask`` in flash-attn's form."""

from __future__ import annotations

import numbers
import operator
from typing import Any, NamedTuple

from ... import _validate

LSE_CONVENTIONS = ("fa2", "fa3")


# --- argument translation ----------------------------------------------------------------


class _FlashWindow(NamedTuple):
    """flash-attn's causal / window_size arguments as refattn sees them."""

    window: tuple[int | None, int | None] | None  # bottom-right (left, right), None = all
    causal_alibi: bool  # the kernel's "is_causal" branch, which writes ALiBi as +slope * j


def _window_edge(index: int, value: Any) -> int:
    """One window edge as a Python int: an int, or a 0-d integer array or tensor (as
    flash-attn's own tests pass it)."""
    side = ("left", "right")[index]
    seen = f"{type(value).__name__} {value!r}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        # A 0-d array converts through __index__ (NumPy, torch, array-api-strict all
        # define it for integer 0-d arrays); a bool or float dtype is refused rather
        # than truncated.
        if tuple(value.shape) != () or "bool" in str(value.dtype) or not any(
                kind in str(value.dtype) for kind in ("int", "uint")):
            raise TypeError(
                f"window_size[{index}] ({side}) must be an int or a 0-d integer array "
                f"(-1 = unlimited); got {seen}"
            )
        value = operator.index(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"window_size[{index}] ({side}) must be an int (-1 = unlimited); got {seen}"
        )
    if value < -1:
        # flash-attn reads every negative value as "unlimited"; anything but -1 is far
        # more likely a slip than a request, so it is refused rather than guessed at.
        raise ValueError(
            f"window_size[{index}] ({side}) must be >= 0, or -1 for unlimited; got "
            f"{int(value)}"
        )
    return int(value)


def _check_window_size(window_size: Any) -> tuple[int, int]:
    if hasattr(window_size, "shape") and tuple(window_size.shape) == (2,):
        window_size = (window_size[0], window_size[1])  # a (2,) integer array or tensor
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(
            f"window_size must be a pair (left, right) of ints, -1 = unlimited; got "
            f"{window_size!r}"
        )
    return _window_edge(0, window_size[0]), _window_edge(1, window_size[1])


def flash_window(window_size: Any, causal: Any, *, seqlen_q: int, seqlen_k: int,
                 has_alibi: bool, version: int = 2) -> _FlashWindow:
    """flash-attn's normalisation of ``causal`` and ``window_size``: flash-attn 2's
    (mha_fwd, mha_varlen_fwd and mha_fwd_kvcache in csrc/flash_attn/flash_api.cpp, then
    set_params_fprop) or, with ``version=3``, flash-attn 3's (hopper/flash_api.cpp).

    An internal helper shared by this package's front-ends, the audit behind
    ``refattn check`` (``refattn._audit``) and ``refattn.testing.strategies``; it is
    not public API.

    ``seqlen_k`` is the length the C++ front-end clamps with: S for flash_attn_func,
    ``max_seqlen_k`` for the varlen form, the cache capacity for the KV cache. Its quirk
    is kept: with a finite left edge, an unlimited (-1) or too large right edge becomes
    ``seqlen_k``, which hides every key from the first L - S - 1 queries when L > S + 1.

    flash-attn 3 clamps differently, and never in a way that changes the result: an edge
    it calls unlimited (left >= seqlen_k - 1, right >= seqlen_q - 1) or -1 becomes
    seqlen_k - 1 (left) or seqlen_q - 1 (right), which reach every key of every row
    anyway. Its window is therefore the literal one, -1 = unlimited.

    Parameters
    ----------
    window_size : (int, int)
        flash-attn's ``(left, right)``, -1 = unlimited; ints, or 0-d integer arrays.
    causal : bool
        flash-attn's ``causal``.
    seqlen_q, seqlen_k : int
        The query length and the length the C++ front-end clamps with (see above).
    has_alibi : bool
        Whether ALiBi slopes are given (they change what ``causal`` means).
    version : {2, 3}
        Whose clamping: flash-attn 2's (the default) or flash-attn 3's (flash-attn 4's
        is flash-attn 3's).

    Returns
    -------
    _FlashWindow
        ``window``, refattn's bottom-right ``(left, right)`` or None for no window, and
        ``causal_alibi``, whether the kernel's causal ALiBi branch applies.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    left, right = _check_window_size(window_size)
    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3; got {version!r}")
    if version == 3:
        # flash-attn 3 has no ALiBi, hence no causal ALiBi branch; causal only closes
        # the right edge.
        if causal:
            right = 0
        literal = (None if left < 0 else left, None if right < 0 else right)
        return _FlashWindow(None if literal == (None, None) else literal, False)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False  # one query at the last key position sees every key either way
    if causal:
        right = 0
    is_causal = left < 0 and right == 0
    if left < 0 and right < 0:
        return _FlashWindow(None, False)
    if left < 0:
        left = seqlen_k
    if right < 0:
        right = seqlen_k
    return _FlashWindow((left, right), is_causal and has_alibi)


def _softcap(softcap: Any) -> float | None:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0 = off); got {softcap!r}")
    value = float(softcap)
    if value < 0 or value != value:
        raise ValueError(f"softcap must be >= 0 (0 turns it off); got {value}")
    return value if value > 0 else None


def _check_convention(lse_convention: Any) -> None:
    _validate.check_choice("lse_convention", lse_convention, LSE_CONVENTIONS)


def _not_implemented(name: str, value: Any, function: str, hint: str) -> None:
    if value is not None:
        raise NotImplementedError(
            f"{name} is not implemented by refattn's {function} front-end; {hint}"
        )


def _compute_inputs(xp: Any, named: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    """(the inputs' one dtype, the arrays of ``named`` in order, widened if 16-bit)."""
    # The dtypes are compared before widening: afterwards float16 q with float64 k would
    # look like one dtype and pass silently.
    dtype = _validate.check_one_dtype(named)
    arrays = tuple(named.values())
    # float16/bfloat16 inputs are widened to float64 here so that the output is rounded
    # once, float64 -> input dtype, and the LSE can come back in float32 (flash-attn's
    # dtype) instead of being rounded to the 16-bit input dtype first.
    if dtype in (xp.float32, xp.float64):
        return dtype, arrays
    return dtype, tuple(None if x is None else xp.astype(x, xp.float64) for x in arrays)


def _lse_dtype(xp: Any, dtype: Any) -> Any:
    return xp.float64 if dtype == xp.float64 else xp.float32


def _flash_lse(lse: Any, *, convention: str, slopes: Any, q_pos: Any, dtype: Any,
               xp: Any) -> Any:
    """refattn's LSE (-inf on rows that see no key) in flash-attn's convention.

    ``slopes`` and ``q_pos`` (broadcasting to ``lse``) are given on the kernel's causal
    ALiBi branch, which adds ``+slope * j`` instead of ``-slope * |i + S - L - j|``: the
    two differ by the row constant ``slope * (i + S - L)``, which leaves the softmax
    unchanged but is part of the LSE the kernel returns.
    """
    if slopes is not None:
        lse = lse + slopes * xp.astype(q_pos, lse.dtype)
    # The kernels test the row's exp-sum: 0 (no key) or NaN give +inf (FA2), -inf (FA3).
    empty = xp.isnan(lse) | (lse == -xp.inf)
    fill = xp.asarray(xp.inf if convention == "fa2" else -xp.inf, dtype=lse.dtype,
                      device=lse.device)
    return xp.astype(xp.where(empty, fill, lse), dtype)


def _s_dmask(weights: Any, keep: Any, xp: Any) -> Any:
    # flash-attn's S_dmask marks dropped entries by a negative sign.
    return weights if keep is None else xp.where(keep, weights, -weights)


def _shape4(name: str, x: Any, legend: str) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D {legend}; got shape {tuple(x.shape)}")
    B, L, H, D = x.shape
    return int(B), int(L), int(H), int(D)


def _check_kv_pair(k_shape: tuple[int, ...], v_shape: tuple[int, ...], k_name: str,
                   v_name: str) -> None:
    if k_shape[:-1] != v_shape[:-1]:
        raise ValueError(
            f"{k_name} and {v_name} must agree on all axes but the last (flash-attn gives "
            f"keys and values the same heads); got shapes {k_shape} and {v_shape}"
        )

