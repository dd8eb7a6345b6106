"""The options every kernel takes, checked and packed into kernel arguments.

The forward and both backward kernels share one argument tail: three broadcast
operands (mask, bias, dropout keep-mask), each a pointer plus four element strides of
its (B, H, L, S) view, then the scalars of ``FlashScore`` and the masked-row policy (see
kernels/flash_common.cu). Operands travel in their own compact shape with stride 0
along every broadcast axis: a (L, S) mask is never expanded to (B, H, L, S).

Shape legend: B batch, H query heads, L query length, S key length.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._window import Window

__all__ = [
    "FLAG_BIAS",
    "FLAG_DBIAS",
    "FLAG_KEEP",
    "FLAG_MASK",
    "FLAG_SOFTCAP",
    "MASKED_ROWS",
    "KernelOptions",
    "flatten_batch",
    "kernel_options",
    "window_edges",
]

# The kernels' `flags` bits (enum FlashFlag in flash_common.cu).
FLAG_MASK = 1
FLAG_BIAS = 2
FLAG_KEEP = 4
FLAG_SOFTCAP = 8
FLAG_DBIAS = 16
#: masked_rows policy -> the kernels' code (enum FlashMaskedRows).
MASKED_ROWS = {"zero": 0, "nan": 1, "uniform": 2}

_SCALAR = {"float32": np.float32, "float64": np.float64}
# The score options that are arrays broadcastable to (..., H, L, S).
_OPERANDS = ("mask", "bias", "dropout_mask")


def window_edges(causal: bool, window: Any) -> tuple[int, int]:
    """The kernels' (left, right) window edges, -1 for unlimited, causal merged in.

    Query i sees keys j with ``-left <= j - (i + shift) <= right``; causal is the window
    (None, 0), and with a window the two intersect. ``window`` is a ``Window``, a pair
    (None or -1 = unlimited side) or None.

    Examples
    --------
    >>> window_edges(True, None), window_edges(False, (3, None)), window_edges(True, (2, 5))
    ((-1, 0), (3, -1), (2, 0))
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    merged = Window.merge(causal=causal, window=None if window is None else Window.parse(window))
    return (-1, -1) if merged is None else merged.edges()


def _dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def _operand(name: str, x: Any, shape: tuple[int, int, int, int], kind: str, dtype: str,
             xp: Any) -> tuple[Any, tuple[int, int, int, int]]:
    """`x` as a C-contiguous array with the element strides of its broadcast to `shape`."""
    if kind == "bool" and _dtype_name(x) != "bool":
        raise ValueError(f"{name} must be a boolean array; got dtype {_dtype_name(x)}")
    if kind == "float" and _dtype_name(x) != dtype:
        raise ValueError(f"{name} has dtype {_dtype_name(x)}, expected {dtype}")
    if x.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dims (B, H, L, S); got shape {x.shape}")
    full = (1,) * (4 - x.ndim) + tuple(int(n) for n in x.shape)
    for have, want in zip(full, shape, strict=True):
        if have not in (1, want):
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} does not broadcast to (B, H, L, S) = "
                f"{shape}"
            )
    x = xp.reshape(x, full)
    if not x.flags.c_contiguous:
        # The compact operand only (NumPy and CuPy copy alike; the kernels index raw
        # pointers, so a strided view would be read wrongly).
        x = x.copy(order="C")
    strides = []
    step = 1
    for n in reversed(full):
        strides.append(0 if n == 1 else step)
        step *= n
    return x, tuple(reversed(strides))  # type: ignore[return-value]


@dataclass(frozen=True)
class KernelOptions:
    """Checked options in the form the kernels take them."""

    operands: tuple[Any, ...]
    """mask, its 4 strides, bias, its 4 strides, keep, its 4 strides (kernel order)."""
    flags: int
    scale: float
    softcap: float
    inv_softcap: float
    keep_scale: float
    shift: int
    win_left: int
    win_right: int
    masked_rows: int
    all_dropped: bool
    """dropout_p = 1: every weight is dropped, the output and gradients are 0."""

    def tail(self, dtype: str) -> tuple[Any, ...]:
        """scale, softcap, inv_softcap, keep_scale, flags, shift, window, masked_rows."""
        t = _SCALAR[dtype]
        i64 = np.int64
        return (t(self.scale), t(self.softcap), t(self.inv_softcap), t(self.keep_scale),
                np.int32(self.flags), i64(self.shift), i64(self.win_left),
                i64(self.win_right), np.int32(self.masked_rows))


def kernel_options(
    *,
    shape: tuple[int, int, int, int],
    dtype: str,
    scale: float,
    causal: bool = False,
    window: Any = None,
    alignment: str = "top_left",
    mask: Any = None,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    masked_rows: str = "zero",
    softcap: float | None = None,
    xp: Any,
) -> KernelOptions:
    """Check the options of a kernel launch on (B, H, L, S) = `shape` and pack them.

    The one list of the kernels' score options, which every kernel entry point takes as
    keywords: ``scale`` multiplies q.k; ``causal`` and ``window`` (left, right) bound
    the keys each query sees, query i at key position i + shift with shift 0
    (``alignment="top_left"``) or S - L; ``mask`` (bool, True = take part), ``bias``
    (added after softcap) and ``dropout_mask`` (bool, True = keep) broadcast to (B, H,
    L, S) and are read through their strides; ``dropout_p`` is the probability the
    keep-mask was drawn with; ``masked_rows`` the output policy of a fully masked row
    ("zero", "nan", "uniform"); ``softcap`` c gives ``c * tanh(s / c)``.

    Raises ValueError, naming the argument, for what breaks the kernels' contract:
    operands of the wrong dtype or shape, dropout without a keep-mask, a bad policy.
    """
    if alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    if masked_rows not in MASKED_ROWS:
        raise ValueError(
            f"masked_rows must be one of {sorted(MASKED_ROWS)}, got {masked_rows!r}"
        )
    if softcap is not None and not (isinstance(softcap, numbers.Real)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    if (dropout_mask is None) != (p == 0.0):
        raise ValueError(
            "dropout_p > 0 needs a dropout_mask (bool, True = keep) and a dropout_mask "
            f"needs dropout_p > 0; got dropout_p={dropout_p!r} and "
            f"{'a' if dropout_mask is not None else 'no'} mask"
        )
    L, S = shape[2], shape[3]
    left, right = window_edges(causal, window)
    flags = 0
    operands: list[Any] = []
    for flag, name, x, kind in ((FLAG_MASK, "mask", mask, "bool"),
                                (FLAG_BIAS, "bias", bias, "float"),
                                (FLAG_KEEP, "dropout_mask", dropout_mask, "bool")):
        if x is None:
            # Never read (its flag is clear), but the kernel still takes a pointer.
            dummy = xp.zeros((1, 1, 1, 1), dtype=xp.bool if kind == "bool" else
                             getattr(xp, dtype))
            operands += [dummy, *(np.int64(0),) * 4]
            continue
        flags |= flag
        array, strides = _operand(name, x, shape, kind, dtype, xp)
        operands += [array, *(np.int64(s) for s in strides)]
    if softcap is not None:
        flags |= FLAG_SOFTCAP
    return KernelOptions(
        operands=tuple(operands), flags=flags, scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        inv_softcap=1.0 / float(softcap) if softcap is not None else 1.0,
        keep_scale=1.0 / (1.0 - p) if 0.0 < p < 1.0 else (0.0 if p == 1.0 else 1.0),
        shift=0 if alignment == "top_left" else S - L, win_left=left, win_right=right,
        masked_rows=MASKED_ROWS[masked_rows], all_dropped=p == 1.0,
    )


def flatten_operands(options: dict[str, Any], batch: tuple[int, ...], xp: Any
                     ) -> dict[str, Any]:
    """``options`` with its mask, bias and dropout_mask flattened by :func:`flatten_batch`."""
    return {name: flatten_batch(value, batch, xp) if name in _OPERANDS else value
            for name, value in options.items()}


def flatten_batch(x: Any, batch: tuple[int, ...], xp: Any) -> Any:
    """An operand broadcastable to (*batch, H, L, S) as one broadcastable to (B, H, L, S).

    The kernels take one batch index b; an operand broadcast along SOME of several
    batch dims cannot be addressed with one stride of b, so it is expanded along the
    batch dims (never along H, L or S). Otherwise nothing is copied.

    Examples
    --------
    >>> import numpy as np
    >>> flatten_batch(np.ones((5, 6)), (2, 3), np).shape
    (1, 1, 5, 6)
    >>> flatten_batch(np.ones((2, 1, 1, 5, 6)), (2, 3), np).shape
    (6, 1, 5, 6)
    """
    if x is None:
        return None
    nb = len(batch)
    nd = nb + 3
    if x.ndim > nd:
        raise ValueError(f"operand of shape {tuple(x.shape)} has more dims than {nd}")
    x = xp.reshape(x, (1,) * (nd - x.ndim) + tuple(x.shape))
    lead = tuple(int(n) for n in x.shape[:nb])
    tail = tuple(x.shape[nb:])
    if all(n == 1 for n in lead):
        return xp.reshape(x, (1, *tail))
    if lead != tuple(batch):
        x = xp.broadcast_to(x, (*batch, *tail))
    return xp.reshape(x, (math.prod(batch), *tail))
