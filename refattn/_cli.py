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
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["main"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
_DEFAULT_DTYPES = "float64,float32,bfloat16"
_CONVENTIONS = ("torch", "flash", "jax", "flex")
_LIBRARIES = ("numpy", "torch", "cupy", "jax")


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
                       help="array library handed to a function TARGET (default: inferred "
                       "from the target, torch, jax or cupy when its code or module uses "
                       "one of them, else numpy; torch for TARGET torch)")
    check.add_argument("--device", default=None,
                       help="device of those arrays, e.g. cuda:0 (default: the library's; "
                       "TARGET torch: cuda when torch sees one, else cpu); a device this "
                       "machine lacks ends the check before it starts, with status 2")
    check.add_argument("--examples", type=int, default=20, help="cases per feature group")
    check.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    check.add_argument("--dtype", default=None,
                       help=f"comma-separated dtypes among {', '.join(_DTYPES)} "
                       f"(default {_DEFAULT_DTYPES}); a dtype the arrays cannot hold here "
                       "is skipped with a note")
    check.add_argument("--group", action="append", default=None,
                       help="only this feature group (repeatable)")
    check.add_argument("--grad", action="store_true",
                       help="check gradients through autograd too (torch or jax arrays)")
    check.add_argument("--strict", action="store_true",
                       help="fail on documented deviations too")
    check.add_argument("--quiet", action="store_true",
                       help="no progress bar: nothing on stderr but errors")
    check.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    check.add_argument("--plot", metavar="FILE.png",
                       help="draw the errors against their budgets, per group "
                       "(needs matplotlib: pip install 'refattn[plot]')")
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"refattn: error: {message}", file=sys.stderr)
    return 2


def _cannot_run(message: str) -> int:
    # The arguments are well formed but the machine cannot do what they ask (no GPU, a
    # library missing): one line, no usage, before anything runs.
    print(f"refattn: error: {message}", file=sys.stderr)
    return 2


def _cwd_on_path() -> None:
    """Let a TARGET module in the working directory import, as under ``python -m``.

    A console script's sys.path[0] is its bin directory, not the working directory that
    ``python -m refattn`` (and pytest) put first. Inserted first as they do, so that the
    user's module wins over an installed one of the same name, and only when no entry
    already stands for the working directory.
    """
    cwd = os.path.realpath(os.getcwd())
    if not any(os.path.realpath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


class _Progress:
    """A progress bar on stderr (rich's when installed), for runs long enough to want one.

    Drawn only on a terminal, never with ``--quiet``, and only once ``delay`` seconds have
    passed since the start: a run that ends sooner leaves stderr untouched.
    """

    delay = 2.0

    def __init__(self, total: int, stream: TextIO, *, quiet: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.enabled = not quiet and stream.isatty()
        self.drawing = False
        self.total = total
        self.rich: Any = None
        self.task: Any = None

    def _begin(self) -> None:
        self.drawing = True
        try:
            from rich.console import Console
            from rich.progress import Progress

            self.rich = Progress(console=Console(file=self.stream), transient=True)
            self.task = self.rich.add_task("refattn check", total=self.total)
            self.rich.start()
        except ImportError:
            self.rich = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        if not self.drawing:
            if self.clock() - self.start < self.delay:
                return
            self._begin()
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


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import _audit

    asked_dtypes = args.dtype is not None
    dtype_list = args.dtype if asked_dtypes else _DEFAULT_DTYPES
    dtypes = [d.strip() for d in dtype_list.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad or not dtypes:
        return _fail(parser, f"--dtype must list some of {', '.join(_DTYPES)}; got {dtype_list!r}")
    if args.examples < 1:
        return _fail(parser, f"--examples must be at least 1; got {args.examples}")
    torch_target = args.target == "torch"
    if torch_target and (args.convention != "torch" or args.library not in (None, "torch")):
        return _fail(parser, "TARGET torch is torch's SDPA: it takes no --convention or "
                     "--library other than torch")
    convention = _audit.CONVENTIONS[args.convention]
    groups = args.group or list(convention.groups)
    unknown = [g for g in groups if g not in convention.groups]
    if unknown:
        return _fail(parser, f"unknown --group {unknown[0]!r} for the {args.convention} "
                     "convention; choose from "
                     + ", ".join(repr(g) for g in convention.groups))
    fn = None
    if not torch_target:
        _cwd_on_path()
        try:
            fn = _audit.load_target(args.target)
        except ValueError as exc:
            return _fail(parser, str(exc))
    if args.library is not None or fn is None:
        library, chosen, because = args.library or "torch", "", "asked with --library"
        asked = "TARGET torch" if fn is None else f"--library {library}"
    else:
        library, why = _audit.infer_library(fn)
        because = why if why.startswith("the default") else f"inferred because {why}"
        chosen = f", {because}; --library to choose"
        asked = f"{library} arrays ({because})"
    if args.grad and library not in ("torch", "jax"):
        return _fail(parser, f"--grad differentiates through autograd: it needs --library "
                     f"torch or jax; got {library} ({because})")
    lib = _audit.Library(library, args.device)
    unusable = lib.cannot_run()
    if unusable is not None:
        return _cannot_run(f"--device {args.device}: {unusable}" if args.device
                           else f"{asked}: {unusable}")
    skipped = {d: reason for d in dtypes if (reason := lib.cannot_hold(d)) is not None}
    if skipped and len(skipped) == len(dtypes) and asked_dtypes:
        return _fail(parser, f"--dtype {dtype_list}: nothing here can run: "
                     + "; ".join(f"{d}: {r}" for d, r in skipped.items()))
    dtypes = [d for d in dtypes if d not in skipped]
    versions = {}
    try:
        if torch_target:
            import torch

            backends = _audit.torch_backends(args.device)
            versions["torch"] = torch.__version__
            what = f"torch {torch.__version__} SDPA on {backends[0].library.device}"
        else:
            backends = [_audit.user_backend(args.target, convention=args.convention,
                                            library=library, device=args.device)]
            what = (f"{args.target} ({args.convention} convention, {library} arrays"
                    + (f" on {args.device}" if args.device else "") + chosen + ")")
    except (ValueError, ImportError) as exc:
        return _fail(parser, str(exc))
    print(f"refattn check: {what}; {args.examples} cases per group, seed {args.seed}"
          + (", with gradients" if args.grad else ""), flush=True)
    for dtype_name, why in skipped.items():
        print(f"refattn check: {dtype_name} skipped: {why}", flush=True)
    total = len(groups) * len(backends) * len(dtypes)
    progress = _Progress(total, sys.stderr, quiet=args.quiet)
    start = time.perf_counter()
    with _audit.quiet_warnings():
        reports = _audit.audit(backends, groups=groups, dtypes=dtypes,
                               examples=args.examples, seed=args.seed, grad=args.grad,
                               progress=progress)
    elapsed = time.perf_counter() - start
    _audit.print_table(reports, sys.stdout)
    _audit.print_failures(reports, sys.stdout)
    counts = _audit.summary(reports)
    if args.json:
        from . import __version__

        meta = {"refattn": __version__, "target": args.target,
                "convention": args.convention, "library": library, "device": args.device,
                "dtypes": dtypes, "groups": groups, "examples": args.examples,
                "seed": args.seed, "grad": args.grad, "seconds": elapsed, **versions,
                "summary": counts}
        with open(args.json, "w") as fh:
            json.dump(_audit.report_json(reports, meta), fh, indent=2, default=str)
    if args.plot:
        try:
            _audit.plot(reports, args.plot, f"refattn check {args.target}")
        except ImportError:
            print("refattn: --plot needs matplotlib: pip install 'refattn[plot]'",
                  file=sys.stderr)
            return 2
    print(f"\n{_audit.summary_line(reports)} ({elapsed:.0f} s)")
    if counts["rows"]["fail"] or (args.strict and counts["rows"]["known"]):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``refattn`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args, parser)
    return _fail(parser, f"unknown command {args.command!r}")  # pragma: no cover - argparse
