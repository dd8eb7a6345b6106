"""The audit behind ``refattn check``: torch's SDPA backends against the oracle.

A *case* is one seeded set of SDPA arguments in a feature group. Every case is run
through each backend in each dtype and compared with refattn's float64 result on the
same (dtype-rounded) inputs. A mismatch is one of:

* a precision failure: the error exceeds the derived budget (``refattn._tolerance``);
* a semantic difference: NaN where the oracle is finite or vice versa, or one side
  raising where the other returns;
* a known deviation: a documented behaviour of that backend, recognised by checking
  that the backend matches the documented alternative semantics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _tolerance
from .compat.torch import scaled_dot_product_attention as oracle_sdpa

__all__ = ["GROUPS", "CaseResult", "GroupReport", "audit", "make_case", "torch_backends"]


@dataclass
class Case:
    group: str
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    attn_mask: np.ndarray | None = None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    dropout_p: float = 0.0
    dropout_mask: np.ndarray | None = None

    def describe(self) -> str:
        mask = None if self.attn_mask is None else f"{self.attn_mask.dtype}{self.attn_mask.shape}"
        return (
            f"q{self.query.shape} k{self.key.shape} v{self.value.shape} attn_mask={mask} "
            f"is_causal={self.is_causal} scale={self.scale} enable_gqa={self.enable_gqa} "
            f"dropout_p={self.dropout_p}"
        )


def _shapes(rng: np.random.Generator, *, gqa: bool = False, empty: bool = False):
    B = int(rng.integers(1, 3))
    H = int(rng.choice([1, 2, 4]))
    K = Kv = H
    if gqa:
        H = int(rng.choice([2, 4, 6]))
        divisors = [d for d in range(1, H + 1) if H % d == 0]
        K, Kv = (int(rng.choice(divisors)) for _ in range(2))
    L, S = (int(x) for x in rng.integers(1, 17, size=2))
    if empty:
        if rng.random() < 0.5:
            L = 0
        else:
            S = 0
    E, Ev = (int(x) for x in rng.integers(1, 33, size=2))
    if rng.random() < 0.5:
        # Equal head dims half the time: torch's CPU fused path only runs then, and
        # it is the path with the most distinct behaviour to audit.
        Ev = E
    return B, H, K, Kv, L, S, E, Ev


def _qkv(rng: np.random.Generator, dims: tuple[int, ...], logit: float = 1.0):
    B, H, K, Kv, L, S, E, Ev = dims
    # Entries of size sqrt(logit) make scale * q.k of order `logit` for scale 1/sqrt(E).
    mag = np.sqrt(logit)
    q = rng.standard_normal((B, H, L, E)) * mag
    k = rng.standard_normal((B, K, S, E)) * mag
    v = rng.standard_normal((B, Kv, S, Ev))
    return q, k, v


def _bool_mask(rng: np.random.Generator, B: int, H: int, L: int, S: int, *, full_rows: bool):
    shape = [(L, S), (B, 1, L, S), (B, H, L, S), (1, H, 1, S)][int(rng.integers(0, 4))]
    mask = rng.random(shape) < 0.7
    if full_rows:
        mask[..., int(rng.integers(0, shape[-2])), :] = False
    else:
        # At least one key per row, so no row is fully masked (that group is separate).
        mask[..., int(rng.integers(0, shape[-1]))] = True
    return mask


def make_case(group: str, seed: int, index: int) -> Case:
    """Build case ``index`` of ``group`` deterministically from ``seed``."""
    rng = np.random.default_rng([seed, GROUPS.index(group), index])
    dims = _shapes(rng, gqa=group == "GQA", empty=group == "empty sequences")
    B, H, K, Kv, L, S, E, Ev = dims
    logit = float(10 ** rng.uniform(1.7, 2.7)) if group == "huge logits" else 1.0
    q, k, v = _qkv(rng, dims, logit)
    case = Case(group, q, k, v)
    if group == "bool mask":
        case.attn_mask = _bool_mask(rng, B, H, L, S, full_rows=False)
    elif group == "fully masked rows":
        case.attn_mask = _bool_mask(rng, B, H, L, S, full_rows=True)
    elif group == "float mask":
        case.attn_mask = rng.standard_normal((B, H, L, S)) * 2
    elif group == "causal":
        case.is_causal = True
    elif group == "mask + causal":
        case.attn_mask = _bool_mask(rng, B, H, L, S, full_rows=False)
        case.is_causal = True
    elif group == "GQA":
        case.enable_gqa = True
    elif group == "scale":
        case.scale = float(rng.choice([0.0, -0.37, 2.5, rng.uniform(-3, 3)]))
    elif group == "dropout":
        case.dropout_p = float(rng.choice([0.1, 0.5, 0.9]))
        case.dropout_mask = rng.random((B, H, L, S)) >= case.dropout_p
    elif group == "NaN query rows":
        case.query[..., int(rng.integers(0, L)), :] = np.nan
    return case


GROUPS = [
    "plain",
    "bool mask",
    "float mask",
    "fully masked rows",
    "causal",
    "mask + causal",
    "GQA",
    "scale",
    "dropout",
    "empty sequences",
    "NaN query rows",
    "huge logits",
]


@dataclass
class Backend:
    """A named way of running torch's SDPA on torch tensors."""

    name: str
    run: Callable[[Case, Any], Any]
    draws_own_dropout: bool = False
    # Known deviations: (name, predicate(case, actual, oracle_fn) -> bool).
    known: list[tuple[str, Callable[..., bool]]] = field(default_factory=list)


def _torch_args(case: Case, dtype: Any, device: str = "cpu") -> dict[str, Any]:
    import torch

    def conv(x: np.ndarray | None, as_dtype: Any = dtype) -> Any:
        if x is None:
            return None
        t = torch.from_numpy(np.array(x))
        return t.to(device) if t.dtype == torch.bool else t.to(device=device, dtype=as_dtype)

    return {
        "query": conv(case.query), "key": conv(case.key), "value": conv(case.value),
        "attn_mask": conv(case.attn_mask),
    }


def _run_math(case: Case, dtype: Any) -> Any:
    import torch

    a = _torch_args(case, dtype)
    if case.dropout_p > 0:
        # The math kernel's test hook is the only torch entry point that takes an
        # explicit keep-mask, so dropout is checkable bit for bit.
        keep = torch.from_numpy(case.dropout_mask)
        mask = a["attn_mask"]
        if mask is not None and mask.dtype == torch.bool:
            # The op adds its mask; F.scaled_dot_product_attention converts a boolean
            # one to 0 / -inf before dispatching, and so must we.
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math(
            a["query"], a["key"], a["value"], mask, case.dropout_p, case.is_causal,
            keep, scale=case.scale, enable_gqa=case.enable_gqa,
        )[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            a["query"], a["key"], a["value"], attn_mask=a["attn_mask"],
            is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
        )


def _run_default(case: Case, dtype: Any) -> Any:
    import torch

    a = _torch_args(case, dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        a["query"], a["key"], a["value"], attn_mask=a["attn_mask"], is_causal=case.is_causal,
        scale=case.scale, enable_gqa=case.enable_gqa,
    )


def _matches_anded_causal(case: Case, actual: np.ndarray, oracle: Callable[..., Any],
                          dtype: str) -> bool:
    # torch's CPU fused path combines an explicit mask with is_causal (logical AND)
    # where the math path refuses the pair.
    if case.attn_mask is None or not case.is_causal:
        return False
    L, S = case.query.shape[-2], case.key.shape[-2]
    tril = np.tril(np.ones((L, S), dtype=bool))
    combined = np.logical_and(case.attn_mask, tril)
    expected = oracle(attn_mask=combined, is_causal=False)
    return _agrees(actual, expected, case, dtype)


def _matches_zero_nan_rows(case: Case, actual: np.ndarray, oracle: Callable[..., Any],
                           dtype: str) -> bool:
    # torch's CPU fused path can turn a NaN query row into a zero row (its row max
    # ignores NaN); elsewhere it must agree with the oracle.
    try:
        expected = oracle()
    except ValueError:
        return False
    nan_rows = np.isnan(expected).all(axis=-1)
    if not nan_rows.any():
        return False
    zero_rows = (actual == 0).all(axis=-1)
    if not np.array_equal(nan_rows, zero_rows & nan_rows) or not zero_rows[nan_rows].all():
        return False
    patched = np.where(nan_rows[..., None], 0.0, expected)
    return _agrees(actual, patched, case, dtype)


def _agrees(actual: np.ndarray, expected: np.ndarray, case: Case, dtype: str) -> bool:
    # A known deviation is only recognised when the backend matches the documented
    # alternative semantics within the first-order rounding bound of its dtype.
    if actual.shape != expected.shape:
        return False
    if not np.array_equal(np.isnan(actual), np.isnan(expected)):
        return False
    return _tolerance.max_abs_error(actual, expected) <= _rounding_budget(case, dtype)


def _rounding_budget(case: Case, dtype: str = "float64") -> float:
    E = case.query.shape[-1]
    scale = case.scale if case.scale is not None else (1 / np.sqrt(E) if E else 1.0)
    bias = case.attn_mask if case.attn_mask is not None and case.attn_mask.dtype != bool else None
    return _tolerance.rounding_bound(
        case.query, case.key, case.value, scale=scale, bias=bias, dropout_p=case.dropout_p,
        dtype=np.dtype(dtype),
    )


def torch_backends() -> list[Backend]:
    """The SDPA backends torch offers on this machine's CPU."""
    return [
        Backend("math", _run_math),
        Backend(
            "default", _run_default, draws_own_dropout=True,
            known=[
                ("explicit mask ANDed with is_causal", _matches_anded_causal),
                ("NaN query rows give zeros", _matches_zero_nan_rows),
            ],
        ),
    ]


@dataclass
class CaseResult:
    group: str
    backend: str
    dtype: str
    status: str  # "ok", "precision", "semantic", "known", "skipped"
    error: float = 0.0
    budget: float = 0.0
    # Low precisions: error of refattn's plain baseline in that precision, and the floor.
    baseline: float | None = None
    floor: float = 0.0
    detail: str = ""
    case: str = ""


@dataclass
class GroupReport:
    group: str
    backend: str
    dtype: str
    cases: int = 0
    worst_ratio: float = 0.0
    worst_error: float = 0.0
    worst_budget: float = 0.0
    verdict: str = "ok"
    failures: list[CaseResult] = field(default_factory=list)


def _oracle_fn(case: Case, rounded: dict[str, np.ndarray | None]) -> Callable[..., np.ndarray]:
    def run(**override: Any) -> np.ndarray:
        kwargs: dict[str, Any] = {
            "attn_mask": rounded["attn_mask"], "is_causal": case.is_causal,
            "scale": case.scale, "enable_gqa": case.enable_gqa,
            "dropout_p": case.dropout_p, "dropout_mask": case.dropout_mask,
        }
        kwargs.update(override)
        return np.asarray(
            oracle_sdpa(rounded["query"], rounded["key"], rounded["value"], **kwargs)
        )

    return run


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    return t.detach().to("cpu", torch.float64).numpy()


def evaluate(case: Case, backend: Backend, dtype_name: str) -> CaseResult:
    """Run one case through one backend in one dtype and judge it."""
    import torch

    dtype = getattr(torch, dtype_name)
    res = CaseResult(case.group, backend.name, dtype_name, "ok", case=case.describe())
    if case.dropout_p > 0 and backend.draws_own_dropout:
        res.status, res.detail = "skipped", "draws its own dropout mask"
        return res
    args = _torch_args(case, dtype)
    # The oracle sees exactly the values torch sees: the inputs rounded to `dtype`.
    rounded = {name: None if t is None else (t.numpy() if t.dtype == torch.bool else _to_numpy(t))
               for name, t in args.items()}
    if rounded["attn_mask"] is not None and case.attn_mask is not None \
            and case.attn_mask.dtype != bool and dtype != torch.float64:
        rounded["attn_mask"] = rounded["attn_mask"].astype(np.float32)
    oracle = _oracle_fn(case, rounded)
    try:
        expected = oracle()
        oracle_error = None
    except (ValueError, TypeError) as exc:
        expected, oracle_error = None, exc
    try:
        with np.errstate(all="ignore"):
            actual = _to_numpy(backend.run(case, dtype))
        actual_error = None
    except RuntimeError as exc:
        actual, actual_error = None, exc
    if oracle_error is not None or actual_error is not None:
        if oracle_error is not None and actual_error is not None:
            res.detail = "both refuse"
            return res
        if actual is not None:
            for name, pred in backend.known:
                if pred(case, actual, oracle, dtype_name):
                    res.status, res.detail = "known", name
                    return res
        res.status = "semantic"
        res.detail = (f"oracle raised {oracle_error!r}" if oracle_error is not None
                      else f"{backend.name} raised {actual_error!r}")
        return res
    assert expected is not None and actual is not None
    if actual.shape != expected.shape or not np.array_equal(np.isnan(actual), np.isnan(expected)):
        for name, pred in backend.known:
            if pred(case, actual, oracle, dtype_name):
                res.status, res.detail = "known", name
                return res
        res.status = "semantic"
        res.detail = (f"shape {actual.shape} vs {expected.shape}" if actual.shape != expected.shape
                      else f"NaN pattern differs: {int(np.isnan(actual).sum())} NaN in "
                      f"{backend.name}, {int(np.isnan(expected).sum())} in the oracle")
        return res
    res.error = _tolerance.max_abs_error(actual, expected)
    if dtype_name == "float64":
        res.budget = _rounding_budget(case)
        if res.error > res.budget:
            res.status = "precision"
            res.detail = f"error {res.error:.3g} > budget {res.budget:.3g}"
    else:
        # Judged per group in `audit`: the flash-attention rule compares maxima over
        # many entries, and one tiny case's baseline error is too noisy to scale.
        res.baseline, res.floor = _baseline_error(case, rounded, expected, dtype_name)
    return res


def _baseline_error(case: Case, rounded: dict[str, Any], expected: np.ndarray,
                    dtype_name: str) -> tuple[float, float]:
    # The plain baseline: refattn's own direct path computing in the low precision.
    from .attention import attention

    mask = rounded["attn_mask"]
    kwargs: dict[str, Any] = {"scale": case.scale, "compute_dtype": dtype_name}
    q, k, v = (rounded[n].astype(dtype_name) for n in ("query", "key", "value"))
    if mask is not None:
        kwargs["mask" if mask.dtype == bool else "bias"] = mask
    if case.is_causal:
        kwargs["causal"] = True
    if case.dropout_p > 0:
        kwargs.update(dropout_p=case.dropout_p, dropout_mask=case.dropout_mask)
    baseline = np.asarray(attention(q, k, v, **kwargs), dtype=np.float64)
    vmax = float(np.max(np.abs(rounded["value"]), initial=0.0))
    if case.dropout_p:
        vmax /= 1 - case.dropout_p
    floor = _tolerance.baseline_budget(0.0, factor=0.0, dtype=np.dtype(dtype_name), vmax=vmax)
    return _tolerance.max_abs_error(baseline, expected), floor


def audit(
    backends: list[Backend],
    *,
    groups: list[str],
    dtypes: list[str],
    examples: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[GroupReport]:
    """Run every (group, backend, dtype) cell and summarise it."""
    reports = []
    total = len(groups) * len(backends) * len(dtypes)
    for group in groups:
        cases = [make_case(group, seed, i) for i in range(examples)]
        for backend in backends:
            for dtype_name in dtypes:
                rep = GroupReport(group, backend.name, dtype_name)
                results = [evaluate(case, backend, dtype_name) for case in cases]
                _apply_group_budget(results)
                for r in results:
                    if r.status == "skipped":
                        rep.verdict = f"skipped ({r.detail})"
                        continue
                    rep.cases += 1
                    ratio = r.error / r.budget if r.budget > 0 else (0.0 if r.error == 0 else
                                                                   float("inf"))
                    if r.status == "ok" and ratio >= rep.worst_ratio:
                        rep.worst_ratio, rep.worst_error, rep.worst_budget = (
                            ratio, r.error, r.budget)
                    if r.status != "ok":
                        rep.failures.append(r)
                statuses = {f.status for f in rep.failures}
                if "semantic" in statuses:
                    rep.verdict = "FAIL (semantic)"
                elif "precision" in statuses:
                    rep.verdict = "FAIL (precision)"
                elif "known" in statuses:
                    names = sorted({f.detail for f in rep.failures})
                    rep.verdict = "known deviation: " + "; ".join(names)
                reports.append(rep)
                if progress is not None:
                    progress(len(reports), total)
    return reports


def _apply_group_budget(results: list[CaseResult]) -> None:
    # The flash-attention rule over a whole group: every case's error must stay within
    # FACTOR x the worst error of the plain low-precision baseline, plus the floor.
    judged = [r for r in results if r.status == "ok" and r.baseline is not None]
    if not judged:
        return
    budget = max(_tolerance.baseline_budget(r.baseline or 0.0, factor=LOW_PRECISION_FACTOR,
                                            dtype=np.dtype(np.float64), vmax=0.0)
                 for r in judged) + max(r.floor for r in judged)
    for r in judged:
        r.budget = budget
        if r.error > budget:
            r.status = "precision"
            r.detail = f"error {r.error:.3g} > budget {budget:.3g} (2 x baseline + floor)"


LOW_PRECISION_FACTOR = 2.0


@contextlib.contextmanager
def quiet_torch_warnings() -> Iterator[None]:
    """Silence torch's one-line warning about the dropout-mask test hook."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
