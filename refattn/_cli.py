"""The ``refattn`` command: audit an attention implementation against the oracle.

``refattn check`` (the default target ``torch``) runs torch's
``scaled_dot_product_attention`` under each backend torch offers on this machine
against refattn on seeded cases in several feature groups, and prints one row per
(group, backend, dtype).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TextIO

__all__ = ["main"]

_DTYPES = ("float64", "float32")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn", description="The attention oracle: audit attention implementations."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", help="audit an attention implementation against the oracle",
        description="Audit torch's scaled_dot_product_attention (each CPU backend) against "
        "refattn. Exit status 0 when every disagreement is a documented deviation, 1 "
        "otherwise (with --strict, 1 on documented deviations too).",
    )
    check.add_argument("target", nargs="?", default="torch", choices=["torch"],
                       help="what to audit (default: torch)")
    check.add_argument("--examples", type=int, default=20, help="cases per feature group")
    check.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    check.add_argument("--dtype", default=",".join(_DTYPES),
                       help="comma-separated dtypes (float64, float32)")
    check.add_argument("--group", action="append", default=None,
                       help="only this feature group (repeatable)")
    check.add_argument("--strict", action="store_true",
                       help="fail on documented deviations too")
    check.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"refattn: error: {message}", file=sys.stderr)
    return 2


def _print_table(reports: list, out: TextIO) -> None:
    header = ("group", "backend", "dtype", "cases", "worst error / budget", "verdict")
    rows = []
    for r in reports:
        ratio = (f"{r.worst_error:.2e} / {r.worst_budget:.2e}" if r.cases and r.worst_budget
                 else "-")
        rows.append((r.group, r.backend, r.dtype, str(r.cases), ratio, r.verdict))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line.format(*row), file=out)


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import _check

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad or not dtypes:
        return _fail(parser, f"--dtype must list some of {', '.join(_DTYPES)}; got {args.dtype!r}")
    if args.examples < 1:
        return _fail(parser, f"--examples must be at least 1; got {args.examples}")
    groups = args.group or list(_check.GROUPS)
    unknown = [g for g in groups if g not in _check.GROUPS]
    if unknown:
        return _fail(parser, f"unknown --group {unknown[0]!r}; choose from "
                     + ", ".join(repr(g) for g in _check.GROUPS))
    try:
        import torch
    except ImportError:
        return _fail(parser, "the torch target needs PyTorch: pip install 'refattn[torch]'")
    print(f"refattn check: torch {torch.__version__}, {args.examples} cases per group, "
          f"seed {args.seed}", flush=True)

    def progress(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        print(f"\r  {done}/{total} cells", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    with _check.quiet_torch_warnings():
        reports = _check.audit(
            _check.torch_backends(), groups=groups, dtypes=dtypes, examples=args.examples,
            seed=args.seed, progress=progress,
        )
    _print_table(reports, sys.stdout)
    failures = [f for r in reports for f in r.failures if f.status in ("semantic", "precision")]
    known = [f for r in reports for f in r.failures if f.status == "known"]
    for f in failures[:10]:
        print(f"\nFAIL {f.group} / {f.backend} / {f.dtype}: {f.status}: {f.detail}\n  case: "
              f"{f.case}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in reports], fh, indent=2, default=str)
    print(f"\n{len(failures)} unexplained disagreements, {len(known)} known deviations")
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
