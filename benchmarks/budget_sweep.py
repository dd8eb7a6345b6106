"""How close correct low-precision kernels come to the budget of the float32 rule.

Draws ``--cases`` problems (default 10000) spread over the shape classes below, with
logits from 1 to 300 (q and k scaled so that the scores ``scale q.k`` have a typical
size T, log-uniform over [1, 300]; [100, 300] for the issue's class), runs each kernel on
them in ``--dtype`` (float32 by default) and judges every output with the budget of
``refattn.testing.assert_attention_close``: ``2 x max|baseline - oracle| + floor``.
Prints per class and kernel the failures (a correct kernel must have none), the largest
and the median ratio error / budget, and the failures the rule had without the floor's
score term (``2 x baseline + u max|V|``, the rule before that term), so that what the
term changes is measured in the same run.

Shape classes (q (B, H, L, E), k and v (B, K, S, E)):

* ``issue``: q (3, 4, 11, 14), k and v (3, 1, 3, 14), causal, scale 2.0: one key
  head for four query heads, causal rows of one to three keys, so that at large logits a
  row's output hangs on the rounding of two or three scores;
* ``clustered``: the same shapes with queries and keys near one direction, so that the
  scores of a row lie within a few units of each other at size T (many weights carry
  the scores' rounding);
* ``small``: random B = 1, H = 2, K in {1, 2}, L and S in [1, 16], E in {8, 16, 32, 64},
  causal or not, the default scale.

Correct kernels: torch's math backend (``sdpa_kernel(SDPBackend.MATH)``), torch's default
CPU path, the plain kernel of docs/testing.rst's example file (``q k^T`` by matmul, exp
after max subtraction, normalise, ``@ v``, all in float32, written out here again since
benchmarks do not import tests), and the same plain kernel with each score summed
one product at a time from the last to the first (an order no baseline uses, as a
different BLAS or machine would). Buggy kernels, which must fail: the plain kernel with
the scale 1% too large, and (in the causal classes) with the causal mask letting query
i see key i + 1; a bug that cannot change a case's output (one key per row) is counted
as a case it could not show. For them "fails" counts the cases caught (all, unless the
score term hides a bug) and "max" is the smallest ratio, how near a bug came to passing.

Run from the repository root::

    python benchmarks/budget_sweep.py                    # 10000 cases, float32
    python benchmarks/budget_sweep.py --cases 2000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

CLASSES = ["issue", "clustered", "small"]
CORRECT = ["torch math", "torch default", "plain", "plain, reversed dot"]
BUGGY = ["scale +1%", "causal +1"]


def draw(cls: str, seed: int, dtype: str) -> dict[str, Any]:
    """One problem of class ``cls``: torch tensors q, k, v and its options."""
    import torch

    rng = np.random.default_rng([seed, CLASSES.index(cls)])
    if cls == "small":
        K = int(rng.integers(1, 3))
        L, S = (int(n) for n in rng.integers(1, 17, size=2))
        E = int(rng.choice([8, 16, 32, 64]))
        qs, ks, causal, scale = (1, 2, L, E), (1, K, S, E), bool(rng.random() < 0.5), None
    else:
        qs, ks, causal, scale = (3, 4, 11, 14), (3, 1, 3, 14), True, 2.0
    E = qs[-1]
    low, high = (100.0, 300.0) if cls == "issue" else (1.0, 300.0)
    T = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if cls == "clustered":
        # Unit-size rows near one direction: scores equal to within ~10% of T.
        base = rng.standard_normal(E) / math.sqrt(E)
        q = base + 0.1 * rng.standard_normal(qs) / math.sqrt(E)
        k = base + 0.1 * rng.standard_normal(ks) / math.sqrt(E)
        a = math.sqrt(T / abs(scale))
    else:
        q, k = rng.standard_normal(qs), rng.standard_normal(ks)
        # Entries of size a: |scale q.k| has a typical size |scale| a^2 sqrt(E) = T.
        a = math.sqrt(T / ((abs(scale) if scale else E ** -0.5) * math.sqrt(E)))
    v = rng.standard_normal(ks)
    tdtype = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x).to(tdtype) for x in (q * a, k * a, v))
    return {"q": q, "k": k, "v": v, "causal": causal, "scale": scale, "T": T}


def plain(q: Any, k: Any, v: Any, *, causal: bool, scale: float | None,
          reach: int = 0, scale_error: float = 0.0, reversed_dot: bool = False) -> Any:
    """The docs' plain kernel in float32 (grouped-query heads repeated), with the bugs."""
    import torch

    dtype = q.dtype
    q, k, v = (x.to(torch.float32) for x in (q, k, v))
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = (q.shape[-1] ** -0.5 if scale is None else scale) * (1 + scale_error)
    if reversed_dot:
        # One float32 product at a time, from the last dim to the first.
        s = torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=torch.float32)
        for e in range(q.shape[-1] - 1, -1, -1):
            s = s + q[..., :, None, e] * k[..., None, :, e]
        s = s * scale
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(reach), float("-inf"))
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return ((p / p.sum(dim=-1, keepdim=True)) @ v).to(dtype)


def run_kernel(name: str, case: dict[str, Any]) -> Any:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, causal, scale = (case[n] for n in ("q", "k", "v", "causal", "scale"))
    with torch.no_grad():
        if name.startswith("torch"):
            kw = {"is_causal": causal, "scale": scale, "enable_gqa": True}
            if name == "torch math":
                with sdpa_kernel(SDPBackend.MATH):
                    return F.scaled_dot_product_attention(q, k, v, **kw)
            return F.scaled_dot_product_attention(q, k, v, **kw)
        return plain(q, k, v, causal=causal, scale=scale,
                     reversed_dot=name == "plain, reversed dot",
                     scale_error=0.01 if name == "scale +1%" else 0.0,
                     reach=1 if name == "causal +1" else 0)


def judge(task: tuple[str, int, str, str]) -> list[tuple[str, str, float, float, bool]]:
    """(class, kernel, error / budget, error / old budget, bug visible) per kernel."""
    import torch
    from array_api_compat import array_namespace

    import refattn
    from refattn.testing._baseline import EPS, numpy_rounder
    from refattn.testing._budget import compute_reference

    torch.set_num_threads(1)
    cls, seed, dtype, library = task
    case = draw(cls, seed, dtype)
    q, k, v = (case[n].to(torch.float32).numpy() for n in ("q", "k", "v"))
    options = {"causal": case["causal"], "scale": case["scale"]}
    if library == "torch":
        # As assert_attention_close judges torch tensors: the baselines run in torch.
        low = getattr(torch, dtype)
        ref = compute_reference(
            case["q"], case["k"], case["v"], kind=dtype, options=options,
            round_to=lambda x: x.to(low).to(torch.float32), xp=array_namespace(case["q"]))
    else:
        # As refattn check judges any library: the baselines run in NumPy.
        ref = compute_reference(q, k, v, kind=dtype, options=options,
                                round_to=numpy_rounder(dtype), xp=np)
    budget = ref.budget("out", 2.0)[0]
    u = EPS[dtype] / 2
    old = 2.0 * ref.baseline_error["out"] + u * float(np.max(np.abs(v)))
    rows = []
    for name in CORRECT + BUGGY:
        if name == "causal +1" and not case["causal"]:
            continue
        out = run_kernel(name, case).to(torch.float64).numpy()
        err = float(np.max(np.abs(out - ref.oracle["out"])))
        visible = True
        if name in BUGGY:
            # The bug shows only if the exact result of the buggy formula differs.
            opts = dict(options)
            if name == "scale +1%":
                E = q.shape[-1]
                opts["scale"] = (E ** -0.5 if case["scale"] is None else case["scale"]) * 1.01
            else:
                opts.update(causal=False, mask=np.tri(q.shape[-2], k.shape[-2], 1, dtype=bool))
            buggy = refattn.attention(q.astype(np.float64), k.astype(np.float64),
                                      v.astype(np.float64), **opts)
            # Against the rule without the score term: a bug that term hides then
            # shows as a case the new rule passes.
            visible = bool(np.max(np.abs(buggy - ref.oracle["out"])) > old)
        rows.append((cls, name, err / budget, err / old, visible))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="problems in all")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--library", default="torch", choices=["torch", "numpy"],
                        help="where the baselines run: torch (as assert_attention_close "
                             "does for torch tensors) or numpy (as refattn check does)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes")
    args = parser.parse_args(argv)
    tasks = [(CLASSES[i % len(CLASSES)], i // len(CLASSES), args.dtype, args.library)
             for i in range(args.cases)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = [row for rows in pool.map(judge, tasks, chunksize=32) for row in rows]
    elapsed = time.perf_counter() - start
    print(f"{args.cases} cases in {args.dtype}, baselines in {args.library}, {elapsed:.0f} s "
          f"on {args.jobs} processes")
    print("ratio = max|out - oracle| / budget; 'old' = the rule without the score term")
    header = (f"{'class':>10} {'kernel':>20} | {'cases':>5} {'fails':>5} {'max':>7} "
              f"{'median':>7} | {'old fails':>9} {'old max':>8}")
    print(header)
    print("-" * len(header))
    for cls in CLASSES:
        for name in CORRECT + BUGGY:
            mine = [r for r in results if r[0] == cls and r[1] == name and r[4]]
            if not mine:
                continue
            ratios, olds = [r[2] for r in mine], [r[3] for r in mine]
            # For a bug the telling number is the smallest ratio: how near it came to
            # passing.
            worst = min if name in BUGGY else max
            print(f"{cls:>10} {name:>20} | {len(mine):>5} "
                  f"{sum(r > 1 for r in ratios):>5} {worst(ratios):7.3g} "
                  f"{statistics.median(ratios):7.3g} | {sum(o > 1 for o in olds):>9} "
                  f"{worst(olds):8.3g}")
    hidden = sum(1 for r in results if r[1] in BUGGY and not r[4])
    print(f"bug cases whose exact result stays within the old budget (not shown): {hidden}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
