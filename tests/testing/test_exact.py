"""``refattn.testing.exact_attention``: the arbitrary-precision ground truth.

The reference here is written independently of refattn: scalar loops over every
(batch, head, query, key) in mpmath with 60 digits, straight from the formulas (scores,
soft-cap, bias, masks, softmax, dropout, weighted sum; the softmax gradient). A result of
``exact_attention`` must be the float64 nearest to that reference, i.e. correctly
rounded, up to a cancellation allowance far below an ulp (see ``CANCEL``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import given

import refattn
from refattn.testing import ExactResult, exact_attention
from tests.helpers.cases import Case, exact_cases

mpmath = pytest.importorskip("mpmath")

# exact_attention carries 50 digits and the reference 60, each over fewer than 10^3
# operations on terms bounded by the case's magnitude M (``_magnitude``): their results
# differ by at most ~10^-47 M. Where a result cancels to (near) zero that absolute
# difference, not half an ulp of the tiny result, is what one can ask for.
CANCEL = 1e-40


# --- the independent reference -------------------------------------------------------


def _src(index: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    # The entry of an array of `shape` that broadcasting maps to the full `index`.
    tail = index[len(index) - len(shape):] if shape else ()
    return tuple(0 if n == 1 else i for i, n in zip(tail, shape, strict=True))


def reference(case: Case, *, grads: bool) -> dict[str, np.ndarray]:
    """Every result of the case in 60-digit mpmath, by scalar loops over the formulas."""
    mp = mpmath.MPContext()
    mp.dps = 60
    q, k, v, kw = case.q, case.k, case.v, case.options
    two_d = q.ndim == 2
    q4, k4, v4, d4 = (x[None] if two_d else x for x in (q, k, v, case.dout))
    batch = np.broadcast_shapes(q4.shape[:-3], k4.shape[:-3], v4.shape[:-3])
    H, L, E = q4.shape[-3:]
    K, S, _ = k4.shape[-3:]
    Kv, _, Ev = v4.shape[-3:]
    scale = mp.mpf(case.scale_value)
    cap = kw.get("softcap")
    bias, mask, keep = kw.get("bias"), kw.get("mask"), kw.get("dropout_mask")
    p = kw.get("dropout_p", 0.0)
    shift = S - L if kw.get("alignment") == "bottom_right" else 0
    policy = kw["masked_rows"]
    f = mp.mpf

    out = np.zeros((*batch, H, L, Ev), dtype=object)
    lse = np.zeros((*batch, H, L), dtype=object)
    weights = np.zeros((*batch, H, L, S), dtype=object)
    dq: dict[tuple[int, ...], list[Any]] = {}
    dk: dict[tuple[int, ...], list[Any]] = {}
    dv: dict[tuple[int, ...], list[Any]] = {}
    db: dict[tuple[int, ...], list[Any]] = {}

    def add(acc: dict[tuple[int, ...], list[Any]], key: tuple[int, ...], term: Any) -> None:
        acc.setdefault(key, []).append(term)

    for bh in np.ndindex(*batch, H):
        b, h = bh[:-1], bh[-1]
        kh, vh = h // (H // K), h // (H // Kv)
        for i in range(L):
            qi = q4[_src((*b, h, i, 0), q4.shape)[:-1]]
            raw, s, ok = [], [], []
            for j in range(S):
                kj = k4[_src((*b, kh, j, 0), k4.shape)[:-1]]
                t = scale * mp.fsum(f(a) * f(c) for a, c in zip(qi, kj, strict=True))
                raw.append(t)
                x = cap * mp.tanh(t / cap) if cap is not None else t
                if bias is not None:
                    x = x + f(bias[_src((*b, h, i, j), bias.shape)])
                allowed = (mask is None or bool(mask[_src((*b, h, i, j), mask.shape)])) and (
                    not kw.get("causal") or j <= i + shift
                )
                s.append(x)
                ok.append(allowed and x != -mp.inf)
            if S == 0:
                P = []
                lse[(*bh, i)] = -mp.inf
            elif any(ok):
                z = mp.fsum(mp.exp(x) for x, a in zip(s, ok, strict=True) if a)
                P = [mp.exp(x) / z if a else f(0) for x, a in zip(s, ok, strict=True)]
                lse[(*bh, i)] = mp.log(z)
            else:
                P = [{"zero": f(0), "nan": mp.nan, "uniform": f(1) / S}[policy]] * S
                lse[(*bh, i)] = -mp.inf
            weights[(*bh, i)] = P
            kept = [True] * S if keep is None else [
                bool(keep[_src((*b, h, i, j), keep.shape)]) for j in range(S)
            ]
            factor = f(1) / (1 - f(p)) if p < 1 else f(0)
            Pd = [P[j] * factor if kept[j] else f(0) for j in range(S)]
            vj = [v4[_src((*b, vh, j, 0), v4.shape)[:-1]] for j in range(S)]
            for e in range(Ev):
                out[(*bh, i, e)] = mp.fsum(Pd[j] * f(vj[j][e]) for j in range(S))
            if not grads:
                continue
            do = d4[(*b, h, i)]
            dP = [mp.fsum(f(do[e]) * f(vj[j][e]) for e in range(Ev)) * factor if kept[j] else f(0)
                  for j in range(S)]
            D = mp.fsum(P[j] * dP[j] for j in range(S))
            dS = [P[j] * (dP[j] - D) for j in range(S)]
            if (not any(ok) and policy == "uniform") or p >= 1:
                # Constant weights, or an output that is identically 0: the scores do not
                # matter.
                dS = [f(0)] * S
            for j in range(S):
                dT = dS[j] if cap is None else dS[j] * (1 - mp.tanh(raw[j] / cap) ** 2)
                kj = k4[_src((*b, kh, j, 0), k4.shape)[:-1]]
                for e in range(E):
                    add(dq, _src((*b, h, i, e), q4.shape), scale * dT * f(kj[e]))
                    add(dk, _src((*b, kh, j, e), k4.shape), scale * dT * f(qi[e]))
                for e in range(Ev):
                    add(dv, _src((*b, vh, j, e), v4.shape), Pd[j] * f(do[e]))
                if bias is not None:
                    add(db, _src((*b, h, i, j), bias.shape), dS[j])

    def gather(acc: dict[tuple[int, ...], list[Any]], shape: tuple[int, ...]) -> np.ndarray:
        res = np.zeros(shape, dtype=object)
        for idx in np.ndindex(*shape):
            res[idx] = mp.fsum(acc.get(idx, []))
        return res

    user = (lambda x: x[0]) if two_d else (lambda x: x)
    result = {"out": user(out), "lse": user(lse), "weights": user(weights)}
    if grads:
        result["dq"] = gather(dq, q4.shape).reshape(q.shape)
        result["dk"] = gather(dk, k4.shape).reshape(k.shape)
        result["dv"] = gather(dv, v4.shape).reshape(v.shape)
        if bias is not None:
            result["dbias"] = gather(db, bias.shape)
    return result


def _magnitude(case: Case) -> float:
    # A bound on every intermediate: products of the largest entries and lengths.
    big = [np.max(np.abs(x), initial=0.0) for x in (case.q, case.k, case.v, case.dout)]
    bias = case.options.get("bias")
    if bias is not None:
        big.append(np.max(np.abs(bias[np.isfinite(bias)]), initial=0.0))
    n = sum(case.q.shape) + sum(case.k.shape) + sum(case.v.shape)
    return float(np.prod([1.0 + b for b in big]) * (1.0 + abs(case.scale_value)) * n**3)


def assert_correctly_rounded(actual: Any, ref: np.ndarray, cancel: float, what: str) -> None:
    """Each entry is the float64 nearest its reference, up to ``cancel`` absolute."""
    a = np.asarray(actual, dtype=np.float64)
    assert a.shape == ref.shape, f"{what}: shape {a.shape} != {ref.shape}"
    for idx in np.ndindex(*a.shape):
        got, want = float(a[idx]), ref[idx]
        if mpmath.isnan(want) or math.isnan(got):
            assert mpmath.isnan(want) and math.isnan(got), f"{what}{idx}: {got} vs {want}"
            continue
        if mpmath.isinf(want) or math.isinf(got):
            assert got == want, f"{what}{idx}: {got} vs {want}"
            continue
        err = abs(mpmath.mpf(got) - want)
        for neighbour in (np.nextafter(got, np.inf), np.nextafter(got, -np.inf)):
            # No float nearer the reference than the returned one (ties either way).
            assert err <= abs(mpmath.mpf(float(neighbour)) - want) + cancel, (
                f"{what}{idx}: {got!r} is not the float nearest {want}"
            )


# --- properties ------------------------------------------------------------------------


@given(case=exact_cases())
def test_matches_scalar_mpmath_reference(case: Case) -> None:
    res = exact_attention(
        case.q, case.k, case.v, return_lse=True, return_weights=True, grad_out=case.dout,
        **case.options,
    )
    assert isinstance(res, ExactResult)
    ref = reference(case, grads=True)
    cancel = CANCEL * _magnitude(case)
    for name in ("out", "lse", "weights", "dq", "dk", "dv"):
        assert_correctly_rounded(getattr(res, name), ref[name], cancel, name)
    if "bias" in case.options:
        assert_correctly_rounded(res.dbias, ref["dbias"], cancel, "dbias")
    else:
        assert res.dbias is None


@given(case=exact_cases(logit=600.0))
def test_large_logits_match_reference(case: Case) -> None:
    # Logits in the hundreds are where float64 implementations fail; mpmath's exponent
    # is unbounded, so exact_attention needs no shift by the row maximum.
    res = exact_attention(case.q, case.k, case.v, return_lse=True, **case.options)
    ref = reference(case, grads=False)
    cancel = CANCEL * _magnitude(case)
    assert_correctly_rounded(res.out, ref["out"], cancel, "out")
    assert_correctly_rounded(res.lse, ref["lse"], cancel, "lse")


def test_example_by_hand() -> None:
    # One query, two keys, scale 1: out = (v0 e^{s0} + v1 e^{s1}) / (e^{s0} + e^{s1}) with
    # s = (1*2 + 0*1, 1*(-1) + 0*3) = (2, -1); correctly rounded through mpmath.
    q = np.array([[1.0, 0.0]])
    k = np.array([[2.0, 1.0], [-1.0, 3.0]])
    v = np.array([[0.5, -4.0], [3.0, 2.0]])
    res = exact_attention(q, k, v, scale=1.0, return_lse=True, return_weights=True)
    with mpmath.workdps(40):  # float() of a 40-digit value rounds to nearest
        e = mpmath.e
        z = e**2 + e**-1
        want = [float((0.5 * e**2 + 3.0 * e**-1) / z), float((-4.0 * e**2 + 2.0 * e**-1) / z),
                float(mpmath.log(z)), float(e**-1 / z)]
    assert [res.out[0, 0], res.out[0, 1], res.lse[0], res.weights[0, 1]] == want


def test_returns_plain_array_without_flags() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in ((2, 3, 4), (2, 5, 4), (2, 5, 3)))
    out = exact_attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 3) and out.dtype == np.float64
    res = exact_attention(q, k, v, return_lse=True)
    assert res.weights is None and res.dq is None and res.dbias is None
    assert np.array_equal(res.out, out)


def test_digits_resolve_cancellation() -> None:
    # q.k = 2^200 + 1 - 2^200 = 1 exactly. Carried with 50 digits (~166 bits) the 1 is
    # lost against 2^200; with 80 digits (~266 bits) it is kept. With scores (1, 0) and
    # v = (1, 0) the output is e / (e + 1).
    q = np.array([[2.0**200, 1.0, -(2.0**200)]])
    k = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    v = np.array([[1.0], [0.0]])
    with mpmath.workdps(40):
        want = float(mpmath.e / (mpmath.e + 1))
    assert exact_attention(q, k, v, scale=1.0, digits=80)[0, 0] == want
    assert exact_attention(q, k, v, scale=1.0, digits=50)[0, 0] != want


def test_empty_lengths() -> None:
    q = np.ones((2, 0, 3))
    k = np.ones((2, 4, 3))
    v = np.ones((2, 4, 2))
    res = exact_attention(q, k, v, return_lse=True, grad_out=np.ones((2, 0, 2)))
    assert res.out.shape == (2, 0, 2) and res.lse.shape == (2, 0)
    assert np.array_equal(res.dk, np.zeros_like(k))
    # S = 0: no keys, every row is empty: output 0 and LSE -inf whatever the policy.
    q = np.ones((1, 3, 2))
    res = exact_attention(q, np.ones((1, 0, 2)), np.ones((1, 0, 4)), masked_rows="nan",
                          return_lse=True)
    assert np.array_equal(res.out, np.zeros((1, 3, 4)))
    assert np.all(res.lse == -np.inf)


@given(case=exact_cases(logit=3.0))
def test_semantics_match_refattn_backward(case: Case) -> None:
    # The gradient conventions (GQA sums, broadcast bias, dropout, masked-row policies)
    # are those of refattn.attention_backward. Small logits (|scale q.k| <= 3) keep the
    # float64 backward accurate: each gradient entry is a sum of fewer than 100 products
    # of rounded terms below the case magnitude M (``_magnitude``: products of the
    # largest entries times n^3, n the sum of the sizes), each off by at most 8u of
    # itself, so it is within 100 * 8u * M of exact: a bound of order 1e-7 here, far
    # below the O(1) gradients a convention mismatch would change.
    kw = dict(case.options)
    kw.pop("softcap", None)  # not an option of attention_backward
    res = exact_attention(case.q, case.k, case.v, grad_out=case.dout, **kw)
    grads = refattn.attention_backward(case.dout, case.q, case.k, case.v, **kw)
    bound = 100 * 8 * 2.0**-53 * _magnitude(case)
    for name in ("dq", "dk", "dv", "dbias"):
        got, want = getattr(grads, name), getattr(res, name)
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape, name
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        assert np.nanmax(np.abs(got - want), initial=0.0) <= bound, name


# --- namespaces ------------------------------------------------------------------------


def test_results_in_input_namespace(backend: Any) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 5, 4)).astype(np.float32)
    v = rng.standard_normal((1, 5, 2)).astype(np.float32)
    bias = rng.standard_normal((3, 5)).astype(np.float32)
    dout = rng.standard_normal((2, 3, 2)).astype(np.float32)
    res = exact_attention(
        backend.asarray(q), backend.asarray(k), backend.asarray(v), bias=backend.asarray(bias),
        grad_out=backend.asarray(dout), return_lse=True,
    )
    want = exact_attention(q, k, v, bias=bias, grad_out=dout, return_lse=True)
    for name in ("out", "lse", "dq", "dk", "dv", "dbias"):
        x = getattr(res, name)
        assert array_api_compat.array_namespace(x) is array_api_compat.array_namespace(
            backend.asarray(np.zeros(1))
        ), name
        # float32 inputs are exact in float64; the results are float64 regardless.
        assert backend.to_numpy(x).dtype == np.float64, name
        assert np.array_equal(backend.to_numpy(x), getattr(want, name)), name


def test_torch_tensor_requiring_grad() -> None:
    torch = pytest.importorskip("torch")
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.float64)
    v = torch.randn(2, 5, 2, dtype=torch.float64)
    out = exact_attention(q, k, v)
    want = exact_attention(q.detach().numpy(), k.numpy(), v.numpy())
    assert isinstance(out, torch.Tensor) and np.array_equal(out.numpy(), want)


# --- errors ----------------------------------------------------------------------------


def _small() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ones((1, 2, 3)), np.ones((1, 4, 3)), np.ones((1, 4, 2))


def test_refuses_too_many_scores() -> None:
    q, k, v = np.zeros((1, 2, 400, 2)), np.zeros((1, 2, 200, 2)), np.zeros((1, 2, 200, 1))
    with pytest.raises(ValueError, match=r"at most 100000 score entries; got score shape "
                                         r"\(1, 2, 400, 200\) \(160000 entries\)"):
        exact_attention(q, k, v)


@pytest.mark.parametrize(
    ("digits", "error", "message"),
    [(16, ValueError, "digits must be at least 17"), (0, ValueError, "at least 17"),
     (20.0, TypeError, "digits must be an int; got float"), (True, TypeError, "got bool")],
)
def test_digits_errors(digits: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        exact_attention(*_small(), digits=digits)


@pytest.mark.parametrize(
    ("softcap", "error"), [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                           (math.nan, ValueError), ("1", TypeError), (True, TypeError)],
)
def test_softcap_errors(softcap: Any, error: type) -> None:
    with pytest.raises(error, match="softcap must be"):
        exact_attention(*_small(), softcap=softcap)


def test_missing_mpmath_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpmath", None)  # makes `import mpmath` fail
    with pytest.raises(ImportError, match=r"pip install 'refattn\[exact\]'"):
        exact_attention(*_small())


def test_grad_out_errors() -> None:
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \(1, 2, 2\)"):
        exact_attention(q, k, v, grad_out=np.ones((1, 2, 3)))
    with pytest.raises(TypeError, match="grad_out must have a real floating dtype"):
        exact_attention(q, k, v, grad_out=np.ones((1, 2, 2), dtype=np.int64))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="two libraries"):
        exact_attention(q, k, v, grad_out=torch.ones(1, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "bad",
    [
        {"k": np.ones((1, 4, 2))},
        {"v": np.ones((1, 3, 2))},
        {"q": np.ones((3, 2, 3)), "k": np.ones((2, 4, 3)), "v": np.ones((2, 4, 2))},
        {"mask": np.ones((2, 4))},
        {"mask": np.ones((3, 4), dtype=bool)},
        {"bias": np.ones((5, 4))},
        {"dropout_p": 0.5},
        {"dropout_p": 1.5, "dropout_mask": np.ones((2, 4), dtype=bool)},
        {"dropout_mask": np.ones((2, 4), dtype=bool)},
        {"dropout_p": 1.0, "dropout_mask": np.ones((2, 4), dtype=bool)},
        {"masked_rows": "ignore"},
        {"alignment": "center", "causal": True},
        {"causal": 1},
        {"scale": math.inf},
        {"scale": "0.5"},
        {"q": np.ones((1, 2, 3), dtype=np.int64)},
        {"q": [[1.0, 2.0, 3.0]]},
    ],
)
def test_rejects_what_attention_rejects(bad: dict[str, Any]) -> None:
    q, k, v = _small()
    args = {"q": q, "k": k, "v": v, **bad}
    with pytest.raises((TypeError, ValueError)) as want:
        refattn.attention(**args)
    with pytest.raises(want.type, match=None) as got:
        exact_attention(**args)
    assert str(got.value) == str(want.value)
