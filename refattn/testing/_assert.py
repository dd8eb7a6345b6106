"""Assertions for attention test suites: the oracle, the budget rule and a repro.

``assert_attention_close`` judges an implementation's output (and gradients) against
refattn's float64 oracle on the same inputs:

* float64 results: within twice the first-order rounding bound of the textbook
  algorithm (``refattn._tolerance.rounding_bound`` and ``gradient_rounding_bound``);
* float32, float16 and bfloat16 results: the flash-attention rule, per tensor,
  ``max|actual - oracle| <= factor * max|baseline - oracle| + floor``, where the
  baseline is a plain implementation in the same precision (``_baseline``) and the
  floor is one unit roundoff of the size of the terms the tensor sums, plus what the
  float32 rounding of the scores moves the tensor by (see
  ``assert_attention_close``).

The oracle and the budgets are computed in ``_budget``; ``decode_flash_dropout_mask``
lives in ``_flash_dropout``. Both are re-exported here, where they have always been
imported from.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np

from .._arrays import to_numpy
from .._front_door import attention
from .._namespace import check_array, library_name
from ._baseline import EPS, dtype_name
from ._budget import _GRAD_NAMES, _float64_options, _Tensor, compute_reference
from ._budget import Reference as Reference  # re-exported: it was defined here
from ._flash_dropout import decode_flash_dropout_mask

__all__ = ["assert_attention_close", "assert_close", "decode_flash_dropout_mask"]

# Options that would change what the oracle returns or how it computes: the oracle is
# float64 standard arithmetic returning the output alone.
_NOT_OPTIONS = ("return_weights", "return_lse", "return_dropout_mask", "compute_dtype",
                "precision", "output", "lse", "xp")
_ARRAY_OPTIONS = ("mask", "bias", "dropout_mask", "alibi_slopes")


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be positive and finite; got {value!r}")
    return number


def _library(named: dict[str, Any]) -> tuple[Any, str]:
    # One library for every array; the namespace of the first. (refattn's own
    # infer_namespace refuses ml_dtypes' bfloat16, which only this module accepts.)
    first = None
    for name, x in named.items():
        if x is None:
            continue
        if not array_api_compat.is_array_api_obj(x):
            raise TypeError(f"{name} must be an array; got {type(x).__name__}")
        if first is None:
            first = (name, x)
        elif library_name(x) != library_name(first[1]):
            raise TypeError(
                f"arrays from two libraries: {first[0]} is a {library_name(first[1])} array "
                f"but {name} is a {library_name(x)} array"
            )
    assert first is not None
    return array_api_compat.array_namespace(first[1]), library_name(first[1])


def _float_name(name: str, x: Any) -> str:
    kind = dtype_name(x)
    if kind not in EPS:
        raise TypeError(
            f"{name} must be float64, float32, float16 or bfloat16; got dtype {x.dtype}"
        )
    return kind


def _repro_dir() -> Path:
    return Path(os.environ.get("REFATTN_REPRO_DIR") or Path(tempfile.gettempdir())
                / "refattn-repro")


def _astype_code(kind: str) -> str:
    return ".astype(ml_dtypes.bfloat16)" if kind == "bfloat16" else f".astype({kind!r})"


def _callable_code(name: str, fn: Any) -> tuple[str | None, str]:
    # (import line, expression): importable module-level functions are named; others
    # cannot be rebuilt from a file and are left for the reader to fill in.
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and qualname and "<" not in qualname and "." not in qualname \
            and module != "__main__":
        return f"from {module} import {qualname}", qualname
    return None, f"...  # {name}: the callable you passed ({fn!r}) cannot be saved"


def _write_repro(arrays: dict[str, Any], options: dict[str, Any], factors: dict[str, float],
                 grads: bool) -> str:
    """Save the inputs to an .npz file; return a snippet that reruns the assertion."""
    kinds = {name: dtype_name(x) for name, x in arrays.items()}
    host = {name: to_numpy(x, float64=True) for name, x in arrays.items()}
    digest = hashlib.sha1()
    for name in sorted(host):
        digest.update(name.encode() + kinds[name].encode() + host[name].tobytes()
                      + str(host[name].shape).encode())
    digest.update(repr(sorted((n, repr(v)) for n, v in options.items()
                              if n not in _ARRAY_OPTIONS)).encode())
    path = _repro_dir() / f"{digest.hexdigest()[:16]}.npz"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **host)  # type: ignore[arg-type]
        saved = f"inputs saved to {path}"
    except OSError as exc:  # pragma: no cover - depends on the file system
        saved = f"could not save the inputs ({exc}); the snippet names the file it expected"
    imports = ["import numpy as np"]
    if "bfloat16" in kinds.values():
        imports.append("import ml_dtypes")
    imports.append("from refattn.testing import assert_attention_close")

    def load(name: str) -> str:
        cast = "" if kinds[name] in ("bool", "float64") else _astype_code(kinds[name])
        return f'data["{name}"]{cast}'

    kwargs = []
    for name, value in options.items():
        if name in arrays:
            kwargs.append(f"{name}={load(name)}")
        elif callable(value):
            line, expr = _callable_code(name, value)
            if line:
                imports.append(line)
            kwargs.append(f"{name}={expr}")
        else:
            kwargs.append(f"{name}={_literal(value)}")
    if grads:
        present = [n for n in _GRAD_NAMES if n in arrays]
        kwargs.append("grads=(" + ", ".join(load(n) for n in present) + ",)")
        kwargs.append(f"grad_out={load('grad_out')}")
    kwargs += [f"{name}={value!r}" for name, value in factors.items()]
    lines = [*imports, f'data = np.load("{path}")',
             f"q, k, v = {load('q')}, {load('k')}, {load('v')}",
             f"actual = {load('actual')}",
             "assert_attention_close(actual, q, k, v,"]
    lines += [f"    {kw}," for kw in kwargs]
    lines.append(")")
    return f"Repro ({saved}; NumPy arrays in the original dtypes):\n    " + "\n    ".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)




def assert_attention_close(
    actual: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    grads: Sequence[Any] | None = None,
    grad_out: Any = None,
    factor: float = 2.0,
    grad_factor: float = 3.0,
    **options: Any,
) -> None:
    """Assert that an attention result is as close to the oracle as its precision allows.

    Computes the float64 oracle ``refattn.attention(q, k, v, **options)`` (and
    ``refattn.attention_backward`` when ``grads`` are given) on exactly the values of
    ``q``, ``k``, ``v``, and compares each tensor with it. The budget depends on the
    dtype of ``actual``:

    * **float64**: twice the first-order rounding bound of the textbook algorithm
      (``refattn._tolerance.rounding_bound`` for the output,
      ``gradient_rounding_bound`` for the gradients), from the sizes of q, k, v, the
      scale, the bias and the lengths;
    * **float32, float16, bfloat16**: the flash-attention rule, per tensor,
      ``max|actual - oracle| <= factor * max|baseline - oracle| + floor``. The baseline
      is a plain implementation in the dtype of ``actual``, computed by refattn: inputs
      in the dtype, products accumulated in float32, scores and probabilities rounded to
      the dtype before the product with V, the output rounded; its gradients are those
      of that forward (refattn's float32 backward through the rounded scores, each
      gradient rounded). The floor is one unit roundoff u = eps/2 of the dtype times the
      size of the terms the tensor sums: ``max|V| / (1 - dropout_p)`` for the output (a
      convex combination of rows of V, rescaled by the dropout); for the gradients, whose
      terms cancel, bounds on those terms rather than on the result (for dQ
      ``2 c |scale| max|K| ||dO|| ||V||`` with ``c = 1 / (1 - dropout_p)``; the others in
      docs/testing.rst, "The floor"). Rounding the exact result to the dtype alone costs
      up to that much, so the budget cannot fall below what a correct implementation
      must lose, even where the baseline happens to be exact (one key, equal values).
      Each floor adds twice what one float32 rounding of every score
      at the size of its terms (``A_ij = |scale| sum_e |q_ie| |k_je| + |bias_ij|``) moves
      the tensor by, for the output ``2 * 2**-24 * max_(i, c) sum_j P_ij |V_jc - O_ic|
      A_ij``: the kernel and the baseline each round their scores, and at large logits
      that exceeds the baseline's error where its scores happened to round well
      (docs/testing.rst, "The floor").

    NaN or infinity where the oracle has a finite value (or the reverse), and a shape
    that differs from the oracle's, fail whatever the budget.

    Parameters
    ----------
    actual : array
        The output of the implementation under test, (..., H, L, Ev) in ``layout``; its
        dtype selects the rule. NumPy, torch, CuPy, JAX or array-api-strict; bfloat16
        NumPy arrays are ``ml_dtypes.bfloat16``.
    q, k, v : array
        The inputs the implementation was given, of the library of ``actual``.
    grads : sequence of arrays, optional
        The implementation's ``(dq, dk, dv)`` or ``(dq, dk, dv, dbias)`` (an
        ``AttentionGrads`` works; None entries are skipped). Needs ``grad_out``.
    grad_out : array, optional
        The gradient of the loss with respect to the output that produced ``grads``.
    factor, grad_factor : float
        The multiples of the baseline error allowed for the output and for the
        gradients (the flash-attention tests use 2 and 2 to 3).
    **options
        Options of ``refattn.attention`` describing what was computed: mask, bias,
        causal, window, alignment, scale, softcap, alibi_slopes, score_mod, mask_mod,
        dropout_p with dropout_mask (or rng), masked_rows, layout, implementation.

    Raises
    ------
    AssertionError
        When a tensor is outside its budget or differs in shape or non-finite pattern.
        The message gives, per tensor, the largest error, its index, the actual and
        oracle values there, the budget and what it is made of (the baseline error and
        the floor), and a snippet that reruns the assertion on inputs saved to an
        ``.npz`` file (in ``$REFATTN_REPRO_DIR``, by default ``refattn-repro`` in the
        temporary directory).
    TypeError
        Arrays of two libraries, a non-float ``actual``, an option that is not an
        option of ``refattn.attention`` or that changes what the oracle returns.
    ValueError
        ``grads`` without ``grad_out`` (or the reverse), a factor that is not positive,
        options that ``refattn.attention`` refuses.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import assert_attention_close
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 16, 8)).astype(np.float16) for _ in range(3))
    >>> def plain_fp16(q, k, v):   # a kernel under test: float32 logits, fp16 out
    ...     s = q.astype(np.float32) @ k.astype(np.float32).T / np.sqrt(8)
    ...     s = np.where(np.tril(np.ones((16, 16), bool)), s, -np.inf)
    ...     p = np.exp(s - s.max(-1, keepdims=True))
    ...     return ((p / p.sum(-1, keepdims=True)) @ v.astype(np.float32)).astype(np.float16)
    >>> assert_attention_close(plain_fp16(q[0], k[0], v[0]), q[0], k[0], v[0], causal=True)
    >>> try:
    ...     assert_attention_close(plain_fp16(q[0], k[0], v[0]), q[0], k[0], v[0])
    ... except AssertionError as e:
    ...     print(str(e).splitlines()[0])
    attention output outside its budget (float16): out
    """
    factor = _check_factor("factor", factor)
    grad_factor = _check_factor("grad_factor", grad_factor)
    refused = [name for name in _NOT_OPTIONS if name in options]
    if refused:
        raise TypeError(
            f"assert_attention_close does not take {refused[0]!r}: the oracle is float64 "
            "with standard arithmetic and returns the output alone"
        )
    if (grads is None) != (grad_out is None):
        raise ValueError("grads and grad_out go together: give both or neither")
    grad_list: list[Any] = []
    if grads is not None:
        grad_list = list(grads)
        if len(grad_list) not in (3, 4):
            raise ValueError(
                f"grads must be (dq, dk, dv) or (dq, dk, dv, dbias); got {len(grad_list)} "
                "arrays"
            )
    for name, x in (("actual", actual), ("q", q), ("k", k), ("v", v)):
        check_array(name, x)
    named = {"actual": actual, "q": q, "k": k, "v": v, "grad_out": grad_out,
             **{n: g for n, g in zip(_GRAD_NAMES, grad_list, strict=False)},
             **{n: options.get(n) for n in _ARRAY_OPTIONS}}
    xp, _ = _library(named)
    kind = _float_name("actual", actual)
    for name in ("q", "k", "v", "grad_out"):
        if named[name] is not None:
            _float_name(name, named[name])
    for name, g in zip(_GRAD_NAMES[:3], grad_list, strict=False):
        # One rule per call: the gradients are judged in the dtype of the output (d bias
        # has the bias's own dtype, whatever it is, and is judged in that of the output).
        if g is not None and dtype_name(g) != kind:
            raise TypeError(f"grads must have the dtype of actual ({kind}); {name} is "
                            f"{dtype_name(g)}")
    if options.get("rng") is not None:
        # Draw the keep-mask once: a Generator would give the backward (and the
        # baseline) another mask.
        options["dropout_mask"] = attention(
            *(xp.astype(x, xp.float64) for x in (q, k, v)), return_dropout_mask=True,
            **_float64_options(options, xp)).dropout_mask
        options.pop("rng")
    if kind == "float32":
        round_to = None
    else:
        low = actual.dtype

        def round_to(x: Any) -> Any:
            return xp.astype(xp.astype(x, low), xp.float32)

    ref = compute_reference(q, k, v, kind=kind, options=options,
                            grad_out=grad_out if grad_list else None, round_to=round_to, xp=xp)
    tensors = [_Tensor("out", actual, ref.oracle["out"])]
    for name, mine in zip(_GRAD_NAMES, grad_list, strict=False):
        if mine is not None:
            if ref.oracle.get(name) is None:
                raise ValueError(f"grads has a {name} but there is no bias to differentiate")
            tensors.append(_Tensor(name, mine, ref.oracle[name]))
    for t in tensors:
        t.measure()
        mult = factor if t.name == "out" else grad_factor
        t.budget, t.how = ref.budget(t.name, mult)
    failed = [t for t in tensors if not t.ok]
    if not failed:
        return
    header = (f"attention output outside its budget ({kind}): "
              + ", ".join(t.name for t in failed))
    arrays = {"actual": actual, "q": q, "k": k, "v": v,
              **{n: options[n] for n in _ARRAY_OPTIONS if options.get(n) is not None}}
    if grad_list:
        arrays["grad_out"] = grad_out
        arrays.update({n: g for n, g in zip(_GRAD_NAMES, grad_list, strict=False)
                       if g is not None})
    factors = {n: f for n, f, d in (("factor", factor, 2.0), ("grad_factor", grad_factor, 3.0))
               if f != d}
    body = "\n".join("  " + t.describe() for t in tensors)
    raise AssertionError(f"{header}\n{body}\n"
                         + _write_repro(arrays, options, factors, bool(grad_list)))


# Default tolerances of assert_close: torch.testing.assert_close's, so that a test moved
# from torch keeps its meaning. rtol is a few ulps of the dtype (eps 2**-23 for float32:
# rtol 1.3e-6 ~ 11 ulps; 2**-10 for float16: 1e-3 ~ 1 ulp; 2**-7 for bfloat16: 1.6e-2 ~
# 2 ulps), atol absorbs cancellation near zero.
_DEFAULT_TOLERANCES = {
    "float64": (1e-7, 1e-7), "float32": (1.3e-6, 1e-5), "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
}


def assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = True,
) -> None:
    """Assert that two arrays agree: library, shape, dtype and device first, then values.

    Values pass where ``|actual - desired| <= atol + rtol * |desired|``; infinities must
    match exactly, NaN matches NaN when ``equal_nan``. Boolean and integer arrays must
    be equal.

    Parameters
    ----------
    actual, desired : array
        Arrays of any array-API library (bfloat16 NumPy arrays via ml_dtypes).
    rtol, atol : float, optional
        Relative and absolute tolerance; both or neither. Defaults by dtype, those of
        ``torch.testing.assert_close``: float64 (1e-7, 1e-7), float32 (1.3e-6, 1e-5),
        float16 (1e-3, 1e-5), bfloat16 (1.6e-2, 1e-5).
    equal_nan : bool
        Whether NaN in both arrays at the same place counts as equal (attention gives
        NaN rows under ``masked_rows="nan"``).

    Raises
    ------
    AssertionError
        Naming the first of library, shape, dtype, device that differs, or the number of
        mismatched values with the largest absolute and relative differences and their
        indices.
    TypeError
        A non-array argument.
    ValueError
        Only one of rtol and atol, or a negative one.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import assert_close
    >>> assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    >>> try:
    ...     assert_close(np.zeros(3, np.float32), np.zeros(3))
    ... except AssertionError as e:
    ...     print(e)
    dtype: actual is float32, desired is float64
    """
    for name, x in (("actual", actual), ("desired", desired)):
        if library_name(x) != "torch":
            # A torch meta tensor is compared by its metadata first: its device then
            # fails the comparison, which is the answer asked for.
            check_array(name, x)
        if not array_api_compat.is_array_api_obj(x):
            raise TypeError(f"{name} must be an array; got {type(x).__name__}")
    if (rtol is None) != (atol is None):
        raise ValueError("give both rtol and atol, or neither (defaults by dtype)")
    checks = (
        ("library", library_name(actual), library_name(desired)),
        ("shape", tuple(actual.shape), tuple(desired.shape)),
        ("dtype", dtype_name(actual), dtype_name(desired)),
        ("device", str(array_api_compat.device(actual)), str(array_api_compat.device(desired))),
    )
    for what, a_, d_ in checks:
        if a_ != d_:
            raise AssertionError(f"{what}: actual is {a_}, desired is {d_}")
    kind = dtype_name(actual)
    a, d = to_numpy(actual, float64=True), to_numpy(desired, float64=True)
    if a.dtype.kind != "f":
        if not np.array_equal(a, d):
            where = tuple(int(i) for i in np.argwhere(a != d)[0])
            raise AssertionError(f"values: {int((a != d).sum())} of {a.size} differ, first "
                                 f"at {where}: actual {a[where]!r}, desired {d[where]!r}")
        return
    if rtol is None:
        rtol, atol = _DEFAULT_TOLERANCES.get(kind, (0.0, 0.0))
    assert atol is not None
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be non-negative; got rtol={rtol}, atol={atol}")
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - d)
        close = diff <= atol + rtol * np.abs(d)
    close |= (a == d)  # equal infinities
    if equal_nan:
        close |= np.isnan(a) & np.isnan(d)
    if close.all():
        return
    bad = ~close
    finite = np.where(bad & np.isfinite(diff), diff, -1.0)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    lines = [f"values: {int(bad.sum())} of {a.size} differ beyond atol={atol:g} + "
             f"rtol={rtol:g} * |desired|; first at {first}: actual {a[first]!r}, desired "
             f"{d[first]!r}"]
    if (finite >= 0).any():
        i = np.unravel_index(int(np.argmax(finite)), a.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(bad & np.isfinite(diff), diff / np.abs(d), -1.0)
        j = np.unravel_index(int(np.argmax(rel)), a.shape)
        lines.append(f"greatest absolute difference {float(finite[i]):.3e} at "
                     f"{tuple(int(x) for x in i)}; greatest relative difference "
                     f"{float(rel[j]):.3e} at {tuple(int(x) for x in j)}")
    raise AssertionError("\n".join(lines))
