"""refattn.compat.flex against torch's own FlexAttention, run eagerly on the CPU.

Uncompiled, torch 2.13's ``flex_attention`` traces its higher-order op with
``torch.compile(backend="eager")`` and runs ``math_attention`` (materialised scores,
``torch._safe_softmax``); ``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True`` calls the same
op without the tracing (one test checks that both agree), which keeps these tests
fast. Inputs are float64.

Every mod below is written once, with array-API calls on the namespace of its arguments,
and handed unchanged to torch (which calls it under vmap on 0-d tensors) and to refattn
(which calls it once on broadcast index grids of the backend's arrays). Arrays a mod
captures are made in the library of the call by ``Mods``. Tolerances are the derived
rounding bounds of tests/helpers/variants.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn.compat.flex import AuxOutput, BlockMask, create_block_mask, flex_attention
from tests.helpers.cases import Case
from tests.helpers.variants import assert_within, forward_bound, lse_bound

torch = pytest.importorskip("torch")
flex_module = pytest.importorskip("torch.nn.attention.flex_attention")

Mod = Callable[..., Any]


@pytest.fixture(scope="module")
def direct_flex() -> Any:
    """torch's flex_attention with the dynamo tracing switched off for this module."""
    before = flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    yield flex_module.flex_attention
    flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = before


# --- the mods, written once ------------------------------------------------------------------


def _xp(x: Any) -> Any:
    return array_api_compat.array_namespace(x)


def _gather(values: Any, index: Any) -> Any:
    xp = _xp(index)
    return xp.reshape(xp.take(values, xp.reshape(index, (-1,)), axis=0), index.shape)


class Mods:
    """Score and mask mods over arrays captured in one library (``asarray``)."""

    def __init__(self, asarray: Callable[[np.ndarray], Any], *, H: int, L: int, S: int,
                 seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.slopes = asarray(rng.uniform(0.1, 1.0, H))
        self.doc_q = asarray(np.sort(rng.integers(0, 3, L)))
        self.doc_kv = asarray(np.sort(rng.integers(0, 3, S)))
        self.L, self.S = L, S
        # What a score mod adds to a logit at most (for the rounding bounds).
        self.extra = {"none": 0.0, "relative": 0.3 * (L + S), "alibi": 1.0 * (L + S),
                      "softcap": 2.0, "dead_row": 0.0}

    # Score mods: (score, b, h, q_idx, kv_idx) -> score.
    def score_mods(self) -> dict[str, Mod | None]:
        def relative(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return score - 0.3 * _xp(q).astype(_xp(q).abs(q - kv), score.dtype)

        def alibi(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            xp = _xp(score)
            distance = xp.astype(xp.abs(q - kv), score.dtype)
            return score - xp.astype(_gather(self.slopes, h), score.dtype) * distance

        def softcap(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return 2.0 * _xp(score).tanh(score / 2.0)

        def dead_row(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            # Query 1 gets -inf everywhere: a row that the score mod, not a mask, empties.
            xp = _xp(score)
            return xp.where((q == 1) & (h >= 0), -xp.inf, score)

        return {"none": None, "relative": relative, "alibi": alibi, "softcap": softcap,
                "dead_row": dead_row}

    # Mask mods: (b, h, q_idx, kv_idx) -> bool.
    def mask_mods(self) -> dict[str, Mod | None]:
        shift = self.S - self.L

        def causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return q >= kv

        def causal_bottom_right(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return q + shift >= kv

        def window(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (kv >= q - 1) & (kv <= q + 1)

        def documents(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return _gather(self.doc_q, q) == _gather(self.doc_kv, kv)

        def head_and_batch(b: Any, h: Any, q: Any, kv: Any) -> Any:
            # Every third query row of head 0 in batch 0 is fully masked.
            return ((q % 3) != 0) | (h > 0) | (b > 0)

        return {"none": None, "causal": causal, "causal_bottom_right": causal_bottom_right,
                "window": window, "documents": documents, "head_and_batch": head_and_batch}


@dataclass(kw_only=True)
class FlexCase(Case):
    """A case (q (B, H, L, E), k and v (Bkv, K, S, E)) with a named score_mod and mask_mod."""

    score_mod: str
    mask_mod: str
    scale: float | None
    seed: int

    @property
    def scale_value(self) -> float:
        return 1 / math.sqrt(self.q.shape[-1]) if self.scale is None else self.scale

    def mods(self, asarray: Callable[[np.ndarray], Any]) -> tuple[Mod | None, Mod | None,
                                                                   float]:
        B, H, L, _ = self.q.shape
        mods = Mods(asarray, H=H, L=L, S=self.k.shape[2], seed=self.seed)
        return (mods.score_mods()[self.score_mod], mods.mask_mods()[self.mask_mod],
                mods.extra[self.score_mod])


@st.composite
def cases(draw: st.DrawFn) -> FlexCase:
    B, L, S = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    E, Ev = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    Bkv = B if draw(st.booleans()) else 1
    return FlexCase(
        q=rng.standard_normal((B, H, L, E)), k=rng.standard_normal((Bkv, K, S, E)),
        v=rng.standard_normal((Bkv, K, S, Ev)),
        score_mod=draw(st.sampled_from(["none", "relative", "alibi", "softcap", "dead_row"])),
        # Bkv = 1 < B needs a block mask in torch.
        mask_mod=draw(st.sampled_from(["causal", "causal_bottom_right", "window", "documents",
                                       "head_and_batch"] + (["none"] if Bkv == B else []))),
        scale=draw(st.sampled_from([None, None, 0.4, -1.0])), seed=seed)


def torch_flex(flex: Any, case: FlexCase, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    score_mod, mask_mod, _ = case.mods(torch.from_numpy)
    B, H, L, _ = case.q.shape
    block_mask = None if mask_mod is None else flex_module.create_block_mask(
        mask_mod, B, H, L, case.k.shape[2], device="cpu")
    out, aux = flex(*(torch.from_numpy(x) for x in (case.q, case.k, case.v)),
                    score_mod=score_mod, block_mask=block_mask, scale=case.scale,
                    enable_gqa=case.k.shape[1] != H,
                    return_aux=flex_module.AuxRequest(lse=True), **kw)
    return out.numpy(), aux.lse.numpy()


def bounds(case: FlexCase, extra: float, lse: np.ndarray) -> tuple[float, np.ndarray]:
    q, k, v = case.q, case.k, case.v
    return (forward_bound(q, k, v, scale=case.scale_value, logit_extra=extra),
            lse_bound(q, k, scale=case.scale_value, logit_extra=extra, lse=lse))


# --- agreement with torch ----------------------------------------------------------------------


@given(data=st.data())
def test_matches_torch_flex_attention(backend, direct_flex, data):
    case = data.draw(cases())
    want_out, want_lse = torch_flex(direct_flex, case)
    score_mod, mask_mod, extra = case.mods(backend.asarray)
    B, H, L, _ = case.q.shape
    block_mask = None if mask_mod is None else create_block_mask(
        mask_mod, B, H, L, case.k.shape[2])
    out, lse = flex_attention(*(backend.asarray(x) for x in (case.q, case.k, case.v)),
                              score_mod=score_mod, block_mask=block_mask, scale=case.scale,
                              enable_gqa=case.k.shape[1] != H, return_lse=True)
    out_tol, lse_tol = bounds(case, extra, want_lse)
    assert_within(backend.to_numpy(out), want_out, out_tol, "out")
    assert_within(backend.to_numpy(lse), want_lse, lse_tol, "lse")


def test_fully_masked_rows_give_zero_and_minus_infinite_lse(direct_flex):
    rng = np.random.default_rng(0)
    case = FlexCase(q=rng.standard_normal((2, 2, 4, 3)), k=rng.standard_normal((2, 2, 5, 3)),
                v=rng.standard_normal((2, 2, 5, 3)), score_mod="dead_row",
                mask_mod="head_and_batch", scale=None, seed=0)
    want_out, want_lse = torch_flex(direct_flex, case)
    score_mod, mask_mod, _ = case.mods(np.asarray)
    out, lse = flex_attention(case.q, case.k, case.v, score_mod=score_mod,
                              block_mask=mask_mod, return_lse=True)
    dead = np.zeros((2, 2, 4), dtype=bool)
    dead[:, :, 1] = True            # the score mod's row
    dead[0, 0, [0, 3]] = True       # the mask mod's rows
    assert np.array_equal(want_lse == -np.inf, dead)  # torch agrees on which rows
    assert np.all(out[dead] == 0) and np.all(lse[dead] == -np.inf)
    out_tol, lse_tol = bounds(case, 0.0, want_lse)
    assert_within(out, want_out, out_tol, "out")
    assert_within(lse, want_lse, lse_tol, "lse")


# torch warns that it runs unfused, and dynamo about the lru_cache of array_api_compat.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_uncompiled_torch_default_path_agrees(direct_flex):
    # The default uncompiled path (dynamo with the "eager" backend) computes what the
    # direct call computes: one case, since its tracing costs seconds.
    rng = np.random.default_rng(1)
    case = FlexCase(q=rng.standard_normal((1, 2, 3, 4)), k=rng.standard_normal((1, 1, 4, 4)),
                v=rng.standard_normal((1, 1, 4, 2)), score_mod="alibi", mask_mod="causal",
                scale=None, seed=1)
    want = torch_flex(direct_flex, case)
    flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = False
    try:
        traced = torch_flex(flex_module.flex_attention, case)
    finally:
        flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    assert np.array_equal(traced[0], want[0]) and np.array_equal(traced[1], want[1])
    score_mod, mask_mod, extra = case.mods(np.asarray)
    out, lse = flex_attention(case.q, case.k, case.v, score_mod=score_mod,
                              block_mask=mask_mod, enable_gqa=True, return_lse=True)
    out_tol, lse_tol = bounds(case, extra, want[1])
    assert_within(out, want[0], out_tol, "out")
    assert_within(lse, want[1], lse_tol, "lse")


def test_block_mask_forms_agree():
    # torch's BlockMask (its .mask_mod), refattn's, and the bare mask_mod.
    rng = np.random.default_rng(2)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 2, 4, 3))) for _ in range(3))

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) | (h == 1)

    forms = [flex_module.create_block_mask(mask_mod, None, 2, 4, 4, device="cpu"),
             create_block_mask(mask_mod, None, 2, 4, 4), mask_mod]
    outs = [flex_attention(q, k, v, block_mask=m) for m in forms]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_aux_request_and_kernel_options(direct_flex):
    rng = np.random.default_rng(3)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 3, 4))) for _ in range(3))
    out, aux = flex_attention(q, k, v, return_aux=flex_module.AuxRequest(lse=True),
                              kernel_options={"BLOCK_M": 16})
    assert isinstance(aux, AuxOutput) and aux.max_scores is None
    want_out, want_aux = direct_flex(q, k, v, return_aux=flex_module.AuxRequest(lse=True))
    case = FlexCase(q=q.numpy(), k=k.numpy(), v=v.numpy(), score_mod="none", mask_mod="none",
                    scale=None, seed=3)
    out_tol, lse_tol = bounds(case, 0.0, want_aux.lse.numpy())
    assert_within(out.numpy(), want_out.numpy(), out_tol, "out")
    assert_within(aux.lse.numpy(), want_aux.lse.numpy(), lse_tol, "lse")
    # AuxRequest(lse=False): AuxOutput with nothing in it, as torch returns.
    _, empty = flex_attention(q, k, v, return_aux=flex_module.AuxRequest())
    assert empty == AuxOutput(None, None)


@pytest.mark.parametrize("dtype,lse_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)])
def test_result_dtypes(direct_flex, dtype, lse_dtype):
    rng = np.random.default_rng(4)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 1, 3, 4))).to(dtype)
               for _ in range(3))
    out, lse = flex_attention(q, k, v, return_lse=True)
    want_out, aux = direct_flex(q, k, v, return_aux=flex_module.AuxRequest(lse=True))
    want_lse = aux.lse
    assert out.dtype == want_out.dtype == dtype
    assert lse.dtype == want_lse.dtype == lse_dtype
    # The float64 result rounded once to the input dtype.
    wide = flex_attention(*(x.double() for x in (q, k, v)))
    assert torch.equal(out, wide.to(dtype))


def test_create_block_mask_records_its_sizes():
    def mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return q >= kv
    mask = create_block_mask(mod, 2, None, 3, 5, device="cpu", BLOCK_SIZE=64)
    assert isinstance(mask, BlockMask) and mask.mask_mod is mod
    assert mask.shape == (2, 1, 3, 5) and mask.seq_lengths == (3, 5)


@pytest.mark.parametrize("args,match", [
    (("not callable", None, None, 3, 3), "mask_mod must be callable"),
    ((lambda *a: True, -1, None, 3, 3), "B must be a non-negative int or None"),
    ((lambda *a: True, None, None, 3.0, 3), "Q_LEN must be a non-negative int"),
])
def test_create_block_mask_bad_arguments(args, match):
    with pytest.raises(TypeError, match=match):
        create_block_mask(*args)


def _causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
    return q >= kv


@pytest.mark.parametrize("shapes,kw,exc,match", [
    (((2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)), {}, ValueError, "query must be 4-D"),
    (((1, 4, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)), {}, ValueError, "set enable_gqa=True"),
    (((1, 3, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)), dict(enable_gqa=True), ValueError,
     "multiple of kv heads"),
    (((1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 4)), {}, ValueError, "same embedding dimension"),
    (((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 4, 4)), {}, ValueError, "value must have key's"),
    (((2, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)), {}, ValueError, "same batch size"),
    (((2, 2, 3, 4), (2, 2, 3, 4), (2, 2, 3, 4)),
     dict(block_mask=create_block_mask(_causal, 3, None, 3, 3)), ValueError,
     "made for a batch of 3"),
    (((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
     dict(block_mask=create_block_mask(_causal, None, None, 3, 3)), ValueError,
     r"made for \(Q_LEN, KV_LEN\) = \(3, 3\)"),
    (((1, 2, 3, 4),) * 3, dict(block_mask="causal"), TypeError, "block_mask must be None"),
    (((1, 2, 3, 4),) * 3, dict(score_mod=3), TypeError, "score_mod must be callable"),
    (((1, 2, 3, 4),) * 3, dict(enable_gqa=1), TypeError, "enable_gqa must be True or False"),
    (((1, 2, 3, 4),) * 3, dict(return_lse=True, return_aux="lse"), ValueError,
     "give return_lse or return_aux, not both"),
    (((1, 2, 3, 4),) * 3, dict(return_aux=True), TypeError, "return_aux must be an AuxRequest"),
])
def test_bad_arguments(shapes, kw, exc, match):
    q, k, v = (np.zeros(s) for s in shapes)
    with pytest.raises(exc, match=match):
        flex_attention(q, k, v, **kw)


def test_max_scores_is_refused_by_name():
    x = np.zeros((1, 1, 2, 2))
    with pytest.raises(NotImplementedError, match="max_scores=True.*flex_attention front-end"):
        flex_attention(x, x, x, return_aux=flex_module.AuxRequest(lse=True, max_scores=True))
