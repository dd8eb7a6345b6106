"""A correct torch-SDPA kernel, its mutants, and the documented test's two checks.

The mutation study (``tests/testing/test_mutation_study.py``, table in
docs/testing.rst) asks whether the documented test of docs/testing.rst, drawing its
cases the documented way, catches plausible kernel bugs within a few examples. The
correct kernel has the structure of ``my_attention`` in ``tests/docs/test_user_example.py``
(logits and softmax in float32, float64 for float64 inputs, output rounded to the input
dtype); each mutant changes one thing in it, a bug people write.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from refattn.testing import assert_attention_close
from refattn.testing import strategies as ras

# name -> the bug, in words. Each is a branch of `attention` below.
MUTANTS: dict[str, str] = {
    "scale_1_over_E": "default scale 1/E instead of 1/sqrt(E)",
    "ignores_scale": "always 1/sqrt(E), whatever `scale` says",
    "scale_twice": "the scale applied twice (scale**2)",
    "zero_scale_means_default": "`scale or 1/sqrt(E)`: scale=0.0 taken for None",
    "sqrt_scale_split": "sqrt(scale) onto q and k with math.sqrt (negative scales fail)",
    "bias_scaled": "the scale applied after the mask is added (scales the bias too)",
    "causal_diagonal_plus_1": "causal tril(diagonal=1): each query sees one key ahead",
    "causal_diagonal_minus_1": "causal tril(diagonal=-1): a query misses its own key",
    "causal_bottom_right": "causal aligned bottom-right (flash-attn's) instead of top-left",
    "mask_polarity": "bool mask inverted: masked_fill(mask) instead of ~mask",
    "bool_mask_added": "bool mask added as 0/1 like a float mask",
    "float_mask_ignored": "float (additive) mask dropped",
    "neg_inf_clamped": "additive mask clamped to >= -1e4: -inf rows become uniform",
    "finfo_min_fill": "masked keys filled with finfo.min: masked rows give mean(V)",
    "masked_rows_nan": "no guard on the row max: fully masked rows give NaN",
    "gqa_tiled": "kv heads tiled (repeat) instead of interleaved (repeat_interleave)",
    "gqa_broadcast_only": "kv heads left to broadcasting: right for K = 1 only",
    "no_max_subtraction": "exp of the raw scores: overflows beyond exp's range",
    "float64_in_float32": "computes in float32 whatever the input dtype",
    "pv_in_bfloat16": "P @ V with P and V rounded to bfloat16",
    "untransposed_k": "q @ k instead of q @ k^T (runs where E = S)",
    "softmax_wrong_axis": "softmax normalised over the queries (dim=-2)",
    "normalise_before_mask": "softmax first, bool mask then zeroes weights (no renormalising)",
    "drops_last_key": "off-by-one loop bound: the last key is never read",
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False, *,
              bug: str | None = None) -> torch.Tensor:
    """torch SDPA's convention; correct for ``bug=None``, else with that one bug."""
    if bug is not None and bug not in MUTANTS:
        raise ValueError(f"unknown bug {bug!r}")
    wide = q.dtype == torch.float64 and bug != "float64_in_float32"
    work = torch.float64 if wide else torch.float32
    dtype = q.dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    if enable_gqa and bug != "gqa_broadcast_only":
        H = q.shape[-3]
        if bug == "gqa_tiled":
            k = k.repeat(*[1] * (k.ndim - 3), H // k.shape[-3], 1, 1)
            v = v.repeat(*[1] * (v.ndim - 3), H // v.shape[-3], 1, 1)
        else:
            k = k.repeat_interleave(H // k.shape[-3], dim=-3)
            v = v.repeat_interleave(H // v.shape[-3], dim=-3)
    if bug == "drops_last_key":
        k, v = k[..., :-1, :], v[..., :-1, :]
        if attn_mask is not None:
            attn_mask = attn_mask[..., :-1]
    E = q.shape[-1]
    if bug == "zero_scale_means_default":
        scale = scale or E ** -0.5
    elif bug == "ignores_scale" or scale is None:
        scale = 1 / E if bug == "scale_1_over_E" else E ** -0.5
    kt = k if bug == "untransposed_k" else k.transpose(-1, -2)
    if bug == "sqrt_scale_split":
        s = (q * math.sqrt(scale)) @ (kt * math.sqrt(scale))
    elif bug == "bias_scaled":
        s = q @ kt
    else:
        s = (q @ kt) * (scale * scale if bug == "scale_twice" else scale)
    fill = torch.finfo(work).min if bug == "finfo_min_fill" else float("-inf")
    L, S = s.shape[-2:]
    if is_causal:
        diagonal = {"causal_diagonal_plus_1": 1, "causal_diagonal_minus_1": -1,
                    "causal_bottom_right": S - L}.get(bug or "", 0)
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(diagonal), fill)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        if bug == "mask_polarity":
            s = s.masked_fill(attn_mask, fill)
        elif bug == "bool_mask_added":
            s = s + attn_mask.to(work)
        elif bug != "normalise_before_mask":
            s = s.masked_fill(~attn_mask, fill)
    elif attn_mask is not None and bug != "float_mask_ignored":
        bias = attn_mask.to(work)
        s = s + (bias.clamp_min(-1e4) if bug == "neg_inf_clamped" else bias)
    if bug == "bias_scaled":
        s = s * scale
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.sum(dim=-1, keepdim=True)
    if bug != "masked_rows_nan":
        # A fully masked row has max -inf: shifted by 0 its weights are 0, not NaN.
        m = m.nan_to_num(neginf=0.0)
    p = torch.exp(s) if bug == "no_max_subtraction" else torch.exp(s - m)
    axis = -2 if bug == "softmax_wrong_axis" else -1
    # The shifted row sums to at least 1 (its largest term is exp(0)) unless the row is
    # fully masked, where it is 0. Clamping at 1 rather than at finfo.tiny keeps the
    # backward finite there: d/dp of p / tiny is dO.V / tiny, which overflows, and
    # inf * exp(-inf) = NaN reaches the scores through an additive -inf mask. The two
    # mutants whose sums are not shifted rows can only guard against 0.
    unshifted = bug in ("no_max_subtraction", "softmax_wrong_axis")
    floor = torch.finfo(work).tiny if unshifted else 1.0
    p = p / p.sum(dim=axis, keepdim=True).clamp_min(floor)
    if bug == "normalise_before_mask" and attn_mask is not None:
        p = p * attn_mask.to(work)
    if bug == "pv_in_bfloat16":
        return (p.to(torch.bfloat16) @ v.to(torch.bfloat16)).to(dtype)
    return (p @ v).to(dtype)


def kernel(bug: str | None) -> Callable[..., torch.Tensor]:
    """The correct kernel (None) or one mutant, with SDPA's signature."""
    def run(q: Any, k: Any, v: Any, **kwargs: Any) -> torch.Tensor:
        return attention(q, k, v, bug=bug, **kwargs)
    return run


# The documented test's two strategy calls and bodies (tests/docs/test_user_example.py),
# with its kernel as a parameter.

def forward_cases(dtype: str) -> st.SearchStrategy[ras.AttentionCase]:
    return ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                               dropout=False, shape=ras.shapes(min_len=1))


def gradient_cases(dtype: str) -> st.SearchStrategy[ras.AttentionCase]:
    return ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                               dropout=False, shape=ras.shapes(min_len=1, max_len=8))


def check_forward(fn: Callable[..., Any], case: ras.AttentionCase) -> None:
    out = fn(case.q, case.k, case.v, **case.kwargs)
    assert_attention_close(out, case.q, case.k, case.v, **case.options())


def check_gradients(fn: Callable[..., Any], case: ras.AttentionCase) -> None:
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    out = fn(q, k, v, **case.kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    out.backward(grad_out)
    assert_attention_close(out.detach(), case.q, case.k, case.v,
                           grads=(q.grad, k.grad, v.grad), grad_out=grad_out,
                           **case.options())


CHECKS = {"forward": (forward_cases, check_forward),
          "gradients": (gradient_cases, check_gradients)}


def examples_to_catch(bug: str | None, dtype: str, check: str = "forward", *,
                      max_examples: int = 25, seed: int | None = None) -> int | None:
    """How many examples the documented check draws until ``bug``'s kernel fails it.

    The draws are hypothesis's generation phase alone (no shrinking), derandomized
    like the suite's CI profile unless a ``seed`` is given. None: it passed all
    ``max_examples``. Anything the kernel raises counts as caught, as it fails the test.
    """
    cases, body = CHECKS[check]
    fn = kernel(bug)
    seen = [0]
    caught: list[int] = []

    @settings(max_examples=max_examples, database=None, deadline=None,
              derandomize=seed is None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(dtype))
    def run(case: ras.AttentionCase) -> None:
        seen[0] += 1
        try:
            body(fn, case)
        except Exception:
            caught.append(seen[0])
            raise

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        with warnings.catch_warnings():
            # A caught mutant's failing case is printed with its arrays: a long repr.
            warnings.filterwarnings("ignore", "Generating overly large repr")
            run()
    except Exception:
        if not caught:
            raise
        return caught[0]
    return None
