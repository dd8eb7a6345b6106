"""Exceptions the CPU shim raises; each names what a GPU would have done wrong."""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CompileError",
    "LaunchConfigError",
    "SanitizerError",
    "ShimError",
    "SyncError",
    "TrapError",
]


class ShimError(RuntimeError):
    """Base class of the shim's errors."""


class CompileError(ShimError):
    """g++ rejected the kernel source (the message carries its diagnostics)."""


class LaunchConfigError(ShimError, ValueError):
    """Grid, block or shared memory beyond what a CUDA device accepts."""


class ArgumentError(ShimError, TypeError):
    """Kernel arguments that do not match the kernel's C++ signature."""


class SyncError(ShimError):
    """A barrier or warp intrinsic that cannot complete on a GPU (deadlock or misuse)."""


class TrapError(ShimError):
    """The kernel called ``__trap()``."""


class SanitizerError(ShimError):
    """AddressSanitizer found an invalid memory access; the message is its report."""
