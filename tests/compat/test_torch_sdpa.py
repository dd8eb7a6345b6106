"""``refattn.scaled_dot_product_attention`` against torch 2.13's math backend, in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import assert_close_within, cases, output_bound

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def torch_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, dropout_mask=None,
               scale=None, enable_gqa=False):
    """torch's math kernel; the aten op is the one entry point taking a keep-mask.

    The op itself adds its mask, so a boolean mask is first turned into 0 / -inf of the
    query's dtype, as ``F.scaled_dot_product_attention`` does before dispatching.
    """
    def t(x):
        return None if x is None else torch.from_numpy(np.array(x))

    if attn_mask is not None and attn_mask.dtype == bool:
        attn_mask = np.where(attn_mask, 0.0, -np.inf).astype(q.dtype)
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        t(q), t(k), t(v), t(attn_mask), dropout_p, is_causal, t(dropout_mask), scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.numpy()


@st.composite
def sdpa_cases(draw):
    enable_gqa = draw(st.booleans())
    case = draw(cases(min_len=0, gqa=enable_gqa))
    kind = draw(st.sampled_from(["none", "bool", "bool-fully-masked", "float64", "float32",
                                 "causal"]))
    kwargs = {"enable_gqa": enable_gqa}
    full = (*case.batch, case.H, case.L, case.S)
    shape = draw(st.sampled_from([full, (case.L, case.S), (*case.batch, 1, 1, case.S)]))
    if kind == "bool":
        kwargs["attn_mask"] = case.random_mask(shape=shape)
    elif kind == "bool-fully-masked":
        kwargs["attn_mask"] = case.random_mask(shape=shape, density=0.3, min_true_per_row=0)
    elif kind.startswith("float"):
        kwargs["attn_mask"] = (case.rng.standard_normal(shape) * 3).astype(kind)
    elif kind == "causal":
        kwargs["is_causal"] = True
    kwargs["scale"] = draw(st.sampled_from([None, 0.0, -0.7, 1.3, 1e-3]))
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.2, 0.5, 0.95]))
        kwargs["dropout_p"] = p
        kwargs["dropout_mask"] = case.rng.random(full) >= p
    return case, kwargs


@given(drawn=sdpa_cases())
def test_agrees_with_torch_math_backend(backend, drawn):
    case, kw = drawn
    expected = torch_math(case.q, case.k, case.v, **kw)
    conv = {name: (backend.asarray(x) if isinstance(x, np.ndarray) else x)
            for name, x in kw.items()}
    actual = refattn.scaled_dot_product_attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), **conv)
    scale = kw["scale"] if kw["scale"] is not None else case.E**-0.5
    bias = kw.get("attn_mask")
    bias = None if bias is None or bias.dtype == bool else bias
    bound = output_bound(case, scale=scale, bias=bias, dropout_p=kw.get("dropout_p", 0.0))
    assert_close_within(backend.to_numpy(actual), expected, bound, "SDPA vs torch math")


@given(case=cases(), is_causal=st.booleans())
def test_agrees_with_torch_functional_under_the_math_backend(case, is_causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.from_numpy(x) for x in (case.q, case.k, case.v))
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, enable_gqa=True).numpy()
    actual = refattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                  enable_gqa=True)
    assert isinstance(actual, torch.Tensor) and actual.dtype == torch.float64
    assert_close_within(actual.numpy(), expected, output_bound(case, scale=case.E**-0.5),
                        "SDPA vs torch F.sdpa")


def test_head_axis_broadcasts_like_a_batch_axis_without_enable_gqa():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 1, 4, 5))   # one query head meets three key heads
    k = rng.standard_normal((2, 3, 6, 5))
    v = rng.standard_normal((2, 3, 6, 2))
    expected = torch_math(q, k, v)
    actual = refattn.scaled_dot_product_attention(q, k, v)
    assert actual.shape == expected.shape == (2, 3, 4, 2)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=64 * np.finfo(float).eps)


def test_dropout_p_one_gives_zeros_where_torchs_test_hook_gives_nan():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    keep = np.zeros((1, 2, 3, 3), dtype=bool)
    ours = refattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0, dropout_mask=keep)
    theirs = torch_math(q, k, v, dropout_p=1.0, dropout_mask=keep)
    assert np.all(ours == 0.0)
    # torch multiplies V by 1 / (1 - p) = inf, and 0 * inf = NaN: documented difference.
    assert np.all(np.isnan(theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_tensors_are_computed_in_float64_and_cast_back(dtype):
    rng = np.random.default_rng(5)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 4))).to(dtype) for _ in range(3))
    out = refattn.scaled_dot_product_attention(q, k, v)
    assert out.dtype == dtype
    exact = refattn.scaled_dot_product_attention(q.double(), k.double(), v.double())
    # float64 result rounded once to the output dtype: within half an ulp of the dtype.
    half_ulp = torch.finfo(dtype).eps / 2 * exact.abs().max().item()
    assert (out.double() - exact).abs().max().item() <= half_ulp
