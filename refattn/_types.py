"""Type aliases and the option enums, from which the accepted-value tuples derive.

refattn is written against the Python array API, whose arrays and namespaces have no
common static type: ``Array``, ``Namespace`` and ``Device`` name what a value is for the
reader (and give mypy one place to tighten later). Each string option is a ``Literal``;
the tuple the validation checks against is derived from it, so the two cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, get_args

__all__ = [
    "ALIGNMENTS",
    "IMPLEMENTATIONS",
    "LAYOUTS",
    "MASKED_ROW_POLICIES",
    "PRECISIONS",
    "Alignment",
    "Array",
    "Device",
    "Implementation",
    "Layout",
    "MaskedRows",
    "Namespace",
    "Precision",
]

#: An array of any array-API library (NumPy, CuPy, torch, JAX, array-api-strict).
Array: TypeAlias = Any
#: An array-API namespace (``array_api_compat``'s wrapper of the array's library).
Namespace: TypeAlias = Any
#: A device object of the array's library.
Device: TypeAlias = Any

Layout = Literal["BHLD", "BLHD"]
Alignment = Literal["top_left", "bottom_right"]
MaskedRows = Literal["zero", "nan", "uniform"]
Precision = Literal["standard", "compensated"]
Implementation = Literal["direct", "blocked", "cuda"]

LAYOUTS: tuple[Layout, ...] = get_args(Layout)
ALIGNMENTS: tuple[Alignment, ...] = get_args(Alignment)
MASKED_ROW_POLICIES: tuple[MaskedRows, ...] = get_args(MaskedRows)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
#: ``implementation=`` accepts None (choose) or one of the paths.
IMPLEMENTATIONS: tuple[Implementation | None, ...] = (None, *get_args(Implementation))
