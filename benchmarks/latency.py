"""Per-call latency of refattn at small and medium shapes, against its peers.

An oracle is called many times on small problems (property-based tests, ``refattn
check``), so what a call costs beyond its arithmetic matters there. For each shape
(B, H, L, S, E), in float64 with a boolean (L, S) mask, this prints the median time per
call of

forward
    ``refattn.scaled_dot_product_attention`` (torch's conventions), ``refattn.attention``,
    torch's ``scaled_dot_product_attention`` on its default CPU path and on its math path
    (``sdpa_kernel(SDPBackend.MATH)``), and a plain NumPy implementation (scaled product,
    masked fill, max-subtract, exp, divide, product with V);
backward
    ``refattn.attention_backward`` given the saved output and LSE (as a fused backward
    kernel has them), ``torch.autograd.grad`` through the math path of an output
    computed outside the timed region (``retain_graph``, so one graph serves every call)
    and a plain NumPy backward given the same saved LSE and output.

All candidates of a shape are timed in the same run, interleaved: every round times
each of them once (a batch of calls sized to about 1 ms, the order rotated from round to
round), and the per-call time is the median over the rounds, so that a change of machine
load hits all of them alike. The ratios printed are those the targets in
docs/performance.rst are stated in: refattn over torch's math path, refattn over plain
NumPy, and ``scaled_dot_product_attention`` over ``attention``.

Run from the repository root::

    python benchmarks/latency.py               # the full table
    python benchmarks/latency.py --quick       # three shapes, fewer rounds
    python benchmarks/latency.py --rounds 41 --shapes 0,4 --no-backward

The times are wall-clock times on a possibly shared machine: the load average is
printed at the start and the end; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

SHAPES = [(1, 1, 1, 1, 1), (1, 2, 8, 8, 4), (2, 4, 16, 16, 8), (2, 4, 32, 32, 16),
          (4, 8, 64, 64, 32), (2, 8, 128, 128, 64), (2, 8, 256, 256, 64)]
#: Seconds one timed batch of calls should take: long against the timer's resolution
#: and the loop, short against the machine's load changes.
BATCH_SECONDS = 1e-3


def _batch_size(fn: Callable[[], object]) -> int:
    # Calls per timed batch: enough for about BATCH_SECONDS (first calls warm up).
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(2000, round(BATCH_SECONDS / one)))


def median_per_call(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved over ``rounds`` rounds.

    Also, under ``"a/b"`` keys, the median over the rounds of each round's ratio of a's
    time to b's: the candidates of one round run within milliseconds of each other, so
    a burst of load from other work, which can last many rounds on a shared machine,
    moves both sides of a round's ratio alike.
    """
    sizes = {name: _batch_size(fn) for name, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, n = fns[name], sizes[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    result = {name: statistics.median(ts) for name, ts in samples.items()}
    for a in names:
        for b in names:
            if a != b:
                result[f"{a}/{b}"] = statistics.median(
                    x / y for x, y in zip(samples[a], samples[b], strict=True))
    return result


def numpy_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
                  scale: float) -> np.ndarray:
    """The plain implementation: five lines of NumPy (no policy for fully masked rows)."""
    s = (scale * q) @ np.swapaxes(k, -1, -2)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - np.max(s, axis=-1, keepdims=True))
    p = p / np.sum(p, axis=-1, keepdims=True)
    return p @ v


def numpy_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                   mask: np.ndarray, scale: float, out: np.ndarray, lse: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain backward from the saved output and LSE: P rebuilt, then the chain rule."""
    s = np.where(mask, (scale * q) @ np.swapaxes(k, -1, -2), -np.inf)
    p = np.exp(s - lse[..., None])
    dv = np.swapaxes(p, -1, -2) @ dout
    ds = p * (dout @ np.swapaxes(v, -1, -2) - np.sum(dout * out, axis=-1, keepdims=True))
    return (ds @ k) * scale, np.swapaxes(ds, -1, -2) @ (scale * q), dv


def _inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    B, H, L, S, E = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, E)) for n in (L, S, S))
    mask = rng.random((L, S)) < 0.8
    mask[:, 0] = True  # no fully masked row: the plain implementation has no policy
    dout = rng.standard_normal((B, H, L, E))
    return q, k, v, mask, dout


def forward_times(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import refattn

    q, k, v, mask, _ = _inputs(shape)
    scale = 1.0 / np.sqrt(shape[-1])
    tq, tk, tv, tmask = (torch.from_numpy(x) for x in (q, k, v, mask))

    def torch_default() -> object:
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    def torch_math() -> object:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    expected = numpy_forward(q, k, v, mask, scale)
    fns: dict[str, Callable[[], object]] = {
        "sdpa": lambda: refattn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "attention": lambda: refattn.attention(q, k, v, mask=mask),
        "torch": torch_default,
        "math": torch_math,
        "numpy": lambda: numpy_forward(q, k, v, mask, scale),
    }
    for name, fn in fns.items():  # every candidate computes the same thing
        got = fn()
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        assert np.allclose(got, expected, rtol=1e-10, atol=1e-12), name
    return median_per_call(fns, rounds)


def backward_times(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import refattn

    q, k, v, mask, dout = _inputs(shape)
    scale = 1.0 / np.sqrt(shape[-1])
    saved = refattn.attention(q, k, v, mask=mask, return_lse=True)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tmask, tdout = torch.from_numpy(mask), torch.from_numpy(dout)
    with sdpa_kernel(SDPBackend.MATH):
        tout = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    def refattn_backward() -> object:
        return refattn.attention_backward(dout, q, k, v, mask=mask, output=saved.out,
                                          lse=saved.lse)

    fns: dict[str, Callable[[], object]] = {
        "attention": refattn_backward,
        "math": lambda: torch.autograd.grad(tout, (tq, tk, tv), tdout, retain_graph=True),
        "numpy": lambda: numpy_backward(dout, q, k, v, mask, scale, saved.out, saved.lse),
    }
    expected = fns["numpy"]()
    for name, fn in fns.items():
        for got, want in zip(fn(), expected, strict=False):
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            assert np.allclose(got, want, rtol=1e-9, atol=1e-11), name
    return median_per_call(fns, rounds)


def _blas_threads() -> str:
    from threadpoolctl import threadpool_info

    return ",".join(str(i["num_threads"]) for i in threadpool_info()
                    if i.get("user_api") == "blas") or "?"


def _us(t: float) -> str:
    return f"{t * 1e6:.0f}" if t < 1e-2 else f"{t * 1e6:.3g}"


def _shape(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def _targets_forward(shape: tuple[int, ...], t: dict[str, float]) -> list[str]:
    missed = []
    if t["attention/math"] > 1 or t["sdpa/math"] > 1:
        missed.append("refattn > math")
    if shape[2] >= 64 and t["attention/numpy"] > 1.1:
        missed.append("attention > 1.1 numpy")
    if shape == (1, 1, 1, 1, 1) and t["attention/numpy"] > 2:
        missed.append("attention > 2 numpy")
    if t["sdpa/attention"] > 1.1:
        missed.append("sdpa > 1.1 attention")
    return missed


def _targets_backward(shape: tuple[int, ...], t: dict[str, float]) -> list[str]:
    missed = []
    if t["attention/math"] > 1:
        missed.append("refattn > math")
    if shape[2] >= 64 and t["attention/numpy"] > 1.1:
        missed.append("refattn > 1.1 numpy")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shapes 0, 2 and 4 only, 9 rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per shape (default 31)")
    parser.add_argument("--shapes", type=str, default=None,
                        help="indices into the shape list, e.g. 0,4")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and for NumPy's BLAS (default: each "
                        "library's own; on a loaded machine 1 gives steadier times)")
    args = parser.parse_args(argv)

    import torch

    import refattn

    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")

    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.quick and not args.shapes:
        shapes = [SHAPES[0], SHAPES[2], SHAPES[4]]
    rounds = args.rounds or (9 if args.quick else 31)
    print(f"refattn {refattn.__version__} ({os.path.dirname(refattn.__file__)}), torch "
          f"{torch.__version__}, numpy {np.__version__}")
    print(f"cores available: {len(os.sched_getaffinity(0))}, torch threads: "
          f"{torch.get_num_threads()}, BLAS threads: {_blas_threads()}")
    print(f"float64, boolean (L, S) mask, median of {rounds} interleaved rounds; times in "
          "microseconds per call")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print()
    head = (f"{'B,H,L,S,E':>16}  {'sdpa':>7}  {'attn':>7}  {'torch':>7}  {'math':>7}  "
            f"{'numpy':>7}  {'ref/math':>8}  {'ref/np':>6}  {'sdpa/attn':>9}  missed")
    print("forward")
    print(head)
    missed_any = False
    for shape in shapes:
        t = forward_times(shape, rounds)
        missed = _targets_forward(shape, t)
        missed_any |= bool(missed)
        print(f"{_shape(shape):>16}  {_us(t['sdpa']):>7}  {_us(t['attention']):>7}  "
              f"{_us(t['torch']):>7}  {_us(t['math']):>7}  {_us(t['numpy']):>7}  "
              f"{t['attention/math']:>8.2f}  {t['attention/numpy']:>6.2f}  "
              f"{t['sdpa/attention']:>9.2f}  {', '.join(missed) or '-'}", flush=True)
    if not args.no_backward:
        print()
        print("backward (refattn and NumPy given the saved output and LSE; torch: autograd "
              "through the math path)")
        print(f"{'B,H,L,S,E':>16}  {'refattn':>7}  {'math':>7}  {'numpy':>7}  "
              f"{'ref/math':>8}  {'ref/np':>6}  missed")
        for shape in shapes:
            t = backward_times(shape, rounds)
            missed = _targets_backward(shape, t)
            missed_any |= bool(missed)
            print(f"{_shape(shape):>16}  {_us(t['attention']):>7}  {_us(t['math']):>7}  "
                  f"{_us(t['numpy']):>7}  {t['attention/math']:>8.2f}  "
                  f"{t['attention/numpy']:>6.2f}  {', '.join(missed) or '-'}",
                  flush=True)
    print()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("targets: " + ("some missed (see the last column)" if missed_any else "all met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
