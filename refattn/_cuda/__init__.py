"""Fused CUDA kernels, run through CuPy.

Imported only after a CuPy array is seen; importing it imports neither CuPy nor any
CUDA library. Kernels are compiled on first use (see ``_modules``).

The front door uses :func:`forward` and :func:`backward` (an ``AttentionProblem`` in,
results out) and :func:`unsupported` (what in a problem the kernels cannot honour). Below
them, the kernel-level entry points take arrays and the score options as keywords:

- :func:`flash_attention`, the fused forward pass for inputs with any batch dims
  (:func:`flash_forward` is the same for one batch dim, contiguous);
- :func:`flash_attention_backward`, the fused backward pass (dQ, dK, dV, d bias) for
  any batch dims (:func:`flash_backward` for one);
- :func:`unsupported_option` / :func:`supported_options`, the options the kernels
  implement, by ``attention`` keyword;
- :class:`UnsupportedLaunch`, raised for problems only known at launch (shared memory
  on the current device).
"""

from ._backward import flash_attention_backward, flash_backward
from ._forward import flash_attention, flash_forward
from ._launch import UnsupportedLaunch
from ._paths import backward, forward
from ._support import SUPPORTED_OPTIONS, supported_options, unsupported, unsupported_option

__all__ = [
    "SUPPORTED_OPTIONS",
    "UnsupportedLaunch",
    "backward",
    "flash_attention",
    "flash_attention_backward",
    "flash_backward",
    "flash_forward",
    "forward",
    "supported_options",
    "unsupported",
    "unsupported_option",
]
