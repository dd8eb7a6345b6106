"""Judging: a target's error against its budget, and the verdict on each case.

The budget of a tensor is ``refattn.testing._budget``'s: the float64 rounding bound;
for lower precisions the flash-attention rule, applied over the whole group
(:func:`apply_group_budget`). An error over ``SEMANTIC_RATIO`` budgets is no rounding
and is named where a simple alternative explains it; a known deviation is recognised by
checking that the backend matches the documented alternative semantics.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _tolerance
from ..testing._baseline import EPS, numpy_rounder
from ..testing._budget import compute_reference
from . import dropout
from .cases import Case, grad_out
from .conventions import host_namespace

if TYPE_CHECKING:
    from .targets import Backend

__all__ = [
    "GRAD_FACTOR",
    "LOW_PRECISION_FACTOR",
    "SEMANTIC_RATIO",
    "REFUSED_ALTERNATIVES",
    "CaseResult",
    "apply_group_budget",
    "error_ratio",
    "evaluate",
    "matches_anded_causal",
    "matches_zero_nan_rows",
]

LOW_PRECISION_FACTOR = 2.0
GRAD_FACTOR = 3.0
# An error this many times its budget is not rounding: a wrong mask, scale or alignment
# moves outputs by O(max|V|), thousands of budgets in float32 and float64 and still tens
# in bfloat16, while a kernel that is merely less accurate than allowed lands within a
# few budgets.
SEMANTIC_RATIO = 10.0


def _oracle(inputs: dict[str, np.ndarray], options: dict[str, Any]) -> np.ndarray:
    from .._front_door import attention

    return np.asarray(attention(inputs["q"], inputs["k"], inputs["v"], **options))


# --- known deviations -----------------------------------------------------------------


def _agrees(actual: np.ndarray, expected: np.ndarray, inputs: dict[str, np.ndarray],
            options: dict[str, Any], dtype: str) -> bool:
    # A known deviation is only recognised when the backend matches the documented
    # alternative semantics within the first-order rounding bound of its dtype.
    if actual.shape != expected.shape:
        return False
    if not np.array_equal(np.isnan(actual), np.isnan(expected)):
        return False
    E = inputs["q"].shape[-1]
    scale = options.get("scale")
    scale = scale if scale is not None else (1 / math.sqrt(E) if E else 1.0)
    bound = _tolerance.rounding_bound(inputs["q"], inputs["k"], inputs["v"], scale=scale,
                                      bias=options.get("bias"),
                                      dropout_p=options.get("dropout_p", 0.0),
                                      dtype=np.float64 if dtype == "float64" else np.float32)
    # Below float32 the inputs' own rounding is already in both; the output's rounding
    # to the dtype (u max|V|) is what is left.
    bound += EPS[dtype] / 2 * float(np.max(np.abs(np.nan_to_num(inputs["v"])), initial=0.0))
    return _tolerance.max_abs_error(actual, expected) <= bound


def matches_anded_causal(case: Case, inputs: dict[str, np.ndarray], actual: np.ndarray,
                         options: dict[str, Any] | None, dtype: str) -> bool:
    """Whether ``actual`` is the oracle with an explicit mask ANDed with ``is_causal``.

    torch's CPU fused path combines an explicit mask with is_causal (logical AND) where
    the math path refuses the pair.
    """
    if case.mask is None or not case.causal:
        return False
    opts = {"mask": inputs["mask"], "causal": True, "scale": case.scale,
            "masked_rows": "zero"}
    return _agrees(actual, _oracle(inputs, opts), inputs, opts, dtype)


def matches_zero_nan_rows(case: Case, inputs: dict[str, np.ndarray], actual: np.ndarray,
                          options: dict[str, Any] | None, dtype: str) -> bool:
    """Whether ``actual`` is the oracle but for zero rows where the oracle's are NaN.

    torch's CPU fused path can turn a NaN query row into a zero row (its row max ignores
    NaN); elsewhere it must agree with the oracle.
    """
    if options is None:
        return False
    expected = _oracle(inputs, options)
    nan_rows = np.isnan(expected).all(axis=-1)
    if not nan_rows.any() or actual.shape != expected.shape:
        return False
    zero_rows = (actual == 0).all(axis=-1)
    if not zero_rows[nan_rows].all():
        return False
    patched = np.where(nan_rows[..., None], 0.0, expected)
    return _agrees(actual, patched, inputs, options, dtype)


#: Documented behaviours of real libraries on inputs the reference semantics of a
#: convention refuses, by convention: (name, predicate(case, inputs, actual, options,
#: dtype) -> bool). They hold for every target of the convention (torch's own backends
#: and user functions alike): a function that follows one is as right as the library it
#: follows. Only the torch convention refuses cases the audit draws (an explicit mask
#: together with is_causal); the flash, jax and flex conventions refuse none of theirs
#: (jax.nn.dot_product_attention combines a mask with is_causal by AND, which is the
#: jax convention's own semantics, not an alternative).
REFUSED_ALTERNATIVES: dict[str, list[tuple[str, Callable[..., bool]]]] = {
    "torch": [("explicit mask ANDed with is_causal, as torch's CPU fused path does",
               matches_anded_causal)],
}


# --- one case -------------------------------------------------------------------------


def error_ratio(error: float, budget: float | None) -> float:
    """``error / budget``; 0 for no error and infinity for an error without a budget."""
    return error / budget if budget else (0.0 if error == 0 else math.inf)


@dataclass
class CaseResult:
    """One case through one backend in one dtype."""

    group: str
    backend: str
    dtype: str
    status: str  # "ok", "precision", "semantic", "known", "skipped", "unsupported"
    errors: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    # Low precisions: the plain baselines' worst error and the floor, per tensor.
    baselines: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    # What the table shows for a case without errors to compare: "raised ValueError",
    # "NaN", "shape", "refused by both", "returned where the oracle refuses", "empty".
    brief: str = ""
    case: str = ""
    snippet: str = ""
    # Kept for the group's judgement, left out of the report.
    actual: Any = field(default=None, repr=False, compare=False)
    inputs: Any = field(default=None, repr=False, compare=False)
    options: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The fields worth a JSON report."""
        return {name: getattr(self, name) for name in (
            "group", "backend", "dtype", "status", "errors", "budgets", "baselines",
            "floors", "detail", "brief", "case", "snippet")}

    @property
    def ratio(self) -> float:
        return max((error_ratio(self.errors[n], self.budgets.get(n)) for n in self.errors),
                   default=0.0)

    @property
    def worst(self) -> str | None:
        if not self.errors:
            return None
        return max(self.errors, key=lambda n: error_ratio(self.errors[n], self.budgets.get(n)))


def _masked_rows(inputs: dict[str, np.ndarray], expected: np.ndarray,
                 options: dict[str, Any]) -> np.ndarray:
    # Rows whose every key is masked (NaN under masked_rows="nan") where the oracle's
    # row is not NaN anyway.
    return np.isnan(_oracle(inputs, {**options, "masked_rows": "nan"})).all(axis=-1) & \
        ~np.isnan(expected).all(axis=-1)


def _diagnose(case: Case, inputs: dict[str, np.ndarray], actual: np.ndarray,
              expected: np.ndarray, options: dict[str, Any]) -> str:
    # Name the semantic difference where a simple alternative explains it.
    err = np.abs(np.nan_to_num(actual - expected))
    rows = err.max(axis=-1) > 0
    if options.get("causal") or options.get("window") is not None:
        other = "bottom_right" if options.get("alignment", "top_left") == "top_left" \
            else "top_left"
        try:
            alt = _oracle(inputs, {**options, "alignment": other})
        except ValueError:
            alt = None
        if alt is not None and alt.shape == actual.shape and np.allclose(
                np.nan_to_num(alt), np.nan_to_num(actual), rtol=0.0,
                atol=1e-3 * max(1.0, float(np.abs(np.nan_to_num(expected)).max(initial=0)))):
            return f"wrong alignment: matches the {other} causal/window alignment"
    if options.get("mask") is not None or options.get("bias") is not None:
        try:
            alt = _oracle(inputs, {**options, "mask": None, "bias": None})
        except ValueError:
            alt = None
        if alt is not None and alt.shape == actual.shape and np.allclose(
                np.nan_to_num(alt), np.nan_to_num(actual), rtol=0.0, atol=1e-3):
            return "the mask is ignored: matches the oracle without attn_mask"
    masked = _masked_rows(inputs, expected, options)
    if masked.any() and rows.any() and not rows[~masked].any():
        return ("wrong value on fully masked rows (only rows whose every key is masked "
                f"differ; the oracle gives {options.get('masked_rows', 'zero')!r} there)")
    return ""


def _nan_detail(name: str, value: np.ndarray, expected: np.ndarray,
                inputs: dict[str, np.ndarray], options: dict[str, Any], who: str) -> str:
    detail = (f"{name}: NaN where the oracle is finite or the reverse ({int(np.isnan(value).sum())}"
              f" NaN in {who}, {int(np.isnan(expected).sum())} in the oracle)")
    if name != "out":
        return detail
    # NaN exactly on the rows whose every key is masked: the masked-row policy.
    masked = _masked_rows(inputs, expected, options)
    differs = (np.isnan(value) != np.isnan(expected)).any(axis=-1)
    if masked.any() and np.array_equal(differs, masked):
        return (f"wrong value on fully masked rows: NaN where the oracle gives "
                f"{options.get('masked_rows', 'zero')!r} rows")
    return detail


def evaluate(case: Case, backend: Backend, dtype_name: str, *, grad: bool = False
             ) -> tuple[CaseResult, Any]:
    """Run one case through one backend in one dtype; judge what does not need the group.

    Returns the result and, for low precisions, the ``Reference`` whose baseline errors
    the group budget is built from (None otherwise).
    """
    conv = backend.convention
    probing = case.dropout_p > 0 and backend.draws_own_dropout
    if probing and conv.layout != "BHLD":
        # No such convention has a dropout group: the probe reads weights heads first.
        res = CaseResult(case.group, backend.name, dtype_name, "skipped",
                         case=case.describe(), detail="draws its own dropout mask")
        return res, None
    if probing:
        # The target draws its own keep-mask and does not say which: it is checked on a
        # probe built for that (see .dropout).
        case = dropout.probe_case(case)
    res = CaseResult(case.group, backend.name, dtype_name, "ok", case=case.describe())
    inputs = conv.inputs(case, dtype_name)
    try:
        options = conv.options(case, inputs)
        oracle_error = None
    except (ValueError, TypeError) as exc:
        options, oracle_error = None, exc
    d_out = None
    if grad and options is not None:
        out_shape = _oracle(inputs, options).shape
        d_out = grad_out(case, out_shape, dtype_name)
    actual_error: Exception | None = None
    draws: list[np.ndarray] = []
    try:
        with np.errstate(all="ignore"), (dropout.seeded(
                backend.library.name, zlib.crc32(f"{res.case} {dtype_name}".encode()))
                if probing else contextlib.nullcontext()):
            got = backend.run(case, inputs, dtype_name, d_out)
            if probing:
                draws = [backend.run(case, inputs, dtype_name, None).out
                         for _ in range(dropout.DRAWS - 1)]
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc) or "positional argument" in str(exc):
            res.status, res.detail = "unsupported", f"the target does not take it: {exc}"
            res.brief = "the target does not take it"
            return res, None
        got, actual_error = None, exc
    except Exception as exc:  # noqa: BLE001 - any crash of the target is reported
        got, actual_error = None, exc
    if probing and actual_error is not None and dropout.refuses(actual_error):
        res.status, res.brief = "unsupported", "not supported by the target"
        res.detail = f"not supported by the target: {actual_error!r}"
        return res, None
    actual, grads = (None, None) if got is None else (got.out, got.grads)
    if got is not None and got.dropout_mask is not None and options is not None:
        # The implementation drew its own dropout and told us which weights it kept.
        options["dropout_mask"] = got.dropout_mask
    if oracle_error is not None:
        _judge_refused(res, case, backend, inputs, actual, actual_error, oracle_error,
                       dtype_name)
        return res, None
    if actual_error is not None:
        res.status, res.brief = "semantic", f"raised {type(actual_error).__name__}"
        res.detail = f"{backend.name} raised {actual_error!r} where the oracle returns"
        return res, None
    assert options is not None and actual is not None
    if probing:
        no_dropout = {n: x for n, x in options.items() if n not in ("dropout_p", "dropout_mask")}
        expected = _oracle(inputs, no_dropout)
        if all(x.shape == expected.shape for x in (actual, *draws)):
            finding = dropout.judge_draws(case, inputs, expected, [actual, *draws],
                                          dtype_name)
            if finding.brief:
                res.status, res.brief, res.detail = "semantic", finding.brief, finding.detail
                return res, None
            # The first call is judged exactly, against the keep-mask read back from it.
            options["dropout_mask"] = finding.keep
    ref = compute_reference(
        inputs["q"], inputs["k"], inputs["v"], kind=dtype_name, options=options,
        grad_out=d_out, round_to=None if dtype_name in ("float32", "float64")
        else numpy_rounder(dtype_name), xp=host_namespace())
    tensors = {"out": actual}
    if grads is not None:
        tensors.update(zip(("dq", "dk", "dv"), grads, strict=True))
    for name, value in tensors.items():
        expected = ref.oracle[name]
        if value.shape != expected.shape or not np.array_equal(np.isnan(value),
                                                               np.isnan(expected)):
            for known_name, pred in backend.known:
                if name == "out" and pred(case, inputs, value, options, dtype_name):
                    res.status, res.detail = "known", known_name
                    res.brief = known_name
                    return res, None
            res.status = "semantic"
            if value.shape != expected.shape:
                res.brief = "shape"
                res.detail = f"{name}: shape {value.shape}, the oracle's {expected.shape}"
            else:
                res.brief = ("NaN" if (np.isnan(value) & ~np.isnan(expected)).any()
                             else "finite for NaN")
                res.detail = _nan_detail(name, value, expected, inputs, options,
                                         backend.name)
            return res, None
        if value.size == 0:
            # An empty tensor equals the oracle's (same shape) and has no error to
            # weigh: the row says so rather than showing a 0 / 0.
            continue
        res.errors[name] = _tolerance.max_abs_error(value, expected)
        if dtype_name == "float64":
            res.budgets[name] = ref.bound[name]
        else:
            res.baselines[name] = ref.baseline_error[name]
            res.floors[name] = ref.floor[name]
            factor = LOW_PRECISION_FACTOR if name == "out" else GRAD_FACTOR
            res.budgets[name] = ref.budget(name, factor)[0]  # per case; see audit
    if not res.errors:
        res.brief = "empty"
        res.detail = "nothing to compare: empty outputs"
        return res, None
    res.actual, res.inputs, res.options = actual, inputs, options
    _judge(res, case, ref)
    return res, ref


def _returned(actual: np.ndarray) -> str:
    # A few words on an output, for a detail line.
    nan = int(np.isnan(actual).sum())
    finite = np.abs(actual[np.isfinite(actual)])
    size = f"max |out| {float(finite.max()):.3g}" if finite.size else "no finite entry"
    return (f"an output of shape {actual.shape} ({size}"
            + (f", {nan} NaN" if nan else "") + ")")


def _judge_refused(res: CaseResult, case: Case, backend: Backend,
                   inputs: dict[str, np.ndarray], actual: np.ndarray | None,
                   actual_error: Exception | None, oracle_error: Exception,
                   dtype_name: str) -> None:
    """The verdict on a case the reference semantics refuses.

    Refusing it too is right; returning what a real library documents for it is a known
    deviation, named after that library; anything else is a semantic difference.
    """
    if actual is None:
        res.brief = "refused by both"
        res.detail = (f"refused by both: the oracle ({oracle_error}); {backend.name} "
                      f"raised {type(actual_error).__name__}")
        return
    known = [*REFUSED_ALTERNATIVES.get(backend.convention.name, []), *backend.known]
    for name, pred in known:
        if pred(case, inputs, actual, None, dtype_name):
            res.status, res.detail, res.brief = "known", name, name
            return
    res.status, res.brief = "semantic", "returned where the oracle refuses"
    alternatives = "; ".join(name for name, _ in known)
    # The refusal's first clause says what is refused; the rest is advice for callers.
    refusal = str(oracle_error).split(";")[0]
    res.detail = (f"the oracle refuses the case ({refusal}) and {backend.name} "
                  f"returned {_returned(actual)}, which is not "
                  + (f"a documented alternative ({alternatives})" if alternatives else
                     "refusing it"))


def _judge(res: CaseResult, case: Case, ref: Any) -> None:
    """Set res.status from its errors and budgets (called again with the group budget)."""
    if res.status not in ("ok", "precision", "semantic") or not res.errors:
        return
    ratio = res.ratio
    if ratio <= 1:
        res.status, res.detail = "ok", ""
        return
    name = res.worst or "out"
    what = f"{name}: error {res.errors[name]:.3g} > budget {res.budgets[name]:.3g}"
    if ratio > SEMANTIC_RATIO:
        why = _diagnose(case, res.inputs, res.actual, ref.oracle["out"], res.options) \
            if name == "out" else ""
        res.status = "semantic"
        res.detail = f"{why or 'gross disagreement, not rounding'} ({what}, {ratio:.3g}x)"
    else:
        res.status, res.detail = "precision", what


# --- a group --------------------------------------------------------------------------


def apply_group_budget(evaluated: list[tuple[Case, CaseResult, Any]]) -> None:
    """Widen each case's low-precision budget to the group's, and judge it again.

    The flash-attention rule over a whole group: every case's error must stay within
    factor x the worst error of the plain baselines in the group, plus the largest
    floor. Compared over many entries the maxima are stable; one tiny case's baseline
    error alone is too noisy to scale.
    """
    judged = [(c, r, ref) for c, r, ref in evaluated if ref is not None and r.baselines]
    if not judged:
        return
    names = {n for _, r, _ in judged for n in r.baselines}
    for name in names:
        factor = LOW_PRECISION_FACTOR if name == "out" else GRAD_FACTOR
        base = max(r.baselines.get(name, 0.0) for _, r, _ in judged)
        floor = max(r.floors.get(name, 0.0) for _, r, _ in judged)
        for _, r, _ in judged:
            if name in r.budgets:
                r.budgets[name] = max(r.budgets[name], factor * base + floor)
    for case, r, ref in judged:
        _judge(r, case, ref)
