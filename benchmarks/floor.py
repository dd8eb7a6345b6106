"""The NumPy floor under refattn's blocked path, against torch's float64 SDPA.

For each shape of ``speed.py`` (non-causal), forward and backward, prints the median
wall time of

* the floor: the blocked algorithm reduced to its arithmetic on NumPy, written out here
  as plainly as it goes: per (batch, head, query block) work item and key block, the
  products and the exp of FlashAttention's forward (scores, exp, P [V, 1]) and backward
  (scores, exp, [dO, -D] [V, 1]^T, dV, dK, dQ), with refattn's block sizes, worker
  threads and one-thread BLAS, and none of refattn's options, checks, shifts (the inputs
  are standard normal: no exp can overflow), masks or ordered sums;
* refattn (``implementation=None``, as in ``speed.py``);
* torch's default SDPA path (its fused CPU kernel);

and the ratios floor / torch (how close NumPy-level code can get on this machine) and
refattn / floor (what refattn's generality costs over it). The three are timed in turn
in every repeat, so that a change of machine load hits all of them.

Run from the repository root::

    python benchmarks/floor.py               # every shape
    python benchmarks/floor.py --shapes 2    # (4, 16, 256, 256, 64) only
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import SHAPES, _median_times  # noqa: E402  (the sibling benchmark script)


def _run_items(items: list, work: Callable, threads: int) -> None:
    it, lock = iter(items), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            work(*item)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _ones(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((*x.shape[:-1], 1))], axis=-1)


def floor_forward(q, k, v, scale, block_l, block_s, threads):
    B, H, L, E = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    v1 = _ones(v)
    out = np.empty((B, H, L, Ev))

    def item(b, h, l0):
        qs = q[b, h, l0:l0 + block_l] * scale
        acc = 0.0
        for s0 in range(0, S, block_s):
            p = np.exp(qs @ k[b, h, s0:s0 + block_s].T)
            acc = acc + p @ v1[b, h, s0:s0 + block_s]
        out[b, h, l0:l0 + block_l] = acc[:, :Ev] / acc[:, Ev:]

    _run_items(list(itertools.product(range(B), range(H), range(0, L, block_l))), item,
               threads)
    return out


def floor_backward(dout, q, k, v, out, lse, scale, block_l, block_s, threads):
    B, H, L, E = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    k1, v1 = _ones(k), _ones(v)
    D = np.sum(dout * out, axis=-1, keepdims=True)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)

    def item(b, h):
        dk_h, dv_h = np.zeros((S, E)), np.zeros((S, Ev))
        for l0 in range(0, L, block_l):
            rows = slice(l0, l0 + block_l)
            qs = q[b, h, rows] * scale
            q_shift = np.concatenate([qs, -lse[b, h, rows, None]], axis=1)
            o_shift = np.concatenate([dout[b, h, rows], -D[b, h, rows]], axis=1)
            dq_rows = 0.0
            for s0 in range(0, S, block_s):
                keys = slice(s0, s0 + block_s)
                p = np.exp(q_shift @ k1[b, h, keys].T)
                ds = o_shift @ v1[b, h, keys].T
                ds *= p
                dv_h[keys] += p.T @ dout[b, h, rows]
                dk_h[keys] += ds.T @ qs
                dq_rows = dq_rows + ds @ k[b, h, keys]
            dq[b, h, rows] = dq_rows * scale
        dk[b, h], dv[b, h] = dk_h, dv_h

    _run_items(list(itertools.product(range(B), range(H))), item, threads)
    return dq, dk, dv


def _untimed(fn: Callable[[], object]) -> Callable[[], None]:
    # _median_times takes a returned number as the function's own timing: return None.
    def run() -> None:
        fn()

    return run


def _bench(shape: tuple, repeats: int, threads: int) -> None:
    """Print the forward and backward lines of one shape."""
    import torch
    import torch.nn.functional as F
    from threadpoolctl import threadpool_limits

    import refattn
    from refattn._agnostic._blocked import choose_blocks

    B, H, L, S, E = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, E)) for n in (L, S, S))
    dout = rng.standard_normal((B, H, L, E))
    scale = E**-0.5
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tdout = torch.from_numpy(dout)
    saved = refattn.attention(q, k, v, return_lse=True)
    fwd_blocks, bwd_blocks = choose_blocks(L, S, 1), choose_blocks(L, S, 1, backward=True)

    def floor_fwd() -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):  # as refattn's workers run
            return floor_forward(q, k, v, scale, *fwd_blocks, threads)

    def floor_bwd() -> tuple:
        with threadpool_limits(limits=1, user_api="blas"):
            return floor_backward(dout, q, k, v, saved.out, saved.lse, scale, *bwd_blocks,
                                  threads)

    def torch_backward() -> float:
        o = F.scaled_dot_product_attention(tq, tk, tv)
        t0 = time.perf_counter()
        torch.autograd.grad(o, (tq, tk, tv), tdout)
        return time.perf_counter() - t0

    # The floor is checked against refattn before it is timed: it computes the same.
    assert np.allclose(floor_fwd(), saved.out)
    grads = refattn.attention_backward(dout, q, k, v, output=saved.out, lse=saved.lse)
    assert all(np.allclose(a, b) for a, b in zip(floor_bwd(), grads[:3], strict=True))
    fwd = _median_times({
        "floor": _untimed(floor_fwd),
        "refattn": _untimed(lambda: refattn.attention(q, k, v)),
        "torch": _untimed(lambda: F.scaled_dot_product_attention(tq.detach(), tk.detach(),
                                                                 tv.detach())),
    }, repeats)
    bwd = _median_times({
        "floor": _untimed(floor_bwd),
        "refattn": _untimed(lambda: refattn.attention_backward(
            dout, q, k, v, output=saved.out, lse=saved.lse)),
        "torch": torch_backward,
    }, repeats)
    for name, t in (("forward", fwd), ("backward", bwd)):
        print(f"{f'{B},{H},{L},{S},{E}':>20}  {name:>8}  {t['floor']:8.4f}  "
              f"{t['refattn']:9.4f}  {t['torch']:8.4f}  {t['floor'] / t['torch']:11.2f}  "
              f"{t['refattn'] / t['floor']:13.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", type=str, default=None,
                        help="indices into the shape list, e.g. 0,2")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    import refattn

    threads = args.threads or refattn.get_num_threads()
    refattn.set_num_threads(threads)
    torch.set_num_threads(threads)
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    print(f"threads: {threads}; load average at start: {os.getloadavg()[0]:.2f}\n")
    print(f"{'B,H,L,S,E':>20}  {'pass':>8}  {'floor s':>8}  {'refattn s':>9}  {'torch s':>8}"
          f"  {'floor/torch':>11}  {'refattn/floor':>13}")
    for shape in shapes:
        _bench(shape, args.repeats, threads)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
