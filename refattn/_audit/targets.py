"""Targets: the backends an audit runs, the array libraries and dtypes they take.

A :class:`Backend` is a named way of running an implementation on a case: torch's SDPA
under one of its backends (:func:`torch_backends`) or a user's
``package.module:function`` (:func:`user_backend`), called in a convention on arrays of
a :class:`Library` and taken back to the host as float64. :func:`infer_library` guesses
which library a user's function takes; :meth:`Library.cannot_run` and
:meth:`Library.cannot_hold` say, before anything runs, what this machine cannot do.
"""

from __future__ import annotations

import dis
import functools
import importlib
import inspect
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._arrays import to_numpy
from .._types import Array
from .cases import Case
from .conventions import CONVENTIONS, Convention
from .judging import matches_zero_nan_rows

__all__ = ["Backend", "Library", "Ran", "infer_library", "load_target", "torch_backends",
           "user_backend"]

#: The array libraries a target can be handed, by the top-level package that defines
#: them (jaxlib and cupyx are parts of JAX and CuPy).
_LIBRARY_OF_PACKAGE = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax",
                       "cupy": "cupy", "cupyx": "cupy"}

_CPU_INSTEAD = "check on the CPU with --library numpy or torch"


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

    def cannot_hold(self, dtype_name: str) -> str | None:
        """Why arrays of this library cannot hold ``dtype_name`` here, or None if they can.

        Examples
        --------
        >>> Library("cupy").cannot_hold("bfloat16")
        'CuPy has no bfloat16 (--library torch or jax has it)'
        >>> Library("numpy").cannot_hold("float32") is None
        True
        """
        if dtype_name == "float64" and self.name == "jax":
            import jax

            # Without x64 JAX silently turns float64 arrays into float32 ones, which the
            # float64 budget would report as gross disagreements.
            if not jax.config.read("jax_enable_x64"):
                return ("JAX makes float64 arrays float32 unless x64 is enabled "
                        "(set JAX_ENABLE_X64=1)")
            return None
        if dtype_name != "bfloat16":
            return None
        if self.name == "cupy":
            return "CuPy has no bfloat16 (--library torch or jax has it)"
        if self.name == "numpy":
            try:
                import ml_dtypes  # noqa: F401
            except ImportError:
                return "NumPy has no bfloat16 without ml_dtypes (pip install ml_dtypes)"
        return None

    def cannot_run(self) -> str | None:
        """Why this library's arrays cannot be put on ``device`` here, or None if they can.

        The answer names what the machine has and what to do instead; it is asked before
        any case runs, so that a missing GPU is one message rather than a failure per case.

        Examples
        --------
        >>> Library("numpy").cannot_run() is None
        True
        >>> print(Library("numpy", "cuda").cannot_run())
        NumPy arrays live on the host; choose --library torch, jax or cupy for a device, \
or drop --device
        """
        device = self.device
        if self.name == "numpy":
            if device in (None, "cpu"):
                return None
            return ("NumPy arrays live on the host; choose --library torch, jax or cupy for "
                    "a device, or drop --device")
        if self.name == "torch":
            return _torch_cannot_run(device)
        if self.name == "jax":
            return _jax_cannot_run(device)
        return _cupy_cannot_run(device)

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

            with cupy.cuda.Device(_cuda_index(self.device)):
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


def _cuda_index(device: str | None) -> int:
    # CuPy's device: None and "cuda" are device 0; "cuda:N" and "N" are device N.
    text = "0" if device in (None, "cuda") else str(device).removeprefix("cuda:")
    if not text.isdigit():
        raise ValueError(f"expected cuda, cuda:N or N for CuPy arrays; got {device!r}")
    return int(text)


def _torch_cannot_run(device: str | None) -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed: pip install 'refattn[torch]'"
    if device is None:
        return None
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return f"torch does not know that device ({exc}); expected e.g. cpu, cuda or cuda:0"
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"torch {torch.__version__} sees no CUDA device "
                    "(torch.cuda.is_available() is False); run on a machine with a GPU, "
                    "or drop --device to check on the CPU")
        if where.index is not None and where.index >= count:
            return (f"torch sees {count} CUDA device{'s' if count > 1 else ''} "
                    f"(cuda:0 to cuda:{count - 1}); choose one of those")
        return None
    try:
        # Any other device type (mps, xpu, ...): the cheapest honest probe is a tensor.
        torch.empty(0, device=where)
    except (RuntimeError, AssertionError, ValueError) as exc:
        return (f"torch {torch.__version__} cannot put a tensor there ({exc}); "
                "drop --device to check on the CPU")
    return None


def _jax_cannot_run(device: str | None) -> str | None:
    try:
        import jax
    except ImportError:
        return "JAX is not installed: pip install jax"
    if device is None:
        return None
    platform, _, index = device.partition(":")
    try:
        found = jax.devices(platform)
    except RuntimeError as exc:
        return (f"JAX {jax.__version__} has no {platform!r} platform here "
                f"(jax.devices({platform!r}) raised: {exc}); run on a machine with one, "
                "or drop --device to check on JAX's default device")
    if not index.isdigit() and index:
        return f"expected {platform} or {platform}:N, N a device number; got {device!r}"
    if int(index or 0) >= len(found):
        return (f"JAX sees {len(found)} {platform} device{'s' if len(found) > 1 else ''} "
                f"({platform}:0 to {platform}:{len(found) - 1}); choose one of those")
    return None


def _cupy_cannot_run(device: str | None) -> str | None:
    try:
        import cupy
    except ImportError:
        return ("CuPy is not installed: pip install 'refattn[cuda12]' (or 'refattn[cuda13]', "
                f"by your driver's CUDA version); without a GPU, {_CPU_INSTEAD}")
    try:
        index = _cuda_index(device)
    except ValueError as exc:
        return f"{exc}; {_CPU_INSTEAD}"
    # CuPy imports without a GPU: only is_available() says whether one is there.
    if not cupy.cuda.is_available():
        return (f"CuPy {cupy.__version__} sees no CUDA device (cupy.cuda.is_available() is "
                f"False); run on a machine with a GPU, or {_CPU_INSTEAD}")
    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        return (f"CuPy sees {count} CUDA device{'s' if count > 1 else ''} "
                f"(cuda:0 to cuda:{count - 1}); choose one of those")
    return None


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


def infer_library(target: Callable[..., Any]) -> tuple[str, str]:
    """The array library a target most likely takes, and why: ``(library, reason)``.

    Asked in turn, the first that names exactly one of torch, JAX and CuPy decides
    (NumPy, the default, when none does):

    1. where the target is defined (``torch.nn.functional``, a subclass of a torch class
       such as ``torch.nn.Module``);
    2. what the target's code uses: the globals its code names (modules, and functions
       or classes defined in a library), the modules it imports inside its body, its
       closure, and likewise the functions of its own module that it calls;
    3. what the target's module imports.

    Decorators (``functools.wraps``), ``functools.partial`` and bound methods are seen
    through. A step that finds two of the libraries decides nothing further: NumPy, with
    the reason saying why.

    Examples
    --------
    >>> import numpy as np
    >>> infer_library(np.exp)
    ('numpy', 'the target is a numpy.ufunc')
    >>> def attend(q, k, v):          # torch is not imported to tell
    ...     import torch
    ...     return torch.softmax(q @ k.mT, dim=-1) @ v
    >>> infer_library(attend)
    ('torch', "the target's code uses torch")
    """
    fn = _unwrapped(target)
    if not inspect.isfunction(fn) and not inspect.isbuiltin(fn) and callable(fn):
        for cls in type(fn).__mro__:
            library = _library_of(cls)
            if library is not None:
                return library, f"the target is a {cls.__module__}.{cls.__qualname__}"
        fn = _unwrapped(type(fn).__call__)
    module = getattr(fn, "__module__", None)
    library = _library_of(fn)
    if library is not None:
        return library, f"the target is defined in {module}"
    steps = [("the target's code uses", _libraries_used(fn, set()))]
    namespace = getattr(sys.modules.get(module or ""), "__dict__", None)
    if namespace is None:
        namespace = getattr(fn, "__globals__", {})
    steps.append(("the target's module imports",
                  {lib for v in namespace.values() if (lib := _library_of(v)) is not None}))
    for what, found in steps:
        others = sorted(found - {"numpy"})
        if len(others) == 1:
            return others[0], f"{what} {others[0]}"
        if others:
            return "numpy", f"the default: {what} {' and '.join(others)}, not one of them"
        if found:
            return "numpy", f"{what} numpy"
    return "numpy", "the default: nothing in the target names torch, jax or cupy"


def _unwrapped(fn: Any) -> Any:
    # The function behind decorators, partials and bound methods (bounded: a __wrapped__
    # chain can loop).
    for _ in range(32):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


def _library_of(obj: Any) -> str | None:
    # The array library a module, or anything defined in one, belongs to.
    try:
        name = obj.__name__ if isinstance(obj, types.ModuleType) else obj.__module__
    except Exception:  # noqa: BLE001 - arbitrary user objects may raise in __getattr__
        return None
    if not isinstance(name, str):
        return None
    return _LIBRARY_OF_PACKAGE.get(name.partition(".")[0])


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    # A code object and those nested in it (inner functions, lambdas, comprehensions).
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _libraries_used(fn: Any, seen: set[int]) -> set[str]:
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or id(fn) in seen:
        return set()
    seen.add(id(fn))
    namespace = getattr(fn, "__globals__", {})
    values = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            pass
    found: set[str] = set()
    for c in _codes(code):
        values += [namespace[name] for name in c.co_names if name in namespace]
        for ins in dis.get_instructions(c):
            if ins.opname == "IMPORT_NAME":  # `import torch` inside the function
                package = str(ins.argval).partition(".")[0]
                if package in _LIBRARY_OF_PACKAGE:
                    found.add(_LIBRARY_OF_PACKAGE[package])
    for value in values:
        library = _library_of(value)
        if library is not None:
            found.add(library)
        elif inspect.isfunction(value) and value.__globals__ is namespace:
            # A helper of the same module: what it uses, the target uses.
            found |= _libraries_used(value, seen)
    return found


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
