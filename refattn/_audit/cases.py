"""Drawing the cases: seeded attention problems, one feature group at a time.

A case holds float64 host arrays, heads before positions (B, H, L, E), whatever the
convention it is later called in; :func:`rounded` gives their values in a lower dtype
and :func:`grad_out` the cotangent a case's gradients are checked with.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..testing._baseline import numpy_rounder

__all__ = ["GROUPS", "Case", "grad_out", "make_case", "rounded"]

GROUPS = [
    "plain",
    "bool mask",
    "float mask",
    "fully masked rows",
    "causal",
    "mask + causal",
    "window",
    "softcap",
    "ALiBi",
    "GQA",
    "scale",
    "dropout",
    "empty sequences",
    "NaN query rows",
    "huge logits",
]


@dataclass
class Case:
    """One attention problem, heads before positions (B, H, L, E) whatever the convention.

    ``window`` is (left, right) with None for an unlimited side; ``causal`` and
    ``window`` are read in the convention's alignment.
    """

    group: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None  # bool, True = take part
    bias: np.ndarray | None = None  # additive float
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    scale: float | None = None
    gqa: bool = False
    dropout_p: float = 0.0
    dropout_mask: np.ndarray | None = None
    softcap: float | None = None
    alibi_slopes: np.ndarray | None = None

    def describe(self) -> str:
        parts = [f"q{self.q.shape} k{self.k.shape} v{self.v.shape}"]
        for name in ("mask", "bias", "dropout_mask", "alibi_slopes"):
            x = getattr(self, name)
            if x is not None:
                parts.append(f"{name}={x.dtype}{x.shape}")
        for name in ("causal", "window", "scale", "gqa", "dropout_p", "softcap"):
            value = getattr(self, name)
            if value not in (None, False, 0.0):
                parts.append(f"{name}={value}")
        return " ".join(parts)


def _shapes(rng: np.random.Generator, *, gqa: bool = False, empty: bool = False,
            same_kv_heads: bool = False, equal_dims: bool = False
            ) -> tuple[int, int, int, int, int, int, int, int]:
    B = int(rng.integers(1, 3))
    H = int(rng.choice([1, 2, 4]))
    K = Kv = H
    if gqa:
        H = int(rng.choice([2, 4, 6]))
        divisors = [d for d in range(1, H + 1) if H % d == 0]
        K = int(rng.choice(divisors))
        Kv = K if same_kv_heads else int(rng.choice(divisors))
    L, S = (int(x) for x in rng.integers(1, 17, size=2))
    if empty:
        if rng.random() < 0.5:
            L = 0
        else:
            S = 0
    E, Ev = (int(x) for x in rng.integers(1, 33, size=2))
    if equal_dims or rng.random() < 0.5:
        # Equal head dims half the time: torch's CPU fused path only runs then, and
        # it is the path with the most distinct behaviour to audit.
        Ev = E
    return B, H, K, Kv, L, S, E, Ev


def _qkv(rng: np.random.Generator, dims: tuple[int, ...], logit: float = 1.0
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B, H, K, Kv, L, S, E, Ev = dims
    # Entries of size sqrt(logit) make scale * q.k of order `logit` for scale 1/sqrt(E).
    mag = np.sqrt(logit)
    q = rng.standard_normal((B, H, L, E)) * mag
    k = rng.standard_normal((B, K, S, E)) * mag
    v = rng.standard_normal((B, Kv, S, Ev))
    return q, k, v


def _bool_mask(rng: np.random.Generator, B: int, H: int, L: int, S: int, *,
               full_rows: bool) -> np.ndarray:
    shape = [(L, S), (B, 1, L, S), (B, H, L, S), (1, H, 1, S)][int(rng.integers(0, 4))]
    mask = rng.random(shape) < 0.7
    if full_rows:
        mask[..., int(rng.integers(0, shape[-2])), :] = False
    else:
        # At least one key per row, so no row is fully masked (that group is separate).
        mask[..., int(rng.integers(0, shape[-1]))] = True
    return mask


def _window(rng: np.random.Generator, S: int) -> tuple[int | None, int | None]:
    left = None if rng.random() < 0.25 else int(rng.integers(0, max(S, 1)))
    right = None if rng.random() < 0.25 else int(rng.integers(0, max(S, 1)))
    if left is None and right is None:
        right = 0
    return left, right


def make_case(group: str, seed: int, index: int, convention: str = "torch") -> Case:
    """Build case ``index`` of ``group`` deterministically from ``seed``.

    Examples
    --------
    >>> case = make_case("causal", 0, 0)
    >>> case.causal, case.q.dtype.name
    (True, 'float64')
    >>> make_case("causal", 0, 0).describe() == case.describe()
    True
    """
    rng = np.random.default_rng([seed, GROUPS.index(group), index])
    flash = convention == "flash"
    dims = _shapes(rng, gqa=group == "GQA", empty=group == "empty sequences",
                   same_kv_heads=convention in ("flash", "jax", "flex"),
                   equal_dims=convention == "jax")
    B, H, K, Kv, L, S, E, Ev = dims
    logit = float(10 ** rng.uniform(1.7, 2.7)) if group == "huge logits" else 1.0
    q, k, v = _qkv(rng, dims, logit)
    case = Case(group, q, k, v, gqa=group == "GQA")
    if group == "bool mask":
        case.mask = _bool_mask(rng, B, H, L, S, full_rows=False)
    elif group == "fully masked rows":
        case.mask = _bool_mask(rng, B, H, L, S, full_rows=True)
    elif group == "float mask":
        case.bias = rng.standard_normal((B, H, L, S)) * 2
    elif group == "causal":
        case.causal = True
    elif group == "mask + causal":
        case.mask = _bool_mask(rng, B, H, L, S, full_rows=False)
        case.causal = True
    elif group == "window":
        case.window = _window(rng, S)
    elif group == "softcap":
        case.softcap = float(rng.choice([5.0, 20.0]))
        case.q *= 3.0  # logits of ~10: the cap bites
    elif group == "ALiBi":
        case.alibi_slopes = (2.0 ** -rng.uniform(0, 4, size=H)).astype(np.float32).astype(
            np.float64)
        case.causal = flash and bool(rng.random() < 0.5)
    elif group == "scale":
        case.scale = float(rng.choice([0.0, -0.37, 2.5, rng.uniform(-3, 3)]))
    elif group == "dropout":
        case.dropout_p = float(rng.choice([0.1, 0.5, 0.9]))
        case.dropout_mask = rng.random((B, H, L, S)) >= case.dropout_p
    elif group == "NaN query rows":
        case.q[..., int(rng.integers(0, L)), :] = np.nan
    return case


def rounded(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """float64 array holding the values of ``x`` rounded to ``dtype_name``.

    Examples
    --------
    >>> import numpy as np
    >>> rounded(np.array([1 + 2.0**-12]), "float16").tolist()
    [1.0]
    """
    if dtype_name == "float64":
        return x.astype(np.float64)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    return numpy_rounder(dtype_name)(x32).astype(np.float64)


def grad_out(case: Case, shape: tuple[int, ...], dtype_name: str) -> np.ndarray:
    """The cotangent ``dO`` of a case's output, in ``dtype_name``'s values.

    Seeded by the case itself, so a shrunk case gets its own, reproducible dO.
    """
    rng = np.random.default_rng(zlib.crc32(case.describe().encode()))
    return rounded(rng.standard_normal(shape), dtype_name)
