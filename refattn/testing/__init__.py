"""What users import in their own test suites.

``assert_attention_close`` judges an implementation against the oracle with the error
budget of its precision; ``assert_close`` compares two arrays (library, shape, dtype,
device, then values); ``decode_flash_dropout_mask`` reads flash-attn's dropout
decisions. The hypothesis strategies live in ``refattn.testing.strategies``.

``exact_attention`` is the arbitrary-precision ground truth (needs mpmath:
``pip install 'refattn[exact]'``, imported only when it is called).
"""

from ._assert import assert_attention_close, assert_close, decode_flash_dropout_mask
from .exact import ExactResult, exact_attention

__all__ = [
    "ExactResult",
    "assert_attention_close",
    "assert_close",
    "decode_flash_dropout_mask",
    "exact_attention",
]
