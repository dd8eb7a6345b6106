"""Shrinking: the smallest case that still fails, and a repro snippet for it.

:func:`shrink` greedily cuts one dimension at a time while the failure holds;
:func:`snippet` writes Python source that reruns the case through the backend and
prints the oracle next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .cases import Case
from .judging import CaseResult, evaluate

if TYPE_CHECKING:
    from .targets import Backend

__all__ = ["shrink", "shrink_semantic", "snippet"]


def _cut(x: np.ndarray | None, axis: int, n: int, size: int) -> np.ndarray | None:
    # Keep the first n along `axis` (from the end) where x spans the full dimension.
    if x is None or x.ndim < -axis or x.shape[axis] != size or size <= 1:
        return x
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, n)
    return x[tuple(index)]


def _smaller(case: Case) -> Iterator[Case]:
    # Candidate cases, each a little smaller along one dimension.
    B, H, L, E = case.q.shape
    K, S, Ev = case.k.shape[1], case.k.shape[2], case.v.shape[3]
    score_arrays = ("mask", "bias", "dropout_mask")

    def along(dim: str, n: int) -> Case:
        new = replace(case)
        if dim == "B":
            for name in ("q", "k", "v", *score_arrays):
                setattr(new, name, _cut(getattr(case, name), -4, n, B))
        elif dim == "L":
            new.q = case.q[..., :n, :]
            for name in score_arrays:
                setattr(new, name, _cut(getattr(case, name), -2, n, L))
        elif dim == "S":
            new.k, new.v = case.k[..., :n, :], case.v[..., :n, :]
            for name in score_arrays:
                setattr(new, name, _cut(getattr(case, name), -1, n, S))
            if case.window is not None:
                new.window = tuple(None if w is None else min(w, max(n - 1, 0))
                                   for w in case.window)  # type: ignore[assignment]
        elif dim == "E":
            new.q, new.k = case.q[..., :n], case.k[..., :n]
        elif dim == "Ev":
            new.v = case.v[..., :n]
        elif dim == "H":
            # One group of query heads with its key and value heads.
            new.q = case.q[:, :n]
            new.k = case.k[:, :max(1, n * K // H)]
            new.v = case.v[:, :max(1, n * case.v.shape[1] // H)]
            for name in score_arrays:
                setattr(new, name, _cut(getattr(case, name), -3, n, H))
            if case.alibi_slopes is not None:
                new.alibi_slopes = case.alibi_slopes[:n]
        return new

    sizes = {"B": B, "H": H, "L": L, "S": S, "E": E, "Ev": Ev}
    for dim, size in sizes.items():
        options = sorted({1, size // 2, size - 1} - {0, size})
        if dim == "H":
            group = H // math.gcd(H, math.gcd(K, case.v.shape[1])) if case.gqa else 1
            options = [n for n in options if n % group == 0 and K * n % H == 0
                       and case.v.shape[1] * n % H == 0]
        for n in options:
            yield along(dim, n)


def shrink(case: Case, fails: Callable[[Case], bool], *, budget: int = 60) -> Case:
    """The smallest case found by greedily cutting dimensions while ``fails`` holds.

    Examples
    --------
    >>> from refattn._audit.cases import make_case
    >>> case = make_case("causal", 0, 0)
    >>> small = shrink(case, lambda c: c.q.shape[-2] >= 2)
    >>> small.q.shape[-2]
    2
    """
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for smaller in _smaller(case):
            tries += 1
            if tries > budget:
                break
            try:
                if fails(smaller):
                    case, improved = smaller, True
                    break
            except Exception:  # noqa: BLE001 - a candidate the convention refuses
                continue
    return case


def _literal(x: np.ndarray) -> str:
    if x.dtype == bool:
        return f"np.array({x.tolist()!r})"
    return f"np.array({np.asarray(x, np.float64).tolist()!r})".replace("nan", "np.nan")


def snippet(case: Case, backend: Backend, dtype_name: str) -> str:
    """Python source that reruns the case through the backend and prints the oracle."""
    conv = backend.convention
    inputs = conv.inputs(case, dtype_name)
    try:
        options: dict[str, Any] | None = conv.options(case, inputs)
        refusal = ""
    except (ValueError, TypeError) as exc:
        # A case the reference semantics refuses: the snippet shows what the target
        # returned and says why there is no oracle to print.
        options, refusal = None, str(exc)
    imports, template = backend.library.source(dtype_name)
    lines = ["import numpy as np", "import refattn", *dict.fromkeys(imports),
             *backend.target_source, "",
             f"# {case.group}, {dtype_name}: {case.describe()}"]
    for name in ("q", "k", "v", "mask", "bias", "alibi_slopes"):
        if name in inputs:
            lines.append(f"{name}64 = {_literal(inputs[name])}")
    for name in ("q", "k", "v", "bias"):
        if name in inputs:
            lines.append(f"{name} = " + template.format(x=f"{name}64"))
    if "mask" in inputs:
        lines.append("mask = " + template.format(x="mask64").replace(
            f".astype({dtype_name!r})", "").replace(".astype(ml_dtypes.bfloat16)", "")
            .replace(f".to(torch.{dtype_name}", ".to(torch.bool"))
    if "alibi_slopes" in inputs:
        lines.append("alibi_slopes = " + template.format(x="alibi_slopes64").replace(
            dtype_name, "float32").replace("ml_dtypes.bfloat16", "'float32'"))
    lines.append(f"actual = target({conv.source(case)})")
    lines.append("actual = actual.detach().cpu().double() if hasattr(actual, 'detach') "
                 "else actual")
    lines.append("print('actual:', np.asarray(actual, dtype=np.float64).tolist())")
    if options is None:
        lines.append(f"# the oracle refuses this case: {refusal}")
        return "\n".join(lines)
    opts = []
    for name, value in options.items():
        if value is None or name in ("dropout_mask", "dropout_p"):
            continue
        if isinstance(value, np.ndarray):
            opts.append(f"{name}={name}64")
        else:
            opts.append(f"{name}={value!r}")
    lines.append("expected = refattn.attention(q64, k64, v64, " + ", ".join(opts) + ")")
    lines.append("print('oracle:', expected.tolist())")
    return "\n".join(lines)


def shrink_semantic(evaluated: list[tuple[Case, CaseResult, Any]], backend: Backend,
                    dtype_name: str, grad: bool) -> None:
    """One shrunk repro per cell: the first semantic failure, cut down while it fails the
    same way; its result gets the smaller case and a snippet."""
    for case, r, _ in evaluated:
        if r.status != "semantic":
            continue
        if case.dropout_p > 0 and backend.draws_own_dropout:
            # Judged on a probe over several calls (see .dropout): a statistical
            # verdict, with nothing smaller to cut it down to.
            return

        def fails(c: Case) -> bool:
            return evaluate(c, backend, dtype_name, grad=grad)[0].status == "semantic"

        small = shrink(case, fails)
        r.case = small.describe()
        try:
            r.snippet = snippet(small, backend, dtype_name)
        except (ValueError, TypeError) as exc:
            r.snippet = f"# no snippet: {exc}"
        return
