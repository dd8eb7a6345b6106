"""The ``refattn`` command: audit an attention implementation against the oracle.

``refattn check`` (the default target ``torch``) runs torch's
``scaled_dot_product_attention`` under each backend torch offers on this machine; a
target ``package.module:function`` runs a user's function in the convention of
``--convention`` on arrays of ``--library``. Both are compared with refattn on seeded
cases in feature groups, one table row per (group, backend, dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, TextIO

__all__ = ["main"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
_DEFAULT_DTYPES = "float64,float32,bfloat16"
_CONVENTIONS = ("torch", "flash", "jax", "flex")
_LIBRARIES = ("numpy", "torch", "cupy", "jax")
# Semantic failures printed in full (with their snippet); the JSON report has them all.
_SHOWN = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn", description="The attention oracle: audit attention implementations."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", help="audit an attention implementation against the oracle",
        description="Audit an attention implementation against refattn: torch's "
        "scaled_dot_product_attention under each backend torch offers (TARGET 'torch', "
        "the default), or your own function (TARGET 'package.module:function'). Exit "
        "status 0 when every disagreement is a documented deviation, 1 otherwise (with "
        "--strict, 1 on documented deviations too), 2 on bad arguments.",
    )
    check.add_argument("target", nargs="?", default="torch",
                       help="'torch' (default) or 'package.module:function'")
    check.add_argument("--convention", default="torch", choices=_CONVENTIONS,
                       help="argument conventions of a function TARGET (default: torch's "
                       "scaled_dot_product_attention)")
    check.add_argument("--library", choices=_LIBRARIES, default=None,
                       help="array library handed to a function TARGET (default numpy; "
                       "torch for TARGET torch)")
    check.add_argument("--device", default=None,
                       help="device of those arrays, e.g. cuda:0 (default: the library's; "
                       "TARGET torch: cuda when torch sees one, else cpu)")
    check.add_argument("--examples", type=int, default=20, help="cases per feature group")
    check.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    check.add_argument("--dtype", default=_DEFAULT_DTYPES,
                       help=f"comma-separated dtypes among {', '.join(_DTYPES)} "
                       f"(default {_DEFAULT_DTYPES})")
    check.add_argument("--group", action="append", default=None,
                       help="only this feature group (repeatable)")
    check.add_argument("--grad", action="store_true",
                       help="check gradients through autograd too (torch or jax arrays)")
    check.add_argument("--strict", action="store_true",
                       help="fail on documented deviations too")
    check.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    check.add_argument("--plot", metavar="FILE.png",
                       help="draw the errors against their budgets, per group "
                       "(needs matplotlib: pip install 'refattn[plot]')")
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"refattn: error: {message}", file=sys.stderr)
    return 2


class _Progress:
    """A progress bar on stderr when it is a terminal (rich's when installed)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.rich: Any = None
        self.task: Any = None
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import Progress

            self.rich = Progress(console=Console(file=stream), transient=True)
            self.task = self.rich.add_task("refattn check", total=total)
            self.rich.start()
        except ImportError:
            self.rich = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.update(self.task, completed=done, description=label)
            if done >= total:
                self.rich.stop()
            return
        width = 30
        filled = width * done // max(total, 1)
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"
        print(f"{line[:110]:<110}", end="" if done < total else "\n", file=self.stream,
              flush=True)


def _ratio_text(r: Any) -> str:
    if not r.cases or not r.worst_budget:
        return "-"
    tensor = f" ({r.worst_tensor})" if r.worst_tensor and r.worst_tensor != "out" else ""
    return f"{r.worst_error:.2e} / {r.worst_budget:.2e}{tensor}"


def _print_table(reports: list, out: TextIO) -> None:
    header = ("group", "backend", "dtype", "cases", "worst error / budget", "verdict")
    rows = [(r.group, r.backend, r.dtype, str(r.cases), _ratio_text(r), r.verdict)
            for r in reports]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line.format(*row).rstrip(), file=out)


def _json_safe(x: Any) -> Any:
    # JSON has no inf or NaN: write them as strings.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _report_json(reports: list, meta: dict[str, Any]) -> dict[str, Any]:
    cells = []
    for r in reports:
        cells.append({
            "group": r.group, "backend": r.backend, "dtype": r.dtype, "cases": r.cases,
            "worst_ratio": r.worst_ratio, "worst_error": r.worst_error,
            "worst_budget": r.worst_budget, "worst_tensor": r.worst_tensor,
            "verdict": r.verdict, "results": [x.to_dict() for x in r.results],
        })
    return _json_safe({**meta, "cells": cells})


def _plot(reports: list, path: str, title: str) -> None:
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
    floor = 1e-4
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        for b_index, backend in enumerate(backends):
            xs, ys = [], []
            for r in reports:
                if r.dtype != dtype or r.backend != backend:
                    continue
                x = groups.index(r.group) + (b_index - (len(backends) - 1) / 2) * 0.15
                for res in r.results:
                    for name, err in res.errors.items():
                        budget = res.budgets.get(name, 0.0)
                        ratio = err / budget if budget else (0.0 if err == 0 else math.inf)
                        xs.append(x)
                        ys.append(min(max(ratio, floor), 1e4))
            ax.scatter(xs, ys, s=12, alpha=0.6, color=colors[b_index % len(colors)],
                       label=backend)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.text(-0.45, 1.15, "budget", ha="left", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, 2e4)
        ax.set_ylabel(f"{dtype}\nerror / budget")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=len(backends))
    axes[0, 0].set_title(f"{title}: error / budget per case and tensor "
                         f"(exact results drawn at {floor:g})", fontsize=10)
    axes[-1, 0].set_xticks(range(len(groups)))
    axes[-1, 0].set_xticklabels(groups, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_failures(reports: list, out: TextIO) -> None:
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
            print(f"\n  ... and {others} more semantic failures (cases in the JSON report):",
                  file=out)
            for r, f in [x for x in semantic if not x[1].snippet][:_SHOWN]:
                print(f"  - {r.group} / {r.backend} / {r.dtype}: {f.detail}", file=out)
    if precision:
        print("\nPrecision failures (error over its budget):", file=out)
        for r, f in precision[:10]:
            print(f"  - {r.group} / {r.backend} / {r.dtype}: {f.detail}\n    case: {f.case}",
                  file=out)
        if len(precision) > 10:
            print(f"  ... and {len(precision) - 10} more (see --json)", file=out)


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import _check

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad or not dtypes:
        return _fail(parser, f"--dtype must list some of {', '.join(_DTYPES)}; got {args.dtype!r}")
    if args.examples < 1:
        return _fail(parser, f"--examples must be at least 1; got {args.examples}")
    torch_target = args.target == "torch"
    if torch_target and (args.convention != "torch" or args.library not in (None, "torch")):
        return _fail(parser, "TARGET torch is torch's SDPA: it takes no --convention or "
                     "--library other than torch")
    library = args.library or ("torch" if torch_target else "numpy")
    if args.grad and library not in ("torch", "jax"):
        return _fail(parser, f"--grad differentiates through autograd: it needs --library "
                     f"torch or jax; got {library}")
    convention = _check.CONVENTIONS[args.convention]
    groups = args.group or list(convention.groups)
    unknown = [g for g in groups if g not in convention.groups]
    if unknown:
        return _fail(parser, f"unknown --group {unknown[0]!r} for the {args.convention} "
                     "convention; choose from "
                     + ", ".join(repr(g) for g in convention.groups))
    if "bfloat16" in dtypes and library == "numpy":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return _fail(parser, "bfloat16 NumPy arrays need ml_dtypes: pip install ml_dtypes")
    versions = {}
    try:
        if torch_target:
            try:
                import torch
            except ImportError:
                return _fail(parser, "the torch target needs PyTorch: pip install "
                             "'refattn[torch]'")
            backends = _check.torch_backends(args.device)
            versions["torch"] = torch.__version__
            what = f"torch {torch.__version__} SDPA on {backends[0].library.device}"
        else:
            backends = [_check.user_backend(args.target, convention=args.convention,
                                            library=library, device=args.device)]
            what = (f"{args.target} ({args.convention} convention, {library} arrays"
                    + (f" on {args.device}" if args.device else "") + ")")
    except (ValueError, ImportError) as exc:
        return _fail(parser, str(exc))
    print(f"refattn check: {what}; {args.examples} cases per group, seed {args.seed}"
          + (", with gradients" if args.grad else ""), flush=True)
    total = len(groups) * len(backends) * len(dtypes)
    progress = _Progress(total, sys.stderr)
    start = time.perf_counter()
    with _check.quiet_warnings():
        reports = _check.audit(backends, groups=groups, dtypes=dtypes,
                               examples=args.examples, seed=args.seed, grad=args.grad,
                               progress=progress)
    elapsed = time.perf_counter() - start
    _print_table(reports, sys.stdout)
    _print_failures(reports, sys.stdout)
    failures = [f for r in reports for f in r.failures if f.status in ("semantic", "precision")]
    known = [f for r in reports for f in r.failures if f.status == "known"]
    semantic = sum(f.status == "semantic" for f in failures)
    if args.json:
        from . import __version__

        meta = {"refattn": __version__, "target": args.target,
                "convention": args.convention, "library": library, "device": args.device,
                "dtypes": dtypes, "groups": groups, "examples": args.examples,
                "seed": args.seed, "grad": args.grad, "seconds": elapsed, **versions,
                "summary": {"semantic": semantic, "precision": len(failures) - semantic,
                            "known": len(known)}}
        with open(args.json, "w") as fh:
            json.dump(_report_json(reports, meta), fh, indent=2, default=str)
    if args.plot:
        try:
            _plot(reports, args.plot, f"refattn check {args.target}")
        except ImportError:
            print("refattn: --plot needs matplotlib: pip install 'refattn[plot]'",
                  file=sys.stderr)
            return 2
    print(f"\n{semantic} semantic differences, {len(failures) - semantic} precision "
          f"failures, {len(known)} known deviations ({elapsed:.0f} s)")
    if failures or (args.strict and known):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``refattn`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args, parser)
    return _fail(parser, f"unknown command {args.command!r}")  # pragma: no cover - argparse
