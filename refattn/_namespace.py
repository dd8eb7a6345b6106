"""The one place that turns user inputs into an array namespace and a device.

Everything else in refattn receives ``xp`` (and, where arrays are created, ``device``)
from here. array_api_compat does the recognising; this wrapper adds the checks an
oracle needs (no mixed libraries, no integer or complex data, no Python lists) and
messages that name the offending argument.

array_api_compat only looks at ``sys.modules`` to recognise torch, CuPy or JAX arrays,
so nothing here imports those libraries unless the user already has (or names one as
``xp="torch"``, which imports it only where a namespace is needed without arrays).

It also refuses, by name, the inputs that look like arrays but would be computed wrongly
or not at all: None for a required array, ``numpy.matrix`` (always 2-D, ``*`` is a
matrix product), NumPy masked arrays (their mask would be dropped silently) and torch
``meta`` tensors (shapes without values).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import array_api_compat

__all__ = ["KNOWN_NAMESPACES", "check_array", "dtype_is", "infer_namespace", "library_name",
           "namespace_library", "namespace_module"]

#: The names ``xp=`` accepts in place of a namespace, and the module each one imports.
KNOWN_NAMESPACES = {"numpy": "numpy", "torch": "torch", "cupy": "cupy",
                    "array_api_strict": "array_api_strict", "jax": "jax.numpy"}

_KINDS = "NumPy, torch, CuPy or array-API"


def library_name(x: Any) -> str:
    """Name of the array library that owns ``x`` (``"numpy"``, ``"torch"``, ...)."""
    module = type(x).__module__.split(".")[0]
    return {"array_api_strict": "array_api_strict", "cupy": "cupy", "jax": "jax",
            "jaxlib": "jax", "torch": "torch", "numpy": "numpy"}.get(module, module)


def _shown_names() -> str:
    return ", ".join(repr(n) for n in KNOWN_NAMESPACES)


def namespace_library(xp: Any) -> str:
    """The library name of an ``xp=`` argument: a namespace or one of its names.

    Names are looked up without importing anything.

    Examples
    --------
    >>> import numpy as np
    >>> namespace_library(np), namespace_library("numpy")
    ('numpy', 'numpy')
    >>> namespace_library("nump")
    Traceback (most recent call last):
    ...
    ValueError: xp must be an array namespace (a module such as numpy) or one of the names \
'numpy', 'torch', 'cupy', 'array_api_strict', 'jax'; got 'nump'
    """
    if isinstance(xp, str):
        if xp not in KNOWN_NAMESPACES:
            raise ValueError(
                "xp must be an array namespace (a module such as numpy) or one of the names "
                f"{_shown_names()}; got {xp!r}"
            )
        return "jax" if xp == "jax" else xp
    empty = getattr(xp, "empty", None)
    if not callable(empty):
        raise TypeError(
            "xp must be an array namespace (a module such as numpy) or one of the names "
            f"{_shown_names()}; got {type(xp).__name__} {xp!r}"
        )
    return library_name(empty((0,)))


def namespace_module(xp: Any) -> Any:
    """The namespace module an ``xp=`` argument stands for: itself, or the module a
    name in ``KNOWN_NAMESPACES`` imports (for callers that create arrays without
    having any to infer from).

    Examples
    --------
    >>> import numpy as np
    >>> namespace_module("numpy") is np
    True
    """
    namespace_library(xp)  # the same refusals as everywhere else
    if not isinstance(xp, str):
        return xp
    try:
        return importlib.import_module(KNOWN_NAMESPACES[xp])
    except ImportError:
        raise ValueError(f"xp={xp!r} names a library that is not installed") from None


def check_array(name: str, x: Any) -> None:
    """Refuse, by ``name``, what cannot stand for an array of values.

    None (for a required array), ``numpy.matrix``, NumPy masked arrays and torch
    ``meta`` tensors; other objects are left to the array-API check.

    Examples
    --------
    >>> check_array("q", None)
    Traceback (most recent call last):
    ...
    TypeError: q must be an array (NumPy, torch, CuPy or array-API); got None
    """
    if x is None:
        raise TypeError(f"{name} must be an array ({_KINDS}); got None")
    np_mod = sys.modules.get("numpy")
    if np_mod is not None and isinstance(x, np_mod.matrix):
        # A matrix stays 2-D under indexing and reshaping and its * is a matrix product,
        # so the oracle's (..., L, E) arithmetic would silently compute something else.
        raise TypeError(
            f"{name} is a numpy.matrix (always 2-D, * is a matrix product); pass "
            f"np.asarray({name}) instead"
        )
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise TypeError(
            f"{name} is a NumPy masked array, whose mask refattn would drop silently; pass "
            f"{name}.filled(value) with the value you mean, and say which positions take "
            "part with a boolean mask= instead"
        )
    if library_name(x) == "torch" and getattr(getattr(x, "device", None), "type", "") == "meta":
        raise TypeError(
            f"{name} is a torch meta tensor (no values): refattn computes values; pass "
            "tensors on cpu or cuda"
        )


def _namespace_of(name: str, x: Any) -> Any:
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array of a library that supports the array API "
            f"(NumPy, CuPy, torch, JAX, array-api-strict); got {type(x).__name__}. "
            f"Wrap Python data with numpy.asarray(..., dtype=numpy.float64) first."
        ) from None


#: ``xp.isdtype(dtype, kind)`` answers, by (namespace, dtype, kind): a call asks about a
#: handful of dtypes, and the array libraries' isdtype costs a few microseconds each
#: time (NumPy normalises its arguments, array_api_compat wraps torch's).
_DTYPE_KINDS: dict[tuple[Any, Any, str], bool] = {}


def dtype_is(xp: Any, dtype: Any, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, remembered per (namespace, dtype, kind).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> dtype_is(xp, xp.float32, "real floating"), dtype_is(xp, xp.int8, "bool")
    (True, False)
    """
    key = (xp, dtype, kind)
    try:
        return _DTYPE_KINDS[key]
    except KeyError:
        answer = bool(xp.isdtype(dtype, kind))
        if len(_DTYPE_KINDS) < 4096:  # bounded whatever dtypes a process sees
            _DTYPE_KINDS[key] = answer
        return answer
    except TypeError:  # a dtype that cannot be hashed is asked every time
        return bool(xp.isdtype(dtype, kind))


def _plain_namespace(kind: type) -> Any:
    # array_api_compat's namespace for exact numpy.ndarray / torch.Tensor inputs: what
    # array_namespace returns for them, looked up once.
    return array_api_compat.array_namespace(
        sys.modules["numpy"].empty(0) if kind.__module__ == "numpy"
        else sys.modules["torch"].empty(0))


_PLAIN_NAMESPACES: dict[type, Any] = {}


def _common_case(floating: Mapping[str, Any], others: Mapping[str, Any] | None, xp: Any,
                 required: Iterable[str]) -> tuple[Any, Any] | None:
    """``(xp, device)`` when the call is the common, valid case; None otherwise.

    The common case: every given array is exactly a ``numpy.ndarray``, or exactly a
    ``torch.Tensor`` (not on the meta device, all on one device), the required ones are
    there, the floating ones hold real floating data and ``xp`` is None or names that
    library plainly. Such a call passes every check of the general path, which costs
    tens of microseconds (array_api_compat's inference per argument, isdtype per dtype);
    anything else, an error above all, goes through the general path and its messages.
    Subclasses (numpy.matrix, masked arrays, torch Parameters) are not the common case.
    """
    for name in required:
        if floating.get(name, None) is None and (others is None or others.get(name) is None):
            return None
    arrays = [x for x in floating.values() if x is not None]
    if others:
        arrays += [x for x in others.values() if x is not None]
    if not arrays:
        return None
    kind = type(arrays[0])
    np_mod = sys.modules.get("numpy")
    torch_mod = sys.modules.get("torch")
    if np_mod is not None and kind is np_mod.ndarray:
        device: Any = "cpu"
        library = "numpy"
    elif torch_mod is not None and kind is torch_mod.Tensor:
        device = arrays[0].device
        if device.type == "meta":
            return None
        library = "torch"
    else:
        return None
    for x in arrays:
        if type(x) is not kind:
            return None
    if library == "torch":
        for x in arrays:
            if x.device != device:
                return None
    space = _PLAIN_NAMESPACES.get(kind)
    if space is None:
        space = _PLAIN_NAMESPACES[kind] = _plain_namespace(kind)
    if xp is not None and not (
            xp is space or (isinstance(xp, str) and xp == library)
            or xp is (np_mod if library == "numpy" else torch_mod)):
        return None
    for x in floating.values():
        if x is not None and not dtype_is(space, x.dtype, "real floating"):
            return None
    return space, device


def infer_namespace(
    floating: Mapping[str, Any],
    others: Mapping[str, Any] | None = None,
    *,
    xp: Any = None,
    required: Iterable[str] = (),
) -> tuple[Any, Any]:
    """Return ``(xp, device)`` for the given named arrays.

    Parameters
    ----------
    floating
        Arrays that must hold real floating-point data (queries, keys, values, biases).
        ``None`` entries are skipped.
    others
        Arrays of any dtype that must still come from the same library (boolean masks).
        ``None`` entries are skipped.
    xp
        An explicit namespace, or its name (``KNOWN_NAMESPACES``). It overrides
        inference, but every array must still belong to it.
    required
        Names among the arrays that may not be None.

    Raises
    ------
    TypeError
        On a missing required array, a non-array, arrays from two libraries, integer/
        complex/bool data in ``floating``, or an array ``check_array`` refuses.
    ValueError
        On an ``xp`` name that is not one of ``KNOWN_NAMESPACES``.
    """
    common = _common_case(floating, others, xp, required)
    if common is not None:
        return common
    everything = {**floating, **(others or {})}
    for name in required:
        check_array(name, everything[name])
    named = {k: v for k, v in everything.items() if v is not None}
    if not named:
        raise TypeError("no arrays given")
    for name, x in named.items():
        check_array(name, x)
    spaces = {name: _namespace_of(name, x) for name, x in named.items()}
    first_name = next(iter(spaces))
    first_lib = library_name(named[first_name])
    for name, x in named.items():
        lib = library_name(x)
        if lib != first_lib:
            raise TypeError(
                f"arrays from two libraries: {first_name} is a {first_lib} array but "
                f"{name} is a {lib} array; convert them to one library first"
            )
    inferred = spaces[first_name]
    if xp is not None:
        # An explicit namespace is a promise about the inputs; we hold the caller to it
        # but keep computing with the wrapped (array-API compliant) namespace.
        given = namespace_library(xp)
        if given != first_lib:
            raise TypeError(
                f"xp is the {given} namespace but {first_name} is a {first_lib} array"
            )
    xp = inferred
    for name, x in floating.items():
        if x is None:
            continue
        if not dtype_is(xp, x.dtype, "real floating"):
            raise TypeError(
                f"{name} must have a real floating dtype (float16, bfloat16, float32 or "
                f"float64); got {x.dtype}"
            )
    device = array_api_compat.device(named[first_name])
    for name, x in named.items():
        if array_api_compat.device(x) != device:
            raise TypeError(
                f"arrays on two devices: {first_name} is on {device} but {name} is on "
                f"{array_api_compat.device(x)}"
            )
    return xp, device
