"""Peak memory of refattn's blocked path at long sequence lengths.

Each configuration runs in a fresh subprocess, which reports its peak resident set size
(``resource.getrusage(...).ru_maxrss``) after the attention call minus the peak after
importing the libraries (the baseline). That extra memory is printed next to the budget
``inputs + outputs + 512 MiB``: the blocked path's own working memory (blocks of scores
per worker, copies of K and V with a column of ones) must fit in the 512 MiB, where the
direct path would need several (B, H, L, S) float64 arrays (8 GiB each at L = S = 32768).

Run from the repository root::

    python benchmarks/memory.py                 # L = S = 32768, forward and backward
    python benchmarks/memory.py --length 8192   # a quicker run
    python benchmarks/memory.py --no-backward

Linux reports ru_maxrss in KiB (macOS in bytes; handled below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 2**20

CHILD = r"""
import json, resource, sys, time
import numpy as np
import refattn

def peak():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024

B, H, L, S, E, causal, backward = json.loads(sys.argv[1])
baseline = peak()
rng = np.random.default_rng(0)
q = rng.standard_normal((B, H, L, E))
k = rng.standard_normal((B, H, S, E))
v = rng.standard_normal((B, H, S, E))
t0 = time.perf_counter()
if backward:
    dout = rng.standard_normal((B, H, L, E))
    # The saved forward is an input of the backward (ru_maxrss covers both calls).
    saved = refattn.attention(q, k, v, causal=causal, return_lse=True)
    grads = refattn.attention_backward(dout, q, k, v, causal=causal, output=saved.out,
                                       lse=saved.lse)
    inputs = (q.nbytes + k.nbytes + v.nbytes + dout.nbytes + saved.out.nbytes
              + saved.lse.nbytes)
    outputs = grads.dq.nbytes + grads.dk.nbytes + grads.dv.nbytes
else:
    res = refattn.attention(q, k, v, causal=causal, return_lse=True)
    inputs = q.nbytes + k.nbytes + v.nbytes
    outputs = res.out.nbytes + res.lse.nbytes
print(json.dumps({"baseline": baseline, "peak": peak(), "inputs": inputs,
                  "outputs": outputs, "seconds": time.perf_counter() - t0}))
"""


def measure(config: list) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
        check=True, env=os.environ.copy(),
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="L = S (default 32768)")
    parser.add_argument("--dim", type=int, default=64, help="E = Ev (default 64)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    args = parser.parse_args(argv)
    L = S = args.length
    E = args.dim
    print(f"B=1, H=1, L=S={L}, E={E}, float64; budget = inputs + outputs + 512 MiB")
    print(f"(the direct path would hold (L, S) float64 arrays of {L * S * 8 / MIB:.0f} MiB each)")
    print()
    header = (f"{'pass':>9} {'causal':>6} {'extra MiB':>10} {'budget MiB':>11} "
              f"{'within':>6} {'s':>7}")
    print(header)
    print("-" * len(header))
    ok = True
    passes = [False] if args.no_backward else [False, True]
    for backward in passes:
        for causal in (False, True):
            r = measure([1, 1, L, S, E, causal, backward])
            extra = r["peak"] - r["baseline"]
            budget = r["inputs"] + r["outputs"] + 512 * MIB
            within = extra <= budget
            ok &= within
            print(f"{'backward' if backward else 'forward':>9} {'yes' if causal else 'no':>6} "
                  f"{extra / MIB:>10.1f} {budget / MIB:>11.1f} {'yes' if within else 'NO':>6} "
                  f"{r['seconds']:>7.1f}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
