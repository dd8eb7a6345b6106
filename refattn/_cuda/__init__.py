"""Fused CUDA kernels, run through CuPy.

Imported only after a CuPy array is seen; importing it imports neither CuPy nor any
CUDA library. Kernels are compiled on first use (see ``_modules``).

The dispatcher in ``refattn.attention`` uses these names:

- :func:`flash_attention`, the fused forward pass for inputs with any batch dims
  (:func:`flash_forward` is the same for one batch dim, contiguous);
- :func:`flash_attention_backward`, the fused backward pass (dQ, dK, dV, d bias) for
  any batch dims (:func:`flash_backward` for one);
- :func:`unsupported_option` / :func:`supported_options`, to decide whether the kernels
  can serve a call;
- :class:`UnsupportedLaunch`, raised for problems only known at launch (shared memory
  on the current device).
"""

from ._backward import flash_attention_backward, flash_backward
from ._forward import flash_attention, flash_forward
from ._launch import UnsupportedLaunch
from ._support import SUPPORTED_OPTIONS, supported_options, unsupported_option

__all__ = [
    "SUPPORTED_OPTIONS",
    "UnsupportedLaunch",
    "flash_attention",
    "flash_attention_backward",
    "flash_backward",
    "flash_forward",
    "supported_options",
    "unsupported_option",
]
