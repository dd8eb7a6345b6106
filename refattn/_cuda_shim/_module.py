"""``ShimModule``: ``cupy.RawModule``'s call API, running kernels on the CPU.

NumPy arrays stand in for device arrays. The checks a GPU would make at launch (and a
few it would not make but should) raise instead of corrupting memory or hanging.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._build import Artifact, build, compiler
from ._errors import (
    ArgumentError,
    LaunchConfigError,
    SanitizerError,
    ShimError,
    SyncError,
    TrapError,
)

__all__ = [
    "DEFAULT_DYNAMIC_SMEM",
    "MAX_DYNAMIC_SMEM",
    "SCHEDULES",
    "ShimFunction",
    "ShimModule",
    "sanitizer_available",
]

#: The order in which a round resumes a block's fibers.
SCHEDULES = ("forward", "reverse", "random")
#: The device the shim imitates: sm_90's opt-in shared memory per block (227 KiB).
MAX_DYNAMIC_SMEM = 232448
#: What CUDA grants without the kernel's max_dynamic_shared_size_bytes being raised.
DEFAULT_DYNAMIC_SMEM = 48 * 1024
_ASAN_EXITCODE = 86

_CTYPE_NAMES = {
    "v": "void",
    "b1": "bool",
    "i1": "signed char",
    "u1": "unsigned char",
    "i2": "short",
    "u2": "unsigned short",
    "i4": "int",
    "u4": "unsigned int",
    "i8": "long long",
    "u8": "unsigned long long",
    "f4": "float",
    "f8": "double",
}


def _ctype(code: str) -> str:
    if code.startswith("pc"):
        return f"const {_CTYPE_NAMES.get(code[2:], code[2:])}*"
    if code.startswith("p"):
        return f"{_CTYPE_NAMES.get(code[1:], code[1:])}*"
    return _CTYPE_NAMES.get(code, f"<{code}>")


def _dtype_code(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "b1"
    return f"{dtype.kind}{dtype.itemsize}"


def _dim3(value: Any, what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),)
    try:
        dims = tuple(int(v) for v in value)
    except TypeError:
        raise LaunchConfigError(f"{what} must be an int or a tuple of 1 to 3 ints") from None
    if not 1 <= len(dims) <= 3:
        raise LaunchConfigError(f"{what} must have 1 to 3 dimensions, got {len(dims)}")
    return (*dims, *(1,) * (3 - len(dims)))  # type: ignore[return-value]


def _check_config(grid: tuple[int, int, int], block: tuple[int, int, int]) -> None:
    bx, by, bz = block
    if min(block) < 1 or bx > 1024 or by > 1024 or bz > 64 or bx * by * bz > 1024:
        raise LaunchConfigError(
            f"block {block} is beyond the device limits: x and y at most 1024, z at most 64, "
            "x*y*z at most 1024 threads, none 0"
        )
    gx, gy, gz = grid
    if min(grid) < 1 or gx > 2**31 - 1 or gy > 65535 or gz > 65535:
        raise LaunchConfigError(
            f"grid {grid} is beyond the device limits: x at most 2**31-1, y and z at most "
            "65535, none 0"
        )


def _error_from_message(message: str) -> ShimError:
    kind, _, text = message.partition(": ")
    cls = {"sync": SyncError, "launch": LaunchConfigError, "trap": TrapError}.get(kind)
    return cls(text) if cls is not None else ShimError(message)


@functools.cache
def sanitizer_available() -> bool:
    """True when g++ can build and run an AddressSanitizer executable here."""
    cxx = compiler()
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        exe = Path(d) / "probe"
        proc = subprocess.run([cxx, "-fsanitize=address", str(src), "-o", str(exe)],
                              capture_output=True)
        return proc.returncode == 0 and subprocess.run([str(exe)]).returncode == 0


class ShimModule:
    """CPU stand-in for ``cupy.RawModule(code=..., options=..., name_expressions=...)``.

    Parameters
    ----------
    code : str
        CUDA C++ source, unchanged.
    options : tuple of str
        NVRTC options; macro definitions and include paths are passed to g++.
    name_expressions : sequence of str, optional
        Template instantiations, as CuPy takes them. ``extern "C"`` kernels are found in
        the source.
    schedule : {"forward", "reverse", "random"}
        The order in which each round resumes a block's threads.
    seed : int
        Seed of the "random" schedule.
    workers : int, optional
        OS threads that run blocks concurrently; default: the CPU count (1 with
        `sanitize`).
    sanitize : bool
        Build with AddressSanitizer and run each launch in a subprocess. Each array is
        then copied into its own heap allocation, so reads one element past its end are
        reported.

    Examples
    --------
    >>> code = '''
    ... extern "C" __global__ void scale(float* x, float a, int n) {
    ...     int i = blockIdx.x * blockDim.x + threadIdx.x;
    ...     if (i < n) x[i] *= a;
    ... }'''
    >>> x = np.arange(5, dtype=np.float32)
    >>> ShimModule(code=code).get_function("scale")((1,), (32,), (x, np.float32(2), np.int32(5)))
    >>> x
    array([0., 2., 4., 6., 8.], dtype=float32)
    """

    max_dynamic_shared_memory = MAX_DYNAMIC_SMEM

    def __init__(
        self,
        code: str,
        *,
        options: Sequence[str] = (),
        name_expressions: Sequence[str] | None = None,
        schedule: str = "forward",
        seed: int = 0,
        workers: int | None = None,
        sanitize: bool = False,
        extra_flags: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self.schedule = schedule
        self.seed = int(seed)
        self.sanitize = bool(sanitize)
        if workers is None:
            workers = 1 if sanitize else (os.cpu_count() or 1)
        self.workers = int(workers)
        self.extra_flags = tuple(extra_flags)
        self.timeout = timeout
        self._artifact: Artifact | None = None
        self._lib: ctypes.CDLL | None = None
        self._signatures: dict[str, tuple[int, tuple[str, ...]]] = {}

    def compile(self) -> None:
        """Build (or fetch from the cache) and load; the first ``get_function`` does it."""
        if self._artifact is not None:
            return
        artifact = build(self.code, self.name_expressions, self.options,
                         sanitize=self.sanitize, extra_flags=self.extra_flags)
        if self.sanitize:
            listing = subprocess.run([str(artifact.path), "--signatures"], capture_output=True,
                                     text=True, check=True,
                                     env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
            pairs = [line.split("\t") for line in listing.stdout.splitlines() if line]
        else:
            lib = ctypes.CDLL(str(artifact.path))
            lib.cushim_entry_count.restype = ctypes.c_int
            lib.cushim_entry_name.restype = ctypes.c_char_p
            lib.cushim_entry_name.argtypes = [ctypes.c_int]
            lib.cushim_entry_signature.restype = ctypes.c_char_p
            lib.cushim_entry_signature.argtypes = [ctypes.c_int]
            lib.cushim_launch.restype = ctypes.c_int
            lib.cushim_launch.argtypes = [
                ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                ctypes.c_ulonglong, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_ulonglong,
            ]
            pairs = [
                [lib.cushim_entry_name(i).decode(), lib.cushim_entry_signature(i).decode()]
                for i in range(lib.cushim_entry_count())
            ]
            self._lib = lib
        for index, (name, sig) in enumerate(pairs):
            self._signatures[name] = (index, tuple(sig.split(",")) if sig else ())
        self._artifact = artifact

    def get_function(self, name: str) -> ShimFunction:
        """The kernel `name`: a name expression, or an ``extern "C"`` kernel's name."""
        self.compile()
        if name not in self._signatures:
            raise ShimError(
                f"no kernel {name!r} in this module; it has {sorted(self._signatures)} "
                "(template kernels must be listed in name_expressions)"
            )
        index, signature = self._signatures[name]
        return ShimFunction(self, name, index, signature)


class ShimFunction:
    """A kernel of a :class:`ShimModule`; called like CuPy's ``RawKernel``."""

    def __init__(self, module: ShimModule, name: str, index: int,
                 signature: tuple[str, ...]) -> None:
        self.module = module
        self.name = name
        self.index = index
        self.signature = signature
        self._max_dynamic = DEFAULT_DYNAMIC_SMEM

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """Dynamic shared memory a launch may request (CUDA's function attribute)."""
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        value = int(value)
        if not 0 <= value <= self.module.max_dynamic_shared_memory:
            raise LaunchConfigError(
                f"max_dynamic_shared_size_bytes={value} is beyond the device limit of "
                f"{self.module.max_dynamic_shared_memory} bytes"
            )
        self._max_dynamic = value

    def _marshal(self, args: Sequence[Any]) -> list[tuple[str, Any]]:
        """Check `args` against the signature.

        Returns ``(kind, value)`` pairs: ``("array" | "const_array", ndarray)`` or
        ``("scalar", bytes)``.
        """
        if not isinstance(args, tuple | list):
            raise ArgumentError(f"args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.signature):
            raise ArgumentError(
                f"{self.name} takes {len(self.signature)} arguments "
                f"({', '.join(_ctype(c) for c in self.signature)}), got {len(args)}"
            )
        out: list[tuple[str, Any]] = []
        for i, (code, arg) in enumerate(zip(self.signature, args, strict=True)):
            where = f"argument {i} of {self.name} ({_ctype(code)})"
            if code.startswith("?"):
                raise ArgumentError(f"{where}: the shim cannot check a parameter of this type")
            if code.startswith("p"):
                pointee = code[2:] if code.startswith("pc") else code[1:]
                if not isinstance(arg, np.ndarray):
                    raise ArgumentError(f"{where}: expected an array, got {type(arg).__name__}")
                if pointee != "v" and _dtype_code(arg.dtype) != pointee:
                    raise ArgumentError(
                        f"{where}: got a {arg.dtype} array; the kernel would read its bytes "
                        f"as {_CTYPE_NAMES.get(pointee, pointee)}"
                    )
                if code.startswith("pc"):
                    out.append(("const_array", arg))
                    continue
                if not arg.flags.writeable:
                    raise ArgumentError(f"{where}: the array is read-only")
                out.append(("array", arg))
                continue
            if isinstance(arg, np.ndarray):
                raise ArgumentError(f"{where}: got an array, which CuPy passes as a pointer")
            if isinstance(arg, np.generic):
                got, desc = _dtype_code(arg.dtype), f"numpy.{arg.dtype}"
            elif isinstance(arg, bool):
                got, desc = "b1", "a Python bool"
            elif isinstance(arg, int):
                got, desc = "i8", "a Python int"
            elif isinstance(arg, float):
                got, desc = "f8", "a Python float"
            else:
                raise ArgumentError(f"{where}: cannot pass {type(arg).__name__}")
            if got != code:
                raise ArgumentError(
                    f"{where}: got {desc}, which CuPy passes as {_ctype(got)}; the kernel "
                    f"would misread its bytes (pass a NumPy scalar of the parameter's type)"
                )
            out.append(("scalar", np.asarray(arg).tobytes()))
        return out

    def __call__(self, grid: Any, block: Any, args: Sequence[Any], *, shared_mem: int = 0,
                 stream: Any = None) -> None:
        """Launch on the CPU; returns when every block has run, like a synchronised launch."""
        del stream  # one CPU "stream": launches run in call order
        grid3 = _dim3(grid, "grid")
        block3 = _dim3(block, "block")
        _check_config(grid3, block3)
        shared_mem = int(shared_mem)
        if shared_mem < 0:
            raise LaunchConfigError(f"shared_mem must be >= 0, got {shared_mem}")
        if shared_mem > self.module.max_dynamic_shared_memory:
            raise LaunchConfigError(
                f"{shared_mem} bytes of dynamic shared memory exceed the device limit of "
                f"{self.module.max_dynamic_shared_memory}"
            )
        if shared_mem > self._max_dynamic:
            raise LaunchConfigError(
                f"{self.name} asks for {shared_mem} bytes of dynamic shared memory but its "
                f"max_dynamic_shared_size_bytes is {self._max_dynamic}: raise that attribute "
                "first, as CUDA refuses such a launch"
            )
        marshalled = self._marshal(args)
        schedule = SCHEDULES.index(self.module.schedule)
        if self.module.sanitize:
            self._run_sanitized(grid3, block3, shared_mem, schedule, marshalled)
        else:
            self._run_in_process(grid3, block3, shared_mem, schedule, marshalled)

    def _run_in_process(self, grid: tuple[int, int, int], block: tuple[int, int, int],
                        shared_mem: int, schedule: int,
                        marshalled: list[tuple[str, Any]]) -> None:
        lib = self.module._lib
        assert lib is not None
        keep: list[Any] = []
        argv = (ctypes.c_void_p * max(1, len(marshalled)))()
        for i, (kind, value) in enumerate(marshalled):
            holder: Any
            if kind != "scalar":
                # Like CuPy, the kernel gets the address of the first element and no strides.
                holder = ctypes.c_void_p(value.ctypes.data)
            else:
                holder = ctypes.create_string_buffer(value, max(1, len(value)))
            keep.append(holder)
            argv[i] = ctypes.addressof(holder)
        err = ctypes.create_string_buffer(4096)
        rc = lib.cushim_launch(
            self.index, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
            schedule, self.module.seed & (2**64 - 1), self.module.workers, argv, err,
            len(err),
        )
        if rc != 0:
            raise _error_from_message(err.value.decode(errors="replace"))

    def _run_sanitized(self, grid: tuple[int, int, int], block: tuple[int, int, int],
                       shared_mem: int, schedule: int,
                       marshalled: list[tuple[str, Any]]) -> None:
        arrays = [value for kind, value in marshalled if kind != "scalar"]
        for arr in arrays:
            if not arr.flags.c_contiguous:
                raise ArgumentError(
                    f"{self.name}: the sanitizer run copies arrays, so they must be "
                    "C-contiguous"
                )
        for i, a in enumerate(arrays):
            for b in arrays[i + 1:]:
                if a.size and b.size and np.shares_memory(a, b):
                    raise ArgumentError(
                        f"{self.name}: two array arguments overlap; the sanitizer run "
                        "gives each its own allocation, so they would not alias there"
                    )
        assert self.module._artifact is not None
        with tempfile.TemporaryDirectory(prefix="cushim-") as tmp:
            launch_file = Path(tmp) / "launch.bin"
            out_file = Path(tmp) / "out.bin"
            with open(launch_file, "wb") as f:
                f.write(b"CUSHIM01")
                f.write(struct.pack("<i3I3IQiQii", self.index, *grid, *block, shared_mem,
                                    schedule, self.module.seed & (2**64 - 1),
                                    self.module.workers, len(marshalled)))
                for kind, value in marshalled:
                    data = value if kind == "scalar" else value.tobytes()
                    f.write(struct.pack("<BQ", 1 if kind == "scalar" else 0, len(data)))
                    f.write(data)
            env = dict(os.environ)
            env["ASAN_OPTIONS"] = (
                f"detect_leaks=0:exitcode={_ASAN_EXITCODE}:halt_on_error=1:"
                "detect_stack_use_after_return=1"
            )
            proc = subprocess.run(
                [str(self.module._artifact.path), str(launch_file), str(out_file)],
                capture_output=True, text=True, env=env, timeout=self.module.timeout,
            )
            if proc.returncode == _ASAN_EXITCODE or "ERROR: AddressSanitizer" in proc.stderr:
                raise SanitizerError(
                    f"AddressSanitizer stopped {self.name}:\n{proc.stderr.strip()}"
                )
            if proc.returncode == 3:
                message = proc.stderr.strip().splitlines()[-1]
                raise _error_from_message(message.removeprefix("cushim-error: "))
            if proc.returncode != 0:
                raise ShimError(
                    f"the sanitizer run of {self.name} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr.strip()}"
                )
            data = out_file.read_bytes()
        offset = 0
        for kind, arr in marshalled:
            if kind == "scalar":
                continue
            if kind == "array":
                chunk = np.frombuffer(data, dtype=arr.dtype, count=arr.size, offset=offset)
                arr[...] = chunk.reshape(arr.shape)
            offset += arr.nbytes
