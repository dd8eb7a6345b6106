"""Every bad input gets a specific exception naming the argument, what was seen and
what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import refattn

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 3, 8))
K = rng.standard_normal((2, 2, 5, 8))
V = rng.standard_normal((2, 2, 5, 6))


def call(**kw):
    args = {"q": Q, "k": K, "v": V}
    args.update(kw)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return refattn.attention(q, k, v, **args)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_rank_below_two(which):
    with pytest.raises(ValueError, match=rf"{which} must be at least 2-D.*shape \(8,\)"):
        call(**{which: np.ones(8)})


def test_mismatched_head_dim():
    with pytest.raises(ValueError, match=r"k's head dim E must equal q's.*E=8.*E=7"):
        call(k=np.ones((2, 2, 5, 7)))


def test_mismatched_key_and_value_lengths():
    with pytest.raises(ValueError, match=r"v must have as many positions S as k.*S=5.*S=4"):
        call(v=np.ones((2, 2, 4, 6)))


@pytest.mark.parametrize("which,heads", [("k", 3), ("v", 3), ("k", 0)])
def test_heads_that_do_not_divide(which, heads):
    bad = np.ones((2, heads, 5, 8 if which == "k" else 6))
    with pytest.raises(ValueError, match=rf"{which}'s head count must divide q's.*H=4.*{heads}"):
        call(**{which: bad})


def test_batch_dims_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"leading \(batch\) dims .* must broadcast"):
        call(k=np.ones((3, 2, 5, 8)))


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, np.bool_])
def test_non_real_floating_data(dtype):
    match = rf"q must have a real floating dtype.*got {np.dtype(dtype)}"
    with pytest.raises(TypeError, match=match):
        call(q=Q.astype(dtype))


def test_mixed_dtypes():
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype.*float32"):
        call(k=K.astype(np.float32))


def test_non_bool_mask():
    with pytest.raises(TypeError, match=r"mask must be a boolean array.*int64.*bias="):
        call(mask=np.ones((3, 5), dtype=np.int64))


def test_integer_bias():
    with pytest.raises(TypeError, match=r"bias must have a real floating dtype"):
        call(bias=np.ones((3, 5), dtype=np.int64))


def test_mask_that_does_not_broadcast():
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to the "
                       r"score shape \(2, 4, 3, 5\)"):
        call(mask=np.ones((3, 4), dtype=bool))


def test_bias_that_does_not_broadcast():
    with pytest.raises(ValueError, match=r"bias of shape \(3, 2, 4, 3, 5\) does not broadcast"):
        call(bias=np.ones((3, 2, 4, 3, 5)))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\]"):
        call(dropout_p=p)


def test_dropout_p_of_wrong_type():
    with pytest.raises(TypeError, match=r"dropout_p must be a real number; got str"):
        call(dropout_p="0.1")


def test_dropout_without_mask_or_seed():
    with pytest.raises(ValueError, match=r"dropout_p=0.3 needs an explicit dropout_mask"):
        call(dropout_p=0.3)


def test_dropout_with_both_mask_and_seed():
    with pytest.raises(ValueError, match=r"give dropout_mask or rng, not both"):
        call(dropout_p=0.3, rng=1, dropout_mask=np.ones((3, 5), dtype=bool))


def test_dropout_mask_without_dropout():
    with pytest.raises(ValueError, match=r"dropout_mask or rng given but dropout_p is 0"):
        call(dropout_mask=np.ones((3, 5), dtype=bool))


def test_keep_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"dropout_mask of shape \(3, 4\) does not broadcast"):
        call(dropout_p=0.3, dropout_mask=np.ones((3, 4), dtype=bool))


def test_keep_mask_that_is_not_bool():
    with pytest.raises(TypeError, match=r"dropout_mask must be a boolean array.*float64"):
        call(dropout_p=0.3, dropout_mask=np.ones((3, 5)))


def test_keep_mask_keeping_weights_at_p_one():
    with pytest.raises(ValueError, match=r"dropout_p=1 drops every weight, but dropout_mask"):
        call(dropout_p=1.0, dropout_mask=np.ones((3, 5), dtype=bool))


@pytest.mark.parametrize("seed", [1.5, "7", True])
def test_rng_of_the_wrong_type(seed):
    with pytest.raises(TypeError, match=r"rng must be an int seed or a numpy.random.Generator"):
        call(dropout_p=0.3, rng=seed)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be finite.*got"):
        call(scale=scale)


def test_scale_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"scale must be a real number; got ndarray"):
        call(scale=np.ones(2))


@pytest.mark.parametrize("name,value", [
    ("masked_rows", "ignore"), ("alignment", "center"), ("layout", "BSHD"),
    ("compute_dtype", "float16"), ("precision", "exact"), ("implementation", "fast"),
])
def test_bad_option_values(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
        call(**{name: value})


def test_causal_must_be_a_bool():
    with pytest.raises(TypeError, match=r"causal must be True or False; got 1"):
        call(causal=1)


def test_non_arrays():
    with pytest.raises(TypeError, match=r"q must be an array .* got list"):
        call(q=Q.tolist())


def test_arrays_from_two_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"arrays from two libraries: q is a numpy array but k "
                       r"is a torch array"):
        call(k=torch.from_numpy(K))


def test_namespace_that_does_not_match_the_inputs():
    import array_api_strict

    with pytest.raises(TypeError, match=r"xp is the array_api_strict namespace but q is a "
                       r"numpy array"):
        call(xp=array_api_strict)


# -- scaled_dot_product_attention: torch's own rules -----------------------------------

def test_sdpa_mask_together_with_is_causal():
    with pytest.raises(ValueError, match=r"attn_mask and is_causal=True given together"):
        refattn.scaled_dot_product_attention(Q, Q, Q, attn_mask=np.ones((3, 3), bool),
                                             is_causal=True)


def test_sdpa_float16_mask_with_float64_query():
    with pytest.raises(TypeError, match=r"attn_mask must be bool, float32 or the query's dtype "
                       r"\(float64\); got float16"):
        refattn.scaled_dot_product_attention(Q, Q, Q, attn_mask=np.ones((3, 3), np.float16))


def test_sdpa_integer_mask():
    with pytest.raises(TypeError, match=r"attn_mask must be bool, float32 .* got int32"):
        refattn.scaled_dot_product_attention(Q, Q, Q, attn_mask=np.ones((3, 3), np.int32))


def test_sdpa_heads_that_do_not_broadcast_without_gqa():
    with pytest.raises(ValueError, match=r"head counts must be equal or 1 .* unless "
                       r"enable_gqa=True"):
        refattn.scaled_dot_product_attention(Q, K, V)


def test_sdpa_rank_below_two():
    with pytest.raises(ValueError, match=r"query must be at least 2-D"):
        refattn.scaled_dot_product_attention(np.ones(3), Q, Q)


@pytest.mark.parametrize("name", ["is_causal", "enable_gqa"])
def test_sdpa_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=rf"{name} must be True or False"):
        refattn.scaled_dot_product_attention(Q, Q, Q, **{name: "yes"})


def test_sdpa_dropout_without_mask_or_seed():
    with pytest.raises(ValueError, match=r"needs an explicit dropout_mask"):
        refattn.scaled_dot_product_attention(Q, Q, Q, dropout_p=0.1)


def test_shapes_in_messages_are_shown_in_the_users_layout():
    q = np.ones((2, 5, 4, 3))     # BLHD: L=5, H=4
    k = np.ones((2, 6, 4, 2))
    with pytest.raises(ValueError, match=r"q has shape \(2, 5, 4, 3\) \(E=3\), k has shape "
                       r"\(2, 6, 4, 2\)"):
        refattn.attention(q, k, np.ones((2, 6, 4, 3)), layout="BLHD")
