"""Targets: the backends an audit runs, the array libraries and dtypes they take.

A :class:`Backend` is a named way of running an implementation on a case: torch's SDPA
under one of its backends (:func:`torch_backends`) or a user's
``package.module:function`` (:func:`user_backend`), called in a convention on arrays of
a :class:`Library` and taken back to the host as float64.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._arrays import to_numpy
from .._types import Array
from .cases import Case
from .conventions import CONVENTIONS, Convention
from .judging import matches_zero_nan_rows

__all__ = ["Backend", "Library", "Ran", "load_target", "torch_backends", "user_backend"]


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

    def put(self, x: np.ndarray | None, dtype_name: str | None) -> Array:
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

    def call(q: Array, k: Array, v: Array) -> Array:
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
    ran = Ran(to_numpy(out, float64=True),
              None if grads is None else tuple(to_numpy(g, float64=True) for g in grads))
    if conv.name == "flash" and case.dropout_p and returned.get("S_dmask") is not None:
        from ..testing import decode_flash_dropout_mask

        L, S = inputs["q"].shape[1], inputs["k"].shape[1]
        ran.dropout_mask = decode_flash_dropout_mask(
            to_numpy(returned["S_dmask"], float64=True), L, S)
    return ran


def _math_sdpa(q: Array, k: Array, v: Array, *, case: Case, **kwargs: Any) -> Array:
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
        # The hook warns, once per process, that it is for testing. Through torch.ops the
        # warning goes from C++ straight to the process's stderr, where no Python filter
        # reaches it; the generated binding (torch._scaled_dot_product_attention_math)
        # hands it to Python's warnings, so it is filtered here, whoever calls.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Dropout mask should only be used")
            return torch._scaled_dot_product_attention_math(
                q, k, v, mask, case.dropout_p, case.causal, keep, scale=case.scale,
                enable_gqa=case.gqa)[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def _torch_source(sdp: str | None) -> list[str]:
    # Source lines that define `target` as torch's SDPA, forced to backend `sdp`.
    if sdp is None:
        return ["import torch", "target = torch.nn.functional.scaled_dot_product_attention"]
    return ["import torch",
            "from torch.nn.attention import SDPBackend, sdpa_kernel",
            "def target(*args, **kwargs):",
            f"    with sdpa_kernel(SDPBackend.{sdp}):",
            "        return torch.nn.functional.scaled_dot_product_attention("
            "*args, **kwargs)"]


def _torch_backend(name: str, sdp: str | None, device: str) -> Backend:
    conv = CONVENTIONS["torch"]
    lib = Library("torch", device)

    def sdpa(q: Array, k: Array, v: Array, *, case: Case, **kwargs: Any) -> Array:
        import torch

        if sdp is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, sdp)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    fn = _math_sdpa if name == "math" else sdpa

    def run(case: Case, inputs: dict[str, np.ndarray], dtype_name: str,
            grad_out: np.ndarray | None) -> Ran:
        return _run_target(lambda *a, **kw: fn(*a, case=case, **kw), case, inputs,
                           dtype_name, grad_out, conv, lib)

    source = _torch_source("MATH" if name == "math" else sdp)
    known: list[tuple[str, Callable[..., bool]]] = []
    if name == "default" and device == "cpu":
        # An explicit mask with is_causal (ANDed there) is the convention's documented
        # alternative for every torch-convention target: judging.REFUSED_ALTERNATIVES.
        known = [("NaN query rows give zeros", matches_zero_nan_rows)]
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
    """Import ``package.module:function`` (dots after the colon reach attributes).

    Examples
    --------
    >>> load_target("refattn:attention").__name__
    'attention'
    >>> load_target("refattn")
    Traceback (most recent call last):
    ...
    ValueError: TARGET must be 'torch' or 'package.module:function'; got 'refattn'
    """
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
            grad_out: np.ndarray | None) -> Ran:
        return _run_target(fn, case, inputs, dtype_name, grad_out, conv, lib)

    module_name, _, attr = spec.partition(":")
    source = [f"from {module_name} import {attr.split('.')[0]} as _target_root",
              f"target = _target_root{''.join('.' + p for p in attr.split('.')[1:])}"]
    return Backend(spec, run, conv, draws_own_dropout=convention != "flash",
                   grads=library in ("torch", "jax"), target_source=source, library=lib)
