"""What users import in their own test suites.

``exact_attention`` is the arbitrary-precision ground truth (needs mpmath:
``pip install 'refattn[exact]'``, imported only when it is called).
"""

from .exact import ExactResult, exact_attention

__all__ = ["ExactResult", "exact_attention"]
