"""The report: the audit over every (group, backend, dtype) cell, its table and plot.

:func:`audit` runs the cases of each cell, judges them (with the group budget for low
precisions), shrinks the first semantic failure and sums the cell up in a
:class:`GroupReport`; :func:`print_table`, :func:`print_failures`, :func:`report_json`
and :func:`plot` write the reports out.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from .cases import Case, make_case
from .judging import CaseResult, apply_group_budget, error_ratio, evaluate
from .shrinking import shrink_semantic
from .targets import Backend

__all__ = ["GroupReport", "audit", "plot", "print_failures", "print_table",
           "quiet_warnings", "report_json", "summary", "summary_line"]

# Semantic failures printed in full (with their snippet); the JSON report has them all.
_SHOWN = 5


@dataclass
class GroupReport:
    """One (group, backend, dtype) cell of the table.

    ``worst_*`` describe the case the row shows: on a failing row the worst failing case
    (its error and budget, or ``worst_note`` when it failed without an error to weigh:
    "raised ValueError", "NaN", "shape", ...), otherwise the worst passing case.
    """

    group: str
    backend: str
    dtype: str
    cases: int = 0
    worst_ratio: float = 0.0
    worst_error: float = 0.0
    worst_budget: float = 0.0
    worst_tensor: str = ""
    worst_note: str = ""
    compared: int = 0
    verdict: str = "ok"
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("precision", "semantic", "known")]

    def count(self, status: str) -> int:
        """How many of the row's cases have ``status``."""
        return sum(r.status == status for r in self.results)


def audit(
    backends: list[Backend],
    *,
    groups: list[str],
    dtypes: list[str],
    examples: int,
    seed: int,
    grad: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    shrink_failures: bool = True,
) -> list[GroupReport]:
    """Run every (group, backend, dtype) cell and summarise it.

    torch runs on one intra-op thread meanwhile (``tiny_problem_threads``)."""
    with tiny_problem_threads():
        return _audit_cells(backends, groups=groups, dtypes=dtypes, examples=examples,
                            seed=seed, grad=grad, progress=progress,
                            shrink_failures=shrink_failures)


@contextlib.contextmanager
def tiny_problem_threads() -> Iterator[None]:
    """torch on one intra-op thread while the audit runs, then as it was.

    Every case is tiny (``cases.py``: B <= 2, H <= 6, L, S <= 16, E <= 32: at most
    3072 scores), where torch's thread pool only costs: its threads are woken for
    microseconds of work per operation and, on a machine whose cores are busy with other
    work, wait for a core each time. Measured on 2 cores with two other busy processes,
    the same code took 29 s with torch's default 2 threads and 5.5 s with 1 (the
    verdicts are the same). Nothing is imported here: a process that has not imported
    torch has no pool to set.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _audit_cells(
    backends: list[Backend],
    *,
    groups: list[str],
    dtypes: list[str],
    examples: int,
    seed: int,
    grad: bool,
    progress: Callable[[int, int, str], None] | None,
    shrink_failures: bool,
) -> list[GroupReport]:
    reports = []
    total = len(groups) * len(backends) * len(dtypes)
    for group in groups:
        for backend in backends:
            cases = [make_case(group, seed, i, backend.convention.name)
                     for i in range(examples)]
            for dtype_name in dtypes:
                rep = GroupReport(group, backend.name, dtype_name)
                use_grad = grad and backend.grads
                evaluated = [(case, *evaluate(case, backend, dtype_name, grad=use_grad))
                             for case in cases]
                if dtype_name != "float64":
                    apply_group_budget(evaluated)
                _summarise(rep, evaluated)
                if shrink_failures:
                    shrink_semantic(evaluated, backend, dtype_name, use_grad)
                reports.append(rep)
                if progress is not None:
                    progress(len(reports), total, f"{group} / {backend.name} / {dtype_name}")
    return reports


def _show_worst(rep: GroupReport, pool: list[CaseResult]) -> None:
    # The row's worst case among `pool`: the largest error / budget, or, where no case of
    # the pool has an error to weigh, the short form of the first one's failure.
    numeric = [r for r in pool if r.errors]
    if not numeric:
        rep.worst_note = pool[0].brief or pool[0].status if pool else ""
        return
    worst = max(numeric, key=lambda r: r.ratio)
    name = worst.worst or "out"
    rep.worst_ratio, rep.worst_error = worst.ratio, worst.errors[name]
    rep.worst_budget, rep.worst_tensor = worst.budgets.get(name, 0.0), name


# Why a passing case has nothing in the error column, as the verdict words it: alone
# (every case of the row) and counted next to compared ones.
_UNCOMPARED = {"refused by both": ("refused by both", "refused by both"),
               "empty": ("nothing to compare: empty outputs", "with empty outputs")}


def _summarise(rep: GroupReport, evaluated: list[tuple[Case, CaseResult, Any]]) -> None:
    for _, r, _ in evaluated:
        rep.results.append(r)
        if r.status in ("skipped", "unsupported"):
            rep.verdict = f"{r.status} ({r.detail.split(':')[0]})"
            continue
        rep.cases += 1
        rep.compared += bool(r.errors)
    semantic, precision, known = (rep.count(s) for s in ("semantic", "precision", "known"))
    if semantic or precision:
        status = "semantic" if semantic else "precision"
        _show_worst(rep, [r for r in rep.results if r.status == status])
        rep.verdict = f"FAIL ({status}): {semantic or precision} of {rep.cases} cases"
        if semantic and precision:
            rep.verdict += f"; precision: {precision}"
        return
    _show_worst(rep, [r for r in rep.results if r.status == "ok"])
    rep.worst_note = ""
    uncompared = {words: sum(r.status == "ok" and r.brief == brief for r in rep.results)
                  for brief, words in _UNCOMPARED.items()}
    others = "".join(f"; {n} {words[1]}" for words, n in uncompared.items() if n)
    if known:
        names = sorted({f.detail for f in rep.failures})
        rep.verdict = (f"known deviation ({known} of {rep.cases} cases{others}): "
                       + "; ".join(names))
        return
    alone = [words[0] for words, n in uncompared.items() if n == rep.cases]
    if rep.cases and alone:
        rep.verdict = f"ok ({alone[0]})"
    elif others:
        rep.verdict = f"ok ({rep.compared} compared{others})"


def summary(reports: list[GroupReport]) -> dict[str, Any]:
    """What the report counts: rows by verdict and cases by status.

    Rows are (group, backend, dtype) cells; a row fails when one of its cases does, and
    has known deviations when some of its cases are documented deviations and none fails.

    Examples
    --------
    >>> summary([GroupReport("plain", "math", "float64", cases=3)])["rows"]
    {'total': 1, 'ok': 1, 'fail': 0, 'known': 0, 'not checked': 0}
    """
    rows = {"total": len(reports), "ok": 0, "fail": 0, "known": 0, "not checked": 0}
    for r in reports:
        kind = r.verdict.split(" ")[0]
        rows[{"FAIL": "fail", "known": "known", "skipped": "not checked",
              "unsupported": "not checked"}.get(kind, "ok")] += 1
    cases = {status: sum(r.count(status) for r in reports)
             for status in ("semantic", "precision", "known")}
    return {"rows": rows, **cases}


def summary_line(reports: list[GroupReport]) -> str:
    """The report's last line: rows by verdict, with the cases behind them.

    Examples
    --------
    >>> summary_line([GroupReport("plain", "math", "float64", cases=3)])
    '1 rows (group x backend x dtype): 1 ok, 0 FAIL, 0 with known deviations'
    """
    s = summary(reports)
    rows = s["rows"]
    fail = f"{rows['fail']} FAIL"
    if rows["fail"]:
        fail += f" ({s['semantic']} cases semantic, {s['precision']} precision)"
    known = f"{rows['known']} with known deviations"
    if rows["known"]:
        known += f" ({s['known']} cases)"
    parts = [f"{rows['ok']} ok", fail, known]
    if rows["not checked"]:
        parts.append(f"{rows['not checked']} skipped or unsupported")
    return f"{rows['total']} rows (group x backend x dtype): " + ", ".join(parts)


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence warnings of the audited code (torch's dropout test hook, overflows)."""
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# --- writing it out -------------------------------------------------------------------


def _ratio_text(r: GroupReport) -> str:
    if r.worst_note:
        return r.worst_note
    if not r.compared:
        return "-"
    tensor = f" ({r.worst_tensor})" if r.worst_tensor and r.worst_tensor != "out" else ""
    return f"{r.worst_error:.2e} / {r.worst_budget:.2e}{tensor}"


def print_table(reports: list[GroupReport], out: TextIO) -> None:
    """One row per cell: cases, the worst error against its budget, the verdict."""
    header = ("group", "backend", "dtype", "cases", "worst error / budget", "verdict")
    rows = [(r.group, r.backend, r.dtype, str(r.cases), _ratio_text(r), r.verdict)
            for r in reports]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line.format(*row).rstrip(), file=out)
    print("(cases: per row, those run; worst error / budget: on a FAIL row the worst "
          "failing case,\n otherwise the worst passing one; '-' where no case had an output "
          "to compare, the verdict says why)", file=out)


def print_failures(reports: list[GroupReport], out: TextIO) -> None:
    """The semantic failures with their repro snippets, then the precision failures."""
    semantic = [(r, f) for r in reports for f in r.failures if f.status == "semantic"]
    precision = [(r, f) for r in reports for f in r.failures if f.status == "precision"]
    if semantic:
        print("\nSemantic differences (not rounding):", file=out)
        shown = 0
        for r, f in semantic:
            if f.snippet and shown < _SHOWN:
                shown += 1
                print(f"\n* {r.group} / {r.backend} / {r.dtype}: {f.detail}\n  smallest "
                      f"case: {f.case}\n  repro:\n    "
                      + f.snippet.replace("\n", "\n    "), file=out)
        others = len(semantic) - shown
        if others:
            more = f"... and {others} more semantic failures" if shown else \
                f"{others} semantic failures without a repro snippet"
            print(f"\n  {more} (cases in the JSON report):", file=out)
            for r, f in [x for x in semantic if not x[1].snippet][:_SHOWN]:
                print(f"  - {r.group} / {r.backend} / {r.dtype}: {f.detail}", file=out)
    if precision:
        print("\nPrecision failures (error over its budget):", file=out)
        for r, f in precision[:10]:
            print(f"  - {r.group} / {r.backend} / {r.dtype}: {f.detail}\n    case: {f.case}",
                  file=out)
        if len(precision) > 10:
            print(f"  ... and {len(precision) - 10} more (see --json)", file=out)


def _json_safe(x: Any) -> Any:
    # JSON has no inf or NaN: write them as strings.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def report_json(reports: list[GroupReport], meta: dict[str, Any]) -> dict[str, Any]:
    """The full report as JSON-ready data: ``meta`` and every cell with its results.

    Examples
    --------
    >>> report_json([GroupReport("plain", "math", "float64")], {"seed": 0})["cells"][0][
    ...     "verdict"]
    'ok'
    """
    cells = []
    for r in reports:
        cells.append({
            "group": r.group, "backend": r.backend, "dtype": r.dtype, "cases": r.cases,
            "worst_ratio": r.worst_ratio, "worst_error": r.worst_error,
            "worst_budget": r.worst_budget, "worst_tensor": r.worst_tensor,
            "worst_note": r.worst_note, "compared": r.compared,
            "verdict": r.verdict, "results": [x.to_dict() for x in r.results],
        })
    return _json_safe({**meta, "cells": cells})


#: The plot's vertical range: ratios below are drawn at the floor (an exact result's 0
#: included), ratios above at the ceiling, with their own marker.
PLOT_FLOOR, PLOT_CEILING = 1e-4, 1e4


def _short(x: float) -> str:
    # 1e4 rather than 10000 or 1e+04.
    return f"{x:.0e}".replace("e+0", "e").replace("e-0", "e-")


def plot(reports: list[GroupReport], path: str, title: str) -> int:
    """Draw every case's error / budget per group, one panel per dtype, to ``path``.

    Ratios above ``PLOT_CEILING`` (1e4), an error without a budget included, are drawn at
    the ceiling as triangles, and the title and legend say so. Returns how many were.

    Examples
    --------
    >>> import os, tempfile
    >>> from refattn._audit.judging import CaseResult
    >>> over = CaseResult("plain", "mine", "float32", "semantic", errors={"out": 2.0},
    ...                   budgets={"out": 1e-6})
    >>> rep = GroupReport("plain", "mine", "float32", cases=1, results=[over])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot([rep], os.path.join(d, "errors.png"), "example")
    1
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.dtype for r in reports))
    groups = list(dict.fromkeys(r.group for r in reports))
    backends = list(dict.fromkeys(r.backend for r in reports))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8, 0.9 * len(groups) + 3),
                                                        2.8 * len(dtypes) + 1),
                             squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    clipped = 0
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        for b_index, backend in enumerate(backends):
            xs, ys, over = [], [], []
            for r in reports:
                if r.dtype != dtype or r.backend != backend:
                    continue
                x = groups.index(r.group) + (b_index - (len(backends) - 1) / 2) * 0.15
                for res in r.results:
                    for name, err in res.errors.items():
                        ratio = error_ratio(err, res.budgets.get(name, 0.0))
                        if ratio > PLOT_CEILING:
                            over.append(x)
                        else:
                            xs.append(x)
                            ys.append(max(ratio, PLOT_FLOOR))
            color = colors[b_index % len(colors)]
            ax.scatter(xs, ys, s=12, alpha=0.6, color=color, label=backend)
            if over:
                clipped += len(over)
                ax.scatter(over, [PLOT_CEILING] * len(over), s=40, marker="^",
                           color=color, edgecolors="black", linewidths=0.5,
                           label=f"{backend}: above {_short(PLOT_CEILING)}, drawn at "
                           f"{_short(PLOT_CEILING)} ({len(over)})")
        ax.axhline(1.0, color="black", linewidth=1)
        ax.text(-0.45, 1.15, "budget", ha="left", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(PLOT_FLOOR / 2, PLOT_CEILING * 4)
        ax.set_ylabel(f"{dtype}\nerror / budget")
        ax.grid(axis="y", alpha=0.3)
        if ax is not axes[0, 0] and any("above" in label for label in
                                        ax.get_legend_handles_labels()[1]):
            ax.legend(loc="best", fontsize=8)  # this panel's triangles, named
    axes[0, 0].legend(loc="best", fontsize=8, ncol=len(backends))
    note = f"exact results drawn at {_short(PLOT_FLOOR)}"
    if clipped:
        note += (f"; {clipped} ratios above {_short(PLOT_CEILING)} drawn at "
                 f"{_short(PLOT_CEILING)}, as triangles")
    axes[0, 0].set_title(f"{title}: error / budget per case and tensor\n({note})",
                         fontsize=10)
    # Room for the "budget" label left of the first group, whatever the number of groups.
    axes[-1, 0].set_xlim(-0.6, len(groups) - 0.4)
    axes[-1, 0].set_xticks(range(len(groups)))
    axes[-1, 0].set_xticklabels(groups, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return clipped
