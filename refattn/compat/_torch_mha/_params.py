"""The parameters of ``MultiheadAttention``: their library, dtype and initialiser.

The parameters live in one array library (NumPy unless ``like``/``xp`` say otherwise) in
one real floating dtype, and are drawn from a NumPy generator so that a seed reproduces
them whatever the library.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ..._dropout import as_generator
from ..._namespace import infer_namespace, namespace_module
from ..._types import Array, Device, Namespace

__all__ = ["Linear", "dtype_name", "generator", "resolve_dtype", "resolve_namespace"]


class Linear:
    """The ``out_proj`` holder: ``weight`` (E_out, E) and ``bias`` (E_out,) or None."""

    def __init__(self, weight: Array, bias: Array | None) -> None:
        self.weight = weight
        self.bias = bias

    def __repr__(self) -> str:
        return f"Linear(weight {tuple(self.weight.shape)}, bias={self.bias is not None})"


_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def resolve_namespace(like: Array | None, xp: Namespace | None) -> tuple[Namespace, Device]:
    if like is not None:
        return infer_namespace({"like": like}, xp=xp)
    if xp is None:
        return array_api_compat.array_namespace(np.empty(0)), None
    # A namespace (or its name) given alone: ask it for an array, then wrap it as the
    # compat layer does.
    return array_api_compat.array_namespace(namespace_module(xp).empty((0,))), None


def resolve_dtype(dtype: Any, xp: Namespace) -> Any:
    if dtype is None:
        return xp.float64
    if isinstance(dtype, str):
        if dtype in _DTYPE_NAMES and hasattr(xp, dtype):
            return getattr(xp, dtype)
    else:
        for name in _DTYPE_NAMES:
            if hasattr(xp, name) and dtype == getattr(xp, name):
                return dtype
    raise TypeError(
        f"dtype must be a real floating dtype of the parameters' library; got {dtype!r}"
    )


def dtype_name(dtype: Any, xp: Namespace) -> str:
    for name in _DTYPE_NAMES:
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return name
    raise TypeError(f"not a real floating dtype: {dtype!r}")


def generator(seed: Any) -> np.random.Generator:
    return as_generator("seed", seed)
