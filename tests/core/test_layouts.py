"""``attention(..., layout="BLHD")``: the BHLD computation with the head and position axes
swapped on the way in and out, on every backend.

The BLHD result must be bit-identical to the BHLD result of the same data: the layout is an
axis permutation of the inputs and the output, and the BHLD inputs here are made with the
very permutation the front door applies, so both calls run the same arithmetic on the same
arrays. Independently, BLHD is checked against the flash-attn-style einsum formula and
against torch's SDPA on transposed tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import assert_close_within, cases, output_bound


def _swap(x, xp):
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


@st.composite
def layout_cases(draw):
    case = draw(cases())
    full = (*case.batch, case.H, case.L, case.S)
    opts = {}
    if draw(st.booleans()):
        shape = draw(st.sampled_from([full, (case.L, case.S), (case.H, 1, case.S)]))
        # Sparse enough that some rows are fully masked, which exercises masked_rows.
        opts["mask"] = case.random_mask(shape=shape, density=0.5, min_true_per_row=0)
    if draw(st.booleans()):
        opts["bias"] = case.rng.standard_normal(full)
    if draw(st.booleans()):
        opts["causal"] = True
        opts["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.25, 0.5]))
        opts["dropout_p"] = p
        opts["dropout_mask"] = case.rng.random(full) >= p
    opts["scale"] = draw(st.sampled_from([None, 0.3, -1.1]))
    opts["masked_rows"] = draw(st.sampled_from(["zero", "nan", "uniform"]))
    return case, opts


@given(drawn=layout_cases())
def test_blhd_equals_bhld_with_axes_swapped(backend, drawn):
    case, opts = drawn
    xp = backend.xp
    conv = {n: backend.asarray(x) if isinstance(x, np.ndarray) else x for n, x in opts.items()}
    q, k, v = (backend.asarray(np.swapaxes(x, -3, -2)) for x in (case.q, case.k, case.v))
    ret = dict(return_weights=True, return_lse=True, return_dropout_mask=True)
    blhd = refattn.attention(q, k, v, layout="BLHD", **conv, **ret)
    bhld = refattn.attention(*(_swap(x, xp) for x in (q, k, v)), **conv, **ret)
    out_b, out_h = backend.to_numpy(blhd.out), backend.to_numpy(bhld.out)
    assert out_b.shape == (*case.batch, case.L, case.H, case.v.shape[-1])
    np.testing.assert_array_equal(out_b, np.swapaxes(out_h, -3, -2))
    # Weights and LSE are in the score layout (..., H, L[, S]) whatever the input layout.
    assert blhd.weights.shape == (*case.batch, case.H, case.L, case.S)
    assert blhd.lse.shape == (*case.batch, case.H, case.L)
    np.testing.assert_array_equal(backend.to_numpy(blhd.weights), backend.to_numpy(bhld.weights))
    np.testing.assert_array_equal(backend.to_numpy(blhd.lse), backend.to_numpy(bhld.lse))
    if "dropout_mask" in opts:
        np.testing.assert_array_equal(backend.to_numpy(blhd.dropout_mask), opts["dropout_mask"])


@given(case=cases(), causal=st.booleans())
def test_blhd_matches_the_einsum_formula(backend, case, causal):
    """softmax(einsum("...lhe,...she->...hls") * scale) contracted back with "...hls,...shd"."""
    scale = case.E ** -0.5
    ql, kl, vl = (np.swapaxes(x, -3, -2) for x in (case.q, case.k, case.v))
    # Grouped-query: repeat the kv heads along BLHD's head axis (-2).
    kr = np.repeat(kl, case.H // kl.shape[-2], axis=-2)
    vr = np.repeat(vl, case.H // vl.shape[-2], axis=-2)
    s = np.einsum("...lhe,...she->...hls", ql, kr) * scale
    if causal:
        s = np.where(np.tril(np.ones((case.L, case.S), dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    expected = np.einsum("...hls,...shd->...lhd", w, vr)
    out = refattn.attention(*(backend.asarray(x) for x in (ql, kl, vl)), causal=causal,
                            layout="BLHD")
    assert_close_within(backend.to_numpy(out), expected, output_bound(case, scale=scale),
                        "BLHD vs einsum")


@given(case=cases())
def test_blhd_matches_torch_sdpa_on_transposed_tensors(case):
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ql, kl, vl = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, -3, -2)))
                  for x in (case.q, case.k, case.v))
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(
            ql.transpose(-3, -2), kl.transpose(-3, -2), vl.transpose(-3, -2),
            enable_gqa=True,
        ).transpose(-3, -2)
    out = refattn.attention(ql, kl, vl, layout="BLHD")
    assert isinstance(out, torch.Tensor)
    assert_close_within(out.numpy(), expected.numpy(), output_bound(case, scale=case.E**-0.5),
                        "BLHD vs torch")


def test_two_dimensional_inputs_have_no_head_axis_so_layouts_agree(backend):
    rng = np.random.default_rng(0)
    q, k, v = (backend.asarray(rng.standard_normal(s)) for s in ((3, 4), (5, 4), (5, 2)))
    a = refattn.attention(q, k, v, layout="BLHD", return_weights=True)
    b = refattn.attention(q, k, v, return_weights=True)
    assert tuple(a.out.shape) == (3, 2) and tuple(a.weights.shape) == (3, 5)
    np.testing.assert_array_equal(backend.to_numpy(a.out), backend.to_numpy(b.out))
    np.testing.assert_array_equal(backend.to_numpy(a.weights), backend.to_numpy(b.weights))


def test_blhd_keeps_dtype_of_low_precision_inputs(backend):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 2, 4)).astype(np.float32) for _ in range(3))
    out = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), layout="BLHD")
    exact = refattn.attention(*(x.astype(np.float64) for x in (q, k, v)), layout="BLHD")
    got = backend.to_numpy(out)
    assert got.dtype == np.float32
    # The float64 result rounded once to float32: within half a float32 ulp of it.
    half_ulp = float(np.finfo(np.float32).eps) / 2
    assert np.all(np.abs(got - exact) <= half_ulp * np.abs(exact))


def test_unknown_layout_is_an_error():
    x = np.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"layout must be one of 'BHLD', 'BLHD'; got 'BSHD'"):
        refattn.attention(x, x, x, layout="BSHD")
