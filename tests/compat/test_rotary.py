"""refattn.apply_rotary_emb against rotations built here: complex multiplication of
feature pairs (interleaved, GPT-J) and the half-split pairing (GPT-NeoX), as
flash-attn's flash_attn/layers/rotary.py defines them, and torch's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

import refattn

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")


def _angles(T: int, half: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, (T, half))


def _by_complex(x: np.ndarray, theta: np.ndarray, interleaved: bool) -> np.ndarray:
    """Pairs as complex numbers times e^{i theta}; theta (B, T, half)."""
    half = theta.shape[-1]
    rot = x[..., :2 * half]
    if interleaved:
        z = rot[..., 0::2] + 1j * rot[..., 1::2]
    else:
        z = rot[..., :half] + 1j * rot[..., half:]
    z = z * np.exp(1j * theta[:, :, None, :])
    out = x.copy()
    if interleaved:
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:2 * half] = z.real, z.imag
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("half,D", [(4, 8), (2, 7)])  # full rotary dim; rotary_dim < D
def test_rotation_is_the_complex_product_of_pairs(interleaved, half, D):
    rng = np.random.default_rng(1)
    B, T, H = 2, 3, 2
    x = rng.standard_normal((B, T, H, D))
    ang = _angles(10, half)
    offsets = np.array([0, 4])
    got = refattn.apply_rotary_emb(x, np.cos(ang), np.sin(ang), interleaved,
                                   seqlen_offsets=offsets)
    theta = ang[np.arange(T)[None, :] + offsets[:, None]]
    np.testing.assert_allclose(got, _by_complex(x, theta, interleaved), rtol=0, atol=1e-14)
    # A rotation keeps each pair's norm; the features past rotary_dim pass untouched.
    np.testing.assert_array_equal(got[..., 2 * half:], x[..., 2 * half:])


def test_half_split_pairs_feature_d_with_d_plus_half():
    # By hand: x = (1, 0 | 0, 0) rotated by a quarter turn in pair 0 -> (0, 0 | 1, 0).
    x = np.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    ang = np.array([[np.pi / 2, 0.0]])
    got = refattn.apply_rotary_emb(x, np.cos(ang), np.sin(ang))
    np.testing.assert_allclose(got.ravel(), [0, 0, 1, 0], atol=1e-15)
    got = refattn.apply_rotary_emb(x, np.cos(ang), np.sin(ang), interleaved=True)
    np.testing.assert_allclose(got.ravel(), [0, 1, 0, 0], atol=1e-15)


def test_packed_positions_restart_per_sequence():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 2, 8))
    ang = _angles(6, 4)
    cu = np.array([0, 2, 5])
    got = refattn.apply_rotary_emb(x, np.cos(ang), np.sin(ang), cu_seqlens=cu,
                                   seqlen_offsets=np.array([1, 0]))
    first = refattn.apply_rotary_emb(x[None, :2], np.cos(ang), np.sin(ang), seqlen_offsets=1)
    second = refattn.apply_rotary_emb(x[None, 2:], np.cos(ang), np.sin(ang))
    np.testing.assert_array_equal(got, np.concatenate([first[0], second[0]]))


@pytest.mark.parametrize("interleaved", [False, True])
def test_torch_and_array_api_strict_agree_with_a_torch_rotation(interleaved):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 8))
    ang = _angles(4, 3)
    tx, tc, ts = (torch.from_numpy(a) for a in (x, np.cos(ang), np.sin(ang)))
    # torch's own arithmetic: rotate-half written with torch ops.
    c = tc.repeat_interleave(2, -1) if interleaved else torch.cat([tc, tc], -1)
    s = ts.repeat_interleave(2, -1) if interleaved else torch.cat([ts, ts], -1)
    r = tx[..., :6]
    if interleaved:
        half = torch.stack([-r[..., 1::2], r[..., 0::2]], -1).flatten(-2)
    else:
        half = torch.cat([-r[..., 3:], r[..., :3]], -1)
    want = torch.cat([r * c[:, None] + half * s[:, None], tx[..., 6:]], -1)
    got = refattn.apply_rotary_emb(tx, tc, ts, interleaved)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    strict = refattn.apply_rotary_emb(xps.asarray(x), xps.asarray(np.cos(ang)),
                                      xps.asarray(np.sin(ang)), interleaved)
    np.testing.assert_allclose(np.asarray(strict), want.numpy(), rtol=0, atol=1e-14)


def test_float32_is_computed_in_float64_and_rounded_once():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 1, 4)).astype(np.float32)
    ang = _angles(3, 2).astype(np.float32)
    got = refattn.apply_rotary_emb(x, np.cos(ang), np.sin(ang))
    want = refattn.apply_rotary_emb(x.astype(np.float64), np.cos(ang).astype(np.float64),
                                    np.sin(ang).astype(np.float64)).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(cos=np.ones((4, 5))), ValueError, "exceeds the head dimension 8"),
    (dict(cos=np.ones((4,))), ValueError, "cos and sin must both be"),
    (dict(seqlen_offsets=2), ValueError, "beyond cos/sin's 4 rows"),
    (dict(seqlen_offsets=np.array([0])), ValueError, r"shape \(B,\) = \(2,\)"),
    (dict(seqlen_offsets=1.5), TypeError, "seqlen_offsets must be an int"),
    (dict(interleaved=1), TypeError, "interleaved must be True or False"),
])
def test_bad_arguments(kw, exc, match):
    args = dict(x=np.zeros((2, 3, 1, 8)), cos=np.ones((4, 2)), sin=None,
                seqlen_offsets=0, interleaved=False)
    args.update(kw)
    if args["sin"] is None:
        args["sin"] = np.ones(args["cos"].shape)
    with pytest.raises(exc, match=match):
        refattn.apply_rotary_emb(**args)
