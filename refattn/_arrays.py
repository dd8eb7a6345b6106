"""Array utilities every layer shares: the host copy and the head-axis swap.

One of each, so that the front door, the front-ends, the testing toolkit and the audit
copy and swap arrays the same way (docs/contributing.rst, "One of each utility").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._namespace import library_name
from ._types import Array, Namespace

__all__ = ["sum_to_shape", "swap_head_axis", "to_numpy"]


def swap_head_axis(x: Array, xp: Namespace) -> Array:
    """BHLD <-> BLHD: exchange axes -3 and -2 (arrays of rank < 3 have no head axis).

    Examples
    --------
    >>> import numpy as np
    >>> swap_head_axis(np.zeros((2, 3, 5, 4)), np).shape
    (2, 5, 3, 4)
    >>> swap_head_axis(np.zeros((5, 4)), np).shape
    (5, 4)
    """
    if x.ndim < 3:
        return x
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def sum_to_shape(x: Array, shape: tuple[int, ...], *, xp: Namespace) -> Array:
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to it.

    ``shape`` must broadcast to ``x.shape`` (the adjoint of broadcasting is summation):
    the gradient of a broadcast input.

    Examples
    --------
    >>> import numpy as np
    >>> sum_to_shape(np.ones((2, 3, 4)), (3, 1), xp=np)
    array([[8.],
           [8.],
           [8.]])
    """
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    if lead > 0:
        x = xp.sum(x, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return x


def to_numpy(x: Any, *, float64: bool = False) -> np.ndarray:
    """A host NumPy copy of an array of any library (NumPy, torch, CuPy, JAX,
    array-api-strict, anything with DLPack).

    A torch tensor that requires grad is detached; device arrays are copied to the host.
    ``float64=True`` widens floating arrays (bfloat16 and float16 included) to float64,
    which is exact; other dtypes (bool, integers) are kept as they are. Without it, a
    dtype NumPy lacks (torch's bfloat16) comes back as float32, exactly.

    Examples
    --------
    >>> import numpy as np
    >>> to_numpy(np.ones(3, dtype=np.float32), float64=True).dtype
    dtype('float64')
    >>> to_numpy(np.array([True, False]), float64=True).dtype
    dtype('bool')
    """
    lib = library_name(x)
    if lib == "torch":
        t = x.detach().cpu()
        if t.dtype.is_floating_point and (float64 or str(t.dtype) == "torch.bfloat16"):
            import torch

            t = t.to(torch.float64 if float64 else torch.float32)
        a = t.numpy()
    elif lib == "cupy":
        a = x.get()
    elif lib in ("jax", "jaxlib"):
        a = np.asarray(x)
    elif isinstance(x, np.ndarray):
        a = x
    else:
        try:
            a = np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError, AttributeError):
            a = np.asarray(x.__array__()) if hasattr(x, "__array__") else np.asarray(x)
    if float64 and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
        a = a.astype(np.float64)
    return a


def records_autograd(*arrays: Any) -> bool:
    """Whether torch's autograd records operations on any of ``arrays`` (a tensor that
    requires grad, with grad mode on).

    Then no intermediate may be written in place: autograd may have saved it for the
    backward, and refattn's results are differentiable through torch like any other
    torch computation. Other arrays are never recorded.
    """
    for x in arrays:
        if getattr(x, "requires_grad", False) is True:
            import torch

            return bool(torch.is_grad_enabled())
    return False


def all_finite(xp: Any, *arrays: Any) -> bool:
    """True when none of ``arrays`` (None skipped) holds a NaN or an infinity: the one
    check with which the paths decide that the non-finite rule needs work
    (docs/semantics.rst, "Non-finite values")."""
    return all(x is None or not math.prod(x.shape) or bool(xp.all(xp.isfinite(x)))
               for x in arrays)
