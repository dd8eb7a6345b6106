"""Worker threads for the blocked CPU path.

NumPy releases the GIL inside matmul and ufuncs, so Python threads running independent
blocks keep every core busy. Two rules make that safe and reproducible:

* the BLAS library's own thread pool is held at one thread while refattn's workers run,
  otherwise each worker's matmul would spawn more threads than there are cores;
* the split of the work into blocks depends on the shapes only, never on the thread
  count, and every block is computed by one thread from start to end, so the results
  are bit-identical whatever ``num_threads`` is.

The thread count is one process-wide setting, like ``torch.set_num_threads``, so that it
reaches every front-end (``attention``, the compat modules) without a keyword on each.
Only NumPy-backed namespaces (NumPy, array-api-strict) use the worker threads: other
libraries (torch, CuPy) parallelise inside their own operations, and run the blocks in
order on the calling thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["available_cores", "get_num_threads", "set_num_threads", "worker_threads"]

_setting: int | None = None  # None: as many threads as this process may run on cores
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None
_controller: Any = None
_allocator_settled = False


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


def _limit_blas() -> None:
    global _blas_users, _blas_limiter, _controller
    with _blas_lock:
        _blas_users += 1
        if _blas_users > 1:
            return
        try:
            # Imported here: ``import refattn`` must not import more than numpy and
            # array_api_compat. Without threadpoolctl the results are the same, the
            # BLAS pool is just not held back (over-subscription costs speed only).
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        if _controller is None:
            # Scanning the loaded libraries costs milliseconds; the libraries NumPy
            # calls are loaded with NumPy, before refattn, so one scan is enough.
            _controller = ThreadpoolController()
        _blas_limiter = _controller.limit(limits=1, user_api="blas")


def _release_blas() -> None:
    global _blas_users, _blas_limiter
    with _blas_lock:
        _blas_users -= 1
        if _blas_users == 0 and _blas_limiter is not None:
            _blas_limiter.restore_original_limits()
            _blas_limiter = None


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


@contextmanager
def worker_threads(xp: Any) -> Iterator[int]:
    """Yield the worker count for arrays of ``xp``, with BLAS at one thread meanwhile.

    NumPy-backed namespaces get ``get_num_threads()`` workers and a one-thread BLAS
    (also for one worker, so that every thread count runs the same BLAS code and gives
    the same bits), and the allocator is settled (``_settle_allocator``); other
    namespaces get 1 and are left alone. Concurrent callers share one limit, restored
    when the last leaves.
    """
    if not _uses_workers(xp):
        yield 1
        return
    _settle_allocator()
    _limit_blas()
    try:
        yield get_num_threads()
    finally:
        _release_blas()
