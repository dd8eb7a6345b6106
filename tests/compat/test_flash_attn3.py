"""flash-attn 3's conventions (``lse_convention="fa3"`` and
``refattn.compat.flash_attn_interface``), and the flash-attn 2 additions (packed
functions, 0-d window edges), against constructions written here.

flash-attn 3 (Dao-AILab/flash-attention, hopper/flash_api.cpp and hopper/mask.h) takes
``window_size`` literally: query i sees keys i + S - L - left .. i + S - L + right,
-1 = unlimited, causal closing the right edge at 0. ``keep_mask`` below builds that by
hand; ``reference`` is attention written out in NumPy with flash-attn 3's empty-row
convention (output 0, LSE -inf).
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn.compat import flash_attn_interface as fa3
from refattn.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")


def keep_mask(L: int, S: int, left: int, right: int, causal: bool = False) -> np.ndarray:
    i = np.arange(L)[:, None] + S - L
    j = np.arange(S)[None, :]
    keep = np.ones((L, S), dtype=bool)
    if left >= 0:
        keep &= j >= i - left
    if causal:
        right = 0
    if right >= 0:
        keep &= j <= i + right
    return keep


def reference(q, k, v, keep, scale=None):
    """(out (B, L, H, Ev), lse (B, H, L)) for BLHD inputs, keep (L, S) or (B, H, L, S)."""
    H, K = q.shape[2], k.shape[2]
    k = np.repeat(k, H // K, axis=2)
    v = np.repeat(v, H // K, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("blhe,bshe->bhls", q, k) * scale
    s = np.where(keep, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(z > 0, e / z, 0.0)
        lse = np.where(z[..., 0] > 0, np.log(z[..., 0]) + m[..., 0], -np.inf)
    return np.einsum("bhls,bshe->blhe", p, v), lse


def _qkv(B, L, S, H, K, E, seed=0, Ev=None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, L, H, E)), rng.standard_normal((B, S, K, E)),
            rng.standard_normal((B, S, K, Ev or E)))


# --- 1. flash-attn 3's windows ---------------------------------------------------------------


def test_issue_example_queries_before_the_window_see_no_key():
    # q (1, 4, 1, 8), one key, window (1, 1): query i sits at key position i - 3 and
    # sees keys i - 4 .. i - 2, so queries 0 and 1 see nothing (flash-attn 3); flash-attn
    # 2 clamps left = 1 >= S = 1 to unlimited and right to S, and every query sees key 0.
    q, k, v = _qkv(1, 4, 1, 1, 1, 8)
    out, lse, _ = flash_attn_func(q, k, v, window_size=(1, 1), return_attn_probs=True,
                                  lse_convention="fa3")
    np.testing.assert_array_equal(out[0, :2], 0.0)
    assert np.all(lse[0, 0, :2] == -np.inf)
    np.testing.assert_allclose(out[0, 2:], np.broadcast_to(v[0, :1], (2, 1, 8)), rtol=1e-15)
    out2 = flash_attn_func(q, k, v, window_size=(1, 1))
    np.testing.assert_allclose(out2[0], np.broadcast_to(v[0], (4, 1, 8)), rtol=1e-15)


WINDOWS = [(-1, -1), (0, 0), (1, 1), (2, -1), (-1, 2), (5, 0), (0, 7), (3, 3)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(6, 2), (2, 6), (4, 4), (1, 5)])
def test_fa3_window_is_the_literal_window(window, causal, L, S):
    q, k, v = _qkv(2, L, S, 4, 2, 8, seed=L * 7 + S)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window,
                                  return_attn_probs=True, lse_convention="fa3")
    want_out, want_lse = reference(q, k, v, keep_mask(L, S, *window, causal=causal))
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)


# --- 6. window edges as 0-d integer arrays ----------------------------------------------------


@pytest.mark.parametrize("make", [np.asarray, torch.tensor, xps.asarray,
                                  lambda w: np.int32(w)], ids=["numpy", "torch", "strict",
                                                              "scalar"])
def test_window_edges_as_0d_integer_arrays(make):
    q, k, v = _qkv(1, 5, 5, 2, 2, 4, seed=3)
    want = flash_attn_func(q, k, v, window_size=(2, 1))
    got = flash_attn_func(q, k, v, window_size=(make(2), make(1)))
    np.testing.assert_array_equal(got, want)
    # A (2,) integer array is read as the pair.
    got = flash_attn_func(q, k, v, window_size=np.asarray([2, 1]))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("edge", [np.asarray(1.0), np.asarray(True), np.asarray([1]),
                                  torch.tensor(1.5)])
def test_window_edges_that_are_not_0d_integers_are_refused(edge):
    q, k, v = _qkv(1, 2, 2, 1, 1, 4)
    with pytest.raises(TypeError, match=r"window_size\[0\] \(left\) must be an int"):
        flash_attn_func(q, k, v, window_size=(edge, 1))


# --- 5. the packed functions of flash-attn 2 --------------------------------------------------

LIBS = {"numpy": np.asarray, "torch": torch.from_numpy, "strict": xps.asarray}


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("lib", LIBS)
def test_packed_functions_equal_the_unpacked_calls(lib):
    from refattn.compat.flash_attn import (
        flash_attn_kvpacked_func,
        flash_attn_qkvpacked_func,
        flash_attn_varlen_func,
        flash_attn_varlen_kvpacked_func,
        flash_attn_varlen_qkvpacked_func,
    )
    a = LIBS[lib]
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((2, 5, 3, 4, 8))
    kw = dict(causal=True, window_size=(2, -1), softcap=3.0, return_attn_probs=True)
    got = flash_attn_qkvpacked_func(a(qkv), **kw)
    # The unpacked call on the same library: the packed form adds no arithmetic.
    want = flash_attn_func(a(qkv[:, :, 0].copy()), a(qkv[:, :, 1].copy()),
                           a(qkv[:, :, 2].copy()), **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_np(g), _np(w))
    q, kv = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal((2, 6, 2, 2, 8))
    got = flash_attn_kvpacked_func(a(q), a(kv), **kw)
    want = flash_attn_func(a(q), a(kv[:, :, 0].copy()), a(kv[:, :, 1].copy()), **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_np(g), _np(w))
    cu = np.asarray([0, 3, 7])
    packed = rng.standard_normal((7, 3, 2, 8))
    got = flash_attn_varlen_qkvpacked_func(a(packed), a(cu), 4, causal=True)
    want = flash_attn_varlen_func(*(a(packed[:, i].copy()) for i in range(3)), a(cu), a(cu),
                                  4, 4, causal=True)
    np.testing.assert_array_equal(_np(got), _np(want))
    qp, kvp = rng.standard_normal((5, 2, 8)), rng.standard_normal((9, 2, 1, 8))
    cu_q, cu_k = np.asarray([0, 2, 5]), np.asarray([0, 4, 9])
    got = flash_attn_varlen_kvpacked_func(a(qp), a(kvp), a(cu_q), a(cu_k), 3, 5,
                                          window_size=(1, 1))
    want = flash_attn_varlen_func(a(qp), a(kvp[:, 0].copy()), a(kvp[:, 1].copy()), a(cu_q),
                                  a(cu_k), 3, 5, window_size=(1, 1))
    np.testing.assert_array_equal(_np(got), _np(want))


@pytest.mark.parametrize("shape,match", [
    ((2, 5, 2, 4, 8), r"qkv must have shape \(B, L, 3, H, E\) with 3 along axis 2"),
    ((2, 5, 4, 8), r"qkv must have shape \(B, L, 3, H, E\)"),
])
def test_packed_shapes_are_checked(shape, match):
    from refattn.compat.flash_attn import flash_attn_qkvpacked_func
    with pytest.raises(ValueError, match=match):
        flash_attn_qkvpacked_func(np.zeros(shape))


# --- 7 and 4. the KV cache: in place, rotary, leftpad -----------------------------------------


def _rotate_by_hand(x, theta, interleaved):
    """x (B, T, K, D) with pair m of token (b, t) turned by theta[b, t, m]: complex product."""
    half = theta.shape[-1]
    out = x.copy()
    if interleaved:
        z = (x[..., 0:2 * half:2] + 1j * x[..., 1:2 * half:2]) * np.exp(1j * theta[:, :, None])
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = z.real, z.imag
    else:
        z = (x[..., :half] + 1j * x[..., half:2 * half]) * np.exp(1j * theta[:, :, None])
        out[..., :half], out[..., half:2 * half] = z.real, z.imag
    return out


def _kvcache_reference(q, keys, values, causal, window=(-1, -1)):
    """Per sequence: attention over its own keys (lists of (n_b, K, E)), bottom-right."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        L, n = q.shape[1], keys[b].shape[0]
        o, lse = reference(q[b:b + 1], keys[b][None], values[b][None],
                           keep_mask(L, n, *window, causal=causal))
        outs.append(o[0])
        lses.append(lse[0])
    return np.stack(outs), np.stack(lses)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lib", LIBS)
def test_kvcache_rotary_rotates_q_and_the_new_keys_then_appends_in_place(interleaved, causal,
                                                                          lib):
    a = LIBS[lib]
    rng = np.random.default_rng(11)
    B, L, Ln, H, K, E, cap, half = 2, 2, 2, 4, 2, 8, 8, 3  # rotary_dim 6 < E
    q = rng.standard_normal((B, L, H, E))
    k_new, v_new = rng.standard_normal((B, Ln, K, E)), rng.standard_normal((B, Ln, K, E))
    k_cache, v_cache = rng.standard_normal((B, cap, K, E)), rng.standard_normal((B, cap, K, E))
    lens = np.asarray([1, 4], dtype=np.int32)
    ang = rng.uniform(-np.pi, np.pi, (12, half))
    kc, vc = a(k_cache.copy()), a(v_cache.copy())
    out, lse = flash_attn_with_kvcache(
        a(q), kc, vc, a(k_new), a(v_new), rotary_cos=a(np.cos(ang)), rotary_sin=a(np.sin(ang)),
        cache_seqlens=a(lens), causal=causal, rotary_interleaved=interleaved,
        return_softmax_lse=True)
    # By hand: key t of sequence b at position lens[b] + t; queries at lens[b] + i when
    # causal, all at lens[b] otherwise.
    k_pos = lens[:, None] + np.arange(Ln)[None]
    q_pos = lens[:, None] + (np.arange(L)[None] if causal else np.zeros((1, L), int))
    k_rot = _rotate_by_hand(k_new, ang[k_pos], interleaved)
    q_rot = _rotate_by_hand(q, ang[q_pos], interleaved)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for b in range(B):
        want_k[b, lens[b]:lens[b] + Ln] = k_rot[b]
        want_v[b, lens[b]:lens[b] + Ln] = v_new[b]
    np.testing.assert_allclose(_np(kc), want_k, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(_np(vc), want_v)
    n = lens + Ln
    want_out, want_lse = _kvcache_reference(q_rot, [want_k[b, :n[b]] for b in range(B)],
                                            [want_v[b, :n[b]] for b in range(B)], causal)
    np.testing.assert_allclose(_np(out), want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(_np(lse), want_lse, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("lib", LIBS)
def test_kvcache_leftpad_reads_from_the_pad_and_appends_at_cache_seqlens(lib):
    a = LIBS[lib]
    rng = np.random.default_rng(12)
    B, L, Ln, H, E, cap = 3, 2, 1, 2, 4, 7
    q = rng.standard_normal((B, L, H, E))
    k_new, v_new = rng.standard_normal((B, Ln, H, E)), rng.standard_normal((B, Ln, H, E))
    k_cache, v_cache = rng.standard_normal((B, cap, H, E)), rng.standard_normal((B, cap, H, E))
    lens, pad = np.asarray([3, 6, 2]), np.asarray([1, 4, 2])
    kc, vc = a(k_cache.copy()), a(v_cache.copy())
    out = flash_attn_with_kvcache(a(q), kc, vc, a(k_new), a(v_new), cache_seqlens=a(lens),
                                  cache_leftpad=a(pad), causal=True, window_size=(1, -1))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for b in range(B):
        want_k[b, lens[b]:lens[b] + Ln] = k_new[b]
        want_v[b, lens[b]:lens[b] + Ln] = v_new[b]
    np.testing.assert_array_equal(_np(kc), want_k)
    np.testing.assert_array_equal(_np(vc), want_v)
    keys = [want_k[b, pad[b]:lens[b] + Ln] for b in range(B)]
    values = [want_v[b, pad[b]:lens[b] + Ln] for b in range(B)]
    want_out, _ = _kvcache_reference(q, keys, values, True, (1, -1))
    np.testing.assert_allclose(_np(out), want_out, rtol=1e-12, atol=1e-13)


def test_kvcache_without_new_keys_writes_nothing_and_returns_out():
    rng = np.random.default_rng(13)
    q, k_cache, v_cache = (rng.standard_normal((1, 2, 1, 4)) for _ in range(3))
    k_cache.flags.writeable = v_cache.flags.writeable = False  # nothing is written
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=2)
    np.testing.assert_array_equal(out, flash_attn_func(q, k_cache, v_cache))


def test_kvcache_on_immutable_arrays_is_refused_by_name():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        caches = [jax.numpy.zeros((1, 4, 1, 4)) for _ in range(2)]
        step = jax.numpy.ones((1, 1, 1, 4))
        with pytest.raises(TypeError, match=r"^k_cache cannot be written in place.*"
                                            r"refattn\.attention_with_kvcache"):
            flash_attn_with_kvcache(step, *caches, step, step, cache_seqlens=1)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(rotary_cos=np.ones((8, 2))), ValueError, "rotary_cos and rotary_sin go together"),
    (dict(rotary_cos=np.ones((8, 2)), rotary_sin=np.ones((8, 2)), new=False), ValueError,
     "rotary_cos/rotary_sin rotate the new keys"),
    (dict(rotary_cos=np.ones((2, 2)), rotary_sin=np.ones((2, 2))), ValueError,
     r"rotary positions reach 2, beyond rotary_cos's 2 rows"),
    (dict(rotary_cos=np.ones((8, 3)), rotary_sin=np.ones((8, 3))), ValueError,
     "rotary_dim = 2 \\* rotary_cos.shape\\[1\\] = 6 exceeds the head dimension 4"),
    (dict(cache_leftpad=np.asarray([0, 3])), ValueError, "cache_leftpad must lie in 0 .. "),
    (dict(cache_leftpad=np.asarray([0, 0]), block_table=np.zeros((2, 1), np.int32)),
     ValueError, "cache_leftpad cannot be combined with block_table"),
])
def test_kvcache_rotary_and_leftpad_errors(kw, exc, match):
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 1, 2, 4))
    args = dict(cache_seqlens=np.asarray([1, 2], dtype=np.int32))
    if kw.pop("new", True):
        args.update(k=q, v=q)
    args.update(kw)
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(q, rng.standard_normal((2, 3, 2, 4)),
                                rng.standard_normal((2, 3, 2, 4)), **args)


# --- 2. flash-attn 3's interface --------------------------------------------------------------


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("window,causal", [((-1, -1), False), ((1, 1), False), ((2, 0), True),
                                           ((-1, 3), False)])
def test_fa3_func_is_the_literal_window_and_returns_out_and_lse(lib, window, causal):
    a = LIBS[lib]
    q, k, v = _qkv(2, 6, 3, 4, 2, 8, seed=21, Ev=6)
    res = fa3.flash_attn_func(a(q), a(k), a(v), causal=causal, window_size=window,
                              softcap=2.0, return_attn_probs=True)
    assert len(res) == 2
    # softcap by hand on the scaled scores, then the literal window.
    H, K = 4, 2
    kk, vv = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    s = 2.0 * np.tanh(np.einsum("blhe,bshe->bhls", q, kk) * 8 ** -0.5 / 2.0)
    s = np.where(keep_mask(6, 3, *window, causal=causal), s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(np.isfinite(s.max(-1, keepdims=True)), s.max(-1, keepdims=True), 0)
        z = np.exp(s - m).sum(-1, keepdims=True)
        p = np.where(z > 0, np.exp(s - m) / z, 0.0)
        want_lse = np.where(z[..., 0] > 0, np.log(z[..., 0]) + m[..., 0], -np.inf)
    want_out = np.einsum("bhls,bshe->blhe", p, vv)
    np.testing.assert_allclose(_np(res[0]), want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(_np(res[1]), want_lse, rtol=1e-12, atol=1e-13)
    # The flash-attn 2 front-end with lse_convention="fa3" is the same computation.
    two = flash_attn_func(a(q), a(k), a(v), causal=causal, window_size=window, softcap=2.0,
                          return_attn_probs=True, lse_convention="fa3")
    np.testing.assert_array_equal(_np(res[0]), _np(two[0]))
    np.testing.assert_array_equal(_np(res[1]), _np(two[1]))


def test_fa3_performance_arguments_and_neutral_descales_change_nothing():
    q, k, v = _qkv(1, 4, 5, 2, 1, 8, seed=22)
    want = fa3.flash_attn_func(q, k, v, causal=True)
    got = fa3.flash_attn_func(q, k, v, causal=True, num_splits=4, pack_gqa=True, sm_margin=8,
                              deterministic=True, q_descale=np.ones((1, 1)),
                              k_descale=np.ones((1, 1)), v_descale=None)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(attention_chunk=-1), ValueError, "attention_chunk must be >= 0"),
    (dict(attention_chunk=2.0), TypeError, "attention_chunk must be an int"),
    (dict(q_descale=np.full((1, 1), 0.5)), ValueError, "q_descale must be None or all ones"),
    (dict(num_splits=1.0), TypeError, "num_splits must be an int"),
    (dict(pack_gqa=1), TypeError, "pack_gqa must be None, True or False"),
])
def test_fa3_refusals(kw, exc, match):
    q, k, v = _qkv(1, 4, 5, 2, 1, 8)
    with pytest.raises(exc, match=match):
        fa3.flash_attn_func(q, k, v, **kw)


def test_fa3_qkvpacked_both_forms_equal_the_unpacked_call():
    rng = np.random.default_rng(23)
    qkv = rng.standard_normal((2, 5, 3, 2, 8))
    want = fa3.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True,
                               return_attn_probs=True)
    got = fa3.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    heads = rng.standard_normal((2, 5, 4 + 2 * 2, 8))  # H = 4, K = 2
    got = fa3.flash_attn_qkvpacked_func(heads, num_heads_q=4, window_size=(1, 0))
    want = fa3.flash_attn_func(heads[:, :, :4], heads[:, :, 4:6], heads[:, :, 6:],
                               window_size=(1, 0))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="num_heads_q=3 does not split"):
        fa3.flash_attn_qkvpacked_func(heads, num_heads_q=3)


@pytest.mark.parametrize("lib", LIBS)
def test_fa3_varlen_with_seqused_is_the_loop_over_used_tokens(lib):
    a = LIBS[lib]
    rng = np.random.default_rng(24)
    cu_q, cu_k = np.asarray([0, 3, 7, 9]), np.asarray([0, 4, 6, 11])
    used_q, used_k = np.asarray([2, 4, 0]), np.asarray([4, 1, 3])
    q, k, v = (rng.standard_normal((n, 2, 8)) for n in (9, 11, 11))
    out, lse = fa3.flash_attn_varlen_func(
        a(q), a(k), a(v), a(cu_q), a(cu_k), 4, 5, seqused_q=a(used_q), seqused_k=a(used_k),
        window_size=(1, 0), return_attn_probs=True)
    out, lse = _np(out), _np(lse)
    for b in range(3):
        q0, k0 = cu_q[b], cu_k[b]
        nq, nk = used_q[b], used_k[b]
        if nq:
            want_out, want_lse = reference(q[None, q0:q0 + nq], k[None, k0:k0 + nk],
                                           v[None, k0:k0 + nk], keep_mask(nq, nk, 1, 0))
            np.testing.assert_allclose(out[q0:q0 + nq], want_out[0], rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(lse[:, q0:q0 + nq], want_lse[0], rtol=1e-12,
                                       atol=1e-13)
        # The rows past seqused_q: flash-attn 3 leaves them unwritten; refattn 0 / -inf.
        np.testing.assert_array_equal(out[q0 + nq:cu_q[b + 1]], 0.0)
        assert np.all(lse[:, q0 + nq:cu_q[b + 1]] == -np.inf)


def test_fa3_kvcache_literal_window_in_place_and_four_results():
    rng = np.random.default_rng(25)
    q = rng.standard_normal((1, 4, 1, 8))
    k_cache, v_cache = rng.standard_normal((1, 3, 1, 8)), rng.standard_normal((1, 3, 1, 8))
    k_new, v_new = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    want_k[0, 0], want_v[0, 0] = k_new[0], v_new[0]
    res = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=0,
                                      window_size=(1, 1), return_softmax_lse=True)
    assert len(res) == 4 and res[2].shape == (0,) and res[3].shape == (0,)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)
    # One key (n = 1) and four queries: literally, queries 0 and 1 see nothing.
    want_out, want_lse = reference(q, want_k[:, :1], want_v[:, :1], keep_mask(4, 1, 1, 1))
    np.testing.assert_allclose(res[0], want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res[1], want_lse, rtol=1e-12, atol=1e-13)
    assert np.all(res[1][0, 0, :2] == -np.inf)


def test_fa3_kvcache_packed_queries_and_new_keys_equal_per_sequence_calls():
    rng = np.random.default_rng(26)
    H, K, E, cap = 2, 1, 8, 6
    cu_q, cu_kn = np.asarray([0, 2, 5]), np.asarray([0, 1, 3])
    q = rng.standard_normal((5, H, E))
    k_new, v_new = rng.standard_normal((3, K, E)), rng.standard_normal((3, K, E))
    k_cache, v_cache = rng.standard_normal((2, cap, K, E)), rng.standard_normal((2, cap, K, E))
    lens = np.asarray([2, 3], dtype=np.int32)
    kc, vc = k_cache.copy(), v_cache.copy()
    out, lse, *_ = fa3.flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=lens, cu_seqlens_q=cu_q,
        cu_seqlens_k_new=cu_kn, max_seqlen_q=3, causal=True, return_softmax_lse=True)
    assert out.shape == (5, H, E) and lse.shape == (H, 5)
    for b in range(2):
        n_new = cu_kn[b + 1] - cu_kn[b]
        want_k = k_cache[b].copy()
        want_k[lens[b]:lens[b] + n_new] = k_new[cu_kn[b]:cu_kn[b + 1]]
        np.testing.assert_array_equal(kc[b], want_k)
        want_v = v_cache[b].copy()
        want_v[lens[b]:lens[b] + n_new] = v_new[cu_kn[b]:cu_kn[b + 1]]
        n = lens[b] + n_new
        Lb = cu_q[b + 1] - cu_q[b]
        want_out, want_lse = reference(q[None, cu_q[b]:cu_q[b + 1]], want_k[None, :n],
                                       want_v[None, :n], keep_mask(Lb, n, -1, 0))
        np.testing.assert_allclose(out[cu_q[b]:cu_q[b + 1]], want_out[0], rtol=1e-12,
                                   atol=1e-13)
        np.testing.assert_allclose(lse[:, cu_q[b]:cu_q[b + 1]], want_lse[0], rtol=1e-12,
                                   atol=1e-13)


def test_fa3_kvcache_page_table_with_cache_batch_idx_and_rotary_seqlens():
    rng = np.random.default_rng(27)
    B, page, per_seq, K, E = 2, 2, 2, 1, 8
    q = rng.standard_normal((B, 1, 2, E))
    k_new, v_new = rng.standard_normal((B, 1, K, E)), rng.standard_normal((B, 1, K, E))
    k_cache, v_cache = (rng.standard_normal((B, page * per_seq, K, E)) for _ in range(2))
    lens = np.asarray([1, 2], dtype=np.int32)
    ang = rng.uniform(-np.pi, np.pi, (8, 4))
    rot = dict(rotary_cos=np.cos(ang), rotary_sin=np.sin(ang),
               rotary_seqlens=np.asarray([5, 0], dtype=np.int32), rotary_interleaved=False)
    kc, vc = k_cache.copy(), v_cache.copy()
    want = fa3.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens,
                                       causal=True, **rot)
    # The same caches paged; the page table's rows in reverse order, picked by
    # cache_batch_idx.
    pool_k = k_cache.reshape(B * per_seq, page, K, E).copy()
    pool_v = v_cache.reshape(B * per_seq, page, K, E).copy()
    table = np.arange(B * per_seq, dtype=np.int32).reshape(B, per_seq)[::-1].copy()
    got = fa3.flash_attn_with_kvcache(q, pool_k, pool_v, k_new, v_new, cache_seqlens=lens,
                                      page_table=table, cache_batch_idx=np.asarray([1, 0]),
                                      causal=True, **rot)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pool_k.reshape(k_cache.shape), kc)
    # rotary_seqlens, not cache_seqlens, places the new keys: sequence 0's key at 5.
    by_hand = _rotate_by_hand(k_new[:1], ang[[[5]]], False)
    np.testing.assert_allclose(kc[0, 1], by_hand[0, 0], rtol=0, atol=1e-14)


# --- 3. flash-attn 4's interface --------------------------------------------------------------


@pytest.mark.parametrize("fa4_window,fa3_window", [
    ((None, None), (-1, -1)), ((-1, -1), (-1, -1)), ((-3, 1), (-1, -1)), ((2, None), (2, -1)),
    ((None, 1), (-1, 1)), ((0, 0), (0, 0)), ((np.int64(1), torch.tensor(2)), (1, 2)),
])
def test_fa4_window_none_is_unlimited_and_results_are_a_pair(fa4_window, fa3_window):
    from refattn.compat import flash_attn_cute as fa4
    q, k, v = _qkv(1, 5, 4, 2, 1, 8, seed=31)
    out, lse = fa4.flash_attn_func(q, k, v, window_size=fa4_window, return_lse=True)
    want_out, want_lse = reference(q, k, v, keep_mask(5, 4, *fa3_window))
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)
    out2, none = fa4.flash_attn_func(q, k, v, window_size=fa4_window)
    assert none is None
    np.testing.assert_array_equal(out2, out)


def test_fa4_varlen_equals_fa3_and_refusals():
    from refattn.compat import flash_attn_cute as fa4
    rng = np.random.default_rng(32)
    q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    cu = np.asarray([0, 3, 7])
    out, lse = fa4.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          causal=True, window_size=(1, None), return_lse=True)
    want = fa3.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True, window_size=(1, -1),
                                      return_attn_probs=True)
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(lse, want[1])
    with pytest.raises(TypeError, match="varlen front-end does not take learnable_sink"):
        fa4.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   learnable_sink=np.zeros(2))
    with pytest.raises(NotImplementedError, match="score_mod is a CuTe-DSL extension"):
        fa4.flash_attn_func(q[None], k[None], v[None], score_mod=lambda *a: a[0])
    with pytest.raises(ValueError, match=r"window_size\[0\] must be >= 0 or None"):
        fa4.flash_attn_func(q[None], k[None], v[None], window_size=(-1, 3))


# --- qv, attention_chunk (flash-attn 3) and learnable sinks (flash-attn 4) ---------------------


def _softmax_reference(scores, values, sink=None):
    """softmax over the last axis (a -inf row gives zeros) @ values, with an optional
    sink logit per head (B, H, L, S) joining each row's denominator."""
    m = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    if sink is not None:
        m = np.maximum(m, sink[None, :, None, None])
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m)
    total = p.sum(axis=-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink[None, :, None, None] - m)
    p = p / np.where(total > 0, total, 1.0)
    return p @ values


def _bhld(x):
    return np.swapaxes(x, 1, 2)


def test_fa3_qv_adds_qv_v_to_the_scores_with_flash_attn_3s_default_scale():
    rng = np.random.default_rng(40)
    q = rng.standard_normal((2, 5, 2, 8))
    k = rng.standard_normal((2, 6, 2, 8))
    v = rng.standard_normal((2, 6, 2, 4))
    qv = rng.standard_normal((2, 5, 2, 4))
    out = fa3.flash_attn_func(q, k, v, causal=True, qv=qv)
    scale = (8 + 4) ** -0.5  # flash-attn 3: head dims of q and qv together
    scores = scale * (_bhld(q) @ np.swapaxes(_bhld(k), -1, -2)
                      + _bhld(qv) @ np.swapaxes(_bhld(v), -1, -2))
    visible = np.arange(6)[None, :] <= np.arange(5)[:, None] + 1  # bottom-right causal
    want = _softmax_reference(np.where(visible, scores, -np.inf), _bhld(v))
    np.testing.assert_allclose(out, _bhld(want), rtol=0, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_fa3_attention_chunk_keeps_each_query_in_its_bottom_right_chunk(chunk):
    q, k, v = _qkv(1, 4, 7, 2, 1, 8, seed=41)
    out = fa3.flash_attn_func(q, k, v, causal=True, attention_chunk=chunk)
    i = np.arange(4)[:, None] + 7 - 4  # query positions, bottom-right
    j = np.arange(7)[None, :]
    visible = (j <= i) & (j // chunk == i // chunk)
    kk, vv = (np.repeat(_bhld(x), 2, axis=1) for x in (k, v))
    scores = 8 ** -0.5 * (_bhld(q) @ np.swapaxes(kk, -1, -2))
    want = _softmax_reference(np.where(visible, scores, -np.inf), vv)
    np.testing.assert_allclose(out, _bhld(want), rtol=0, atol=1e-13)


def test_fa3_varlen_and_kvcache_refuse_qv_and_chunks_by_name():
    rng = np.random.default_rng(42)
    q, k, v = (rng.standard_normal((5, 2, 8)) for _ in range(3))
    cu = np.asarray([0, 2, 5])
    with pytest.raises(TypeError, match="varlen front-end does not take attention_chunk"):
        fa3.flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, attention_chunk=2)


def test_fa4_learnable_sink_joins_each_rows_denominator():
    from refattn.compat import flash_attn_cute as fa4

    q, k, v = _qkv(1, 3, 5, 2, 2, 8, seed=43)
    sink = np.asarray([0.5, -1.0])
    out, lse = fa4.flash_attn_func(q, k, v, causal=True, learnable_sink=sink,
                                   return_lse=True)
    scores = 8 ** -0.5 * (_bhld(q) @ np.swapaxes(_bhld(k), -1, -2))
    visible = np.arange(5)[None, :] <= np.arange(3)[:, None] + 2
    masked = np.where(visible, scores, -np.inf)
    want = _softmax_reference(masked, _bhld(v), sink=sink)
    np.testing.assert_allclose(out, _bhld(want), rtol=0, atol=1e-13)
    # The LSE counts the sink: log(sum_j exp(s_ij) + exp(sink_h)).
    want_lse = np.log(np.exp(masked).sum(-1) + np.exp(sink)[None, :, None])
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-13)
