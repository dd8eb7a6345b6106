"""The one window value: which keys each query may see, by position.

Query i "sits at" key position ``i + shift``: shift = 0 for ``"top_left"`` alignment
(torch's ``is_causal``) and S - L for ``"bottom_right"`` (flash-attn, KV-cache decoding,
where the last query sees every key). A window (left, right) lets query i see keys j with
``i + shift - left <= j <= i + shift + right``, None being unlimited on that side; causal
is the window (None, 0), and causal with a window is their intersection.

Every layer uses this type: the front door parses ``window=`` and ``causal`` into it once,
``refattn.mods``, ``refattn.varlen`` and ``refattn.kvcache`` evaluate it on positions,
the blocked path skips blocks by its edges and the CUDA kernels take its ``edges()``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from ._types import Array, Device, Namespace

__all__ = ["Window", "alignment_shift", "chunk_mask", "chunk_span"]


def alignment_shift(L: int, S: int, alignment: str) -> int:
    """The key position of query 0: 0 for "top_left", S - L for "bottom_right".

    Examples
    --------
    >>> alignment_shift(3, 5, "top_left"), alignment_shift(3, 5, "bottom_right")
    (0, 2)
    """
    return 0 if alignment == "top_left" else S - L


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Window:
    """Keys j that query i may see: ``i + shift - left <= j <= i + shift + right``.

    None on a side is unlimited. ``Window(None, 0)`` is causal attention.

    Examples
    --------
    >>> import numpy as np
    >>> w = Window.merge(causal=True, window=Window.parse((1, None)))
    >>> w
    Window(left=1, right=0)
    >>> w.mask(3, 3, shift=0, xp=np, device="cpu").astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 1, 1]])
    >>> w.edges()
    (1, 0)
    """

    left: int | None = None
    right: int | None = None

    @classmethod
    def parse(cls, value: Any, *, name: str = "window", typed: bool = False) -> Window:
        """A pair ``(left, right)`` (None or -1 = unlimited side) as a ``Window``.

        ``name`` is the argument named in errors. The front door's messages (the
        default) refuse a bad side with ValueError; ``typed=True`` gives the messages of
        ``refattn.mods`` (``name[0] (left)``), with TypeError for a side that is not an
        int. A ``Window`` is returned as it is.
        """
        if isinstance(value, Window):
            return value
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            if typed:
                raise TypeError(
                    f"{name} must be a pair (left, right) of ints, None or -1 for unlimited; "
                    f"got {value!r}"
                )
            raise TypeError(f"{name} must be a pair (left, right) or None; got {value!r}")
        sides: list[int | None] = []
        for index, (side, edge) in enumerate(zip(("left", "right"), value, strict=True)):
            if edge is None or (_is_int(edge) and edge == -1):
                sides.append(None)
            elif _is_int(edge) and edge >= 0:
                sides.append(int(edge))
            elif typed:
                what = f"{name}[{index}] ({side})"
                if not _is_int(edge):
                    raise TypeError(f"{what} must be a non-negative int; got "
                                    f"{type(edge).__name__} {edge!r}")
                raise ValueError(f"{what} must be a non-negative int; got {edge}")
            else:
                raise ValueError(
                    f"{name}'s {side} edge must be a non-negative int, or None / -1 for "
                    f"unlimited; got {edge!r}"
                )
        return cls(sides[0], sides[1])

    @classmethod
    def merge(cls, *, causal: bool, window: Window | None) -> Window | None:
        """The window ``causal`` and ``window`` allow together; None when neither limits."""
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False; got {causal!r}")
        if window is None and not causal:
            return None
        left, right = (window.left, window.right) if window is not None else (None, None)
        if causal:
            right = 0 if right is None else min(right, 0)
        if left is None and right is None:
            return None
        return cls(left, right)

    def edges(self) -> tuple[int, int]:
        """``(left, right)`` with -1 for an unlimited side (the kernels' form)."""
        return (-1 if self.left is None else self.left,
                -1 if self.right is None else self.right)

    def allows(self, q_pos: Array, kv_pos: Array) -> Array:
        """True where ``q_pos - left <= kv_pos <= q_pos + right``, broadcast.

        ``q_pos`` is the query's key position (its index plus the shift).
        """
        ok = None
        if self.right is not None:
            ok = kv_pos <= q_pos + self.right
        if self.left is not None:
            lo = kv_pos >= q_pos - self.left
            ok = lo if ok is None else ok & lo
        if ok is None:
            # No limit on either side: every pair, at the broadcast shape of the grids.
            ok = (kv_pos <= q_pos) | (kv_pos > q_pos)
        return ok

    def mask(self, L: int, S: int, *, shift: int, xp: Namespace, device: Device) -> Array:
        """The (L, S) boolean array of the window, query i at key position i + shift."""
        q_pos = xp.reshape(xp.arange(L, device=device), (L, 1)) + shift
        kv_pos = xp.reshape(xp.arange(S, device=device), (1, S))
        return self.allows(q_pos, kv_pos)  # (L, 1) against (1, S): always (L, S)


def chunk_span(position: int, chunk: int) -> tuple[int, int]:
    """The keys ``[start, stop)`` of the chunk holding key position ``position``.

    Chunked local attention (``attention_chunk=``) cuts the key positions into chunks
    ``[0, chunk), [chunk, 2 chunk), ...``; the query at key position p (its index plus
    the alignment's shift) sees the keys of p's chunk only. Positions below 0 (a query
    of a bottom-right problem with L > S) fall in chunks with no key.

    Examples
    --------
    >>> chunk_span(5, 4), chunk_span(-1, 4)
    ((4, 8), (-4, 0))
    """
    start = position // chunk * chunk
    return start, start + chunk


def chunk_mask(L: int, S: int, chunk: int, *, shift: int, xp: Namespace,
               device: Device) -> Array:
    """The (L, S) boolean array of chunked local attention: query i sees key j when
    ``(i + shift) // chunk == j // chunk`` (floor division, as ``chunk_span``).

    Examples
    --------
    >>> import numpy as np
    >>> chunk_mask(4, 4, 2, shift=0, xp=np, device="cpu").astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    q_pos = xp.reshape(xp.arange(L, device=device), (L, 1)) + shift
    kv_pos = xp.reshape(xp.arange(S, device=device), (1, S))
    return (q_pos // chunk) == (kv_pos // chunk)
