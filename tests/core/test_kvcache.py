"""refattn.attention_with_kvcache: decoding against full attention over the keys so far.

References, all independent of refattn.kvcache:
* per sequence, ``refattn.attention`` over the cached keys concatenated with the new
  ones, bottom-right aligned (the core's own causal / window / softcap / ALiBi);
* the updated caches, written here with NumPy item assignment;
* a paged cache, scattered here into shuffled pages, must give exactly what the
  contiguous cache gives (the same keys reach the same arithmetic);
* token-by-token decoding must reproduce full causal attention over the whole sequence.
Cache entries past the valid length hold NaN throughout: they must never be read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import divisors
from tests.helpers.variants import assert_within, forward_bound, lse_bound


@dataclass
class Case:
    lens: list[int]  # cache_seqlens
    as_int: bool  # pass cache_seqlens as an int (all lens equal)
    capacity: int
    page_size: int
    Lq: int
    H: int
    E: int
    causal: bool
    window: tuple[int | None, int | None] | None
    softcap: float | None
    slopes: np.ndarray | None
    masked_rows: str
    scale_option: float | None
    q: np.ndarray  # (B, Lq, H, E)
    k_cache: np.ndarray  # (B, capacity, K, E), NaN past each valid length
    v_cache: np.ndarray
    k: np.ndarray | None  # (B, Lnew, K, E)
    v: np.ndarray | None
    rng: np.random.Generator

    @property
    def B(self) -> int:
        return len(self.lens)

    @property
    def L_new(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.E) if self.scale_option is None else self.scale_option

    @property
    def logit_extra(self) -> float:
        extra = self.softcap or 0.0
        if self.slopes is not None:
            extra += float(np.max(self.slopes)) * (self.Lq + self.capacity)
        return extra

    def finite_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key and value that may be read, for the magnitudes of the bounds."""
        ks = [self.k_cache[b, :n] for b, n in enumerate(self.lens)]
        vs = [self.v_cache[b, :n] for b, n in enumerate(self.lens)]
        if self.k is not None:
            ks.append(self.k.reshape(-1, *self.k.shape[2:]))
            vs.append(self.v.reshape(-1, *self.v.shape[2:]))
        k, v = np.concatenate(ks)[None], np.concatenate(vs)[None]
        # (1, n, K, E) in BLHD; padded along positions to the capacity for S in the bound.
        pad = max(self.capacity - k.shape[1], 0)
        return (np.swapaxes(np.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))), 1, 2),
                np.swapaxes(np.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))), 1, 2))


SIDES = st.sampled_from([None, -1, 0, 1, 3])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    B = draw(st.integers(1, 3))
    page_size = draw(st.integers(1, 3))
    capacity = page_size * draw(st.integers(1, 3))
    L_new = draw(st.integers(0, min(capacity, 2)))
    as_int = draw(st.booleans())
    lens = draw(st.lists(st.integers(0, capacity - L_new), min_size=1 if as_int else B,
                         max_size=1 if as_int else B))
    lens = lens * B if as_int else lens
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    Kv = draw(st.sampled_from(divisors(H)))
    E, Ev, Lq = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k_cache = rng.standard_normal((B, capacity, K, E))
    v_cache = rng.standard_normal((B, capacity, Kv, Ev))
    for b, n in enumerate(lens):
        k_cache[b, n:] = np.nan  # unused cache memory: never to be read
        v_cache[b, n:] = np.nan
    slopes_kind = draw(st.sampled_from([None, "H", "BH"]))
    return Case(
        lens=lens, as_int=as_int, capacity=capacity, page_size=page_size, Lq=Lq, H=H, E=E,
        causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.tuples(SIDES, SIDES))),
        softcap=draw(st.sampled_from([None, 2.0])),
        slopes=None if slopes_kind is None else rng.uniform(
            0.0, 1.0, (H,) if slopes_kind == "H" else (B, H)),
        masked_rows=draw(st.sampled_from(["zero", "nan"])),
        scale_option=draw(st.sampled_from([None, None, 0.0, -0.7, 1.3])),
        q=rng.standard_normal((B, Lq, H, E)), k_cache=k_cache, v_cache=v_cache,
        k=rng.standard_normal((B, L_new, K, E)) if L_new or draw(st.booleans()) else None,
        v=rng.standard_normal((B, L_new, Kv, Ev)) if L_new else None,
        rng=rng,
    )


def fix_empty_step(case: Case) -> Case:
    # k drawn with Lnew = 0 needs a matching empty v (both or neither).
    if case.k is not None and case.v is None:
        case.v = np.zeros((case.B, 0, case.v_cache.shape[2], case.v_cache.shape[3]))
    return case


def kwargs(case: Case, backend: Any) -> dict[str, Any]:
    return dict(
        k=None if case.k is None else backend.asarray(case.k),
        v=None if case.v is None else backend.asarray(case.v),
        cache_seqlens=case.lens[0] if case.as_int else backend.asarray(np.array(case.lens)),
        causal=case.causal, window=case.window, softcap=case.softcap,
        masked_rows=case.masked_rows, scale=case.scale_option,
        alibi_slopes=None if case.slopes is None else backend.asarray(case.slopes),
    )


def reference(case: Case, backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: attention over cache[:len] + new keys, bottom-right aligned."""
    outs, lses = [], []
    for b, n in enumerate(case.lens):
        keys, values = case.k_cache[b, :n], case.v_cache[b, :n]
        if case.k is not None:
            keys = np.concatenate([keys, case.k[b]])
            values = np.concatenate([values, case.v[b]])
        slopes = None if case.slopes is None else (
            case.slopes if case.slopes.ndim == 1 else case.slopes[b])
        res = refattn.attention(
            *(backend.asarray(x) for x in (case.q[b], keys, values)), layout="BLHD",
            causal=case.causal, window=case.window, alignment="bottom_right",
            softcap=case.softcap, masked_rows=case.masked_rows, return_lse=True,
            scale=case.scale_option,
            alibi_slopes=None if slopes is None else backend.asarray(slopes),
        )
        outs.append(backend.to_numpy(res.out))
        lses.append(backend.to_numpy(res.lse))
    return np.stack(outs), np.stack(lses)


def written_caches(case: Case) -> tuple[np.ndarray, np.ndarray]:
    kc, vc = case.k_cache.copy(), case.v_cache.copy()
    for b, n in enumerate(case.lens):
        if case.k is not None:
            kc[b, n:n + case.L_new] = case.k[b]
            vc[b, n:n + case.L_new] = case.v[b]
    return kc, vc


@given(case=cases().map(fix_empty_step))
def test_decode_equals_attention_over_the_concatenated_keys(backend, case):
    q, kc, vc = (backend.asarray(x) for x in (case.q, case.k_cache, case.v_cache))
    res = refattn.attention_with_kvcache(q, kc, vc, return_lse=True, **kwargs(case, backend))
    want_out, want_lse = reference(case, backend)
    keys, values = case.finite_keys()
    bound = forward_bound(np.swapaxes(case.q, 1, 2), keys, values, scale=case.scale,
                          logit_extra=case.logit_extra)
    assert_within(backend.to_numpy(res.out), want_out, bound, "out")
    assert_within(backend.to_numpy(res.lse), want_lse,
                  lse_bound(np.swapaxes(case.q, 1, 2), keys, scale=case.scale,
                            logit_extra=case.logit_extra, lse=want_lse), "lse")
    # The caches: copies (no arithmetic), so exactly the item-assigned reference.
    want_k, want_v = written_caches(case)
    np.testing.assert_array_equal(backend.to_numpy(res.k_cache), want_k)
    np.testing.assert_array_equal(backend.to_numpy(res.v_cache), want_v)
    # The inputs were not written into.
    np.testing.assert_array_equal(backend.to_numpy(kc), case.k_cache)
    np.testing.assert_array_equal(backend.to_numpy(vc), case.v_cache)


def page(case: Case, cache: np.ndarray, perm: np.ndarray, spare: int) -> np.ndarray:
    """Scatter a contiguous (B, capacity, ...) cache into shuffled pages (NaN spares)."""
    per_seq = case.capacity // case.page_size
    pages = np.full((case.B * per_seq + spare, case.page_size, *cache.shape[2:]), np.nan)
    for b in range(case.B):
        for c in range(per_seq):
            pages[perm[b * per_seq + c]] = cache[b, c * case.page_size:(c + 1) * case.page_size]
    return pages


@given(case=cases().map(fix_empty_step), spare=st.integers(0, 2))
def test_paged_cache_gives_exactly_the_contiguous_result(backend, case, spare):
    per_seq = case.capacity // case.page_size
    perm = case.rng.permutation(case.B * per_seq + spare)
    table = perm[:case.B * per_seq].reshape(case.B, per_seq).copy()
    # Pages past each sequence's valid length are never looked up: put garbage there.
    valid = np.array(case.lens) + case.L_new
    for b in range(case.B):
        used = -(-valid[b] // case.page_size)
        table[b, used:] = case.rng.choice([-1, 10**6], per_seq - used)
    kp, vp = page(case, case.k_cache, perm, spare), page(case, case.v_cache, perm, spare)
    contiguous = refattn.attention_with_kvcache(
        *(backend.asarray(x) for x in (case.q, case.k_cache, case.v_cache)),
        return_lse=True, **kwargs(case, backend))
    paged = refattn.attention_with_kvcache(
        *(backend.asarray(x) for x in (case.q, kp, vp)), block_table=backend.asarray(table),
        return_lse=True, **kwargs(case, backend))
    # Both read the same keys into the same (B, capacity) view: identical arithmetic.
    np.testing.assert_array_equal(backend.to_numpy(paged.out), backend.to_numpy(contiguous.out))
    np.testing.assert_array_equal(backend.to_numpy(paged.lse), backend.to_numpy(contiguous.lse))
    want_k, want_v = written_caches(case)
    np.testing.assert_array_equal(backend.to_numpy(paged.k_cache), page(case, want_k, perm, spare))
    np.testing.assert_array_equal(backend.to_numpy(paged.v_cache), page(case, want_v, perm, spare))


def test_token_by_token_decoding_reproduces_full_causal_attention(backend):
    # Prefill 3 tokens, then decode 4 one at a time: every step's output must be the
    # matching rows of causal attention over the whole sequence of 7.
    rng = np.random.default_rng(3)
    B, T, H, K, E = 2, 7, 4, 2, 3
    q = rng.standard_normal((B, T, H, E))
    k, v = rng.standard_normal((B, T, K, E)), rng.standard_normal((B, T, K, E))
    full = backend.to_numpy(refattn.attention(*(backend.asarray(x) for x in (q, k, v)),
                                              causal=True, layout="BLHD"))
    kc = backend.asarray(np.zeros((B, 8, K, E)))
    vc = backend.asarray(np.zeros((B, 8, K, E)))
    steps = [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    bound = forward_bound(np.swapaxes(q, 1, 2), np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2),
                          scale=1 / math.sqrt(E))
    for start, stop in steps:
        res = refattn.attention_with_kvcache(
            backend.asarray(q[:, start:stop]), kc, vc,
            k=backend.asarray(k[:, start:stop]), v=backend.asarray(v[:, start:stop]),
            cache_seqlens=start, causal=True)
        kc, vc = res.k_cache, res.v_cache
        assert_within(backend.to_numpy(res.out), full[:, start:stop], bound, f"step {start}")
    np.testing.assert_array_equal(backend.to_numpy(kc)[:, :T], k)


def test_without_new_keys_the_caches_come_back_as_given(backend):
    rng = np.random.default_rng(4)
    q = backend.asarray(rng.standard_normal((1, 2, 2, 3)))
    kc, vc = (backend.asarray(rng.standard_normal((1, 4, 2, 3))) for _ in range(2))
    res = refattn.attention_with_kvcache(q, kc, vc, cache_seqlens=3)
    assert res.k_cache is kc and res.v_cache is vc and res.lse is None
    assert isinstance(res, refattn.KVCacheResult)
    out, k_cache, v_cache, lse = res  # four fields, always
    assert lse is None


def test_rows_that_see_no_key(backend):
    # Three causal queries over one valid key: queries 0 and 1 sit before it (positions
    # -2 and -1) and see nothing; query 2 sees it alone, so its output is that value.
    rng = np.random.default_rng(2)
    q = backend.asarray(rng.standard_normal((1, 3, 1, 2)))
    kc = np.full((1, 4, 1, 2), np.nan)
    kc[0, 0] = [0.5, -1.5]
    kc = backend.asarray(kc)
    for policy, fill in (("zero", 0.0), ("nan", np.nan)):
        res = refattn.attention_with_kvcache(q, kc, kc, cache_seqlens=1, causal=True,
                                             masked_rows=policy, return_lse=True)
        out = backend.to_numpy(res.out)
        np.testing.assert_array_equal(out[0, :2], fill)
        np.testing.assert_array_equal(out[0, 2, 0], [0.5, -1.5])  # one weight of exactly 1
        np.testing.assert_array_equal(backend.to_numpy(res.lse)[0, 0, :2], -np.inf)
    # No keys at all (an empty cache, nothing new) is an empty sum: 0 under both
    # policies, as attention over S = 0 keys gives, with LSE -inf.
    for policy in ("zero", "nan"):
        empty = refattn.attention_with_kvcache(q, kc, kc, cache_seqlens=0, masked_rows=policy,
                                               return_lse=True)
        np.testing.assert_array_equal(backend.to_numpy(empty.out), 0.0)
        np.testing.assert_array_equal(backend.to_numpy(empty.lse), -np.inf)
        direct = refattn.attention(q[0, ...], kc[0, :0, ...], kc[0, :0, ...], layout="BLHD",
                                   masked_rows=policy)
        np.testing.assert_array_equal(backend.to_numpy(direct), 0.0)


# --- validation ---------------------------------------------------------------------------

R = np.random.default_rng(0)
Q = R.standard_normal((2, 1, 4, 3))
KC = R.standard_normal((2, 5, 2, 3))
KN = R.standard_normal((2, 1, 2, 3))
PAGED = R.standard_normal((6, 2, 2, 3))
TABLE = np.array([[0, 1, 2], [3, 4, 5]])


def call(**kw: Any) -> Any:
    args = dict(q=Q, k_cache=KC, v_cache=KC, k=KN, v=KN, cache_seqlens=np.array([2, 4]))
    args.update(kw)
    return refattn.attention_with_kvcache(args.pop("q"), args.pop("k_cache"),
                                          args.pop("v_cache"), **args)


@pytest.mark.parametrize("kw,exc,match", [
    ({"cache_seqlens": np.array([2, 5])}, ValueError,
     r"sequence 1 would need 6 cache positions \(cache_seqlens 5 \+ 1 new\) but the cache "
     r"holds 5 per sequence"),
    ({"cache_seqlens": 5}, ValueError, r"sequence 0 would need 6 cache positions"),
    ({"cache_seqlens": -1}, ValueError, r"cache_seqlens must be non-negative; got -1"),
    ({"cache_seqlens": np.array([2, -1])}, ValueError,
     r"cache_seqlens must be non-negative; got cache_seqlens\[1\] = -1"),
    ({"cache_seqlens": np.array([2.0, 1.0])}, TypeError,
     r"cache_seqlens must have an integer dtype; got float64"),
    ({"cache_seqlens": np.array([2, 1, 0])}, ValueError,
     r"cache_seqlens must have shape \(B,\) = \(2,\); got \(3,\)"),
    ({"cache_seqlens": 2.0}, TypeError, r"cache_seqlens must be an int or a \(B,\) integer "
                                        r"array; got float"),
    ({"v": None}, ValueError, r"give both k and v"),
    ({"k": KN[:, :, :1], "v": KN[:, :, :1]}, ValueError,
     r"k and v must have shapes \(B, Lnew, K, E\) = \(2, 1, 2, 3\)"),
    ({"k": KN.astype(np.float32), "v": KN.astype(np.float32)}, TypeError,
     r"k must have q's dtype float64; got float32"),
    ({"k_cache": KC.astype(np.float32)}, TypeError, r"k_cache must have q's dtype float64"),
    ({"q": Q[0]}, ValueError, r"q must be 4-D \(B, Lq, H, E\); got shape \(1, 4, 3\)"),
    ({"k_cache": KC[0]}, ValueError, r"k_cache must be 4-D \(B, S_cache, K, E\)"),
    ({"k_cache": KC[:1], "v_cache": KC[:1]}, ValueError,
     r"a contiguous k_cache must have B=2 rows .* \(pass block_table for a paged cache\)"),
    ({"v_cache": KC[:, :4]}, ValueError, r"k_cache and v_cache must agree on their first two "
                                         r"axes"),
    ({"k_cache": KC[..., :2], "v_cache": KC[..., :2]}, ValueError,
     r"k_cache's head dim must equal q's E=3"),
    ({"alibi_slopes": np.ones((3, 4))}, ValueError,
     r"alibi_slopes must have shape \(H,\) = \(4,\) or \(B, H\) = \(2, 4\); got \(3, 4\)"),
    ({"masked_rows": "uniform"}, ValueError, r"masked_rows must be one of 'zero', 'nan'"),
    ({"window": (0,)}, TypeError, r"window must be a pair"),
    ({"causal": "yes"}, TypeError, r"causal must be True or False"),
    # paged
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": TABLE.astype(float)}, TypeError,
     r"block_table must have an integer dtype; got float64"),
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": TABLE[:1]}, ValueError,
     r"block_table must have shape \(B, max_blocks\) with B=2; got \(1, 3\)"),
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": np.array([[0, 6, 2], [3, 4, 5]])},
     ValueError, r"block_table\[0, 1\] = 6 is not a block of the cache \(0 \.\. 5\); "
                 r"sequence 0 uses its first ceil\(3 / 2\) pages"),
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": np.array([[0, 1, 2], [-1, 4, 5]])},
     ValueError, r"block_table\[1, 0\] = -1 is not a block"),
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": np.array([[0, 1, 2], [3, 1, 5]]),
      "cache_seqlens": np.array([3, 3])}, ValueError,
     r"two new entries would be written to one cache slot"),
    ({"k_cache": PAGED, "v_cache": PAGED, "block_table": TABLE,
      "cache_seqlens": np.array([6, 0])}, ValueError,
     r"sequence 0 would need 7 cache positions .* the cache holds 6 per sequence"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


def test_arrays_of_another_library():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"arrays from two libraries: q is a torch array but "
                                        r"cache_seqlens is a numpy array"):
        call(q=torch.from_numpy(Q), k_cache=torch.from_numpy(KC), v_cache=torch.from_numpy(KC),
             k=torch.from_numpy(KN), v=torch.from_numpy(KN))


def test_explicit_namespace(backend):
    rng = np.random.default_rng(8)
    q = backend.asarray(rng.standard_normal((2, 1, 2, 3)))
    kc, vc = (backend.asarray(rng.standard_normal((2, 4, 2, 3))) for _ in range(2))
    lens = backend.asarray(np.array([1, 3]))
    given_xp = refattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, xp=backend.xp)
    inferred = refattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    np.testing.assert_array_equal(backend.to_numpy(given_xp.out), backend.to_numpy(inferred.out))


def test_a_namespace_that_does_not_match():
    import array_api_strict

    with pytest.raises(TypeError, match=r"xp is the array_api_strict namespace but q is a "
                                        r"numpy array"):
        call(xp=array_api_strict)
