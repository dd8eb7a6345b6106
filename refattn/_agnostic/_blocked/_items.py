"""Running work items: slicing broadcastable arrays per item, ordered sums, the threads.

Work items and the order of every sum depend on the shapes only, and each item is
computed by one thread start to end, so the results are the same bits whatever the
thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ... import _threads
from ..._types import Array, Namespace
from ._plan import _Plan

# --- slicing without broadcasting -------------------------------------------------------


def _pad_rank(x: Array, ndim: int, xp: Namespace) -> Array:
    # Leading axes of size 1 (a view) so that every array indexes with the same tuple.
    if x is None or x.ndim == ndim:
        return x
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _batch_index(x: Array, b: tuple[int, ...]) -> tuple[int, ...]:
    # Broadcasting by indexing: an axis of size 1 is read at 0 for every batch index.
    return tuple(0 if x.shape[d] == 1 else i for d, i in enumerate(b))


def _axis_slice(size: int, full: int, start: int, stop: int) -> slice:
    # A broadcast (size 1) axis stays size 1: the block then broadcasts against it.
    return slice(start, stop) if size == full and full != 1 else slice(0, size)


def _region(x: Array, b: tuple[int, ...], plan: _Plan, h0: int, l0: int, l1: int) -> tuple:
    """Index of the (heads, rows, ...) part of a (..., H, L, ...) array for one item."""
    idx = _batch_index(x, b)
    return (
        *idx,
        _axis_slice(x.shape[len(b)], plan.H, h0, h0 + plan.group),
        _axis_slice(x.shape[len(b) + 1], plan.L, l0, l1),
    )


def _rows_of(x: Array, b: tuple[int, ...], plan: _Plan, h0: int, l0: int, l1: int) -> Array:
    """The (heads, rows, S) part of a broadcastable (..., H, L, S) array for one item."""
    return None if x is None else x[(*_region(x, b, plan, h0, l0, l1), slice(None))]


def _hashable(index: tuple) -> tuple:
    # slice objects are not hashable before Python 3.12.
    return tuple((s.start, s.stop) if isinstance(s, slice) else s for s in index)


def _keys_of(x: Array, s0: int, s1: int, S: int) -> Array:
    return None if x is None else x[..., _axis_slice(x.shape[-1], S, s0, s1)]


def _unit_region(x: Array, b: tuple[int, ...], plan: _Plan, heads: slice, c0: int,
                 c1: int) -> tuple:
    """Index of the part of a broadcastable (..., H, L, S) array one backward item
    covers: the unit's heads, every query, the chunk's keys (size-1 axes stay size 1)."""
    nb = len(b)
    return (
        *_batch_index(x, b),
        _axis_slice(x.shape[nb], plan.H, heads.start, heads.stop),
        slice(None),
        _axis_slice(x.shape[nb + 2], plan.S, c0, c1),
    )


# --- running work items -----------------------------------------------------------------


class _OrderedSum:
    """Adds work items' contributions into regions of ``target`` in item order.

    Items whose region no other item shares just write it. Where several items share a
    region (an input broadcast over batch dims, a bias broadcast over heads or rows),
    each waits until the item before it in the list has added its part, so the sum's
    order is the list's whatever the thread count. No deadlock: the pool starts items in
    list order, so the item waited for has always started.
    """

    def __init__(self, target: Array, keys: Sequence[Any]) -> None:
        self.target = target
        last: dict[Any, int] = {}
        self.previous: list[int | None] = []
        for i, key in enumerate(keys):
            self.previous.append(last.get(key))
            last[key] = i
        self.done = [threading.Event() for _ in keys]

    def add(self, i: int, index: tuple, value: Array) -> None:
        before = self.previous[i]
        if before is None:
            self.target[index] = value
        else:
            self.done[before].wait()
            self.target[index] = self.target[index] + value
        self.done[i].set()

    def release(self, i: int) -> None:
        # Also on failure, so that no later item waits forever (the error is re-raised).
        self.done[i].set()


_JOIN_WAIT_S = 0.05


def _run_items(
    items: Sequence[Any], work: Callable[[int, Any], None], num_threads: int,
    sums: Sequence[_OrderedSum] = (),
) -> None:
    """Run ``work(i, items[i])`` for every item on ``num_threads`` threads.

    Each thread takes the next item in list order (so an item never starts before the
    items before it, which ``_OrderedSum`` relies on). Plain threads pulling indices
    cost a tenth of a ThreadPoolExecutor's futures per item, which shows with many small
    items. The first error stops the taking of new items and is raised at the end; so
    does an interrupt of the caller (Ctrl-C) while it waits: the workers finish the item
    in hand, take no other, and the interrupt is raised once they have stopped.
    """
    def run(i: int) -> None:
        try:
            work(i, items[i])
        finally:
            for s in sums:
                s.release(i)

    if num_threads <= 1 or len(items) <= 1:
        for i in range(len(items)):
            run(i)
        return
    indices = iter(range(len(items)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        limiter = _threads.enter_worker()
        try:
            while True:
                with lock:
                    i = None if errors else next(indices, None)
                if i is None:
                    return
                try:
                    run(i)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                    with lock:
                        errors.append(error)
        finally:
            if limiter is not None:
                limiter.__exit__(None, None, None)

    threads = [threading.Thread(target=worker, daemon=True, name=f"refattn-worker-{n}")
               for n in range(min(num_threads, len(items)))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            # In short waits: a signal's handler (Ctrl-C) runs between them even where a
            # long wait is not woken by the signal, so the interrupt reaches the caller
            # within a wait's length.
            while thread.is_alive():
                thread.join(_JOIN_WAIT_S)
    except BaseException as interrupt:
        # Ctrl-C (or any exception raised into the waiting caller): no worker takes
        # another item; wait for the items in hand, whose results are thrown away.
        with lock:
            errors.append(interrupt)
        for thread in threads:
            if thread.is_alive():
                thread.join()
        raise
    if errors:
        raise errors[0]


# --- shared block arithmetic ------------------------------------------------------------


def squared_row_norms(x: Array, xp: Namespace) -> Array:
    """``||x_i||^2`` over the last axis, for the score bounds.

    On huge inputs (|x| ~ 1e155) the squares overflow to inf, which is what the bounds
    want (no shift can be skipped, the overflow test fires); NumPy's RuntimeWarning about
    it would only alarm the caller, whose own result is right.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return xp.vecdot(x, x)
