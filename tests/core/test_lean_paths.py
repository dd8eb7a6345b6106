"""The lean front door and the in-place direct path give what the general code gives.

The front door recognises plain NumPy and torch inputs without array_api_compat's
inference, remembers dtype answers and typed constants, and the direct path writes into
the score arrays it makes. These tests hold each shortcut to the general result and
check that no user array is ever written into.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest

import refattn
from refattn._agnostic._scores import constant
from refattn._audit.report import tiny_problem_threads
from refattn._namespace import dtype_is, infer_namespace

torch = pytest.importorskip("torch")


def _general(x: object) -> tuple[object, object]:
    return array_api_compat.array_namespace(x), array_api_compat.device(x)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_common_case_namespace_is_the_general_one(library: str) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    mask = np.ones((3, 3), dtype=bool)
    if library == "torch":
        arrays = [torch.from_numpy(a) for a in arrays]
        mask = torch.from_numpy(mask)
    q, k, v = arrays
    for xp in (None, library, _general(q)[0]):
        got = infer_namespace({"q": q, "k": k, "v": v, "bias": None}, {"mask": mask},
                              xp=xp, required=("q", "k", "v"))
        assert got == _general(q)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_subclasses_and_mixed_inputs_keep_their_messages() -> None:
    # Not the common case: the general path refuses them with its own messages.
    q = np.ones((2, 3, 4))
    with pytest.raises(TypeError, match="numpy.matrix"):
        refattn.attention(np.asmatrix(np.ones((3, 4))), q[0], q[0])
    with pytest.raises(TypeError, match="masked array"):
        refattn.attention(np.ma.masked_array(q), q, q)
    with pytest.raises(TypeError, match="two libraries"):
        refattn.attention(q, torch.from_numpy(q), q)
    with pytest.raises(TypeError, match="real floating dtype"):
        refattn.attention(q.astype(np.int64), q, q)
    with pytest.raises(TypeError, match="xp is the torch namespace"):
        refattn.attention(q, q, q, xp="torch")
    with pytest.raises(TypeError, match="meta tensor"):
        t = torch.ones((2, 3, 4), dtype=torch.float64, device="meta")
        refattn.attention(t, t, t)


def test_dtype_is_remembers_the_namespace_answer() -> None:
    xp = array_api_compat.array_namespace(np.ones(1))
    for dtype in (xp.float16, xp.float32, xp.float64, xp.int8, xp.bool):
        for kind in ("real floating", "bool", "integral"):
            assert dtype_is(xp, dtype, kind) == xp.isdtype(dtype, kind)
            assert dtype_is(xp, dtype, kind) == xp.isdtype(dtype, kind)  # remembered


def test_constants_are_typed_and_shared() -> None:
    xp = array_api_compat.array_namespace(np.ones(1))
    like = np.ones(3, dtype=np.float32)
    nan = constant(math.nan, like, xp=xp)
    assert nan.dtype == np.float32 and np.isnan(nan)
    assert constant(float("nan"), like, xp=xp) is nan  # any NaN finds the same entry
    assert constant(-math.inf, like, xp=xp) == -np.inf
    assert constant(0.0, np.ones(3), xp=xp).dtype == np.float64


def _options() -> list[dict]:
    rng = np.random.default_rng(3)
    mask = rng.random((5, 7)) < 0.7
    mask[1] = False  # a fully masked row
    return [
        {},
        {"mask": mask},
        {"mask": mask, "masked_rows": "nan"},
        {"mask": mask, "masked_rows": "uniform"},
        {"bias": rng.standard_normal((2, 5, 7))},
        {"mask": mask[None], "bias": rng.standard_normal((5, 7))},
        {"causal": True, "softcap": 3.0},
        {"mask": mask, "score_mod": lambda s, b, h, i, j: s},  # returns its argument
        {"mask": mask, "dropout_p": 0.3, "rng": 1},
    ]


@pytest.mark.parametrize("options", _options())
def test_direct_path_writes_into_no_user_array(options: dict) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4))
    k, v = rng.standard_normal((2, 7, 4)), rng.standard_normal((2, 7, 3))
    dout = rng.standard_normal((2, 5, 3))
    given = {name: x.copy() for name, x in options.items() if isinstance(x, np.ndarray)}
    before = [x.copy() for x in (q, k, v, dout)]
    res = refattn.attention(q, k, v, implementation="direct", return_lse=True, **options)
    saved_out, saved_lse = res.out.copy(), res.lse.copy()
    g = refattn.attention_backward(dout, q, k, v, implementation="direct", output=res.out,
                                   lse=res.lse, **options)
    for x, y in zip((q, k, v, dout), before, strict=True):
        assert np.array_equal(x, y)
    for name, x in given.items():
        assert np.array_equal(options[name], x)
    assert np.array_equal(res.out, saved_out, equal_nan=True)
    assert np.array_equal(res.lse, saved_lse, equal_nan=True)
    # And the gradients are those computed without the saved output and LSE.
    again = refattn.attention_backward(dout, q, k, v, implementation="direct", **options)
    for a, b in zip(g[:3], again[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_lse_is_the_same_whether_or_not_asked() -> None:
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, 6, 5)) for _ in range(3))
    plain = refattn.attention(q, k, v, implementation="direct")
    full = refattn.attention(q, k, v, implementation="direct", return_lse=True,
                             return_weights=True)
    assert np.array_equal(plain, full.out)
    assert np.array_equal(full.weights @ v, full.out)


def test_audit_runs_torch_on_one_thread_and_restores_it() -> None:
    before = torch.get_num_threads()
    with tiny_problem_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), tiny_problem_threads():
        raise RuntimeError("a failing case")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"sinks": True},
                                     {"score_mod": True}])
def test_torch_autograd_differentiates_through_the_direct_path(options):
    # The direct path writes its own intermediates in place, except when torch's
    # autograd records the computation: then refattn is differentiable like any torch
    # code, and its gradients are those refattn.attention_backward computes.
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    kw: dict = {"causal": options.get("causal", False)}
    if "sinks" in options:
        kw["sinks"] = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    if "score_mod" in options:
        kw["score_mod"] = lambda s, b, h, i, j: 0.5 * s
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = refattn.attention(*leaves, implementation="direct", **kw)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(dout)
    want = refattn.attention_backward(dout, q, k, v, implementation="direct", **kw)
    for leaf, expected in zip(leaves, want[:3], strict=True):
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)
