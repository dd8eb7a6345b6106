"""refattn.testing's assertions: the budget rule passes correct low-precision kernels,
fails broken ones, reports where and by how much, and writes a repro that runs."""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refattn
from refattn._tolerance import gradient_rounding_bound
from refattn.testing import assert_attention_close, assert_close, decode_flash_dropout_mask
from refattn.testing import strategies as ras
from tests.helpers import example_kernels as ek

ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.fixture(autouse=True)
def _repro_in_tmp(tmp_path, monkeypatch):
    # Failing assertions save their inputs; keep them out of the shared temp dir.
    monkeypatch.setenv("REFATTN_REPRO_DIR", str(tmp_path / "repro"))


def _np(x, dtype):
    return x.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else x.astype(dtype)


def _inputs(seed, shape=(2, 3, 12, 16), S=None, logit=1.0, dtype="float16", kv_heads=None):
    # Entries of std sqrt(logit) give logits scale * q.k of std about `logit`.
    rng = np.random.default_rng(seed)
    B, H, L, E = shape
    S = L if S is None else S
    K = kv_heads or H
    q = rng.standard_normal((B, H, L, E)) * math.sqrt(logit)
    k = rng.standard_normal((B, K, S, E)) * math.sqrt(logit)
    v = rng.standard_normal((B, K, S, E))
    return tuple(_np(x, dtype) for x in (q, k, v))


# --- correct implementations pass -----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@given(data=st.data())
def test_torch_sdpa_on_cpu_passes(dtype, data):
    # float32 runs on the math backend: torch's fused CPU path computes exp with ATen's
    # exp_u20 (20 ulp), which in float32 can cost it more than twice a plain float32
    # implementation's error (docs/testing.rst); in float16 and bfloat16 the dtype's
    # own rounding dwarfs that, and the default path runs.
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = data.draw(ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                                         dropout=False, logit_magnitudes=(1.0, 10.0)))
    kw = case.kwargs
    # torch's fused CPU path scales its causal mask's -inf with the scores: a scale of 0
    # gives 0 * -inf = NaN there, a negative one +inf and then NaN (the math path and
    # refattn mask after scaling). A deviation of torch's, not a false alarm of the rule:
    # left out of the default path.
    assume(dtype == "float32" or not (kw["is_causal"] and kw["scale"] is not None
                                      and kw["scale"] <= 0))
    with sdpa_kernel(SDPBackend.MATH) if dtype == "float32" else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(case.q, case.k, case.v, **kw)
    mask = kw["attn_mask"]
    opts = {"scale": kw["scale"], "causal": kw["is_causal"]}
    if mask is not None:
        opts["mask" if mask.dtype == torch.bool else "bias"] = mask
    assert_attention_close(out, case.q, case.k, case.v, **opts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@given(data=st.data())
def test_torch_math_backend_gradients_pass(dtype, data):
    # torch's math backend differentiates plain float32 operations (float16 and
    # bfloat16 are upcast to float32 by it), so it is a correct low-precision kernel
    # for the gradient rule too.
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = data.draw(ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                                         dropout=False, masks=False,
                                         shape=ras.shapes(min_len=1, max_len=12)))
    kw = case.kwargs
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    out.backward(dout)
    assert_attention_close(out.detach(), case.q, case.k, case.v,
                           grads=(q.grad, k.grad, v.grad), grad_out=dout,
                           scale=kw["scale"], causal=kw["is_causal"])


@given(case=ras.attention_cases(convention="refattn", dtype="float32",
                                logit_magnitudes=(1.0, 10.0, 100.0)))
def test_refattn_float32_compute_passes_forward_and_backward(case):
    out = refattn.attention(case.q, case.k, case.v, compute_dtype="float32", **case.kwargs)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    grads = refattn.attention_backward(dout, case.q, case.k, case.v, compute_dtype="float32",
                                       **case.kwargs)
    assert_attention_close(out, case.q, case.k, case.v, grads=grads, grad_out=dout,
                           **case.kwargs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@given(data=st.data())
def test_a_correct_numpy_kernel_passes(dtype, data):
    case = data.draw(ras.attention_cases(convention="torch", dtype=dtype, dropout=False,
                                         logit_magnitudes=(1.0, 10.0)))
    kw = case.kwargs
    out = ek.correct(case.q, case.k, case.v, **kw)
    mask = kw["attn_mask"]
    opts = {"scale": kw["scale"], "causal": kw["is_causal"]}
    if mask is not None:
        opts["mask" if mask.dtype == bool else "bias"] = mask
    assert_attention_close(out, case.q, case.k, case.v, **opts)


@given(case=ras.attention_cases(convention="refattn", logit_magnitudes=(1.0, 30.0)))
def test_float64_uses_the_rounding_bound(case):
    # The compensated oracle is within half an ulp of the exact result: well inside.
    out = refattn.attention(case.q, case.k, case.v, precision="compensated", **case.kwargs)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    grads = refattn.attention_backward(dout, case.q, case.k, case.v, precision="compensated",
                                       **case.kwargs)
    assert_attention_close(out, case.q, case.k, case.v, grads=grads, grad_out=dout,
                           **case.kwargs)


def test_variants_with_softcap_alibi_and_window_pass_in_float64_and_bfloat16():
    q, k, v = _inputs(3, shape=(1, 2, 10, 8), S=14, logit=20.0, dtype="float64")
    slopes = np.array([0.5, 0.25])
    opts = {"softcap": 10.0, "alibi_slopes": slopes, "window": (3, 1),
            "alignment": "bottom_right"}
    out = refattn.attention(q, k, v, **opts)
    assert_attention_close(out, q, k, v, **opts)
    qb, kb, vb = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    # A kernel computing in float32 from bfloat16 inputs and rounding its output.
    out_b = refattn.attention(*(x.astype(np.float32) for x in (qb, kb, vb)),
                              compute_dtype="float32", **opts).astype(ml_dtypes.bfloat16)
    assert_attention_close(out_b, qb, kb, vb, **opts)


# --- float64 gradient bound -------------------------------------------------------------


@given(case=ras.attention_cases(convention="refattn", logit_magnitudes=(1.0, 30.0, 300.0),
                                masks=True, dropout=True))
def test_gradient_rounding_bound_covers_standard_float64_gradients(case):
    # The compensated backward is the exact gradient to within an ulp (test_compensated),
    # so the plain float64 backward's error against it must stay within half the bound
    # (the bound covers two implementations).
    out_shape = case.shape.out
    dout = np.random.default_rng(3).standard_normal(out_shape)
    plain = refattn.attention_backward(dout, case.q, case.k, case.v, **case.kwargs)
    exact = refattn.attention_backward(dout, case.q, case.k, case.v, precision="compensated",
                                       **case.kwargs)
    kw = case.kwargs
    E = case.shape.E
    scale = kw["scale"] if kw.get("scale") is not None else 1 / math.sqrt(E)
    bias = kw.get("bias")
    bound = gradient_rounding_bound(case.q, case.k, case.v, dout, scale=scale, bias=bias,
                                    bias_shape=None if bias is None else bias.shape,
                                    dropout_p=kw.get("dropout_p", 0.0))
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), plain, exact, strict=True):
        if got is None:
            continue
        both = np.isfinite(got) & np.isfinite(want)
        err = float(np.max(np.abs(got - want)[both], initial=0.0))
        assert err <= bound[name] / 2, (name, err, bound[name])


def test_gradient_bound_covers_torch_float64_autograd():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in _inputs(4, shape=(2, 4, 9, 8), S=11, logit=50.0,
                                                     dtype="float64", kv_heads=2))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(dout)
    assert_attention_close(out.detach(), q, k, v, grads=(qq.grad, kk.grad, vv.grad),
                           grad_out=dout)


# --- broken implementations fail ------------------------------------------------------


@pytest.mark.parametrize("kernel,opts,dtype,logit", [
    (ek.wrong_scale, {}, "float16", 1.0),
    (ek.wrong_scale, {}, "float32", 1.0),
    (ek.off_by_one_causal, {"is_causal": True}, "bfloat16", 1.0),
    (ek.off_by_one_causal, {"is_causal": True}, "float64", 1.0),
    (ek.no_max_subtraction, {}, "float16", 30.0),
    (ek.ignores_mask, {"attn_mask": "bool"}, "float16", 1.0),
    (ek.ignores_mask, {"attn_mask": "float"}, "float32", 1.0),
])
def test_broken_kernels_fail(kernel, opts, dtype, logit):
    q, k, v = _inputs(5, logit=logit, dtype=dtype)
    kw = dict(opts)
    ref_opts = {"causal": kw.get("is_causal", False)}
    rng = np.random.default_rng(6)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = ref_opts["mask"] = rng.random((12, 12)) < 0.5
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = ref_opts["bias"] = (rng.standard_normal((12, 12)) * 3).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow, on purpose
        out = kernel(q, k, v, **kw)
    with pytest.raises(AssertionError, match="outside its budget"):
        assert_attention_close(out, q, k, v, **ref_opts)
    # The same call with the correct kernel passes: the failure is the bug's.
    assert_attention_close(ek.correct(q, k, v, **kw), q, k, v, **ref_opts)


def test_overflow_is_reported_as_a_non_finite_difference():
    q, k, v = _inputs(7, logit=30.0, dtype="float16")
    with np.errstate(all="ignore"):
        out = ek.no_max_subtraction(q, k, v)
    with pytest.raises(AssertionError, match=r"out: \d+ entries non-finite where the oracle"):
        assert_attention_close(out, q, k, v)


def test_a_wrong_gradient_fails_and_names_it():
    q, k, v = _inputs(8, shape=(1, 2, 6, 8), dtype="float32")
    dout = np.random.default_rng(9).standard_normal((1, 2, 6, 8)).astype(np.float32)
    g = refattn.attention_backward(dout, q, k, v, compute_dtype="float32")
    broken_dk = g.dk * np.float32(1 + 1e-3)   # a 0.1% error, ~8000 ulp of float32
    with pytest.raises(AssertionError) as info:
        assert_attention_close(refattn.attention(q, k, v, compute_dtype="float32"), q, k, v,
                               grads=(g.dq, broken_dk, g.dv), grad_out=dout)
    text = str(info.value)
    assert text.splitlines()[0].endswith("(float32): dk")
    assert re.search(r"dq: ok: .*\n.*dk: FAILS: ", text)


# --- the report -------------------------------------------------------------------------


def test_the_failure_message_and_its_repro(tmp_path):
    q, k, v = _inputs(10, dtype="bfloat16")
    mask = np.random.default_rng(11).random((12, 12)) < 0.6
    out = ek.ignores_mask(q, k, v, attn_mask=mask)
    with pytest.raises(AssertionError) as info:
        assert_attention_close(out, q, k, v, mask=mask, scale=0.25, factor=2.5)
    text = str(info.value)
    expected = refattn.attention(q.astype(np.float64), k.astype(np.float64),
                                 v.astype(np.float64), mask=mask, scale=0.25)
    err = np.abs(out.astype(np.float64) - expected)
    where = np.unravel_index(int(np.argmax(err)), err.shape)
    # The error and its index are reported as NumPy computes them here.
    assert f"max |actual - oracle| = {err.max():.3e} at index {tuple(int(i) for i in where)}" \
        in text
    assert "2.5 x baseline error" in text and "floor" in text and "bfloat16" in text
    path = re.search(r"inputs saved to (\S+\.npz)", text).group(1)
    assert path.startswith(str(tmp_path))
    snippet = text.split("original dtypes):\n", 1)[1]
    code = "\n".join(line[4:] for line in snippet.splitlines())
    assert "factor=2.5" in code and "mask=data[\"mask\"]" in code
    with pytest.raises(AssertionError, match="outside its budget"):
        exec(compile(code, "repro", "exec"), {})


def test_repro_of_a_gradient_failure_reruns(tmp_path):
    q, k, v = _inputs(12, shape=(1, 1, 4, 4), dtype="float16")
    dout = np.ones((1, 1, 4, 4), np.float16)
    g = refattn.attention_backward(dout, q, k, v, compute_dtype="float32")
    out = refattn.attention(q, k, v, compute_dtype="float32")
    with pytest.raises(AssertionError) as info:
        assert_attention_close(out, q, k, v, grads=(g.dq, g.dk, -g.dv), grad_out=dout)
    code = "\n".join(line[4:] for line in
                     str(info.value).split("original dtypes):\n", 1)[1].splitlines())
    assert "grads=(" in code and "grad_out=" in code
    with pytest.raises(AssertionError, match=r"\(float16\): dv"):
        exec(compile(code, "repro", "exec"), {})


def test_an_rng_is_drawn_once_for_oracle_baseline_and_gradients():
    q, k, v = _inputs(13, shape=(1, 2, 5, 8), dtype="float32")
    gen_seed = 17
    res = refattn.attention(q, k, v, dropout_p=0.3, rng=np.random.default_rng(gen_seed),
                            compute_dtype="float32", return_dropout_mask=True)
    dout = np.ones(res.out.shape, np.float32)
    g = refattn.attention_backward(dout, q, k, v, dropout_p=0.3, dropout_mask=res.dropout_mask,
                                   compute_dtype="float32")
    assert_attention_close(res.out, q, k, v, grads=g, grad_out=dout, dropout_p=0.3,
                           rng=np.random.default_rng(gen_seed))


# --- argument errors --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,message", [
    ({"factor": 0.0}, ValueError, "factor must be positive"),
    ({"grad_factor": "3"}, TypeError, "grad_factor must be a real number"),
    ({"factor": True}, TypeError, "factor must be a real number"),
    ({"return_lse": True}, TypeError, "does not take 'return_lse'"),
    ({"compute_dtype": "float32"}, TypeError, "does not take 'compute_dtype'"),
    ({"grad_out": np.zeros((2, 3, 12, 16), np.float16)}, ValueError, "go together"),
    ({"grads": (1, 2), "grad_out": np.zeros(1)}, ValueError, r"\(dq, dk, dv\) or"),
    ({"causal": "yes"}, TypeError, "causal must be True or False"),
])
def test_argument_errors(kwargs, error, message):
    q, k, v = _inputs(14)
    with pytest.raises(error, match=message):
        assert_attention_close(q, q, k, v, **kwargs)


def test_type_errors_of_the_arrays():
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(15, dtype="float32")
    with pytest.raises(TypeError, match="actual is a torch array but q is a numpy array"):
        assert_attention_close(torch.zeros(2), q, k, v)
    with pytest.raises(TypeError, match="actual must be float64, float32"):
        assert_attention_close(np.zeros((2, 3, 12, 16), np.int32), q, k, v)
    with pytest.raises(TypeError, match="v must be an array"):
        assert_attention_close(q, q, k, [1.0])
    dout = np.ones_like(q)
    with pytest.raises(TypeError, match=r"grads must have the dtype of actual \(float32\); "
                                        "dk is float64"):
        assert_attention_close(q, q, k, v, grads=(q, k.astype(np.float64), v), grad_out=dout)


def test_a_shape_mismatch_fails_before_values():
    q, k, v = _inputs(16, dtype="float32")
    with pytest.raises(AssertionError, match=r"out: shape \(2, 3, 12, 15\) but the oracle"):
        assert_attention_close(q[..., :15], q, k, v)


def test_dbias_without_a_bias_is_refused():
    q, k, v = _inputs(17, shape=(1, 1, 3, 4), dtype="float32")
    g = refattn.attention_backward(q, q, k, v, compute_dtype="float32")
    with pytest.raises(ValueError, match="no bias to differentiate"):
        assert_attention_close(q, q, k, v, grads=(g.dq, g.dk, g.dv, g.dq), grad_out=q)


# --- assert_close -----------------------------------------------------------------------


def test_assert_close_checks_metadata_first():
    torch = pytest.importorskip("torch")
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(AssertionError, match="library: actual is numpy, desired is torch"):
        assert_close(a, torch.zeros(2, 3))
    with pytest.raises(AssertionError, match=r"shape: actual is \(2, 3\), desired is \(3, 2\)"):
        assert_close(a, a.T)
    with pytest.raises(AssertionError, match="dtype: actual is float32, desired is bfloat16"):
        assert_close(a, a.astype(ml_dtypes.bfloat16))
    with pytest.raises(AssertionError, match="device: actual is cpu, desired is meta"):
        assert_close(torch.zeros(2), torch.zeros(2, device="meta"))


def test_assert_close_values():
    a = np.array([1024.0, 2.0, np.nan, np.inf], np.float32)
    assert_close(a, a.copy())
    # At 1024 a float32 ulp is 2**-13 and the default atol + rtol * 1024 = 1e-5 + 1.33e-3
    # is 11 ulp: 8 ulp pass, 16 fail.
    one = np.array([1, 0, 0, 0], np.float32)
    assert_close(a + np.float32(8 * 2.0**-13) * one, a)
    with pytest.raises(AssertionError, match=r"1 of 4 differ .* first at \(0,\)"):
        assert_close(a + np.float32(16 * 2.0**-13) * one, a)
    with pytest.raises(AssertionError, match="differ"):
        assert_close(a, a.copy(), equal_nan=False)
    with pytest.raises(AssertionError, match="greatest absolute difference 5.000e-01"):
        assert_close(np.array([0.5, 2.0]), np.array([1.0, 2.0]), rtol=0.0, atol=0.1)
    assert_close(np.array([0.5, 2.0]), np.array([1.0, 2.0]), rtol=0.5, atol=0.0)
    with pytest.raises(AssertionError, match=r"1 of 2 differ, first at \(1,\)"):
        assert_close(np.array([True, True]), np.array([True, False]))


def test_assert_close_argument_errors():
    a = np.zeros(2)
    with pytest.raises(ValueError, match="give both rtol and atol"):
        assert_close(a, a, rtol=1e-3)
    with pytest.raises(ValueError, match="must be non-negative"):
        assert_close(a, a, rtol=-1.0, atol=0.0)
    with pytest.raises(TypeError, match="desired must be an array"):
        assert_close(a, [0.0, 0.0])


# --- flash-attn's dropout encoding ------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), L=st.integers(1, 9), S=st.integers(1, 9),
       p=st.sampled_from([0.1, 0.5]))
def test_decoded_flash_mask_reproduces_the_dropped_output(seed, L, S, p):
    # Build S_dmask as flash-attn stores it: softmax probabilities with the sign bit set
    # where dropped, lengths rounded up to the block size (128 here), fp16.
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 3, n, 8)) for n in (L, S, S))
    weights = refattn.attention(q, k, v, return_weights=True).weights
    keep = rng.random(weights.shape) >= p
    S_dmask = np.zeros((2, 3, 128, 128), np.float16)
    S_dmask[..., :L, :S] = np.where(keep, weights, -weights)
    decoded = decode_flash_dropout_mask(S_dmask, seqlen_q=L, seqlen_k=S)
    # Where a weight rounded to zero in fp16 the sign carries the decision still (-0.0 is
    # "kept": its weight is zero either way); elsewhere the decision is recovered.
    nonzero = S_dmask[..., :L, :S] != 0
    assert decoded.shape == keep.shape and np.array_equal(decoded[nonzero], keep[nonzero])
    # flash-attn's output is sum_j keep_ij P_ij v_j / (1 - p): with the decoded mask the
    # oracle gives it, to the rounding of the fp16 weights (|P| rel. error 2**-11 each,
    # |v| summed over S keys).
    out = refattn.attention(q, k, v, dropout_p=p, dropout_mask=decoded)
    by_hand = (np.where(decoded, weights, 0.0) / (1 - p)) @ v
    bound = 2.0**-11 * np.abs(v).max() * S / (1 - p)
    assert np.abs(out - by_hand).max() <= bound


def test_decode_takes_torch_tensors_and_refuses_bad_arguments():
    torch = pytest.importorskip("torch")
    S_dmask = torch.tensor([[0.5, -0.25], [-0.0, float("nan")]], dtype=torch.bfloat16)
    keep = decode_flash_dropout_mask(S_dmask)
    assert keep.dtype == torch.bool and keep.tolist() == [[True, False], [True, False]]
    with pytest.raises(TypeError, match="S_dmask must be a floating array"):
        decode_flash_dropout_mask(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"must be \(\.\.\., L_rounded, S_rounded\)"):
        decode_flash_dropout_mask(np.ones(3))
    with pytest.raises(ValueError, match=r"seqlen_k must lie in \[0, 2\]"):
        decode_flash_dropout_mask(np.ones((2, 2)), seqlen_k=3)
    with pytest.raises(TypeError, match="seqlen_q must be an int"):
        decode_flash_dropout_mask(np.ones((2, 2)), seqlen_q=1.0)
    with pytest.raises(TypeError, match="S_dmask must be an array"):
        decode_flash_dropout_mask([[1.0]])
