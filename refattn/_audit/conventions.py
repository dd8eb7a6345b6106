"""Conventions: how a case becomes a target's arguments, and the oracle's semantics.

Each convention (torch's ``scaled_dot_product_attention``, flash-attn's
``flash_attn_func``, ``jax.nn.dot_product_attention``, FlexAttention) lists its keyword
arguments once, as :data:`Param` rows: the same rows give the call and the source of a
repro snippet. ``options`` gives :func:`refattn.attention`'s options for the oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from .._arrays import swap_head_axis
from .._types import Array, Namespace
from ..compat.torch import sdpa_translate
from .cases import Case, rounded

__all__ = ["CONVENTIONS", "Convention", "Param", "host_namespace"]

#: One keyword argument: (keyword, given for this case, value, source in a snippet or
#: None when a snippet leaves it out).
Param: TypeAlias = tuple[str, bool, Any, "str | None"]


def host_namespace() -> Namespace:
    """NumPy's array-API namespace (NumPy < 2 has no ``permute_dims`` of its own)."""
    import array_api_compat.numpy as xnp

    return xnp


@dataclass
class Convention:
    """How a case becomes an implementation's arguments, and the oracle's semantics.

    ``groups`` are the feature groups the convention can express; ``arrays`` puts q, k, v
    into its layout; ``call`` gives (args, kwargs) from arrays already in the target's
    library (``a`` maps names to them); ``options`` gives ``refattn.attention``'s options
    for the oracle (raising ValueError where the convention refuses the case);
    ``source`` writes the call as Python source for a repro snippet. ``params`` lists
    the keyword arguments behind both ``call`` and ``source``.
    """

    name: str
    groups: tuple[str, ...]
    layout: str
    params: Callable[[Case, Mapping[str, Array]], list[Param]]
    options: Callable[[Case, dict[str, np.ndarray]], dict[str, Any]]

    def arrays(self, case: Case) -> dict[str, np.ndarray]:
        names = {"q": case.q, "k": case.k, "v": case.v}
        if self.layout != "BLHD":
            return names
        xnp = host_namespace()
        return {n: np.ascontiguousarray(swap_head_axis(x, xnp)) for n, x in names.items()}

    def inputs(self, case: Case, dtype_name: str) -> dict[str, np.ndarray]:
        """Every array the implementation sees, rounded to the dtype, as float64 (bool
        kept)."""
        inputs = {n: rounded(x, dtype_name) for n, x in self.arrays(case).items()}
        if case.mask is not None:
            inputs["mask"] = _full(case, case.mask) if self.name == "flex" else case.mask
        if case.bias is not None:
            bias = rounded(case.bias, dtype_name)
            inputs["bias"] = _full(case, bias) if self.name == "flex" else bias
        if case.alibi_slopes is not None:
            inputs["alibi_slopes"] = rounded(case.alibi_slopes, "float32")
        return inputs

    def call(self, case: Case, a: Mapping[str, Array]
             ) -> tuple[tuple[Array, ...], dict[str, Any]]:
        kwargs = {kw: value for kw, given, value, _ in self.params(case, a) if given}
        return (a["q"], a["k"], a["v"]), kwargs

    def source(self, case: Case) -> str:
        parts = [f"{kw}={src}" for kw, given, _, src in self.params(case, {})
                 if given and src is not None]
        return ", ".join(["q", "k", "v", *parts])


def _full(case: Case, x: np.ndarray) -> np.ndarray:
    # Mods index their arrays with (b, h, q_idx, kv_idx) grids: give them all four axes.
    B, H, L = case.q.shape[:3]
    return np.ascontiguousarray(np.broadcast_to(x, (B, H, L, case.k.shape[-2])))


def _array(keyword: str, case: Case, a: Mapping[str, Array], name: str) -> Param:
    # An array of the case, passed (and named in a snippet) as `name`.
    return (keyword, getattr(case, name) is not None, a.get(name), name)


def _flag(keyword: str, on: bool) -> Param:
    return (keyword, on, True, "True")


def _number(keyword: str, value: float | None) -> Param:
    return (keyword, value is not None, value, repr(value))


def _window(keyword: str, case: Case, sides: tuple[int, int]) -> Param:
    return (keyword, case.window is not None, sides, repr(sides))


# --- torch: torch.nn.functional.scaled_dot_product_attention --------------------------


def _torch_params(case: Case, a: Mapping[str, Array]) -> list[Param]:
    attn_mask = "mask" if case.mask is not None else "bias"
    return [_array("attn_mask", case, a, attn_mask),
            ("dropout_p", bool(case.dropout_p), case.dropout_p, repr(case.dropout_p)),
            _flag("is_causal", case.causal), _number("scale", case.scale),
            _flag("enable_gqa", case.gqa)]


def _torch_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # torch's arguments translated where the torch front-end translates them (it raises
    # for attn_mask together with is_causal, as torch's math backend does).
    attn_mask = r.get("mask") if case.mask is not None else r.get("bias")
    _, _, mask, bias = sdpa_translate(r["q"], r["k"], r["v"], attn_mask, case.causal,
                                      case.gqa, None)
    opts: dict[str, Any] = {"mask": mask, "bias": bias, "causal": case.causal,
                            "alignment": "top_left", "scale": case.scale,
                            "masked_rows": "zero"}
    if case.dropout_p:
        opts.update(dropout_p=case.dropout_p, dropout_mask=case.dropout_mask)
    return opts


# --- flash: flash_attn.flash_attn_func ------------------------------------------------


def _flash_sides(case: Case) -> tuple[int, int]:
    left, right = case.window or (None, None)
    return (-1 if left is None else left, -1 if right is None else right)


def _flash_params(case: Case, a: Mapping[str, Array]) -> list[Param]:
    dropout = bool(case.dropout_p)
    return [_flag("causal", case.causal), _window("window_size", case, _flash_sides(case)),
            _number("softmax_scale", case.scale), _number("softcap", case.softcap),
            _array("alibi_slopes", case, a, "alibi_slopes"),
            ("dropout_p", dropout, case.dropout_p, None),
            ("return_attn_probs", dropout, True, None)]


def _flash_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    from ..compat.flash_attn import flash_window

    L, S = r["q"].shape[1], r["k"].shape[1]
    fw = flash_window(_flash_sides(case), case.causal, seqlen_q=L, seqlen_k=S,
                      has_alibi=case.alibi_slopes is not None)
    opts: dict[str, Any] = {"window": fw.window, "alignment": "bottom_right",
                            "scale": case.scale, "softcap": case.softcap,
                            "alibi_slopes": r.get("alibi_slopes"), "masked_rows": "zero",
                            "layout": "BLHD"}
    if case.dropout_p:
        opts.update(dropout_p=case.dropout_p, dropout_mask=case.dropout_mask)
    return opts


# --- jax: jax.nn.dot_product_attention ------------------------------------------------


def _jax_sides(case: Case, S: int) -> tuple[int, int]:
    left, right = case.window or (None, None)
    return (S if left is None else left, S if right is None else right)


def _jax_params(case: Case, a: Mapping[str, Array]) -> list[Param]:
    return [_array("bias", case, a, "bias"), _array("mask", case, a, "mask"),
            _flag("is_causal", case.causal), _number("scale", case.scale),
            _window("local_window_size", case, _jax_sides(case, case.k.shape[-2]))]


def _jax_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # jax.nn.dot_product_attention: masks fill with a finite negative, so a fully masked
    # row is the mean of the values ("uniform"); windows and causal are top-left.
    window = None if case.window is None else _jax_sides(case, r["k"].shape[1])
    return {"mask": r.get("mask"), "bias": r.get("bias"), "causal": case.causal,
            "window": window, "alignment": "top_left", "scale": case.scale,
            "masked_rows": "uniform", "layout": "BLHD"}


# --- flex: torch.nn.attention.flex_attention ------------------------------------------


def _flex_params(case: Case, a: Mapping[str, Array]) -> list[Param]:
    # FlexAttention expresses masks as a mask_mod (here handed as a bare callable, which
    # torch's flex_attention does not take but refattn.compat.flex does; torch users
    # wrap it with create_block_mask) and additive biases as a score_mod.
    mask: Array = a.get("mask")
    bias: Array = a.get("bias")
    block_mask: Param
    if case.mask is not None:
        block_mask = ("block_mask", True,
                      lambda b, h, q_idx, kv_idx: mask[b, h, q_idx, kv_idx],
                      "lambda b, h, q, kv: mask[b, h, q, kv]")
    else:
        block_mask = ("block_mask", case.causal, lambda b, h, q_idx, kv_idx: kv_idx <= q_idx,
                      "lambda b, h, q, kv: kv <= q")
    score_mod = ("score_mod", case.bias is not None,
                 lambda s, b, h, q_idx, kv_idx: s + bias[b, h, q_idx, kv_idx],
                 "lambda s, b, h, q, kv: s + bias[b, h, q, kv]")
    return [block_mask, score_mod, _number("scale", case.scale),
            _flag("enable_gqa", case.gqa)]


def _flex_options(case: Case, r: dict[str, np.ndarray]) -> dict[str, Any]:
    # flex_attention: top-left index arithmetic, fully masked rows give 0 (LSE -inf).
    return {"mask": r.get("mask"), "bias": r.get("bias"), "causal": case.causal,
            "alignment": "top_left", "scale": case.scale, "masked_rows": "zero"}


CONVENTIONS = {
    "torch": Convention(
        "torch", ("plain", "bool mask", "float mask", "fully masked rows", "causal",
                  "mask + causal", "GQA", "scale", "dropout", "empty sequences",
                  "NaN query rows", "huge logits"),
        "BHLD", _torch_params, _torch_options),
    "flash": Convention(
        "flash", ("plain", "causal", "window", "softcap", "ALiBi", "GQA", "scale", "dropout",
                  "huge logits"),
        "BLHD", _flash_params, _flash_options),
    "jax": Convention(
        "jax", ("plain", "bool mask", "float mask", "fully masked rows", "causal", "window",
                "GQA", "scale", "huge logits"),
        "BLHD", _jax_params, _jax_options),
    "flex": Convention(
        "flex", ("plain", "bool mask", "float mask", "fully masked rows", "causal", "GQA",
                 "scale", "huge logits"),
        "BHLD", _flex_params, _flex_options),
}
