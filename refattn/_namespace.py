"""The one place that turns user inputs into an array namespace and a device.

Everything else in refattn receives ``xp`` (and, where arrays are created, ``device``)
from here. array_api_compat does the recognising; this wrapper adds the checks an
oracle needs (no mixed libraries, no integer or complex data, no Python lists) and
messages that name the offending argument.

array_api_compat only looks at ``sys.modules`` to recognise torch, CuPy or JAX arrays,
so nothing here imports those libraries unless the user already has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat

__all__ = ["infer_namespace", "library_name"]


def library_name(x: Any) -> str:
    """Name of the array library that owns ``x`` (``"numpy"``, ``"torch"``, ...)."""
    module = type(x).__module__.split(".")[0]
    return {"array_api_strict": "array_api_strict", "cupy": "cupy", "jax": "jax",
            "jaxlib": "jax", "torch": "torch", "numpy": "numpy"}.get(module, module)


def _namespace_of(name: str, x: Any) -> Any:
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array of a library that supports the array API "
            f"(NumPy, CuPy, torch, JAX, array-api-strict); got {type(x).__name__}. "
            f"Wrap Python data with numpy.asarray(..., dtype=numpy.float64) first."
        ) from None


def infer_namespace(
    floating: Mapping[str, Any],
    others: Mapping[str, Any] | None = None,
    *,
    xp: Any = None,
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
        An explicit namespace. It overrides inference, but every array must still
        belong to it.

    Raises
    ------
    TypeError
        On a non-array, arrays from two libraries, or integer/complex/bool data in
        ``floating``.
    """
    named = {k: v for k, v in {**floating, **(others or {})}.items() if v is not None}
    if not named:
        raise TypeError("no arrays given")
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
        given = library_name(xp.empty((0,)))
        if given != first_lib:
            raise TypeError(
                f"xp is the {given} namespace but {first_name} is a {first_lib} array"
            )
    xp = inferred
    for name, x in floating.items():
        if x is None:
            continue
        if not xp.isdtype(x.dtype, "real floating"):
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
