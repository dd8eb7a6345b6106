"""refattn's CPU speed against torch's float64 scaled_dot_product_attention.

For each shape (B, H, L, S, E), causal and not, forward and backward, prints the median
wall time of

* refattn (``refattn.attention`` / ``refattn.attention_backward`` with the default
  ``implementation=None``, which takes the blocked path at these sizes; the backward is
  given the saved output and LSE, as an autograd backward has them);
* torch's default SDPA path on the CPU (the fused flash-attention kernel for float64);
* torch's math path (``sdpa_kernel(SDPBackend.MATH)``), the composite reference;

all in float64, on the same number of threads (``refattn.set_num_threads`` and
``torch.set_num_threads``), the three timed in turn in every repeat so that a change of
machine load hits all of them. torch's backward is ``torch.autograd.grad`` of an output
computed outside the timed region.

Run from the repository root::

    python benchmarks/speed.py             # the full table
    python benchmarks/speed.py --quick     # one shape, two repeats
    python benchmarks/speed.py --repeats 9 --threads 2 --no-math --shapes 0,2

The timings are wall-clock times on a possibly shared machine: the load average is
printed at the start and the end; compare runs taken at a similar load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

SHAPES = [(2, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64), (4, 16, 256, 256, 64)]
WIDTHS = [22, 6, 8, 10, 10, 6, 10, 6]


def _median_times(fns: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, float]:
    """Median time of each function over ``repeats`` rounds, after one warm-up round.

    A function may time itself by returning its own measured seconds (torch's backward,
    whose forward must stay outside the timed region); otherwise its call is timed.
    """
    def timed(fn: Callable[[], float | None]) -> float:
        t0 = time.perf_counter()
        own = fn()
        return own if own is not None else time.perf_counter() - t0

    for fn in fns.values():  # warm-up: first-call costs (allocations, thread start-up)
        timed(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    parts = [
        f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture', '?')}, "
        f"{i.get('num_threads')} threads)"
        for i in threadpool_info() if i.get("user_api") == "blas"
    ]
    return "; ".join(parts) or "none found"


def _row(cells: list[str]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, WIDTHS, strict=False))


def _print_line(shape: tuple, causal: bool, what: str, t: dict[str, float]) -> None:
    cells = [",".join(map(str, shape)), "yes" if causal else "no", what,
             f"{t['refattn']:.4f}", f"{t['torch']:.4f}", f"{t['refattn'] / t['torch']:.2f}"]
    if "math" in t:
        cells += [f"{t['math']:.4f}", f"{t['refattn'] / t['math']:.2f}"]
    print(_row(cells), flush=True)


def _bench_shape(shape: tuple, *, causal: bool, repeats: int, math: bool,
                 backward: bool) -> float:
    """Print the forward (and backward) lines of one shape; return refattn's forward time."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import refattn

    B, H, L, S, E = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, E)) for n in (L, S, S))
    dout = rng.standard_normal((B, H, L, E))
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tdout = torch.from_numpy(dout)

    def torch_context(math_path: bool) -> contextlib.AbstractContextManager:
        return sdpa_kernel(SDPBackend.MATH) if math_path else contextlib.nullcontext()

    def torch_forward(math_path: bool) -> None:
        with torch.no_grad(), torch_context(math_path):
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def torch_backward(math_path: bool) -> float:
        with torch_context(math_path):
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        t0 = time.perf_counter()
        torch.autograd.grad(out, (tq, tk, tv), tdout)
        return time.perf_counter() - t0

    def refattn_forward() -> None:
        refattn.attention(q, k, v, causal=causal)

    fns: dict[str, Callable[[], float | None]] = {
        "refattn": refattn_forward, "torch": lambda: torch_forward(False),
    }
    if math:
        fns["math"] = lambda: torch_forward(True)
    forward = _median_times(fns, repeats)
    _print_line(shape, causal, "forward", forward)
    if backward:
        saved = refattn.attention(q, k, v, causal=causal, return_lse=True)

        def refattn_backward() -> None:
            refattn.attention_backward(dout, q, k, v, causal=causal, output=saved.out,
                                       lse=saved.lse)

        fns = {"refattn": refattn_backward, "torch": lambda: torch_backward(False)}
        if math:
            fns["math"] = lambda: torch_backward(True)
        _print_line(shape, causal, "backward", _median_times(fns, repeats))
    return forward["refattn"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="first shape only, 2 repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 5; 3 at L >= 4096)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for refattn and torch (default: available cores)")
    parser.add_argument("--shapes", type=str, default=None,
                        help="indices into the shape list, e.g. 0,2")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--no-math", action="store_true", help="skip torch's math path")
    args = parser.parse_args(argv)

    import torch

    import refattn

    threads = args.threads or refattn.get_num_threads()
    refattn.set_num_threads(threads)
    torch.set_num_threads(threads)
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.quick:
        shapes = shapes[:1]

    print(f"refattn {refattn.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"threads: {threads} (refattn and torch); BLAS: {_blas_info()}")
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if env:
        print(f"environment: {env}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print()
    columns = ["B,H,L,S,E", "causal", "pass", "refattn s", "torch s", "ratio"]
    if not args.no_math:
        columns += ["math s", "ratio"]
    print(_row(columns))
    print(_row(["-" * w for w in WIDTHS[:len(columns)]]))
    speedups = []
    for shape in shapes:
        repeats = 2 if args.quick else args.repeats or (3 if shape[2] >= 4096 else 5)
        times = [
            _bench_shape(shape, causal=causal, repeats=repeats, math=not args.no_math,
                         backward=not args.no_backward)
            for causal in (False, True)
        ]
        speedups.append((shape, times[0] / times[1]))
    print()
    for shape, speedup in speedups:
        print(f"causal speed-up of refattn's forward at {shape}: {speedup:.2f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
