"""Which ``attention(...)`` options the CUDA kernels implement.

The dispatcher asks before choosing ``implementation="cuda"``: with an explicit
``implementation="cuda"`` it raises ``implementation='cuda' does not support <option>``,
with ``implementation=None`` it takes the array-API path instead.
"""

from __future__ import annotations

from typing import Any

from ._launch import MAX_HEAD_DIM

__all__ = ["SUPPORTED_OPTIONS", "supported_options", "unsupported_option"]

#: Options the forward kernel honours at any value (GQA is inferred from the shapes).
SUPPORTED_OPTIONS = frozenset({"scale", "causal", "alignment", "compute_dtype", "return_lse"})

# Options the kernel does not implement, with the value that means "not used".
_UNUSED: dict[str, Any] = {
    "mask": None,
    "bias": None,
    "window": None,
    "softcap": None,
    "alibi_slopes": None,
    "score_mod": None,
    "mask_mod": None,
    "dropout_p": 0.0,
    "dropout_mask": None,
    "rng": None,
    "masked_rows": "zero",
    "precision": "standard",
    "return_weights": False,
    "return_dropout_mask": False,
}


def supported_options() -> frozenset[str]:
    """Names of the options the CUDA forward kernel implements.

    Examples
    --------
    >>> sorted(supported_options())
    ['alignment', 'causal', 'compute_dtype', 'return_lse', 'scale']
    """
    return SUPPORTED_OPTIONS


def _is_unused(value: Any, unused: Any) -> bool:
    if unused is None:
        return value is None
    if isinstance(unused, bool):
        return isinstance(value, bool) and value == unused
    if isinstance(unused, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return isinstance(value, str) and value == unused


def unsupported_option(
    *, head_dim: int | None = None, value_head_dim: int | None = None, **options: Any
) -> str | None:
    """The first option the CUDA kernel cannot honour, described, or None.

    Pass the ``attention`` keyword arguments as given (unused ones may be left out) and
    the head dims. Unknown option names raise ``TypeError`` so that a new option cannot
    slip past the kernel unnoticed.

    Examples
    --------
    >>> unsupported_option(causal=True, alignment="bottom_right", head_dim=64,
    ...                    value_head_dim=64) is None
    True
    >>> unsupported_option(dropout_p=0.1)
    'dropout_p=0.1'
    >>> unsupported_option(head_dim=512)
    'head dim E=512 (the kernel takes at most 256)'
    """
    for name, value in options.items():
        if name in SUPPORTED_OPTIONS:
            if name == "alignment" and value not in ("top_left", "bottom_right"):
                return f"alignment={value!r}"
            if name == "compute_dtype" and value not in (None, "float32", "float64"):
                return f"compute_dtype={value!r}"
            continue
        if name not in _UNUSED:
            raise TypeError(f"unknown attention option {name!r}")
        if not _is_unused(value, _UNUSED[name]):
            shown = repr(value) if isinstance(value, (str, int, float, bool)) else "<given>"
            return name if shown == "<given>" else f"{name}={shown}"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim E={head_dim} (the kernel takes at most {MAX_HEAD_DIM})"
    if value_head_dim is not None and value_head_dim > MAX_HEAD_DIM:
        return f"value head dim Ev={value_head_dim} (the kernel takes at most {MAX_HEAD_DIM})"
    return None
