"""refattn.compat.jax against ``jax.nn.dot_product_attention`` itself.

JAX is the reference: the same NumPy data goes through JAX (float32 inputs, and float64
inputs under ``jax.enable_x64``) and through refattn's front-end on every backend. JAX
rounds the logits to float32 and computes its softmax there for both dtypes, so the
comparison is bounded by float32 rounding (``jax_bound``, derived in its docstring);
fully masked rows, whose value is a convention rather than a rounding, must agree to
that bound too, and their residuals exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn.compat.jax import FILL, dot_product_attention
from tests.helpers.cases import Case
from tests.helpers.variants import assert_within, forward_bound, lse_bound

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

U32 = float(np.finfo(np.float32).eps) / 2
U64 = float(np.finfo(np.float64).eps) / 2


@dataclass(kw_only=True)
class JaxCase(Case):
    """A case in JAX's layout, q (B, T, N, H) and k, v (B, S, K, H), with JAX's options."""

    layout: ClassVar[str] = "BLHD"

    bias: np.ndarray | None
    mask: np.ndarray | None
    is_causal: bool
    window: int | tuple[int, int] | None
    q_lens: np.ndarray | None
    kv_lens: np.ndarray | None
    scale: float | None

    def jax_options(self, convert: Any) -> dict[str, Any]:
        def c(x: np.ndarray | None) -> Any:
            return None if x is None else convert(x)
        return dict(bias=c(self.bias), mask=c(self.mask), is_causal=self.is_causal,
                    local_window_size=self.window, query_seq_lengths=c(self.q_lens),
                    key_value_seq_lengths=c(self.kv_lens), scale=self.scale)


def broadcast_shape(draw: st.DrawFn, full: tuple[int, ...]) -> tuple[int, ...]:
    # Each axis full or 1; sometimes fewer leading axes (JAX adds them).
    shape = tuple(n if draw(st.booleans()) else 1 for n in full)
    return shape[draw(st.integers(0, 2)):]


@st.composite
def cases(draw: st.DrawFn, dtype: Any) -> JaxCase:
    # Few distinct sizes: each new shape costs JAX a compilation (~0.3 s).
    B, T, S = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 4])), draw(
        st.sampled_from([1, 2, 5]))
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2]))
    H = draw(st.sampled_from([2, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = (rng.standard_normal(s).astype(dtype)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    bias = mask = None
    if draw(st.booleans()):
        bias = rng.standard_normal(broadcast_shape(draw, (B, N, T, S))).astype(dtype)
    if draw(st.booleans()):
        # A low keep-probability makes fully masked rows common.
        keep = draw(st.sampled_from([0.2, 0.6]))
        mask = rng.random(broadcast_shape(draw, (B, N, T, S))) < keep
    window = draw(st.one_of(st.none(), st.integers(0, 3),
                            st.tuples(st.integers(0, 3), st.integers(0, 3))))
    q_lens = kv_lens = None
    if draw(st.booleans()):
        q_lens = rng.integers(0, T + 2, B).astype(np.int32)
    if draw(st.booleans()):
        kv_lens = rng.integers(0, S + 2, B).astype(np.int32)
    return JaxCase(q=q, k=k, v=v, bias=bias, mask=mask, is_causal=draw(st.booleans()),
                window=window, q_lens=q_lens, kv_lens=kv_lens,
                scale=draw(st.sampled_from([None, None, 0.5, -1.2])))


# Compiled whole, once per shape and option set: eager JAX compiles every small op anew
# for each shape (~3 s an example).
_jax_attention = jax.jit(jax.nn.dot_product_attention, static_argnames=(
    "scale", "is_causal", "local_window_size", "implementation", "return_residual"))


def run_jax(case: JaxCase, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    with jax.enable_x64(dtype == np.float64):
        out, res = _jax_attention(
            jnp.asarray(case.q), jnp.asarray(case.k), jnp.asarray(case.v),
            return_residual=True, **case.jax_options(jnp.asarray))
        return np.asarray(out, dtype=np.float64), np.asarray(res, dtype=np.float64)


def jax_bound(case: JaxCase, dtype: Any) -> tuple[float, float]:
    """Bounds on |JAX - refattn| for the output and the residual.

    With A the largest |logit| (|scale| max_i sum_e |q_ie| max|k| + max|bias|), JAX
    computes a logit in the input dtype (error (H + 2) u A, u the dtype's unit
    roundoff) and rounds it to float32 (u32 A more). Its float32 softmax subtracts the
    row max (u32 |x - m| <= 2 u32 A), exponentiates (2 u32), sums S terms and divides
    ((S + 2) u32): each weight is off by a relative rho = 2 (logit error) + 2 u32 2A +
    (S + 4) u32, so sum_j |dp_j| |v_j| <= rho max|v|. The weights are cast to the dtype
    and summed against V in it (S u max|v|), and the output rounded (u max|v|).
    refattn's float64 error is of the same form with u64 and far smaller; it is added.

    The residual m + log(sum) carries the logit error (one logit's) plus 2 u32 A for the
    rounding and the subtraction, (S + 2) u32 for the sum and log, and u32 |lse| for the
    final addition and cast, plus refattn's float64 counterpart.
    """
    u = float(np.finfo(dtype).eps) / 2
    H, S = case.q.shape[-1], case.k.shape[1]
    A = abs(1 / math.sqrt(H) if case.scale is None else case.scale) * float(
        np.max(np.abs(case.q.astype(np.float64)).sum(axis=-1))) * float(np.max(np.abs(case.k)))
    if case.bias is not None:
        A += float(np.max(np.abs(case.bias)))
    vmax = float(np.max(np.abs(case.v)))
    logit = (H + 2) * u * A + U32 * A
    rho = 2 * logit + 4 * U32 * A + (S + 4) * U32
    ours = 2 * (H + 2) * U64 * A + (2 * S + 3) * U64
    out = vmax * (rho + (S + 1) * u + ours)
    lse = logit + 2 * U32 * A + (S + 2) * U32 + (H + 2) * U64 * A + (S + 3) * U64
    return out, lse


def check(case: JaxCase, got_out: Any, got_res: Any, dtype: Any) -> None:
    want_out, want_res = run_jax(case, dtype)
    got_out = np.asarray(got_out, dtype=np.float64)
    got_res = np.asarray(got_res, dtype=np.float64)
    out_tol, lse_tol = jax_bound(case, dtype)
    assert got_out.shape == want_out.shape and got_res.shape == want_res.shape
    err = np.abs(got_out - want_out)
    assert np.all(err <= out_tol), (float(err.max()), out_tol)
    filled = want_res == float(FILL)
    # A fully masked row's residual is the fill itself, bit for bit.
    assert np.array_equal(got_res == float(FILL), filled)
    res_tol = lse_tol * (1 + np.abs(want_res))
    assert np.all(np.abs(got_res - want_res)[~filled] <= res_tol[~filled])


@given(data=st.data())
def test_matches_jax(data):
    # NumPy inputs; the other backends are held to the NumPy result below. Both dtypes
    # share the examples: each costs JAX a compilation.
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    case = data.draw(cases(dtype))
    out, res = dot_product_attention(case.q, case.k, case.v, return_residual=True,
                                     **case.jax_options(np.asarray))
    assert out.dtype == dtype and res.dtype == dtype
    check(case, out, res, dtype)


@given(data=st.data())
def test_every_backend_gives_the_numpy_result(backend, data):
    case = data.draw(cases(np.float64))
    out, res = dot_product_attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), return_residual=True,
        **case.jax_options(backend.asarray))
    want_out, want_res = dot_product_attention(case.q, case.k, case.v, return_residual=True,
                                               **case.jax_options(np.asarray))
    # Two float64 evaluations of one attention (matmul orders may differ by library).
    scale = 1 / math.sqrt(case.q.shape[-1]) if case.scale is None else case.scale
    extra = 0.0 if case.bias is None else float(np.max(np.abs(case.bias)))
    bound = forward_bound(bthd(case.q), bthd(case.k), bthd(case.v), scale=scale,
                          logit_extra=extra)
    assert_within(backend.to_numpy(out), want_out, bound, "out")
    tol = lse_bound(bthd(case.q), bthd(case.k), scale=scale, logit_extra=extra,
                    lse=np.swapaxes(want_res, -1, -2))
    assert_within(backend.to_numpy(res), want_res, np.swapaxes(tol, -1, -2), "residual")


def bthd(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, 1, 2)


@pytest.mark.parametrize("x64", [False, True])
def test_jax_arrays_in_jax_arrays_out(x64):
    rng = np.random.default_rng(0)
    dtype = np.float64 if x64 else np.float32
    q, k, v = (rng.standard_normal((2, 3, 4, 8)).astype(dtype) for _ in range(3))
    mask = rng.random((2, 4, 3, 3)) < 0.3
    with jax.enable_x64(x64):
        args = [jnp.asarray(x) for x in (q, k, v)]
        out, res = dot_product_attention(*args, mask=jnp.asarray(mask), return_residual=True)
        assert isinstance(out, jax.Array) and out.dtype == dtype and res.dtype == dtype
        assert out.devices() == args[0].devices()
        # Computed in float64 on the host whatever jax_enable_x64 says: exactly what the
        # NumPy path gives (both round the float64 result once).
        want = dot_product_attention(q, k, v, mask=mask)
        assert np.array_equal(np.asarray(out), want)
        case = JaxCase(q=q, k=k, v=v, bias=None, mask=mask, is_causal=False, window=None,
                       q_lens=None, kv_lens=None, scale=None)
        check(case, np.asarray(out), np.asarray(res), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_rows_are_the_mean_of_the_values_in_both_dtypes(dtype):
    # What JAX (>= the fill cap of jax-ml/jax#37457) does, checked against JAX itself.
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 1, 4)).astype(dtype) for _ in range(3))
    mask = np.asarray([[True, False], [False, False]])[None, None]
    case = JaxCase(q=q, k=k, v=v, bias=None, mask=mask, is_causal=False, window=None,
                   q_lens=None, kv_lens=None, scale=None)
    out, res = dot_product_attention(q, k, v, mask=mask, return_residual=True)
    # Uniform weights 1/2 in float32, rounded (u32), the product summed in dtype.
    assert np.allclose(out[0, 1, 0], v[0, :, 0].mean(axis=0), rtol=0,
                       atol=4 * U32 * float(np.max(np.abs(v))))
    assert res[0, 1, 0] == FILL
    check(case, out, res, dtype)


def test_three_dimensional_inputs_and_symmetric_window():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((5, 2, 4)).astype(np.float32) for _ in range(3))
    out, res = dot_product_attention(q, k, v, local_window_size=1, return_residual=True)
    assert out.shape == (5, 2, 4) and res.shape == (5, 2)
    case = JaxCase(q=q[None], k=k[None], v=v[None], bias=None, mask=None, is_causal=False,
                   window=(1, 1), q_lens=None, kv_lens=None, scale=None)
    check(case, out[None], res[None], np.float32)


def test_implementations_share_the_xla_semantics():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 3, 2, 4)) for _ in range(3))
    want = dot_product_attention(q, k, v, is_causal=True)
    for implementation in ("xla", "cudnn"):
        got = dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        assert np.array_equal(got, want)


BAD = [
    (dict(implementation="flash"), ValueError, "implementation must be one of"),
    (dict(mask=np.ones((1, 1, 3, 3))), ValueError, "mask must be a boolean array"),
    (dict(bias=np.ones((1, 2, 3, 3))), ValueError,
     r"bias of shape \(1, 2, 3, 3\) does not broadcast to the score shape \(1, 4, 3, 3\)"),
    (dict(bias=np.ones((1, 1, 1, 3, 3))), ValueError, "bias must be at most 4-D"),
    (dict(value=np.ones((1, 3, 2, 5))), ValueError, "value must have key's shape"),
    (dict(key=np.ones((1, 3, 3, 4)), value=np.ones((1, 3, 3, 4))), ValueError,
     "multiple of key/value heads"),
    (dict(query=np.ones((2, 3, 4, 4))), ValueError, "query must have shape"),
    (dict(query=np.ones((3, 4, 4), dtype=np.float32)), ValueError, "dtype float64"),
    (dict(query_seq_lengths=np.asarray([1.0])), TypeError,
     "query_seq_lengths must have an integer dtype"),
    (dict(key_value_seq_lengths=np.asarray([1, 2], dtype=np.int32)), ValueError,
     r"key_value_seq_lengths must have shape \(B,\) = \(1,\)"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_arguments_fail_as_in_jax(kw, exc, match):
    args = dict(query=np.ones((1, 3, 4, 4)), key=np.ones((1, 3, 2, 4)),
                value=np.ones((1, 3, 2, 4)))
    args.update(kw)
    with pytest.raises(exc, match=match):
        dot_product_attention(**args)
    # JAX refuses each of these too (some with another exception type or an assertion).
    with jax.enable_x64(True), pytest.raises((ValueError, TypeError, AssertionError)):
        jax.nn.dot_product_attention(
            **{n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in args.items()})


@pytest.mark.parametrize("kw,exc,match", [
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size's left size must be >= 0"),
    (dict(local_window_size=(1.0, 2)), TypeError, "local_window_size's left size must be an int"),
    (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size must be an int or a pair"),
    (dict(is_causal=None), TypeError, "is_causal must be True or False"),
])
def test_arguments_refattn_refuses_more_strictly(kw, exc, match):
    x = np.ones((1, 3, 2, 4))
    with pytest.raises(exc, match=match):
        dot_product_attention(x, x, x, **kw)


def test_explicit_namespace_with_jax_arrays():
    x = jnp.ones((1, 2, 1, 4))
    out = dot_product_attention(x, x, x, xp=jnp)
    assert isinstance(out, jax.Array)
    with pytest.raises(TypeError, match="the inputs are JAX arrays"):
        dot_product_attention(x, x, x, xp=np)


def test_mixed_libraries_are_refused():
    torch = pytest.importorskip("torch")
    x = np.ones((1, 3, 2, 4))
    with pytest.raises(TypeError, match="arrays from two libraries"):
        dot_product_attention(x, torch.ones(1, 3, 2, 4, dtype=torch.float64), x)
