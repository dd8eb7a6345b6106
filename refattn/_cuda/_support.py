"""Which ``attention(...)`` options the CUDA kernels implement.

The dispatcher asks before choosing ``implementation="cuda"``: with an explicit
``implementation="cuda"`` it raises ``implementation='cuda' does not support <option>``,
with ``implementation=None`` it takes the array-API path instead. The forward and the
backward kernels implement the same options.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .._arrays import all_finite
from ._launch import MAX_HEAD_DIM

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = ["NON_FINITE", "SUPPORTED_OPTIONS", "finite_inputs", "supported_options",
           "unsupported", "unsupported_option"]

#: Options the kernels honour at any value (GQA is inferred from the shapes).
#: ``mask_mod`` arrives as the boolean array the front door evaluates it to (ANDed into
#: ``mask``), ``rng`` as the keep-mask it draws on the host, and ``return_dropout_mask``
#: only returns that mask.
SUPPORTED_OPTIONS = frozenset({
    "scale", "causal", "alignment", "compute_dtype", "return_lse", "mask", "bias", "window",
    "softcap", "mask_mod", "dropout_p", "dropout_mask", "rng", "masked_rows",
    "return_dropout_mask",
    # ALiBi reaches the kernel folded into the bias the front door builds.
    "alibi_slopes",
})

# Options the kernels do not implement, with the value that means "not used".
_UNUSED: dict[str, Any] = {
    "score_mod": None,
    "precision": "standard",
    "return_weights": False,
}


def supported_options() -> frozenset[str]:
    """Names of the options the CUDA forward kernel implements.

    Examples
    --------
    >>> sorted(supported_options())[:5]
    ['alibi_slopes', 'alignment', 'bias', 'causal', 'compute_dtype']
    """
    return SUPPORTED_OPTIONS


def _dtype_name(value: Any) -> str | None:
    # None, a name, or a dtype in any of the spellings NumPy and CuPy accept.
    if value is None:
        return None
    try:
        return np.dtype(value).name
    except TypeError:
        return "<not a dtype>"


def _is_unused(value: Any, unused: Any) -> bool:
    if unused is None:
        return value is None
    if isinstance(unused, bool):
        return isinstance(value, bool) and value == unused
    if isinstance(unused, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return isinstance(value, str) and value == unused


def unsupported_option(
    *, head_dim: int | None = None, value_head_dim: int | None = None, **options: Any
) -> str | None:
    """The first option the CUDA kernel cannot honour, described, or None.

    Pass the ``attention`` keyword arguments as given (unused ones may be left out) and
    the head dims. Unknown option names raise ``TypeError`` so that a new option cannot
    slip past the kernel unnoticed.

    Examples
    --------
    >>> unsupported_option(causal=True, alignment="bottom_right", head_dim=64,
    ...                    value_head_dim=64) is None
    True
    >>> unsupported_option(score_mod=lambda s, b, h, q, kv: s)
    'score_mod'
    >>> unsupported_option(head_dim=512)
    'head dim E=512 (the kernel takes at most 256)'
    """
    for name, value in options.items():
        if name in SUPPORTED_OPTIONS:
            if name == "alignment" and value not in ("top_left", "bottom_right"):
                return f"alignment={value!r}"
            if name == "compute_dtype" and _dtype_name(value) not in (None, "float32",
                                                                     "float64"):
                return f"compute_dtype={value!r}"
            if name == "masked_rows" and value not in ("zero", "nan", "uniform"):
                return f"masked_rows={value!r}"
            continue
        if name not in _UNUSED:
            raise TypeError(f"unknown attention option {name!r}")
        if not _is_unused(value, _UNUSED[name]):
            shown = repr(value) if isinstance(value, (str, int, float, bool)) else "<given>"
            return name if shown == "<given>" else f"{name}={shown}"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim E={head_dim} (the kernel takes at most {MAX_HEAD_DIM})"
    if value_head_dim is not None and value_head_dim > MAX_HEAD_DIM:
        return f"value head dim Ev={value_head_dim} (the kernel takes at most {MAX_HEAD_DIM})"
    return None


# The fields of AttentionProblem the kernels read as they are (``_paths``), and those
# ``unsupported`` checks: a new field must be added to one or the other, so that a new
# option cannot reach the kernels unnoticed.
_PROBLEM_FIELDS_TAKEN = frozenset({
    "xp", "device", "shapes", "q", "k", "v", "mask", "mask_mod", "bias", "alibi_slopes",
    "window", "alignment", "shift", "keep", "scale", "dropout_p", "masked_rows", "layout",
    "in_dtype", "compute_dtype", "implementation",
})
_PROBLEM_FIELDS_CHECKED = frozenset({"mods", "precision", "sinks", "attention_chunk", "qv"})


def unsupported(problem: AttentionProblem, *, return_weights: bool) -> str | None:
    """The first thing in ``problem`` the kernels cannot honour, described, or None.

    Raises TypeError for a problem field the kernel layer does not know (see
    ``_PROBLEM_FIELDS_TAKEN``), so that a new option has to be decided here.
    """
    fields = {f.name for f in dataclasses.fields(problem)}
    unknown = sorted(fields - _PROBLEM_FIELDS_TAKEN - _PROBLEM_FIELDS_CHECKED)
    if unknown:
        raise TypeError(f"unknown attention option {unknown[0]!r}")
    # The kernels have no sink term, chunk edges or second product yet: the array-API
    # paths take these (docs/variants.rst).
    for name in ("sinks", "attention_chunk", "qv"):
        if getattr(problem, name) is not None:
            return name
    reason = unsupported_option(
        score_mod=problem.mods.score_mod, precision=problem.precision,
        return_weights=return_weights, head_dim=problem.shapes.E,
        value_head_dim=problem.shapes.Ev,
    )
    if reason is None and not finite_inputs(problem):
        return NON_FINITE
    return reason


#: Why a problem with NaN or infinity in its inputs goes to the array-API path.
NON_FINITE = ("non-finite inputs (the kernels skip hidden blocks; use implementation=None, "
              "'direct' or 'blocked')")


def finite_inputs(problem: AttentionProblem) -> bool:
    """True when q, k, v and the bias hold no NaN or infinity (the bias may hold -inf,
    which masks) and no score can overflow.

    docs/semantics.rst ("Non-finite values"): a NaN or +inf score, or a non-finite
    value, reaches rows and columns through the masked pairs too, and the kernels never
    visit the key blocks a mask hides. Rather than scan those blocks in-kernel, such a
    problem goes to the array-API paths, which follow the rule: one pass over the inputs
    (O((L + S) E), against the kernels' O(L S E)) decides, and finite problems, the
    kernels' whole domain in practice, pay only that pass.

    Overflow: |scale q . k| <= |scale| E max|q| max|k| (plus the largest bias; softcap
    bounds a score by the cap); a bound below half the compute dtype's largest float
    proves every score finite, otherwise the array-API path evaluates them.
    """
    xp = problem.xp
    if not all_finite(xp, problem.q, problem.k, problem.v):
        return False
    bias, top = problem.bias_with_alibi, float(xp.finfo(problem.q.dtype).max)
    bias_max = 0.0
    if bias is not None and math.prod(bias.shape):
        if bool(xp.any(xp.isnan(bias))):
            return False
        bias_max = max(float(xp.max(bias)), 0.0)
        if bias_max == math.inf:
            return False
    largest = [float(xp.max(xp.abs(x))) if math.prod(x.shape) else 0.0
               for x in (problem.q, problem.k)]
    bound = abs(problem.scale) * problem.shapes.E * largest[0] * largest[1]
    if problem.mods.softcap is not None:
        bound = min(bound, problem.mods.softcap)
    # The scores are (scale q) k^T: scale q must not overflow either.
    return bound + bias_max < top / 2 and abs(problem.scale) * largest[0] < top / 2
