"""The audit behind ``refattn check``: an attention implementation against the oracle.

A *case* is one seeded attention problem in a feature group (plain, masks, causal, GQA,
dropout, ...). Every case is run through each *backend* (a way of calling the
implementation: one of torch's SDPA backends, or a user's function) in each dtype, on
inputs rounded to that dtype, and compared with refattn's float64 oracle on exactly
those values. A *convention* (torch, flash, jax) says how a case becomes the
implementation's arguments and which semantics the oracle takes.

A disagreement is one of:

* a precision failure: the error exceeds its budget (``refattn.testing._assert``:
  the float64 rounding bound; for lower precisions the flash-attention rule, applied
  over the whole group: ``factor x`` the worst error of the plain baselines in the group
  plus the largest floor);
* a semantic difference: NaN or infinity where the oracle is finite (or the reverse), a
  different shape, one side raising where the other returns, or an error so large (over
  ``SEMANTIC_RATIO`` times its budget) that no rounding explains it; named more
  precisely where possible (fully masked rows, the other causal alignment);
* a known deviation: a documented behaviour of that backend, recognised by checking that
  the backend matches the documented alternative semantics.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import _tolerance
from .compat.torch import sdpa_translate
from .testing._assert import compute_reference
from .testing._baseline import EPS, numpy_rounder

__all__ = [
    "CONVENTIONS",
    "GROUPS",
    "Backend",
    "Case",
    "CaseResult",
    "Ran",
    "GroupReport",
    "audit",
    "make_case",
    "torch_backends",
    "user_backend",
]

LOW_PRECISION_FACTOR = 2.0
GRAD_FACTOR = 3.0
# An error this many times its budget is not rounding: a wrong mask, scale or alignment
# moves outputs by O(max|V|), thousands of budgets in float32 and float64 and still tens
# in bfloat16, while a kernel that is merely less accurate than allowed lands within a
# few budgets.
SEMANTIC_RATIO = 10.0
_TENSORS = ("out", "dq", "dk", "dv")


# --- cases ----------------------------------------------------------------------------


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
            same_kv_heads: bool = False, equal_dims: bool = False):
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


def _window(rng: np.random.Generator, S: int) -> tuple[int | None, int | None]:
    left = None if rng.random() < 0.25 else int(rng.integers(0, max(S, 1)))
    right = None if rng.random() < 0.25 else int(rng.integers(0, max(S, 1)))
    if left is None and right is None:
        right = 0
    return left, right


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


def make_case(group: str, seed: int, index: int, convention: str = "torch") -> Case:
    """Build case ``index`` of ``group`` deterministically from ``seed``."""
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


# --- conventions ----------------------------------------------------------------------


def _blhd(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, -3, -2))


@dataclass
class Convention:
    """How a case becomes an implementation's arguments, and the oracle's semantics.

    ``groups`` are the feature groups the convention can express; ``arrays`` puts q, k, v
    into its layout; ``call`` gives (args, kwargs) from arrays already in the target's
    library (``a`` maps names to them); ``options`` gives ``refattn.attention``'s options
    for the oracle (raising ValueError where the convention refuses the case);
    ``source`` writes the call as Python source for a repro snippet.
    """

    name: str
    groups: tuple[str, ...]
    layout: str
    call: Callable[[Case, dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]
    options: Callable[[Case, dict[str, np.ndarray]], dict[str, Any]]
    source: Callable[[Case], str]

    def arrays(self, case: Case) -> dict[str, np.ndarray]:
        names = {"q": case.q, "k": case.k, "v": case.v}
        return {n: _blhd(x) if self.layout == "BLHD" else x for n, x in names.items()}


def _torch_call(case: Case, a: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    mask = a.get("mask") if case.mask is not None else a.get("bias")
    if mask is not None:
        kwargs["attn_mask"] = mask
    if case.causal:
        kwargs["is_causal"] = True
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.gqa:
        kwargs["enable_gqa"] = True
    return (a["q"], a["k"], a["v"]), kwargs


def _torch_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # torch's arguments translated where the torch front-end translates them (it raises
    # for attn_mask together with is_causal, as torch's math backend does).
    attn_mask = r.get("mask") if case.mask is not None else r.get("bias")
    _, _, mask, bias = sdpa_translate(r["q"], r["k"], r["v"], attn_mask, case.causal,
                                      case.gqa, None)
    opts: dict[str, Any] = {"mask": mask, "bias": bias, "causal": case.causal,
                            "alignment": "top_left", "scale": case.scale,
                            "masked_rows": "zero"}
    if case.dropout_p:
        opts.update(dropout_p=case.dropout_p, dropout_mask=case.dropout_mask)
    return opts


def _torch_source(case: Case) -> str:
    parts = []
    if case.mask is not None:
        parts.append("attn_mask=mask")
    if case.bias is not None:
        parts.append("attn_mask=bias")
    if case.causal:
        parts.append("is_causal=True")
    if case.scale is not None:
        parts.append(f"scale={case.scale!r}")
    if case.gqa:
        parts.append("enable_gqa=True")
    return ", ".join(["q", "k", "v", *parts])


def _flash_window(case: Case) -> tuple[int, int]:
    left, right = case.window or (None, None)
    return (-1 if left is None else left, -1 if right is None else right)


def _flash_call(case: Case, a: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    if case.causal:
        kwargs["causal"] = True
    if case.window is not None:
        kwargs["window_size"] = _flash_window(case)
    if case.scale is not None:
        kwargs["softmax_scale"] = case.scale
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    if case.alibi_slopes is not None:
        kwargs["alibi_slopes"] = a["alibi_slopes"]
    if case.dropout_p:
        kwargs.update(dropout_p=case.dropout_p, return_attn_probs=True)
    return (a["q"], a["k"], a["v"]), kwargs


def _flash_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    from .compat.flash_attn import flash_window as normalise

    L, S = r["q"].shape[1], r["k"].shape[1]
    fw = normalise(_flash_window(case), case.causal, seqlen_q=L, seqlen_k=S,
                   has_alibi=case.alibi_slopes is not None)
    opts: dict[str, Any] = {"window": fw.window, "alignment": "bottom_right",
                            "scale": case.scale, "softcap": case.softcap,
                            "alibi_slopes": r.get("alibi_slopes"), "masked_rows": "zero",
                            "layout": "BLHD"}
    if case.dropout_p:
        opts.update(dropout_p=case.dropout_p, dropout_mask=case.dropout_mask)
    return opts


def _flash_source(case: Case) -> str:
    parts = []
    if case.causal:
        parts.append("causal=True")
    if case.window is not None:
        parts.append(f"window_size={_flash_window(case)!r}")
    if case.scale is not None:
        parts.append(f"softmax_scale={case.scale!r}")
    if case.softcap is not None:
        parts.append(f"softcap={case.softcap!r}")
    if case.alibi_slopes is not None:
        parts.append("alibi_slopes=alibi_slopes")
    return ", ".join(["q", "k", "v", *parts])


def _jax_window(case: Case, S: int) -> tuple[int, int]:
    left, right = case.window or (None, None)
    return (S if left is None else left, S if right is None else right)


def _jax_call(case: Case, a: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    if case.bias is not None:
        kwargs["bias"] = a["bias"]
    if case.mask is not None:
        kwargs["mask"] = a["mask"]
    if case.causal:
        kwargs["is_causal"] = True
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.window is not None:
        kwargs["local_window_size"] = _jax_window(case, case.k.shape[-2])
    return (a["q"], a["k"], a["v"]), kwargs


def _jax_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # jax.nn.dot_product_attention: masks fill with a finite negative, so a fully masked
    # row is the mean of the values ("uniform"); windows and causal are top-left.
    window = None if case.window is None else _jax_window(case, r["k"].shape[1])
    return {"mask": r.get("mask"), "bias": r.get("bias"), "causal": case.causal,
            "window": window, "alignment": "top_left", "scale": case.scale,
            "masked_rows": "uniform", "layout": "BLHD"}


def _jax_source(case: Case) -> str:
    parts = []
    if case.bias is not None:
        parts.append("bias=bias")
    if case.mask is not None:
        parts.append("mask=mask")
    if case.causal:
        parts.append("is_causal=True")
    if case.scale is not None:
        parts.append(f"scale={case.scale!r}")
    if case.window is not None:
        parts.append(f"local_window_size={_jax_window(case, case.k.shape[-2])!r}")
    return ", ".join(["q", "k", "v", *parts])


def _full(case: Case, x: np.ndarray) -> np.ndarray:
    # Mods index their arrays with (b, h, q_idx, kv_idx) grids: give them all four axes.
    B, H, L = case.q.shape[:3]
    return np.ascontiguousarray(np.broadcast_to(x, (B, H, L, case.k.shape[-2])))


def _flex_call(case: Case, a: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # FlexAttention expresses masks as a mask_mod (here handed as a bare callable, which
    # torch's flex_attention does not take but refattn.compat.flex does; torch users
    # wrap it with create_block_mask) and additive biases as a score_mod.
    kwargs: dict[str, Any] = {}
    mask, bias = a.get("mask"), a.get("bias")
    if mask is not None:
        kwargs["block_mask"] = lambda b, h, q_idx, kv_idx: mask[b, h, q_idx, kv_idx]
    elif case.causal:
        kwargs["block_mask"] = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
    if bias is not None:
        kwargs["score_mod"] = lambda s, b, h, q_idx, kv_idx: s + bias[b, h, q_idx, kv_idx]
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.gqa:
        kwargs["enable_gqa"] = True
    return (a["q"], a["k"], a["v"]), kwargs


def _flex_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # flex_attention: top-left index arithmetic, fully masked rows give 0 (LSE -inf).
    return {"mask": r.get("mask"), "bias": r.get("bias"), "causal": case.causal,
            "alignment": "top_left", "scale": case.scale, "masked_rows": "zero"}


def _flex_source(case: Case) -> str:
    parts = []
    if case.mask is not None:
        parts.append("block_mask=lambda b, h, q, kv: mask[b, h, q, kv]")
    elif case.causal:
        parts.append("block_mask=lambda b, h, q, kv: kv <= q")
    if case.bias is not None:
        parts.append("score_mod=lambda s, b, h, q, kv: s + bias[b, h, q, kv]")
    if case.scale is not None:
        parts.append(f"scale={case.scale!r}")
    if case.gqa:
        parts.append("enable_gqa=True")
    return ", ".join(["q", "k", "v", *parts])


CONVENTIONS = {
    "torch": Convention(
        "torch", ("plain", "bool mask", "float mask", "fully masked rows", "causal",
                  "mask + causal", "GQA", "scale", "dropout", "empty sequences",
                  "NaN query rows", "huge logits"),
        "BHLD", _torch_call, _torch_options, _torch_source),
    "flash": Convention(
        "flash", ("plain", "causal", "window", "softcap", "ALiBi", "GQA", "scale", "dropout",
                  "huge logits"),
        "BLHD", _flash_call, _flash_options, _flash_source),
    "jax": Convention(
        "jax", ("plain", "bool mask", "float mask", "fully masked rows", "causal", "window",
                "GQA", "scale", "huge logits"),
        "BLHD", _jax_call, _jax_options, _jax_source),
    "flex": Convention(
        "flex", ("plain", "bool mask", "float mask", "fully masked rows", "causal", "GQA",
                 "scale", "huge logits"),
        "BHLD", _flex_call, _flex_options, _flex_source),
}


# --- arrays in the target's library ---------------------------------------------------


def _round(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """float64 array holding the values of ``x`` rounded to ``dtype_name``."""
    if dtype_name == "float64":
        return x.astype(np.float64)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    return numpy_rounder(dtype_name)(x32).astype(np.float64)


@dataclass
class Library:
    """Puts host arrays into one array library on one device, and takes results back."""

    name: str
    device: str | None = None

    def dtype(self, dtype_name: str) -> Any:
        if self.name == "torch":
            import torch

            return getattr(torch, dtype_name)
        if self.name == "jax":
            import jax.numpy as jnp

            return getattr(jnp, dtype_name)
        if dtype_name == "bfloat16":
            if self.name == "cupy":
                raise ValueError("CuPy has no bfloat16: use --library torch or jax")
            import ml_dtypes

            return ml_dtypes.bfloat16
        return np.dtype(dtype_name)

    def put(self, x: np.ndarray | None, dtype_name: str | None) -> Any:
        if x is None:
            return None
        if self.name == "torch":
            import torch

            t = torch.from_numpy(np.ascontiguousarray(x))
            if dtype_name is not None and x.dtype != bool:
                t = t.to(self.dtype(dtype_name))
            return t.to(self.device or "cpu")
        a = x if dtype_name is None or x.dtype == bool else x.astype(self.dtype(dtype_name))
        if self.name == "numpy":
            return a
        if self.name == "cupy":
            import cupy

            with cupy.cuda.Device(int(str(self.device or "0").split(":")[-1])):
                return cupy.asarray(a)
        import jax

        device = None
        if self.device is not None:
            platform, _, index = self.device.partition(":")
            device = jax.devices(platform)[int(index or 0)]
        return jax.device_put(a, device)

    def source(self, dtype_name: str) -> tuple[list[str], str]:
        """(imports, expression template with {x}) that rebuild an input in a snippet."""
        device = f", device={self.device!r}" if self.device else ""
        if self.name == "torch":
            return ["import torch"], f"torch.from_numpy({{x}}).to(torch.{dtype_name}{device})"
        if self.name == "jax":
            return ["import jax.numpy as jnp"], f"jnp.asarray({{x}}, dtype=jnp.{dtype_name})"
        cast = ("ml_dtypes.bfloat16" if dtype_name == "bfloat16" else repr(dtype_name))
        imports = ["import ml_dtypes"] if dtype_name == "bfloat16" else []
        if self.name == "cupy":
            return ["import cupy", *imports], f"cupy.asarray({{x}}.astype({cast}))"
        return imports, f"{{x}}.astype({cast})"


def to_host(x: Any) -> np.ndarray:
    """A result of any library as a float64 (or bool) NumPy array."""
    from .testing._baseline import to_numpy64

    if type(x).__module__.split(".")[0] in ("jax", "jaxlib"):
        return np.asarray(x).astype(np.float64)
    return to_numpy64(x)


# --- backends -------------------------------------------------------------------------


@dataclass
class Backend:
    """A named way of running an implementation on a case's arrays.

    ``run(case, inputs, dtype_name, grad_out)`` takes host float64 arrays (in the
    convention's layout, holding values of the dtype) and returns a ``Ran``: the output,
    and the gradients (dq, dk, dv) when ``grad_out`` is given, as host arrays.
    """

    name: str
    run: Callable[..., Any]
    convention: Convention
    draws_own_dropout: bool = False
    grads: bool = True
    # Known deviations: (name, predicate(case, inputs, actual, options, dtype) -> bool).
    known: list[tuple[str, Callable[..., bool]]] = field(default_factory=list)
    # Source lines that define `target(q, k, v, ...)` for a repro snippet.
    target_source: list[str] = field(default_factory=list)
    library: Library = field(default_factory=lambda: Library("numpy"))


@dataclass
class Ran:
    """What one run of an implementation gave, on the host."""

    out: np.ndarray
    grads: tuple[np.ndarray, ...] | None = None
    # flash convention with dropout: the keep-mask decoded from the returned S_dmask.
    dropout_mask: np.ndarray | None = None


def _run_target(fn: Callable[..., Any], case: Case, inputs: dict[str, np.ndarray],
                dtype_name: str, grad_out: np.ndarray | None, conv: Convention,
                lib: Library) -> Ran:
    a = {n: lib.put(x, dtype_name if n != "alibi_slopes" else "float32")
         for n, x in inputs.items()}
    args, kwargs = conv.call(case, a)
    returned: dict[str, Any] = {}

    def call(q: Any, k: Any, v: Any) -> Any:
        res = fn(q, k, v, *args[3:], **kwargs)
        if isinstance(res, tuple):
            # flash-attn with return_attn_probs: (out, softmax_lse, S_dmask).
            returned["S_dmask"] = res[-1] if len(res) == 3 else None
            res = res[0]
        return res

    if grad_out is None:
        out, grads = call(*args[:3]), None
    elif lib.name == "torch":
        q, k, v = (x.detach().clone().requires_grad_() for x in args[:3])
        out = call(q, k, v)
        out.backward(lib.put(grad_out, dtype_name))
        out, grads = out.detach(), (q.grad, k.grad, v.grad)
    else:  # jax
        import jax

        out, vjp = jax.vjp(call, *args[:3])
        grads = vjp(lib.put(grad_out, dtype_name))
    ran = Ran(to_host(out), None if grads is None else tuple(to_host(g) for g in grads))
    if conv.name == "flash" and case.dropout_p and returned.get("S_dmask") is not None:
        from .testing import decode_flash_dropout_mask

        L, S = inputs["q"].shape[1], inputs["k"].shape[1]
        ran.dropout_mask = decode_flash_dropout_mask(to_host(returned["S_dmask"]), L, S)
    return ran


def _math_sdpa(q: Any, k: Any, v: Any, *, case: Case, **kwargs: Any) -> Any:
    import torch

    if case.dropout_p > 0:
        # The math kernel's test hook is the only torch entry point that takes an
        # explicit keep-mask, so dropout is checkable bit for bit.
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            # The op adds its mask; F.scaled_dot_product_attention converts a boolean
            # one to 0 / -inf before dispatching, and so must we.
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        keep = torch.from_numpy(case.dropout_mask).to(q.device)
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, case.dropout_p, case.causal, keep, scale=case.scale,
            enable_gqa=case.gqa)[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def _torch_backend(name: str, sdp: str | None, device: str) -> Backend:
    conv = CONVENTIONS["torch"]
    lib = Library("torch", device)

    def sdpa(q: Any, k: Any, v: Any, *, case: Case, **kwargs: Any) -> Any:
        import torch

        if sdp is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, sdp)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    fn = _math_sdpa if name == "math" else sdpa

    def run(case: Case, inputs: dict[str, np.ndarray], dtype_name: str,
            grad_out: np.ndarray | None) -> Any:
        return _run_target(lambda *a, **kw: fn(*a, case=case, **kw), case, inputs,
                           dtype_name, grad_out, conv, lib)

    if name == "math":
        source = ["import torch",
                  "from torch.nn.attention import SDPBackend, sdpa_kernel",
                  "def target(*args, **kwargs):",
                  "    with sdpa_kernel(SDPBackend.MATH):",
                  "        return torch.nn.functional.scaled_dot_product_attention("
                  "*args, **kwargs)"]
    elif sdp is None:
        source = ["import torch",
                  "target = torch.nn.functional.scaled_dot_product_attention"]
    else:
        source = ["import torch",
                  "from torch.nn.attention import SDPBackend, sdpa_kernel",
                  "def target(*args, **kwargs):",
                  f"    with sdpa_kernel(SDPBackend.{sdp}):",
                  "        return torch.nn.functional.scaled_dot_product_attention("
                  "*args, **kwargs)"]
    known = []
    if name == "default" and device == "cpu":
        known = [("explicit mask ANDed with is_causal", _matches_anded_causal),
                 ("NaN query rows give zeros", _matches_zero_nan_rows)]
    return Backend(name, run, conv, draws_own_dropout=name != "math", known=known,
                   target_source=source, library=lib)


def torch_backends(device: str | None = None) -> list[Backend]:
    """torch's SDPA under each backend torch offers here (math and default on a CPU; with
    CUDA also flash, efficient and cuDNN, each forced with ``sdpa_kernel``)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [_torch_backend("math", None, device), _torch_backend("default", None, device)]
    if device.startswith("cuda"):
        backends += [_torch_backend(name.lower(), name, device) for name in
                     ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")]
    return backends


def load_target(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (dots after the colon reach attributes)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"TARGET must be 'torch' or 'package.module:function'; got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for TARGET {spec!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (TARGET {spec!r})"
                             ) from None
    if not callable(obj):
        raise ValueError(f"TARGET {spec!r} is not callable: {type(obj).__name__}")
    return obj


def user_backend(spec: str, *, convention: str = "torch", library: str = "numpy",
                 device: str | None = None) -> Backend:
    """A user's function ``package.module:function`` called in ``convention`` on arrays
    of ``library`` (on ``device``)."""
    fn = load_target(spec)
    conv = CONVENTIONS[convention]
    lib = Library(library, device)

    def run(case: Case, inputs: dict[str, np.ndarray], dtype_name: str,
            grad_out: np.ndarray | None) -> Any:
        return _run_target(fn, case, inputs, dtype_name, grad_out, conv, lib)

    module_name, _, attr = spec.partition(":")
    source = [f"from {module_name} import {attr.split('.')[0]} as _target_root",
              f"target = _target_root{''.join('.' + p for p in attr.split('.')[1:])}"]
    return Backend(spec, run, conv, draws_own_dropout=convention != "flash",
                   grads=library in ("torch", "jax"), target_source=source, library=lib)


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


def _oracle(inputs: dict[str, np.ndarray], options: dict[str, Any]) -> np.ndarray:
    from .attention import attention

    return np.asarray(attention(inputs["q"], inputs["k"], inputs["v"], **options))


def _matches_anded_causal(case: Case, inputs: dict[str, np.ndarray], actual: np.ndarray,
                          options: dict[str, Any] | None, dtype: str) -> bool:
    # torch's CPU fused path combines an explicit mask with is_causal (logical AND)
    # where the math path refuses the pair.
    if case.mask is None or not case.causal:
        return False
    opts = {"mask": inputs["mask"], "causal": True, "scale": case.scale,
            "masked_rows": "zero"}
    return _agrees(actual, _oracle(inputs, opts), inputs, opts, dtype)


def _matches_zero_nan_rows(case: Case, inputs: dict[str, np.ndarray], actual: np.ndarray,
                           options: dict[str, Any] | None, dtype: str) -> bool:
    # torch's CPU fused path can turn a NaN query row into a zero row (its row max
    # ignores NaN); elsewhere it must agree with the oracle.
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


# --- evaluation -----------------------------------------------------------------------


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
            "floors", "detail", "case", "snippet")}

    @property
    def ratio(self) -> float:
        ratios = [self.errors[n] / self.budgets[n] if self.budgets.get(n) else
                  (0.0 if self.errors[n] == 0 else math.inf) for n in self.errors]
        return max(ratios, default=0.0)

    @property
    def worst(self) -> str | None:
        if not self.errors:
            return None
        return max(self.errors, key=lambda n: self.errors[n] / self.budgets[n]
                   if self.budgets.get(n) else (0.0 if self.errors[n] == 0 else math.inf))


def _inputs(case: Case, conv: Convention, dtype_name: str) -> dict[str, np.ndarray]:
    # Every array the implementation sees, rounded to the dtype, as float64 (bool kept).
    arrays = conv.arrays(case)
    inputs = {n: _round(x, dtype_name) for n, x in arrays.items()}
    if case.mask is not None:
        inputs["mask"] = _full(case, case.mask) if conv.name == "flex" else case.mask
    if case.bias is not None:
        bias = _round(case.bias, dtype_name)
        inputs["bias"] = _full(case, bias) if conv.name == "flex" else bias
    if case.alibi_slopes is not None:
        inputs["alibi_slopes"] = _round(case.alibi_slopes, "float32")
    return inputs


def _grad_out(case: Case, shape: tuple[int, ...], dtype_name: str) -> np.ndarray:
    # Seeded by the case itself, so a shrunk case gets its own, reproducible dO.
    rng = np.random.default_rng(zlib.crc32(case.describe().encode()))
    return _round(rng.standard_normal(shape), dtype_name)


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
    masked = np.isnan(_oracle(inputs, {**options, "masked_rows": "nan"})).all(axis=-1) & \
        ~np.isnan(expected).all(axis=-1)
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
    masked = np.isnan(_oracle(inputs, {**options, "masked_rows": "nan"})).all(axis=-1) & \
        ~np.isnan(expected).all(axis=-1)
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
    res = CaseResult(case.group, backend.name, dtype_name, "ok", case=case.describe())
    if case.dropout_p > 0 and backend.draws_own_dropout:
        res.status, res.detail = "skipped", "draws its own dropout mask"
        return res, None
    inputs = _inputs(case, conv, dtype_name)
    try:
        options = conv.options(case, inputs)
        oracle_error = None
    except (ValueError, TypeError) as exc:
        options, oracle_error = None, exc
    grad_out = None
    if grad and options is not None:
        out_shape = _oracle(inputs, options).shape
        grad_out = _grad_out(case, out_shape, dtype_name)
    actual_error: Exception | None = None
    try:
        with np.errstate(all="ignore"):
            got = backend.run(case, inputs, dtype_name, grad_out)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc) or "positional argument" in str(exc):
            res.status, res.detail = "unsupported", f"the target does not take it: {exc}"
            return res, None
        got, actual_error = None, exc
    except Exception as exc:  # noqa: BLE001 - any crash of the target is reported
        got, actual_error = None, exc
    actual, grads = (None, None) if got is None else (got.out, got.grads)
    if got is not None and got.dropout_mask is not None and options is not None:
        # The implementation drew its own dropout and told us which weights it kept.
        options["dropout_mask"] = got.dropout_mask
    if oracle_error is not None or actual_error is not None:
        if oracle_error is not None and actual_error is not None:
            res.detail = "both refuse"
            return res, None
        if actual is not None:
            for name, pred in backend.known:
                if pred(case, inputs, actual, options, dtype_name):
                    res.status, res.detail = "known", name
                    return res, None
        res.status = "semantic"
        res.detail = (f"the oracle refuses the case: {oracle_error}" if oracle_error is not None
                      else f"{backend.name} raised {actual_error!r}")
        return res, None
    assert options is not None and actual is not None
    ref = compute_reference(
        inputs["q"], inputs["k"], inputs["v"], kind=dtype_name, options=options,
        grad_out=grad_out, round_to=None if dtype_name in ("float32", "float64")
        else numpy_rounder(dtype_name), xp=_np_namespace())
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
                    return res, None
            res.status = "semantic"
            res.detail = (f"{name}: shape {value.shape}, the oracle's {expected.shape}"
                          if value.shape != expected.shape else
                          _nan_detail(name, value, expected, inputs, options, backend.name))
            return res, None
        res.errors[name] = _tolerance.max_abs_error(value, expected)
        if dtype_name == "float64":
            res.budgets[name] = ref.bound[name]
        else:
            res.baselines[name] = ref.baseline_error[name]
            res.floors[name] = ref.floor[name]
            factor = LOW_PRECISION_FACTOR if name == "out" else GRAD_FACTOR
            res.budgets[name] = ref.budget(name, factor)[0]  # per case; see audit
    res.actual, res.inputs, res.options = actual, inputs, options
    _judge(res, case, ref)
    return res, ref


def _np_namespace() -> Any:
    import array_api_compat.numpy as xnp

    return xnp


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


# --- shrinking --------------------------------------------------------------------------


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
    """The smallest case found by greedily cutting dimensions while ``fails`` holds."""
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
    inputs = _inputs(case, conv, dtype_name)
    options = conv.options(case, inputs)
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
    opts = []
    for name, value in options.items():
        if value is None or name in ("dropout_mask", "dropout_p"):
            continue
        if isinstance(value, np.ndarray):
            opts.append(f"{name}={name}64")
        else:
            opts.append(f"{name}={value!r}")
    lines.append("expected = refattn.attention(q64, k64, v64, " + ", ".join(opts) + ")")
    lines.append("actual = actual.detach().cpu().double() if hasattr(actual, 'detach') "
                 "else actual")
    lines.append("print('actual:', np.asarray(actual, dtype=np.float64).tolist())")
    lines.append("print('oracle:', expected.tolist())")
    return "\n".join(lines)


# --- the audit ----------------------------------------------------------------------------


@dataclass
class GroupReport:
    """One (group, backend, dtype) cell of the table."""

    group: str
    backend: str
    dtype: str
    cases: int = 0
    worst_ratio: float = 0.0
    worst_error: float = 0.0
    worst_budget: float = 0.0
    worst_tensor: str = ""
    verdict: str = "ok"
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("precision", "semantic", "known")]


def audit(
    backends: list[Backend],
    *,
    groups: list[str],
    dtypes: list[str],
    examples: int,
    seed: int,
    grad: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    shrink_failures: bool = True,
) -> list[GroupReport]:
    """Run every (group, backend, dtype) cell and summarise it."""
    reports = []
    total = len(groups) * len(backends) * len(dtypes)
    for group in groups:
        for backend in backends:
            cases = [make_case(group, seed, i, backend.convention.name)
                     for i in range(examples)]
            for dtype_name in dtypes:
                rep = GroupReport(group, backend.name, dtype_name)
                use_grad = grad and backend.grads
                evaluated = [(case, *evaluate(case, backend, dtype_name, grad=use_grad))
                             for case in cases]
                if dtype_name != "float64":
                    _apply_group_budget(evaluated)
                _summarise(rep, evaluated)
                if shrink_failures:
                    _shrink_semantic(rep, evaluated, backend, dtype_name, use_grad)
                reports.append(rep)
                if progress is not None:
                    progress(len(reports), total, f"{group} / {backend.name} / {dtype_name}")
    return reports


def _apply_group_budget(evaluated: list[tuple[Case, CaseResult, Any]]) -> None:
    # The flash-attention rule over a whole group: every case's error must stay within
    # factor x the worst error of the plain baselines in the group, plus the largest
    # floor. Compared over many entries the maxima are stable; one tiny case's baseline
    # error alone is too noisy to scale.
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


def _summarise(rep: GroupReport, evaluated: list[tuple[Case, CaseResult, Any]]) -> None:
    for _, r, _ in evaluated:
        rep.results.append(r)
        if r.status in ("skipped", "unsupported"):
            rep.verdict = f"{r.status} ({r.detail.split(':')[0]})"
            continue
        rep.cases += 1
        if r.status == "ok" and r.errors and r.ratio >= rep.worst_ratio:
            name = r.worst or "out"
            rep.worst_ratio, rep.worst_error, rep.worst_budget = (
                r.ratio, r.errors[name], r.budgets.get(name, 0.0))
            rep.worst_tensor = name
    statuses = {f.status for f in rep.failures}
    if "semantic" in statuses:
        rep.verdict = "FAIL (semantic)"
    elif "precision" in statuses:
        rep.verdict = "FAIL (precision)"
    elif "known" in statuses:
        names = sorted({f.detail for f in rep.failures})
        rep.verdict = "known deviation: " + "; ".join(names)


def _shrink_semantic(rep: GroupReport, evaluated: list[tuple[Case, CaseResult, Any]],
                     backend: Backend, dtype_name: str, grad: bool) -> None:
    # One shrunk repro per cell: the first semantic failure, cut down while it fails the
    # same way.
    for case, r, _ in evaluated:
        if r.status != "semantic":
            continue

        def fails(c: Case) -> bool:
            return evaluate(c, backend, dtype_name, grad=grad)[0].status == "semantic"

        small = shrink(case, fails)
        r.case = small.describe()
        try:
            r.snippet = snippet(small, backend, dtype_name)
        except (ValueError, TypeError) as exc:
            r.snippet = f"# no snippet: {exc}"
        return


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence warnings of the audited code (torch's dropout test hook, overflows)."""
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield
