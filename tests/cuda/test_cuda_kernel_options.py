"""The fused kernels with every option they take, on the CPU shim, against the array-API path.

Forward (``flash_attention``) and backward (``flash_attention_backward``) run unchanged
through the shim with CuPy's call API; the reference is ``refattn.attention`` /
``attention_backward(implementation="direct")`` in float64 on the same inputs, and the
tolerances are the derived bounds of ``tests/helpers/cuda_bounds.py``. Options: boolean masks,
float biases and dropout keep-masks broadcast from any compact shape, causal masks and
windows in both alignments, softcap, the three masked-row policies, grouped-query heads
with K != Kv, float64 and float32.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn._arrays import sum_to_shape
from refattn._cuda import _launch, _modules, flash_attention, flash_attention_backward
from refattn._cuda_shim import MAX_DYNAMIC_SMEM, ShimModule
from tests.helpers.cases import divisors
from tests.helpers.cuda_bounds import Problem, backward_tolerance, forward_tolerance, mismatch

pytestmark = pytest.mark.usefixtures("gxx")


@contextlib.contextmanager
def shim(**options):
    """The kernels on the shim for a ``with`` block (hypothesis tests cannot take the
    function-scoped ``shim_backend`` fixture). Builds are cached by content, so every
    example after the first reuses the compiled library."""
    with _modules.module_factory(functools.partial(ShimModule, **options),
                                 max_dynamic_smem=MAX_DYNAMIC_SMEM):
        yield


# ------------------------------------------------------------------ cases
_AXES = ("B", "H", "L", "S")


def _operand_shape(draw, full: tuple[int, ...]) -> tuple[int, ...]:
    """A compact shape broadcastable to `full` = (B, H, L, S): each axis kept or 1,
    leading axes possibly left out."""
    kept = draw(st.tuples(*(st.booleans() for _ in _AXES)))
    shape = tuple(n if keep else 1 for n, keep in zip(full, kept, strict=True))
    return shape[draw(st.integers(0, 2)):]


@st.composite
def kernel_cases(draw, *, max_dim: int = 40) -> tuple[Problem, str, int]:
    """(problem in float64, kernel dtype, seed); inputs are representable in the dtype."""
    dtype = draw(st.sampled_from(["float64", "float32"]))
    B = draw(st.integers(1, 2))
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2, 3]))
    Kv = draw(st.sampled_from(divisors(H)))
    # Lengths around the 32-key tiles and 8/16-row query tiles, and empty ones.
    L = draw(st.integers(0, 40))
    S = draw(st.integers(0, 70))
    E = draw(st.integers(0, max_dim))
    Ev = draw(st.integers(0, max_dim))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def data(*shape, spread=1.0):
        return (spread * rng.standard_normal(shape)).astype(dtype).astype(np.float64)

    full = (B, H, L, S)
    options: dict = {}
    if draw(st.booleans()):
        mask = rng.random(_operand_shape(draw, full)) < 0.75
        if mask.size and draw(st.booleans()):
            # A fully masked query row (all of them when the mask has no L axis).
            mask[..., int(rng.integers(mask.shape[-2])), :] = False
        options["mask"] = mask
    if draw(st.booleans()):
        bias = data(*_operand_shape(draw, full), spread=2.0)
        if bias.size and draw(st.booleans()):
            bias.flat[int(rng.integers(bias.size))] = -np.inf
        options["bias"] = bias
    options["causal"] = draw(st.booleans())
    edge = st.one_of(st.none(), st.integers(0, 40))
    options["window"] = draw(st.one_of(st.none(), st.tuples(edge, edge)))
    options["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    p = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    if p:
        keep_shape = _operand_shape(draw, full)
        options["dropout_p"] = p
        options["dropout_mask"] = (rng.random(keep_shape) >= p) if p < 1 else np.zeros(
            keep_shape, bool)
    options["masked_rows"] = draw(st.sampled_from(["zero", "nan", "uniform"]))
    options["softcap"] = draw(st.sampled_from([None, None, 0.5, 4.0]))
    scale = draw(st.sampled_from([0.0, -0.5, 0.25, 1.0]))
    prob = Problem(data(B, H, L, E), data(B, K, S, E), data(B, Kv, S, Ev), scale, options)
    return prob, dtype, seed


def _kernel_kwargs(prob: Problem, dtype: str) -> dict:
    kw = dict(prob.options)
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].astype(dtype)
    return dict(kw, scale=prob.scale, compute_dtype=dtype)


def run_forward(prob: Problem, dtype: str):
    q, k, v = (x.astype(dtype) for x in (prob.q, prob.k, prob.v))
    return flash_attention(q, k, v, batch_shape=q.shape[:1], need_lse=True,
                           **_kernel_kwargs(prob, dtype))


def run_backward(prob: Problem, dtype: str, dout: np.ndarray):
    q, k, v, do = (x.astype(dtype) for x in (prob.q, prob.k, prob.v, dout))
    kw = _kernel_kwargs(prob, dtype)
    out, lse = flash_attention(q, k, v, batch_shape=q.shape[:1], need_lse=True, **kw)
    dq, dk, dv, dbias = flash_attention_backward(
        do, q, k, v, out, lse, batch_shape=q.shape[:1],
        need_dbias=prob.options.get("bias") is not None, **kw)
    if dbias is not None:
        dbias = sum_to_shape(dbias, prob.options["bias"].shape, xp=np)
    return [dq, dk, dv, dbias]


def check_forward(prob: Problem, dtype: str) -> None:
    out, lse = run_forward(prob, dtype)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.dtype(dtype)
    ref_out, ref_lse, _ = prob.reference()
    tol_out, tol_lse = forward_tolerance(prob, dtype)
    for problem in (mismatch("out", out, ref_out, tol_out),
                    mismatch("lse", lse, ref_lse, tol_lse)):
        assert problem is None, problem


def check_backward(prob: Problem, dtype: str, seed: int) -> None:
    B, H, L, _ = prob.shape
    dout = np.random.default_rng(seed + 1).standard_normal(
        (B, H, L, prob.v.shape[-1])).astype(dtype).astype(np.float64)
    got = run_backward(prob, dtype, dout)
    _, _, ref = prob.reference(dout)
    tols = backward_tolerance(prob, dout, dtype)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), got, ref, tols, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.dtype == np.dtype(dtype)
        problem = mismatch(name, g, w, t)
        assert problem is None, problem


# ------------------------------------------------------------------ properties
@given(case=kernel_cases())
def test_forward_matches_the_array_api_path(case) -> None:
    prob, dtype, seed = case
    with shim(schedule="random", seed=seed % 1000):
        check_forward(prob, dtype)


@given(case=kernel_cases())
def test_backward_matches_the_array_api_path(case) -> None:
    prob, dtype, seed = case
    with shim(schedule="random", seed=seed % 1000):
        check_backward(prob, dtype, seed)


# ------------------------------------------------------------------ every instantiation
def _bucket_problem(E: int, Ev: int, seed: int = 0, H: int = 4) -> Problem:
    # Two key tiles (the second partial), query tiles that end mid-block, GQA with
    # K != Kv, a padding mask, a per-head bias, dropout, softcap and a bottom-right
    # window that leaves the first rows fully masked ("uniform": the second pass).
    rng = np.random.default_rng(seed)
    B, K, Kv, L, S = 1, 2, 1, 35, 40
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32).astype(np.float64)  # noqa: E731
    options = dict(mask=np.arange(S) < 37, bias=f32(H, 1, S), window=(12, 0),
                   alignment="bottom_right", dropout_p=0.25,
                   dropout_mask=rng.random((B, H, L, S)) >= 0.25, masked_rows="uniform",
                   softcap=4.0)
    return Problem(f32(B, H, L, E), f32(B, K, S, E), f32(B, Kv, S, Ev), E ** -0.5 if E else 1.0,
                   options)


# Every head-dim bucket of every kernel: the forward's by Ev, dQ's by E, dK/dV's by
# max(E, Ev); fp64 with E = Ev = 256 is the largest shared-memory footprint.
BUCKETS = [(16, 16), (64, 48), (128, 100), (256, 256), (40, 256), (256, 8)]


def test_the_buckets_cover_every_instantiation() -> None:
    used = set()
    for dtype in ("float32", "float64"):
        for E, Ev in BUCKETS:
            used.add(_launch.flash_config(dtype, Ev).name_expression)
            for kernel in ("flash_bwd_dq", "flash_bwd_dkdv"):
                used.add(_launch.backward_config(kernel, dtype, E, Ev).name_expression)
    assert used == {c.name_expression for kernel in _launch.KERNEL_NAMES
                    for c in _launch.all_flash_configs(kernel)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("E", "Ev"), BUCKETS)
def test_every_head_dim_bucket(shim_backend, dtype, E, Ev) -> None:
    shim_backend(schedule="reverse")
    prob = _bucket_problem(E, Ev)
    check_forward(prob, dtype)
    check_backward(prob, dtype, seed=3)


# ------------------------------------------------------------------ deterministic cases
def test_backward_is_bitwise_deterministic_across_schedules_and_workers(shim_backend) -> None:
    """No atomics: each dK/dV block sums its group's heads in a fixed order, so the
    gradients cannot depend on which block runs first."""
    prob = _bucket_problem(24, 24, seed=5, H=8)  # key groups of 4, one value group of 8
    dout = np.random.default_rng(9).standard_normal((1, 8, 35, 24))
    results = []
    for schedule, workers in [("forward", 1), ("reverse", 2), ("random", 2)]:
        shim_backend(schedule=schedule, seed=11, workers=workers)
        results.append(run_backward(prob, "float64", dout))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_straddling_groups_sum_into_the_right_heads(shim_backend, dtype) -> None:
    # K = 3, Kv = 2 over H = 6: key head 1 serves query heads 2-3, which belong to value
    # heads 0 and 1; one dK/dV block loops over all 6 (lcm of the groups).
    shim_backend(schedule="random", seed=2)
    rng = np.random.default_rng(4)
    f = lambda *s: rng.standard_normal(s).astype(dtype).astype(np.float64)  # noqa: E731
    prob = Problem(f(2, 6, 33, 16), f(2, 3, 65, 16), f(2, 2, 65, 8), 0.3,
                   dict(causal=True, alignment="bottom_right"))
    check_forward(prob, dtype)
    check_backward(prob, dtype, seed=6)


class _Recording:
    """A module (or kernel) that records each launch's arguments, passing all through."""

    def __init__(self, inner, log) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_log", log)

    def get_function(self, name):
        return _Recording(self._inner.get_function(name), self._log)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._inner, name, value)

    def __call__(self, grid, block, args, **kw):
        self._log.append([a for a in args if isinstance(a, np.ndarray)])
        return self._inner(grid, block, args, **kw)


def test_broadcast_operands_reach_the_kernel_compact() -> None:
    """A (L, S) mask, a (H, 1, S) bias and a (B, 1, 1, S) keep-mask are read through
    their broadcast strides: the kernels get arrays of the operands' own sizes, and no
    array of the full (B, H, L, S) size but the bias gradient."""
    launches: list = []
    rng = np.random.default_rng(1)
    prob = Problem(rng.standard_normal((3, 4, 5, 8)), rng.standard_normal((3, 4, 6, 8)),
                   rng.standard_normal((3, 4, 6, 8)), 0.5,
                   dict(mask=rng.random((5, 6)) < 0.8, bias=rng.standard_normal((4, 1, 6)),
                        dropout_p=0.5, dropout_mask=rng.random((3, 1, 1, 6)) < 0.5))
    with _modules.module_factory(lambda **kw: _Recording(ShimModule(**kw), launches),
                                 max_dynamic_smem=MAX_DYNAMIC_SMEM):
        check_forward(prob, "float64")
        check_backward(prob, "float64", seed=2)
    full = 3 * 4 * 5 * 6
    # forward, then the backward's forward, dQ and dK/dV.
    assert len(launches) == 4
    for i, arrays in enumerate(launches):
        sizes = [a.size for a in arrays]
        assert sorted(a.size for a in arrays if a.dtype == bool) == [18, 30]  # keep, mask
        assert 24 in sizes  # the bias
        assert sizes.count(full) == (1 if i == 2 else 0), sizes  # dQ writes d bias


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_masked_nan_or_inf_score_poisons_its_row(shim_backend) -> None:
    """Masks add -inf rather than select it (as the array-API path does): +inf + -inf
    is NaN, so a +inf bias under a False mask entry makes its row NaN."""
    shim_backend()
    rng = np.random.default_rng(2)
    bias = np.zeros((4, 6))
    bias[1, 2] = np.inf
    mask = np.ones((4, 6), bool)
    mask[1, 2] = False
    prob = Problem(rng.standard_normal((1, 1, 4, 8)), rng.standard_normal((1, 1, 6, 8)),
                   rng.standard_normal((1, 1, 6, 8)), 0.5, dict(mask=mask, bias=bias))
    out, lse = run_forward(prob, "float64")
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    check_forward(prob, "float64")


def test_tiles_outside_every_window_are_never_read(shim_backend) -> None:
    """Key tiles no row of a query tile can see are skipped, not masked: NaN keys there
    leave the output finite. (The array-API direct path adds -inf to the NaN score and
    gives NaN; the blocked path skips as the kernel does. docs/gpu.rst.)"""
    shim_backend()
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, n, 8)) for n in (16, 96, 96))
    k[:, :, 64:] = np.nan  # the third key tile; rows 0..15 see keys <= 15 (causal)
    out, lse = flash_attention(q, k, v, batch_shape=(1,), scale=0.5, causal=True,
                               compute_dtype="float64", need_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    ref = Problem(q, k[:, :, :64], v[:, :, :64], 0.5, dict(causal=True))
    ref_out, ref_lse, _ = ref.reference()
    tol_out, tol_lse = forward_tolerance(ref, "float64")
    assert mismatch("out", out, ref_out, tol_out) is None
    assert mismatch("lse", lse, ref_lse, tol_lse) is None


# ------------------------------------------------------------------ AddressSanitizer
def _sanitized(names):
    def factory(**kwargs):
        return ShimModule(kwargs["code"], options=kwargs["options"], name_expressions=names,
                          sanitize=True, schedule="random", seed=1)
    return factory


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_with_options_are_clean_under_address_sanitizer(asan, dtype) -> None:
    """Every operand read (compact masks through zero strides, the second pass of the
    masked-row policy, the backward's three loads per query tile) stays in bounds."""
    prob = _bucket_problem(16, 24, seed=7)
    fwd = [_launch.flash_config(dtype, 24).name_expression]
    bwd = [_launch.backward_config(k, dtype, 16, 24).name_expression
           for k in ("flash_bwd_dq", "flash_bwd_dkdv")]

    def factory(**kwargs):
        names = fwd if kwargs["name_expressions"][0].startswith("flash_fwd") else bwd
        return _sanitized(names)(**kwargs)

    with _modules.module_factory(factory, max_dynamic_smem=MAX_DYNAMIC_SMEM):
        check_forward(prob, dtype)
        check_backward(prob, dtype, seed=8)
