"""The strategies' edge-class shares and the mutation study, as docs/testing.rst shows them.

Prints two tables in reStructuredText:

* the share of draws of the documented call (``attention_cases(convention="torch",
  library="torch", dtype=..., dropout=False, shape=shapes(min_len=1))``) that fall in
  each edge class, judged from the drawn arrays (``tests/helpers/edge_shares.py``),
  over ``--draws`` derandomized draws, plus the refattn convention's for the classes the
  torch convention cannot draw;
* for each mutant of ``tests/helpers/mutant_kernels.py``, the number of examples the
  documented forward test (and, in float64, its gradient test) drew before failing,
  derandomized (as the CI profile draws), "-" for not caught within ``--examples``;
  then over ``--seeds`` random seeds, in float64, the largest number needed and how
  many seeds missed it.

Run from the repository root (it imports the tests' helpers)::

    python benchmarks/edge_study.py
    python benchmarks/edge_study.py --draws 500 --seeds 0   # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refattn.testing import strategies as ras  # noqa: E402
from tests.helpers import mutant_kernels as mk  # noqa: E402
from tests.helpers.edge_shares import FEATURES, shares  # noqa: E402

DTYPES = ("float64", "float32", "float16", "bfloat16")


def share_table(draws: int) -> None:
    columns = {dtype: shares(mk.forward_cases(dtype), draws)[1]
               for dtype in ("float64", "float32")}
    columns["refattn"] = shares(ras.attention_cases(convention="refattn"), draws)[1]
    print(f"Shares over {draws} derandomized draws")
    print("torch convention (documented call) float64 | float32 | refattn convention")
    for feature in FEATURES:
        row = " | ".join(f"{100 * columns[c][feature]:5.1f} %" for c in columns)
        print(f"{feature:18s} {row}")


def mutant_table(examples: int, seeds: int, only: list[str] | None = None) -> None:
    print(f"\nExamples to catch (derandomized, max {examples}); forward per dtype, "
          f"gradients in float64; then over {seeds} seeds, float64 forward: worst, missed")
    for bug in only or mk.MUTANTS:
        found = [mk.examples_to_catch(bug, d, max_examples=examples) for d in DTYPES]
        found.append(mk.examples_to_catch(bug, "float64", "gradients",
                                          max_examples=examples))
        spread = [mk.examples_to_catch(bug, "float64", max_examples=examples, seed=s)
                  for s in range(seeds)]
        caught = [n for n in spread if n is not None]
        cells = " | ".join("-" if n is None else str(n) for n in found)
        worst = max(caught) if caught else "-"
        print(f"{bug:26s} {cells} | {worst} | {len(spread) - len(caught)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated mutants (default all); "
                        "skips the shares")
    args = parser.parse_args()
    os.environ.setdefault("REFATTN_REPRO_DIR", tempfile.mkdtemp(prefix="edge-study-"))
    start = time.perf_counter()
    if not args.only:
        share_table(args.draws)
    mutant_table(args.examples, args.seeds, args.only.split(",") if args.only else None)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
