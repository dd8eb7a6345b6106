"""Accuracy of float64 attention against an arbitrary-precision result, by logit size.

For logit magnitudes T from 1 to 1000 (q and k scaled so that max |scale q.k| = T) and
several (L, S, E), measures against ``refattn.testing.exact_attention`` (mpmath, 50
digits, correctly rounded):

* the output error, max |out - exact| in ulp of max|V|;
* the LSE error, max |lse - exact| in ulp of the exact LSE (a relative error);
* the gradients' error (dq, dk, dv, each in ulp of its largest exact entry; torch's
  through autograd), on the first two sizes;

for refattn ``precision="standard"``, refattn ``precision="compensated"``, torch's float64
math backend (``sdpa_kernel(SDPBackend.MATH)``, which has no LSE) and torch's default
float64 CPU backend (the fused flash kernel, whose LSE comes from
``aten._scaled_dot_product_flash_attention_for_cpu``). Two kinds of inputs: "random"
(independent Gaussian directions: the largest logit dominates) and "clustered" (queries
and keys near one direction: many logits within a few units of the largest, so many
weights carry the logits' rounding). Each table cell is the worst of ``--seeds`` draws.

Then times ``precision="compensated"`` against ``"standard"`` (forward and backward) on
(B=2, H=8, L=S=512, E=64), printing the load average, since the machine may be shared.

Run from the repository root::

    python benchmarks/accuracy.py                       # table, plot, timing
    python benchmarks/accuracy.py --quick               # fewer cases, no timing
    python benchmarks/accuracy.py --plot docs/_static/accuracy.png

The plot needs matplotlib (``pip install 'refattn[plot]'``); without it the table is
still printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

LOGITS = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0]
SIZES = [(16, 16, 16), (32, 32, 64), (16, 64, 128)]
KINDS = ["random", "clustered"]
IMPLEMENTATIONS = ["refattn standard", "refattn compensated", "torch math", "torch default"]


def make_case(kind: str, L: int, S: int, E: int, logit: float, seed: int,
              heads: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (1, H, L, E), k (1, H, S, E), v (1, H, S, E) with max |q.k| / sqrt(E) = logit."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        q = rng.standard_normal((1, heads, L, E))
        k = rng.standard_normal((1, heads, S, E))
    else:
        base = rng.standard_normal((1, heads, 1, E))
        q = base + 0.1 * rng.standard_normal((1, heads, L, E))
        k = base + 0.1 * rng.standard_normal((1, heads, S, E))
    v = rng.standard_normal((1, heads, S, E))
    peak = np.max(np.abs(q @ np.swapaxes(k, -1, -2))) / np.sqrt(E)
    factor = np.sqrt(logit / peak)
    return q * factor, k * factor, v


def measure(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, tuple[float, float]]:
    """(output error in ulp of max|V|, LSE error in ulp of the LSE) per implementation."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import refattn
    from refattn.testing import exact_attention

    exact = exact_attention(q, k, v, return_lse=True)
    ulp_v = np.spacing(np.max(np.abs(v)))
    ulp_lse = np.spacing(np.abs(exact.lse))

    def errors(out: Any, lse: Any) -> tuple[float, float]:
        e_out = float(np.max(np.abs(np.asarray(out) - exact.out)) / ulp_v)
        e_lse = float("nan") if lse is None else float(
            np.max(np.abs(np.asarray(lse) - exact.lse) / ulp_lse))
        return e_out, e_lse

    res: dict[str, tuple[float, float]] = {}
    std = refattn.attention(q, k, v, return_lse=True)
    res["refattn standard"] = errors(std.out, std.lse)
    comp = refattn.attention(q, k, v, precision="compensated", return_lse=True)
    res["refattn compensated"] = errors(comp.out, comp.lse)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            res["torch math"] = errors(F.scaled_dot_product_attention(tq, tk, tv).numpy(), None)
        out = F.scaled_dot_product_attention(tq, tk, tv)
        flash_out, flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            tq, tk, tv, 0.0, False)
        # The LSE is the flash kernel's; it is the default path only if the outputs agree.
        lse = flash_lse.numpy() if torch.equal(out, flash_out) else None
        res["torch default"] = errors(out.numpy(), lse)
    return res


def measure_grads(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  dout: np.ndarray) -> dict[str, float]:
    """Worst gradient error over dq, dk, dv, each in ulp of its largest exact entry."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import refattn
    from refattn.testing import exact_attention

    exact = exact_attention(q, k, v, grad_out=dout)

    def errors(grads: Any) -> float:
        return max(float(np.max(np.abs(np.asarray(g) - e)) / np.spacing(np.max(np.abs(e))))
                   for g, e in zip(grads, (exact.dq, exact.dk, exact.dv), strict=True))

    res = {}
    for name, precision in (("refattn standard", "standard"),
                            ("refattn compensated", "compensated")):
        g = refattn.attention_backward(dout, q, k, v, precision=precision)
        res[name] = errors((g.dq, g.dk, g.dv))
    for name, math in (("torch math", True), ("torch default", False)):
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        if math:
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(tq, tk, tv)
        else:
            out = F.scaled_dot_product_attention(tq, tk, tv)
        grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(dout))
        res[name] = errors(tuple(g.numpy() for g in grads))
    return res


def gradient_table(logits: list[float], sizes: list[tuple[int, int, int]], kinds: list[str],
                   seeds: int) -> None:
    print("gradients: worst of dq, dk, dv, in ulp of the largest exact entry of each")
    header = (f"{'kind':>9} {'L':>3} {'S':>3} {'E':>4} {'T':>6} | "
              + " ".join(f"{n.split()[-1][:11]:>11}" for n in IMPLEMENTATIONS))
    print(header)
    print("-" * len(header))
    for kind in kinds:
        for size in sizes:
            for logit in logits:
                worst = dict.fromkeys(IMPLEMENTATIONS, 0.0)
                for seed in range(seeds):
                    q, k, v = make_case(kind, *size, logit, seed)
                    dout = np.random.default_rng(1000 + seed).standard_normal(q.shape[:-1]
                                                                            + v.shape[-1:])
                    got = measure_grads(q, k, v, dout)
                    worst = {n: max(worst[n], got[n]) for n in IMPLEMENTATIONS}
                print(f"{kind:>9} {size[0]:>3} {size[1]:>3} {size[2]:>4} {logit:>6g} | "
                      + " ".join(f"{worst[n]:>11.3g}" for n in IMPLEMENTATIONS))


def _fmt(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.2f}"


def accuracy_table(logits: list[float], sizes: list[tuple[int, int, int]], kinds: list[str],
                   seeds: int) -> dict[tuple[str, tuple[int, int, int], float], dict]:
    header = (f"{'kind':>9} {'L':>3} {'S':>3} {'E':>4} {'T':>6} | "
              + " ".join(f"{n.split()[-1][:8]:>8}" for n in IMPLEMENTATIONS) + " | "
              + " ".join(f"{n.split()[-1][:8]:>8}" for n in IMPLEMENTATIONS))
    print("output error in ulp of max|V| (left) and LSE error in ulp of the LSE (right);")
    print("columns: refattn standard, refattn compensated, torch math, torch default")
    print(header)
    print("-" * len(header))
    table = {}
    for kind in kinds:
        for size in sizes:
            for logit in logits:
                worst = {name: (0.0, 0.0) for name in IMPLEMENTATIONS}
                for seed in range(seeds):
                    got = measure(*make_case(kind, *size, logit, seed))
                    worst = {n: (max(worst[n][0], got[n][0]), max(worst[n][1], got[n][1])
                                 if not np.isnan(got[n][1]) else float("nan"))
                             for n in IMPLEMENTATIONS}
                table[(kind, size, logit)] = worst
                print(f"{kind:>9} {size[0]:>3} {size[1]:>3} {size[2]:>4} {logit:>6g} | "
                      + " ".join(f"{_fmt(worst[n][0]):>8}" for n in IMPLEMENTATIONS) + " | "
                      + " ".join(f"{_fmt(worst[n][1]):>8}" for n in IMPLEMENTATIONS))
    print()
    print("worst per logit size over all kinds and sizes: output ulp of max|V| / LSE ulp")
    print(f"{'T':>6} | " + " | ".join(f"{n:>21}" for n in IMPLEMENTATIONS))
    for logit in logits:
        cells = []
        for name in IMPLEMENTATIONS:
            rows = [w[name] for key, w in table.items() if key[2] == logit]
            lse = [r[1] for r in rows if not np.isnan(r[1])]
            cells.append(f"{max(r[0] for r in rows):10.2f} / "
                         f"{(_fmt(max(lse)) if lse else '-'):>8}")
        print(f"{logit:>6g} | " + " | ".join(cells))
    print()
    for name in IMPLEMENTATIONS:
        outs = [w[name][0] for w in table.values()]
        lses = [w[name][1] for w in table.values() if not np.isnan(w[name][1])]
        print(f"worst over all cases, {name:>20}: output {max(outs):8.2f} ulp of max|V|, "
              f"LSE {_fmt(max(lses)) if lses else '-':>8} ulp")
    return table


def plot(table: dict, logits: list[float], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    styles = {"refattn standard": ("o-", "C0"), "refattn compensated": ("s-", "C1"),
              "torch math": ("^--", "C2"), "torch default": ("v--", "C3")}
    floor = 0.01  # zero errors cannot be drawn on a log axis: they are drawn at 0.01
    for col, ax in enumerate(axes):
        for name in IMPLEMENTATIONS:
            ys = [max(w[name][col] for key, w in table.items() if key[2] == t) for t in logits]
            if np.all(np.isnan(ys)):
                continue  # torch's math backend has no LSE
            marker, color = styles[name]
            ax.plot(logits, np.maximum(ys, floor), marker, color=color, label=name,
                    markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, None)
        ax.set_xlabel("max |logit|")
        ax.set_ylabel("ulp (0 drawn at 0.01)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title("output error, ulp of max|V| (worst case)", fontsize=10)
    axes[1].set_title("LSE error, ulp of LSE (worst case)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def timing(repeats: int) -> None:
    import refattn

    rng = np.random.default_rng(0)
    B, H, L, S, E = 2, 8, 512, 512, 64
    q, k, v, dout = (rng.standard_normal((B, H, n, E)) for n in (L, S, S, L))
    print(f"timing on (B={B}, H={H}, L=S={L}, E={E}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    runs = {
        "forward standard": lambda: refattn.attention(q, k, v, implementation="direct"),
        "forward compensated": lambda: refattn.attention(q, k, v, precision="compensated"),
        "backward standard": lambda: refattn.attention_backward(
            dout, q, k, v, implementation="direct"),
        "backward compensated": lambda: refattn.attention_backward(
            dout, q, k, v, precision="compensated"),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():  # interleaved, so that load changes hit all alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        print(f"{name:>22}: {t:7.3f} s (median of {repeats})")
    for p in ("forward", "backward"):
        print(f"compensated / standard, {p}: "
              f"{med[p + ' compensated'] / med[p + ' standard']:.1f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="first size, logits 1/30/1000, one seed, no timing")
    parser.add_argument("--seeds", type=int, default=3, help="draws per table cell")
    parser.add_argument("--plot", default="accuracy.png", help="PNG path ('' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-gradients", action="store_true",
                        help="skip the gradient table (the slowest part)")
    args = parser.parse_args(argv)

    logits, sizes, seeds = LOGITS, SIZES, args.seeds
    if args.quick:
        logits, sizes, seeds = [1.0, 30.0, 1000.0], SIZES[:1], 1
    table = accuracy_table(logits, sizes, KINDS, seeds)
    if args.plot:
        plot(table, logits, args.plot)
    if not args.no_gradients:
        print()
        gradient_table(logits, sizes[:2], KINDS, max(1, seeds - 1))
    if not (args.quick or args.no_timing):
        print()
        timing(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
