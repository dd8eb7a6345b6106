"""Worker threads for the blocked CPU path.

NumPy releases the GIL inside matmul and ufuncs, so Python threads running independent
blocks keep every core busy. Two rules make that safe and reproducible:

* the BLAS library's own thread pool is held at one thread while refattn's workers run,
  otherwise each worker's matmul would spawn more threads than there are cores;
* the split of the work into blocks depends on the shapes only, never on the thread
  count, and every block is computed by one thread from start to end, so the results
  are bit-identical whatever ``num_threads`` is, and whichever thread calls.

Calls may come from any thread, several at once. Three more rules keep that safe:

* compute slots: the process has as many slots as cores (or the thread setting, when it
  is larger); a call holds one slot while it computes, waiting for it if every slot is
  busy, and its worker threads take the free slots it can get without waiting. So eight
  concurrent callers on two cores run two at a time instead of sixteen threads fighting
  over two cores (and over the GIL between NumPy calls, which made rounds of concurrent
  calls tens of times slower than the same calls in a row);
* the BLAS limit is applied where the BLAS library reads it: once for the process
  (reference-counted, restored when the last concurrent call leaves) for a library
  whose thread count is one process-wide value (OpenBLAS on pthreads, MKL); in every
  computing thread for one built on OpenMP, whose setting belongs to each thread (a
  limit set by another thread would be ignored there). Either way the process's BLAS
  settings are what they were once the call returns or raises;
* an interrupt (``KeyboardInterrupt``) or an error stops the workers from taking more
  work: they finish the block in hand and the call raises.

The thread count is one process-wide setting, like ``torch.set_num_threads``, so that it
reaches every front-end (``attention``, the compat modules) without a keyword on each.
Only NumPy-backed namespaces (NumPy, array-api-strict) use the worker threads: other
libraries (torch, CuPy) parallelise inside their own operations, and run the blocks in
order on the calling thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["available_cores", "get_num_threads", "set_num_threads", "settle_allocator",
           "worker_threads"]

_setting: int | None = None  # None: as many threads as this process may run on cores
_slots_free = threading.Condition()
_slots_used = 0
# Per thread: whether it already holds a compute slot (a refattn worker, or a caller
# inside a call: a nested call, e.g. from a score_mod, must not wait for a slot it holds).
_local = threading.local()
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None
_controller: Any = None  # a ThreadpoolController; False without threadpoolctl
_allocator_settled = False
_blas_per_thread: bool | None = None  # None: not known yet (threadpoolctl not asked)


def available_cores() -> int:
    """Number of cores this process may run on (its CPU affinity where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _check_num_threads(num_threads: Any) -> int | None:
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(
            f"num_threads must be a positive int or None (all available cores); got "
            f"{type(num_threads).__name__} {num_threads!r}"
        )
    if num_threads < 1:
        raise ValueError(
            f"num_threads must be at least 1 (or None for all available cores); got {num_threads}"
        )
    return num_threads


def get_num_threads() -> int:
    """Number of worker threads refattn's blocked CPU path uses.

    Returns
    -------
    int
        The value last given to ``set_num_threads``, or the number of available cores
        when none was given (or None was).

    Examples
    --------
    >>> import refattn
    >>> refattn.get_num_threads() >= 1
    True
    """
    return available_cores() if _setting is None else _setting


class set_num_threads:  # noqa: N801 - used like a function, as torch.set_grad_enabled is
    """Set the number of worker threads of the blocked CPU path, process-wide.

    Takes effect at once. Used in a ``with`` statement, it restores the previous setting
    on leaving the block. The results do not depend on the setting (bit for bit): it
    changes only how many blocks run at the same time. While the workers run, the BLAS
    library's own pool is held at one thread (through threadpoolctl).

    Parameters
    ----------
    num_threads : int or None
        A positive number of threads, or None for the number of available cores (the
        default).

    Raises
    ------
    TypeError
        ``num_threads`` is not an int or None.
    ValueError
        ``num_threads`` is less than 1.

    Examples
    --------
    >>> import refattn
    >>> before = refattn.get_num_threads()
    >>> with refattn.set_num_threads(1):
    ...     refattn.get_num_threads()
    1
    >>> refattn.get_num_threads() == before
    True
    """

    def __init__(self, num_threads: int | None) -> None:
        global _setting
        value = _check_num_threads(num_threads)
        self._previous = _setting
        _setting = value

    def __enter__(self) -> set_num_threads:
        return self

    def __exit__(self, *exc: object) -> None:
        global _setting
        _setting = self._previous

    def __repr__(self) -> str:
        return f"set_num_threads({_setting!r})"


def _uses_workers(xp: Any) -> bool:
    return bool(
        array_api_compat.is_numpy_namespace(xp)
        or array_api_compat.is_array_api_strict_namespace(xp)
    )


def _blas_controller() -> Any:
    # None without threadpoolctl: the results are the same, the BLAS pool is just not
    # held back (over-subscription costs speed only).
    global _controller, _blas_per_thread
    if _controller is False:
        return None
    if _controller is None:
        try:
            # Imported here: ``import refattn`` must not import more than numpy and
            # array_api_compat.
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
            return None
        # Scanning the loaded libraries costs milliseconds; the libraries NumPy calls are
        # loaded with NumPy, before refattn, so one scan is enough.
        controller = ThreadpoolController()
        blas = controller.select(user_api="blas")
        _blas_per_thread = any(info.get("threading_layer") == "openmp" for info in blas.info())
        _controller = controller
    return _controller


class _BlasControlThread:
    """The one thread that sets and restores a process-wide BLAS limit.

    threadpoolctl lets only one thread at a time change a process-wide BLAS pool (the
    first to set a limit, until its limit context is left); a limit set or restored from
    any other thread is silently ignored. refattn's limit is shared by concurrent calls
    from any threads: set when the first starts, restored when the last ends, which may
    be another thread. Both go through this thread, which enters the limit context and
    leaves it, so the limit holds and is restored whichever threads called, and control
    is given back when it is restored.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="refattn-blas-control")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            action, done = self._requests.get()
            try:
                action()
            finally:
                done.set()

    def run(self, action: Callable[[], None]) -> None:
        done = threading.Event()
        self._requests.put((action, done))
        done.wait()


_blas_control: _BlasControlThread | None = None


def _limit_blas() -> None:
    # The process-wide limit, shared by concurrent calls: set by the first, restored by
    # the last (a limit restored by one call while another still runs would let that
    # one's BLAS calls spawn threads again).
    global _blas_users, _blas_control
    controller = _blas_controller()
    if controller is None or _blas_per_thread:
        return
    with _blas_lock:
        _blas_users += 1
        if _blas_users == 1:
            if _blas_control is None:
                _blas_control = _BlasControlThread()

            def enter() -> None:
                global _blas_limiter
                _blas_limiter = controller.limit(limits=1, user_api="blas")
                _blas_limiter.__enter__()

            _blas_control.run(enter)


def _release_blas() -> None:
    global _blas_users
    if not _controller or _blas_per_thread:
        return
    with _blas_lock:
        _blas_users -= 1
        if _blas_users == 0 and _blas_limiter is not None and _blas_control is not None:

            def leave() -> None:
                global _blas_limiter
                if _blas_limiter is not None:
                    _blas_limiter.__exit__(None, None, None)
                    _blas_limiter = None

            _blas_control.run(leave)


def limit_blas_in_this_thread() -> Any:
    """Hold BLAS at one thread in the calling thread where the setting is per thread.

    Returns the entered limit context, to be left with ``__exit__`` (None where nothing
    was set: no threadpoolctl, or a BLAS whose setting is process-wide, which
    ``worker_threads`` sets once). Called by
    every thread that computes blocks: refattn's workers, and the caller itself.
    """
    controller = _blas_controller()
    if controller is None or not _blas_per_thread:
        return None
    limiter = controller.limit(limits=1, user_api="blas")
    limiter.__enter__()
    return limiter


def enter_worker() -> Any:
    """Mark the calling thread as one of refattn's workers (it holds a slot) and hold its
    BLAS at one thread; returns what ``limit_blas_in_this_thread`` returns."""
    _local.holding = True
    return limit_blas_in_this_thread()


def _slot_capacity() -> int:
    return max(available_cores(), get_num_threads())


def _take_slots(wanted: int) -> int:
    """Take one compute slot, waiting for it, and up to ``wanted - 1`` more that are free.

    Returns the number taken (at least 1). The wait is interruptible (Ctrl-C reaches a
    caller waiting here at once).
    """
    global _slots_used
    with _slots_free:
        while _slots_used >= _slot_capacity():
            _slots_free.wait()
        taken = min(max(wanted, 1), _slot_capacity() - _slots_used)
        _slots_used += taken
    return taken


def _give_slots(count: int) -> None:
    global _slots_used
    with _slots_free:
        _slots_used -= count
        _slots_free.notify_all()


def _settle_allocator() -> None:
    # glibc's malloc hands blocks above its mmap threshold back to the OS when they are
    # freed, and trims its heaps when more than twice that is free at the top; both
    # thresholds start at 128 KiB and rise (up to 32 MiB) when a larger mmapped block is
    # freed. The blocked path allocates and frees blocks of about 1 MiB many times per
    # call; below the thresholds every one of them comes back as fresh pages, and the
    # page faults cost as much as the arithmetic (measured at B=1, H=4, L=S=1024: the
    # forward 1.8x, the backward 1.2-1.5x slower). Freeing one untouched 31 MiB array
    # raises both thresholds once for the process, as any program that frees a large
    # array does; other allocators are unaffected, and the array's pages are never
    # touched.
    global _allocator_settled
    if not _allocator_settled:
        np.empty(31 * 2**20 // 8)
        _allocator_settled = True


def settle_allocator(xp: Any) -> None:
    """Raise glibc's malloc thresholds once per process, for NumPy-backed arrays.

    The direct path's score-sized arrays are the same story as the blocked path's blocks
    (``_settle_allocator``): at B=4, H=8, L=S=64 (1 MiB scores) fresh pages made the
    direct forward 1.6 and its backward 1.8 times slower. Other namespaces are left
    alone; after the first call this is one test of a flag.
    """
    if not _allocator_settled and _uses_workers(xp):
        _settle_allocator()


@contextmanager
def worker_threads(xp: Any) -> Iterator[int]:
    """Yield the worker count for arrays of ``xp``, with BLAS at one thread meanwhile.

    NumPy-backed namespaces: the call takes compute slots (one, waiting for it, and up to
    ``get_num_threads()`` without waiting; a thread that already holds one, a nested
    call or a worker, takes none and gets 1 worker), BLAS is held at one thread (also for
    one worker, so that every thread count runs the same BLAS code and gives the same
    bits), and the allocator is settled (``_settle_allocator``). Other namespaces get 1
    and are left alone. Everything is given back when the block is left, by a return or
    an exception.
    """
    if not _uses_workers(xp):
        yield 1
        return
    _settle_allocator()
    nested = getattr(_local, "holding", False)
    taken = 0 if nested else _take_slots(get_num_threads())
    _local.holding = True
    try:
        _limit_blas()
        try:
            own = limit_blas_in_this_thread()
            try:
                yield max(taken, 1)
            finally:
                if own is not None:
                    own.__exit__(None, None, None)
        finally:
            _release_blas()
    finally:
        _local.holding = nested
        if taken:
            _give_slots(taken)
