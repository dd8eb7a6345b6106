"""Concurrent callers of the blocked CPU path against the same calls made in a row.

N calls of ``refattn.attention`` on the blocked path are timed made one after another on
the main thread, then made at once from N threads of a ``ThreadPoolExecutor``. With the
cores shared out (compute slots, BLAS held at one thread from any calling thread; see
docs/performance.rst) the concurrent round takes about as long as the serial one: the
printed ratio concurrent / serial stays near 1. Oversubscription (each caller starting
its own workers, each worker a BLAS pool) shows as a ratio of several to tens. The
process and the BLAS thread counts are printed before and after, which must agree.

Run from the repository root::

    python benchmarks/concurrency.py                   # 8 callers, L = S = 1100
    python benchmarks/concurrency.py --callers 16 --length 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import refattn


def _blas_threads() -> list[int]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--length", type=int, default=1100)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, args.heads, args.length, 64)) for _ in range(3))

    def call(_: int) -> np.ndarray:
        return refattn.attention(q, k, v, implementation="blocked")

    expected = call(0)
    before = _blas_threads()
    serial, concurrent = [], []
    same = True
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.callers):
            call(i)
        serial.append(time.perf_counter() - start)
        with ThreadPoolExecutor(args.callers) as pool:
            start = time.perf_counter()
            outs = list(pool.map(call, range(args.callers)))
            concurrent.append(time.perf_counter() - start)
        same &= all(np.array_equal(o, expected) for o in outs)
    s, c = statistics.median(serial), statistics.median(concurrent)
    print(f"{args.callers} calls, (1, {args.heads}, {args.length}, 64) float64, blocked path, "
          f"{refattn.get_num_threads()} worker threads a call")
    print(f"serial {s:.3f} s   concurrent {c:.3f} s   concurrent / serial {c / s:.2f}")
    print(f"the same bits from every thread: {same}")
    print(f"BLAS threads before {before}, after {_blas_threads()}")


if __name__ == "__main__":
    main()
