"""Assertions for attention test suites: the oracle, the budget rule and a repro.

``assert_attention_close`` judges an implementation's output (and gradients) against
refattn's float64 oracle on the same inputs:

* float64 results: within twice the first-order rounding bound of the textbook
  algorithm (``refattn._tolerance.rounding_bound`` and ``gradient_rounding_bound``);
* float32, float16 and bfloat16 results: the flash-attention rule, per tensor,
  ``max|actual - oracle| <= factor * max|baseline - oracle| + floor``, where the
  baseline is a plain implementation in the same precision (``_baseline``) and the
  floor is one unit roundoff of the largest value the tensor may hold (see
  ``assert_attention_close``).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np

from .. import _tolerance
from .._arrays import swap_head_axis, to_numpy
from .._front_door import attention, attention_backward
from .._namespace import library_name
from ._baseline import EPS, SCALE_PLACEMENTS, dtype_name, low_precision_baseline

__all__ = ["assert_attention_close", "assert_close", "decode_flash_dropout_mask"]

# Options that would change what the oracle returns or how it computes: the oracle is
# float64 standard arithmetic returning the output alone.
_NOT_OPTIONS = ("return_weights", "return_lse", "return_dropout_mask", "compute_dtype",
                "precision", "output", "lse", "xp")
_FLOAT_OPTIONS = ("bias", "alibi_slopes")
_ARRAY_OPTIONS = ("mask", "bias", "dropout_mask", "alibi_slopes")
_GRAD_NAMES = ("dq", "dk", "dv", "dbias")


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


def _blhd_to_bhld(x: np.ndarray, layout: str) -> np.ndarray:
    return swap_head_axis(x, np) if layout == "BLHD" else x


class _Tensor:
    """One compared tensor: its name, values, oracle, budget and the verdict."""

    def __init__(self, name: str, actual: Any, oracle: Any) -> None:
        self.name = name
        self.actual = to_numpy(actual, float64=True)
        self.oracle = to_numpy(oracle, float64=True)
        self.error = 0.0
        self.index: tuple[int, ...] | None = None
        self.budget = 0.0
        self.how = ""
        self.problem = ""

    def measure(self) -> None:
        a, o = self.actual, self.oracle
        if a.shape != o.shape:
            self.problem = f"shape {a.shape} but the oracle's is {o.shape}"
            return
        # NaN or inf must sit where the oracle has them: anything else is a semantic
        # difference (a wrong masked-row value, an overflow), not a rounding error.
        differ = (np.isnan(a) != np.isnan(o)) | ((np.isinf(a) | np.isinf(o)) & (a != o)
                                                 & ~(np.isnan(a) & np.isnan(o)))
        if differ.any():
            where = tuple(int(i) for i in np.argwhere(differ)[0])
            self.problem = (f"{int(differ.sum())} entries non-finite where the oracle is "
                            f"not (or the reverse), first at {where}: actual {a[where]!r}, "
                            f"oracle {o[where]!r}")
            return
        diff = np.where(np.isfinite(a) & np.isfinite(o), np.abs(a - o), 0.0)
        if diff.size:
            flat = int(np.argmax(diff))
            self.index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
            self.error = float(diff.reshape(-1)[flat])

    @property
    def ok(self) -> bool:
        return not self.problem and self.error <= self.budget

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        where = ""
        if self.index is not None:
            where = (f" at index {self.index} (actual {self.actual[self.index]:.6g}, oracle "
                     f"{self.oracle[self.index]:.6g})")
        verdict = "ok" if self.ok else "FAILS"
        return (f"{self.name}: {verdict}: max |actual - oracle| = {self.error:.3e}{where}; "
                f"budget {self.budget:.3e} = {self.how}")


def _logit_extra(q: np.ndarray, k: np.ndarray, options: dict[str, Any], scale: float,
                 run_oracle: Any) -> np.ndarray | None:
    # The float64 bound's logit size A: |scale| sum |q||k| plus what is added to the
    # scaled scores. A bias alone adds max|bias|. ALiBi, softcap and score_mod add
    # terms of the size of the final scores themselves: read those off the oracle
    # (s = lse + log w where w > 0; zero weights carry no error) and add the product
    # term again, since final - product bounds everything added to it.
    nonadditive = any(options.get(n) is not None for n in ("alibi_slopes", "softcap",
                                                           "score_mod"))
    bias = options.get("bias")
    if not nonadditive:
        return None if bias is None else to_numpy(bias, float64=True)
    res = run_oracle(return_weights=True, return_lse=True)
    w, lse = to_numpy(res.weights, float64=True), to_numpy(res.lse, float64=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = lse[..., None] + np.log(w)
    s = np.where((w > 0) & np.isfinite(s), np.abs(s), 0.0)
    qa = np.abs(np.where(np.isfinite(q), q, 0.0))
    product = abs(scale) * float(np.max(qa.sum(axis=-1), initial=0.0)) * float(
        np.max(np.abs(np.where(np.isfinite(k), k, 0.0)), initial=0.0))
    extra = float(np.max(s, initial=0.0)) + product
    if bias is not None:
        finite = np.nan_to_num(to_numpy(bias, float64=True), posinf=0, neginf=0)
        extra += float(np.max(np.abs(finite), initial=0.0))
    return np.asarray([extra])


def _finite_max(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=0.0))


def _row_norm_max(x: np.ndarray) -> float:
    x = np.where(np.isfinite(x), x, 0.0)
    return float(np.max(np.sqrt(np.sum(x * x, axis=-1)), initial=0.0))


def _gradient_term_sizes(host: dict[str, np.ndarray], grad_out: Any, options: dict[str, Any],
                         opts64: dict[str, Any], f64: dict[str, Any], scale: float,
                         keep_scale: float, xp: Any) -> dict[str, tuple[float, str]]:
    """The size of the terms each gradient entry sums, for the floor of its budget.

    Gradient entries are sums of terms that cancel, so the rounding of the terms, not
    the size of the result, sets what any implementation in the dtype must lose. With
    c = 1 / (1 - p), dS_ij = P_ij (dP_ij - D_i), |dP_ij| = c |dO_i . V_j| and |D_i| =
    |dO_i . O_i| both at most c ||dO_i|| max_j ||V_j|| (Cauchy-Schwarz; O_i is a convex
    combination of rows of V, rescaled), so |dS_ij| <= 2 c P_ij ||dO|| ||V||:

    * dV_j = sum_i c keep_ij P_ij dO_i: its terms sum to sum_i c keep_ij P_ij |dO_i|,
      which is exactly the oracle's dV for the gradient |dO| (linear, weights >= 0);
    * dQ_i = scale sum_j dS_ij K_j: terms up to 2 c |scale| max|K| ||dO|| ||V|| (a row of
      P sums to 1), times the rows summed into one broadcast query row;
    * dK_j = scale sum_i dS_ij Q_i: the same with max|Q| and the column sum of P, which
      is the oracle's dV for a gradient of ones without dropout;
    * d bias: 2 c ||dO|| ||V|| times the score entries summed into one bias entry.
    """
    do = _blhd_to_bhld(to_numpy(grad_out, float64=True), options.get("layout", "BHLD"))
    q, k, v = host["q"], host["k"], host["v"]
    pair = 2.0 * keep_scale * _row_norm_max(do) * _row_norm_max(v)
    go = xp.astype(grad_out, xp.float64)
    dv_abs = attention_backward(xp.abs(go), f64["q"], f64["k"], f64["v"], **opts64).dv
    plain = {n: val for n, val in opts64.items() if n not in ("dropout_p", "dropout_mask")}
    colsum = attention_backward(xp.ones_like(go), f64["q"], f64["k"], f64["v"], **plain).dv
    L = q.shape[-2]
    rows = float(np.prod(np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])))
    rows *= (q.shape[-3] if q.ndim >= 3 else 1) * L
    n_q = rows / float(np.prod(q.shape[:-1])) if L else 1.0
    sizes = {
        "dv": (_finite_max(to_numpy(dv_abs, float64=True)), "max_j sum_i c P_ij |dO_i|"),
        "dq": (n_q * abs(scale) * _finite_max(k) * pair,
               "2 c |scale| max|K| max||dO_i|| max||V_j||"),
        "dk": (abs(scale) * _finite_max(q) * pair * _finite_max(to_numpy(colsum, float64=True)),
               "2 c |scale| max|Q| max||dO_i|| max||V_j|| max_j sum_i P_ij"),
    }
    bias = options.get("bias")
    if bias is not None:
        S = k.shape[-2]
        entries = float(np.prod(bias.shape))
        n_b = rows * S / entries if entries else 0.0
        sizes["dbias"] = (n_b * pair, "2 c max||dO_i|| max||V_j|| times the entries summed")
    return sizes


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


def _float64_options(options: dict[str, Any], xp: Any) -> dict[str, Any]:
    opts = dict(options)
    for name in _FLOAT_OPTIONS:
        if opts.get(name) is not None:
            opts[name] = xp.astype(opts[name], xp.float64)
    return opts


@dataclass
class Reference:
    """What a result of dtype ``kind`` is judged against, tensor by tensor.

    ``oracle`` holds the float64 oracle's tensors on the host ("out", "dq", "dk", "dv",
    "dbias"). For float64, ``bound`` holds the rounding bounds; for lower precisions,
    ``baseline_error`` the largest error of the plain baselines against the oracle and
    ``floor`` (with ``floor_how``) the floor of the budget.
    """

    kind: str
    oracle: dict[str, Any]
    bound: dict[str, float] = field(default_factory=dict)
    baseline_error: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    floor_how: dict[str, str] = field(default_factory=dict)

    def budget(self, name: str, factor: float) -> tuple[float, str]:
        """(budget, how it is made) of tensor ``name`` with this factor."""
        if self.kind == "float64":
            what = "gradient_rounding_bound" if name != "out" else "rounding_bound"
            return self.bound[name], f"2 x the float64 rounding bound ({what})"
        base, floor = self.baseline_error[name], self.floor[name]
        return factor * base + floor, (
            f"{factor:g} x baseline error {base:.3e} + floor {floor:.3e} ({self.floor_how[name]})")


def compute_reference(q: Any, k: Any, v: Any, *, kind: str, options: dict[str, Any],
                      grad_out: Any = None, round_to: Any = None, xp: Any) -> Reference:
    """The oracle and the ingredients of the budgets for inputs q, k, v and ``options``.

    ``round_to`` rounds float32 arrays of ``xp`` to the dtype ``kind`` (None: float32 or
    float64, no rounding). ``options`` are ``refattn.attention``'s, a dropout given as a
    ``dropout_mask``. The inputs may hold any float dtype; their values are used exactly.
    """
    layout = options.get("layout", "BHLD")
    f64 = {name: xp.astype(x, xp.float64) for name, x in (("q", q), ("k", k), ("v", v))}
    opts64 = _float64_options(options, xp)

    def run_oracle(**extra: Any) -> Any:
        return attention(f64["q"], f64["k"], f64["v"], **opts64, **extra)

    oracle: dict[str, Any] = {"out": to_numpy(run_oracle(), float64=True)}
    if grad_out is not None:
        grads = attention_backward(xp.astype(grad_out, xp.float64), f64["q"], f64["k"],
                                   f64["v"], **opts64)
        oracle.update({n: None if g is None else to_numpy(g, float64=True)
                       for n, g in zip(_GRAD_NAMES, grads, strict=True)})
    ref = Reference(kind, oracle)
    host = {name: _blhd_to_bhld(to_numpy(x, float64=True), layout) for name, x in
            (("q", q), ("k", k), ("v", v))}
    E = host["q"].shape[-1]
    scale = options.get("scale")
    scale = float(scale) if scale is not None else (1.0 / math.sqrt(E) if E else 1.0)
    p = float(options.get("dropout_p", 0.0))
    keep_scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    names = [n for n, value in oracle.items() if value is not None]
    if kind == "float64":
        extra = _logit_extra(host["q"], host["k"], options, scale, run_oracle)
        ref.bound["out"] = _tolerance.rounding_bound(
            host["q"], host["k"], host["v"], scale=scale, bias=extra, dropout_p=p)
        if grad_out is not None:
            bias = options.get("bias")
            ref.bound.update(_tolerance.gradient_rounding_bound(
                host["q"], host["k"], host["v"],
                _blhd_to_bhld(to_numpy(grad_out, float64=True), layout),
                scale=scale, bias=extra, dropout_p=p,
                bias_shape=None if bias is None else tuple(bias.shape)))
        return ref
    u = EPS[kind] / 2
    rounder = round_to if round_to is not None else (lambda x: x)
    bases = [low_precision_baseline(q, k, v, round_to=rounder, options=options,
                                    grad_out=grad_out, placement=placement, xp=xp)
             for placement in SCALE_PLACEMENTS]
    sizes = {"out": (_finite_max(host["v"]) * keep_scale, "max|V| / (1 - dropout_p)")}
    if grad_out is not None:
        sizes.update(_gradient_term_sizes(host, grad_out, options, opts64, f64, scale,
                                          keep_scale, xp))
    for name in names:
        ref.baseline_error[name] = max(
            _tolerance.max_abs_error(to_numpy(getattr(b, name), float64=True), oracle[name])
            for b in bases)
        size, what = sizes[name]
        ref.floor[name] = u * size
        ref.floor_how[name] = (f"u = eps/2 of {kind} times {what} = {size:.4g}, the size of "
                               "the terms it sums")
    return ref


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
      largest value the exact tensor may hold: ``max|V| / (1 - dropout_p)`` for the
      output (a convex combination of rows of V, rescaled by the dropout), max|g| of the
      oracle's gradient g for each gradient. Rounding the exact result to the dtype
      alone costs up to that much, so the budget cannot fall below what a correct
      implementation must lose, even where the baseline happens to be exact (one key,
      equal values).

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


def decode_flash_dropout_mask(S_dmask: Any, seqlen_q: int | None = None,
                              seqlen_k: int | None = None, *, xp: Any = None) -> Any:
    """Turn flash-attn's ``S_dmask`` into refattn's dropout keep-mask (True = kept).

    ``flash_attn_func(..., dropout_p=p, return_attn_probs=True)`` returns, as its last
    value, ``S_dmask`` of shape (B, H, L_rounded, S_rounded): the probabilities of the
    softmax with the dropout decision in the sign bit, negative where the weight was
    dropped. (Its lengths are rounded up to the kernel's block size; flash-attn 2 stores
    it in plain row-major order, earlier versions in the order of their MMA tiles,
    which flash-attn's tests untangle with ``convert_flash_attn_S_to_softmax``.)
    The keep-mask is therefore ``S_dmask >= 0``, cropped to (L, S), which is what
    flash-attn's own tests use. Entries that the kernel masks (causal, window, padding)
    hold zeros and decode as kept; as their weight is 0, keeping them changes nothing.
    A weight that underflowed to zero and was dropped is stored as -0.0 and decodes as
    kept for the same reason.

    Parameters
    ----------
    S_dmask : array
        (..., L_rounded, S_rounded) floating array from flash-attn.
    seqlen_q, seqlen_k : int, optional
        The true lengths L and S to crop to; None keeps that axis whole.
    xp : namespace, optional
        Array namespace of ``S_dmask``; inferred when None.

    Returns
    -------
    array
        Boolean keep-mask (..., L, S), True = kept, for ``refattn.attention``'s
        ``dropout_mask`` (with ``layout``-independent (B, H, L, S) order).

    Raises
    ------
    TypeError
        A non-floating ``S_dmask`` or non-int lengths.
    ValueError
        Fewer than 2 dimensions, or lengths outside the array.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import decode_flash_dropout_mask
    >>> S_dmask = np.array([[[0.25, -0.5, 0.0], [-0.125, 0.75, 0.0]]])  # H=1, 2 x 3
    >>> decode_flash_dropout_mask(S_dmask, seqlen_q=2, seqlen_k=2)
    array([[[ True, False],
            [False,  True]]])
    """
    if xp is None:
        if not array_api_compat.is_array_api_obj(S_dmask):
            raise TypeError(f"S_dmask must be an array; got {type(S_dmask).__name__}")
        xp = array_api_compat.array_namespace(S_dmask)
    if dtype_name(S_dmask) not in EPS:
        raise TypeError(f"S_dmask must be a floating array (flash-attn's fp16/bf16); got "
                        f"dtype {S_dmask.dtype}")
    if S_dmask.ndim < 2:
        raise ValueError(f"S_dmask must be (..., L_rounded, S_rounded); got shape "
                         f"{tuple(S_dmask.shape)}")
    index: list[Any] = [slice(None), slice(None)]
    for axis, (name, n) in enumerate((("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k))):
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {n!r}")
        size = S_dmask.shape[axis - 2]
        if not 0 <= n <= size:
            raise ValueError(f"{name} must lie in [0, {size}] (the rounded length of "
                             f"S_dmask's axis {axis - 2}); got {n}")
        index[axis] = slice(0, int(n))
    keep = S_dmask >= 0
    return keep[(..., *index)]
