"""Run CUDA kernels on the CPU, unchanged, to test them where there is no GPU.

The shim compiles a ``.cu`` source with g++ against ``cushim.h`` (the CUDA dialect:
thread indices, ``__shared__``, barriers, warp shuffles) and runs each CUDA thread as a
fiber, one block at a time per OS worker. :class:`ShimModule` has the call API of
``cupy.RawModule``, with NumPy arrays in place of device arrays, so code written for
CuPy runs on it unchanged when its module factory is swapped.

It reports what a GPU would silently get wrong or hang on: barriers that only part of
a block reaches, threads waiting at different barriers, warp intrinsics whose mask
names lanes that have exited or do not exist, arguments that do not match the kernel's
C++ signature, launch configurations beyond device limits. The thread schedule is
selectable (forward, reverse, seeded random) so that races show up as
schedule-dependent results, uninitialised dynamic shared memory reads back as NaN, and
``sanitize=True`` runs the launch in an AddressSanitizer build in a subprocess.

This package is a testing tool: nothing in refattn imports it at run time. It plugs
itself in as the kernels' backend: ``refattn._cuda._modules.set_module_factory`` builds
the kernels with :class:`ShimModule`, and :func:`serve_numpy_arrays` lets
``refattn.attention`` route NumPy arrays to them.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from ._build import build, cache_dir, compiler
from ._errors import (
    ArgumentError,
    CompileError,
    LaunchConfigError,
    SanitizerError,
    ShimError,
    SyncError,
    TrapError,
)
from ._module import (
    DEFAULT_DYNAMIC_SMEM,
    MAX_DYNAMIC_SMEM,
    SCHEDULES,
    ShimFunction,
    ShimModule,
    sanitizer_available,
)


@contextmanager
def serve_numpy_arrays() -> Iterator[None]:
    """While inside, ``refattn.attention`` sends NumPy inputs to the CUDA kernels.

    Pair it with a shim module factory (``_modules.set_module_factory(ShimModule)``) so
    that the kernels run here on the CPU; the dispatch glue (option support, fallbacks,
    result shapes) is then tested without a GPU.
    """
    from .._front_door import kernels_take

    with kernels_take("numpy"):
        yield


__all__ = [
    "DEFAULT_DYNAMIC_SMEM",
    "MAX_DYNAMIC_SMEM",
    "SCHEDULES",
    "ArgumentError",
    "CompileError",
    "LaunchConfigError",
    "SanitizerError",
    "ShimError",
    "ShimFunction",
    "ShimModule",
    "SyncError",
    "TrapError",
    "build",
    "cache_dir",
    "compiler",
    "sanitizer_available",
    "serve_numpy_arrays",
]
