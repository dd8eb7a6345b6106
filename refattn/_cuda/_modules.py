"""Cached kernel modules: compiled on first use, never at import.

The sources are package data under ``refattn/_cuda/kernels``. By default a module is a
``cupy.RawModule``; :func:`set_module_factory` swaps in any callable with the same
keyword signature (``code=``, ``options=``, ``name_expressions=``), which is how the
tests run this glue on the CPU shim without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

from . import _launch

__all__ = [
    "COMMON_HEADER",
    "KERNELS",
    "NVRTC_OPTIONS",
    "get_module",
    "kernel_source",
    "max_dynamic_shared_memory",
    "module_factory",
    "name_expressions",
    "set_module_factory",
]

#: Options for NVRTC (through CuPy) and the compile gate alike.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

#: Kernel file -> function returning its name expressions, in a fixed order.
KERNELS: dict[str, Callable[[], tuple[str, ...]]] = {
    "flash_fwd.cu": lambda: tuple(c.name_expression for c in _launch.all_flash_configs()),
    "flash_bwd.cu": lambda: tuple(
        c.name_expression
        for kernel in ("flash_bwd_dq", "flash_bwd_dkdv")
        for c in _launch.all_flash_configs(kernel)
    ),
}
#: What every kernel file is compiled with, put in front of its text.
COMMON_HEADER = "flash_common.cu"

ModuleFactory = Callable[..., Any]

_lock = threading.Lock()
_factory: ModuleFactory | None = None
_factory_smem: int | None = None
_modules: dict[str, Any] = {}


def _read(name: str) -> str:
    return (resources.files("refattn._cuda") / "kernels" / name).read_text(encoding="utf-8")


def kernel_source(name: str) -> str:
    """The CUDA source of kernel file `name`: the common header, then the file.

    The header is pasted in rather than ``#include``d so that what NVRTC, CuPy's binary
    cache (keyed by the source text) and the CPU shim see is one self-contained text.

    Examples
    --------
    >>> src = kernel_source("flash_fwd.cu")
    >>> "struct FlashScore" in src and "flash_fwd(" in src
    True
    """
    if name not in KERNELS:
        raise KeyError(f"no kernel file {name!r}; known: {sorted(KERNELS)}")
    return f"{_read(COMMON_HEADER)}\n{_read(name)}"


def name_expressions(name: str) -> tuple[str, ...]:
    """The template instantiations compiled from kernel file `name`.

    Examples
    --------
    >>> name_expressions("flash_fwd.cu")[0]
    'flash_fwd<float, 32, 4, 4>'
    """
    return KERNELS[name]()


def _cupy_raw_module(**kwargs: Any) -> Any:
    import cupy

    return cupy.RawModule(**kwargs)


def set_module_factory(
    factory: ModuleFactory | None, *, max_dynamic_smem: int | None = None
) -> tuple[ModuleFactory | None, int | None]:
    """Build modules with `factory` from now on (None: ``cupy.RawModule``).

    `max_dynamic_smem` is the shared memory limit to plan launches against with this
    factory; by default the factory's ``max_dynamic_shared_memory`` attribute, else the
    current CuPy device's opt-in limit. Cached modules are dropped. Returns the previous
    ``(factory, max_dynamic_smem)`` so that callers can restore it.
    """
    global _factory, _factory_smem
    with _lock:
        previous = (_factory, _factory_smem)
        _factory = factory
        _factory_smem = max_dynamic_smem
        _modules.clear()
    return previous


@contextlib.contextmanager
def module_factory(factory: ModuleFactory | None, *,
                   max_dynamic_smem: int | None = None) -> Iterator[None]:
    """Use `factory` inside a ``with`` block, then restore the previous one."""
    previous, previous_smem = set_module_factory(factory, max_dynamic_smem=max_dynamic_smem)
    try:
        yield
    finally:
        set_module_factory(previous, max_dynamic_smem=previous_smem)


def get_module(name: str = "flash_fwd.cu") -> Any:
    """The module for kernel file `name`, built by the current factory on first use.

    CuPy compiles lazily (at the first ``get_function``) and keeps its own on-disk
    cache of binaries; this cache only avoids re-reading sources and re-creating modules.
    """
    with _lock:
        module = _modules.get(name)
        if module is None:
            factory = _factory if _factory is not None else _cupy_raw_module
            module = factory(code=kernel_source(name), options=NVRTC_OPTIONS,
                             name_expressions=name_expressions(name))
            _modules[name] = module
        return module


_device_smem: dict[int, int] = {}


def _cupy_device_smem() -> int:
    import cupy

    device_id = cupy.cuda.runtime.getDevice()
    if device_id not in _device_smem:
        # Device attributes are keyed by the cudaDevAttr name without its prefix.
        attrs = cupy.cuda.Device(device_id).attributes
        _device_smem[device_id] = int(attrs["MaxSharedMemoryPerBlockOptin"])
    return _device_smem[device_id]


def max_dynamic_shared_memory() -> int:
    """Dynamic shared memory per block to plan launches against.

    Examples
    --------
    >>> class Factory:
    ...     max_dynamic_shared_memory = 99 * 1024
    >>> with module_factory(Factory()):
    ...     max_dynamic_shared_memory()
    101376
    """
    with _lock:
        factory, smem = _factory, _factory_smem
    if smem is not None:
        return smem
    if factory is None:
        return _cupy_device_smem()
    return int(getattr(factory, "max_dynamic_shared_memory", _launch.DEFAULT_DYNAMIC_SMEM))
