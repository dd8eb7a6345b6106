"""The audit behind ``refattn check``: an attention implementation against the oracle.

A *case* is one seeded attention problem in a feature group (plain, masks, causal, GQA,
dropout, ...). Every case is run through each *backend* (a way of calling the
implementation: one of torch's SDPA backends, or a user's function) in each dtype, on
inputs rounded to that dtype, and compared with refattn's float64 oracle on exactly
those values. A *convention* (torch, flash, jax, flex) says how a case becomes the
implementation's arguments and which semantics the oracle takes.

A disagreement is one of:

* a precision failure: the error exceeds its budget (``refattn.testing._budget``:
  the float64 rounding bound; for lower precisions the flash-attention rule, applied
  over the whole group: ``factor x`` the worst error of the plain baselines in the group
  plus the largest floor);
* a semantic difference: NaN or infinity where the oracle is finite (or the reverse), a
  different shape, one side raising where the other returns, or an error so large (over
  ``SEMANTIC_RATIO`` times its budget) that no rounding explains it; named more
  precisely where possible (fully masked rows, the other causal alignment);
* a known deviation: a documented behaviour of a real library, recognised by checking
  that the backend matches the documented alternative semantics (on a case the
  convention refuses, for every backend of the convention: ``REFUSED_ALTERNATIVES``;
  refusing such a case too is right).

A backend that draws its own dropout is checked on a probe that reveals its keep-mask
(:mod:`.dropout`).

One module per step: :mod:`.cases` draws the cases, :mod:`.conventions` turns them into
a target's arguments and the oracle's options, :mod:`.targets` runs the targets,
:mod:`.judging` weighs errors against budgets, :mod:`.shrinking` cuts failures down to
repro snippets and :mod:`.report` runs the audit and writes its table and plot.
"""

from __future__ import annotations

from .cases import GROUPS, Case, make_case
from .conventions import CONVENTIONS, Convention
from .judging import REFUSED_ALTERNATIVES, SEMANTIC_RATIO, CaseResult, evaluate
from .report import (
    GroupReport,
    audit,
    plot,
    print_failures,
    print_table,
    quiet_warnings,
    report_json,
    summary,
    summary_line,
)
from .shrinking import shrink, snippet
from .targets import (
    Backend,
    Library,
    Ran,
    infer_library,
    load_target,
    torch_backends,
    user_backend,
)

__all__ = [
    "CONVENTIONS",
    "GROUPS",
    "REFUSED_ALTERNATIVES",
    "SEMANTIC_RATIO",
    "Backend",
    "Case",
    "CaseResult",
    "Convention",
    "GroupReport",
    "Library",
    "Ran",
    "audit",
    "evaluate",
    "infer_library",
    "load_target",
    "make_case",
    "plot",
    "print_failures",
    "print_table",
    "quiet_warnings",
    "report_json",
    "shrink",
    "snippet",
    "summary",
    "summary_line",
    "torch_backends",
    "user_backend",
]
