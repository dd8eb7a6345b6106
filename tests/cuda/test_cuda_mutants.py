"""Broken copies of the forward kernel must fail: the checks can catch the bugs they target.

Each mutant edits the real source in one place. A missing barrier or a wrong bound
shows up as a mismatch with the reference, a misplaced warp intrinsic or barrier as a
SyncError from the shim, and an out-of-bounds read that changes no result only under
AddressSanitizer. Every edit must match exactly once, so a refactor of the kernel that
removes the targeted code fails here loudly instead of testing nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn._cuda import _launch, _modules, flash_forward
from refattn._cuda_shim import SanitizerError, ShimModule, SyncError

pytestmark = pytest.mark.usefixtures("gxx")

SOURCE = _modules.kernel_source("flash_fwd.cu")
# Two key tiles (the second partial), query tiles that end mid-block, GQA on v only.
SHAPE = (1, 2, 1, 2, 33, 70, 16, 24)


def mutate(old: str, new: str) -> str:
    assert SOURCE.count(old) == 1, f"mutation target not found exactly once: {old!r}"
    return SOURCE.replace(old, new)


BARRIER_MUTANTS = {
    # The previous tile's values are still being read when the next keys land.
    "no barrier before loading keys": mutate(
        "        __syncthreads();\n        for (int i = tid; i < BLOCK_N * E; i += THREADS) {",
        "        for (int i = tid; i < BLOCK_N * E; i += THREADS) {",
    ),
    "no barrier after loading keys": mutate(
        "        }\n        __syncthreads();\n\n        const long long n = n0 + lane;",
        "        }\n\n        const long long n = n0 + lane;",
    ),
    "no barrier before loading values": mutate(
        "        // Every warp is done with the keys before the values replace them.\n"
        "        __syncthreads();\n",
        "",
    ),
    "no barrier after loading values": mutate(
        "        __syncthreads();\n\n        const int n_valid",
        "\n        const int n_valid",
    ),
}

WRONG_RESULT_MUTANTS = {
    # Off by one in the causal tile skip: the block's last row loses its last key when
    # that key starts a new tile (row 32 of L = S = 33 style shapes).
    "causal tile bound off by one": (
        mutate("row_hi + shift + win_right + 1;", "row_hi + shift + win_right;"),
        (True, "top_left"),
    ),
    "last partial tile one key short": (
        mutate("        const int n_valid = (S - n0 < BLOCK_N) ? (int)(S - n0) : BLOCK_N;\n"
               "#pragma unroll\n        for (int r = 0; r < ROWS; ++r) {\n"
               "            const T m_new",
               "        const int n_valid = (S - n0 < BLOCK_N) ? (int)(S - n0 - 1) : BLOCK_N;\n"
               "#pragma unroll\n        for (int r = 0; r < ROWS; ++r) {\n"
               "            const T m_new"),
        (False, "top_left"),
    ),
    "causal mask off by one": (
        mutate("(win_right < 0 || offset <= win_right)", "(win_right < 0 || offset < win_right)"),
        (True, "bottom_right"),
    ),
    "butterfly sum skips a level": (
        mutate("        x += __shfl_xor_sync(0xffffffffu, x, offset);",
               "        if (offset < 16) x += __shfl_xor_sync(0xffffffffu, x, offset);"),
        (False, "top_left"),
    ),
}

SYNC_MUTANTS = {
    # Lane 31 skips the broadcast: the full-mask shuffle can never complete.
    "shuffle in lane-divergent code": mutate(
        "const T p_j = __shfl_sync(0xffffffffu, p, j);",
        "const T p_j = (lane < 31) ? __shfl_sync(0xffffffffu, p, j) : p;",
    ),
    # Warps whose rows all lie past L skip the barrier: a partial barrier.
    "barrier skipped by idle warps": mutate(
        "        __syncthreads();\n\n        const int n_valid",
        "        if (m0 + warp * ROWS < L) __syncthreads();\n\n        const int n_valid",
    ),
}

OOB_MUTANTS = {
    # Reads row L of q: past the end for the last (batch, head); no output depends on it.
    "query tile reads one row too many": (
        mutate("(m0 + r < L) ? q_bh", "(m0 + r <= L) ? q_bh"),
        (False, "top_left"),
    ),
    # Reads key S: past the end for the last key head; its score is masked anyway.
    "key tile reads one key too many": (
        mutate("(n0 + r < S) ? k_bh", "(n0 + r <= S) ? k_bh"),
        (False, "top_left"),
    ),
}


def launch(code: str, dtype: str, causal: bool, alignment: str, **shim: object):
    """Run `code` through flash_forward on the shim; return (out, lse, q, k, v)."""
    name = _launch.flash_config(dtype, SHAPE[7]).name_expression
    module = ShimModule(code, name_expressions=[name], **shim)
    B, H, K, Kv, L, S, E, Ev = SHAPE
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, K, S, E)).astype(dtype)
    v = rng.standard_normal((B, Kv, S, Ev)).astype(dtype)
    with _modules.module_factory(lambda **_: module, max_dynamic_smem=232448):
        out, lse = flash_forward(q, k, v, scale=0.25, causal=causal, alignment=alignment,
                                 compute_dtype=dtype, need_lse=True)
    return out, lse, q, k, v


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_unmutated_kernel_passes_the_same_checks(mismatch, dtype: str) -> None:
    for causal, alignment in [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]:
        for schedule in ("forward", "reverse"):
            out, lse, q, k, v = launch(SOURCE, dtype, causal, alignment, schedule=schedule)
            assert mismatch(out, lse, q, k, v, scale=0.25, causal=causal,
                            alignment=alignment) is None


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("mutant", sorted(BARRIER_MUTANTS))
def test_missing_barrier_is_caught(mismatch, mutant: str, schedule: str) -> None:
    # With one warp running ahead until a barrier stops it, whichever warp reads shared
    # memory too early reads NaN (never written) or the other tile's data.
    out, lse, q, k, v = launch(BARRIER_MUTANTS[mutant], "float64", False, "top_left",
                               schedule=schedule)
    assert mismatch(out, lse, q, k, v, scale=0.25, causal=False,
                    alignment="top_left") is not None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mutant", sorted(WRONG_RESULT_MUTANTS))
def test_wrong_bound_is_caught(mismatch, mutant: str, dtype: str) -> None:
    code, (causal, alignment) = WRONG_RESULT_MUTANTS[mutant]
    out, lse, q, k, v = launch(code, dtype, causal, alignment)
    assert mismatch(out, lse, q, k, v, scale=0.25, causal=causal,
                    alignment=alignment) is not None


@pytest.mark.parametrize("mutant", sorted(SYNC_MUTANTS))
def test_misplaced_synchronisation_is_reported(mutant: str) -> None:
    with pytest.raises(SyncError):
        launch(SYNC_MUTANTS[mutant], "float64", False, "top_left")


@pytest.mark.parametrize("mutant", sorted(OOB_MUTANTS))
def test_out_of_bounds_read_needs_the_sanitizer(asan, mismatch, mutant: str) -> None:
    code, (causal, alignment) = OOB_MUTANTS[mutant]
    # The plain run reads a neighbour's bytes and computes correct results anyway ...
    out, lse, q, k, v = launch(code, "float64", causal, alignment)
    assert mismatch(out, lse, q, k, v, scale=0.25, causal=causal, alignment=alignment) is None
    # ... so only AddressSanitizer, with each array in its own allocation, sees it.
    with pytest.raises(SanitizerError, match="heap-buffer-overflow"):
        launch(code, "float64", causal, alignment, sanitize=True)


# ------------------------------------------------------------------ forward options
from refattn._cuda import flash_attention, flash_attention_backward  # noqa: E402
from refattn._cuda_shim import MAX_DYNAMIC_SMEM  # noqa: E402
from tests.helpers.cuda_bounds import (  # noqa: E402
    Problem,
    backward_tolerance,
    forward_tolerance,
    mismatch,
)

BWD_SOURCE = _modules.kernel_source("flash_bwd.cu")


def mutate_bwd(old: str, new: str) -> str:
    assert BWD_SOURCE.count(old) == 1, f"mutation target not found exactly once: {old!r}"
    return BWD_SOURCE.replace(old, new)


def options_problem(masked_rows: str = "uniform") -> Problem:
    """Every forward option at once, in float64: a (L, S) mask with one fully masked
    row, a per-head (H, 1, S) bias, a bottom-right window (20, 5) (shift 37: row i sees
    keys i + 17 .. i + 42, so the first key tile is partly visible), dropout, softcap."""
    rng = np.random.default_rng(3)
    B, H, K, Kv, L, S, E, Ev = SHAPE
    mask = rng.random((L, S)) < 0.8
    mask[5] = False
    options = dict(mask=mask, bias=rng.standard_normal((H, 1, S)), window=(20, 5),
                   alignment="bottom_right", dropout_p=0.25,
                   dropout_mask=rng.random((B, H, L, S)) >= 0.25, masked_rows=masked_rows,
                   softcap=2.0)
    return Problem(rng.standard_normal((B, H, L, E)), rng.standard_normal((B, K, S, E)),
                   rng.standard_normal((B, Kv, S, Ev)), 0.25, options)


def poisoned_problem() -> Problem:
    """A +inf bias under a False mask entry: +inf + -inf makes row 1 NaN."""
    rng = np.random.default_rng(4)
    bias = np.zeros((9, 12))
    bias[1, 2] = np.inf
    mask = np.ones((9, 12), bool)
    mask[1, 2] = False
    return Problem(rng.standard_normal((1, 2, 9, 16)), rng.standard_normal((1, 1, 12, 16)),
                   rng.standard_normal((1, 2, 12, 24)), 0.25, dict(mask=mask, bias=bias))


def forward_problem(code: str, prob: Problem, **shim: object) -> str | None:
    """Run the forward source `code` on `prob`; why it disagrees with the reference."""
    name = _launch.flash_config("float64", prob.v.shape[-1]).name_expression
    module = ShimModule(code, name_expressions=[name], **shim)
    with _modules.module_factory(lambda **_: module, max_dynamic_smem=MAX_DYNAMIC_SMEM):
        out, lse = flash_attention(prob.q, prob.k, prob.v, batch_shape=prob.q.shape[:1],
                                   scale=prob.scale, compute_dtype="float64", need_lse=True,
                                   **prob.options)
    with np.errstate(invalid="ignore"):
        ref_out, ref_lse, _ = prob.reference()
        tol_out, tol_lse = forward_tolerance(prob, "float64")
    return mismatch("out", out, ref_out, tol_out) or mismatch("lse", lse, ref_lse, tol_lse)


OPTION_MUTANTS = {
    # Every head reads head 0's bias (the head stride dropped from the operand index).
    "bias read for head 0 only": (
        mutate("return base[b * sb + h * sh + i * sl + j * ss];",
               "return base[b * sb + i * sl + j * ss];"), options_problem),
    "window's left edge off by one": (
        mutate("offset >= -win_left", "offset > -win_left"), options_problem),
    # The tile skip ignores the left edge: keys the first rows see are never visited.
    "left tile skip too far": (
        mutate("first = row_lo + shift - win_left;", "first = row_lo + shift;"),
        options_problem),
    "dropout's 1 / (1 - p) missing": (
        mutate("acc[r][c] / l_run[r] * keep_scale", "acc[r][c] / l_run[r]"), options_problem),
    # Fully masked rows keep 0 under "uniform" / "nan" instead of weighing every key.
    "masked-row pass skipped": (
        mutate("if (masked_rows != FLASH_ROWS_ZERO && S > 0) {", "if (false) {"),
        options_problem),
    "softcap loses its scale c": (
        mutate("            s = *cap * softcap;", "            s = *cap;"), options_problem),
    # Selecting -inf instead of adding it hides the NaN a masked +inf score must give.
    "mask selects -inf instead of adding it": (
        mutate("if ((flags & FLASH_MASK) && !mask.at(b, h, i, j)) s += NEG_INF;",
               "if ((flags & FLASH_MASK) && !mask.at(b, h, i, j)) s = NEG_INF;"),
        poisoned_problem),
}


@pytest.mark.parametrize("problem", [options_problem, poisoned_problem,
                                     lambda: options_problem("nan")])
def test_unmutated_kernel_passes_the_option_checks(problem) -> None:
    assert forward_problem(SOURCE, problem(), schedule="reverse") is None


@pytest.mark.parametrize("mutant", sorted(OPTION_MUTANTS))
def test_wrong_option_handling_is_caught(mutant: str) -> None:
    code, problem = OPTION_MUTANTS[mutant]
    assert forward_problem(code, problem()) is not None


# ------------------------------------------------------------------ backward
def backward_problem(masked_rows: str) -> Problem:
    """GQA with two query heads per key head, bottom-right with L > S (rows 0..4 see
    no key: fully masked), a window, a padding mask, a per-head bias, dropout and
    softcap. 45 rows end mid-tile (the dK/dV kernel reads 32 query rows at a time)."""
    rng = np.random.default_rng(5)
    B, H, K, Kv, L, S, E, Ev = 1, 4, 2, 1, 45, 40, 16, 24
    options = dict(mask=np.arange(S) < 37, bias=rng.standard_normal((H, 1, S)),
                   window=(12, 0), alignment="bottom_right", dropout_p=0.25,
                   dropout_mask=rng.random((B, H, L, S)) >= 0.25, masked_rows=masked_rows,
                   softcap=4.0)
    return Problem(rng.standard_normal((B, H, L, E)), rng.standard_normal((B, K, S, E)),
                   rng.standard_normal((B, Kv, S, Ev)), 0.25, options)


def backward_run(code: str, prob: Problem, **shim: object) -> str | None:
    """Run the backward source `code` (the forward unmutated) on `prob`; why its
    gradients disagree with the reference, or None."""
    E, Ev = prob.q.shape[-1], prob.v.shape[-1]
    names = [_launch.backward_config(k, "float64", E, Ev).name_expression
             for k in ("flash_bwd_dq", "flash_bwd_dkdv")]
    bwd = ShimModule(code, name_expressions=names, **shim)
    fwd = ShimModule(SOURCE, name_expressions=[_launch.flash_config("float64", Ev)
                                               .name_expression])

    def factory(**kwargs):
        return fwd if kwargs["name_expressions"][0].startswith("flash_fwd") else bwd

    dout = np.random.default_rng(6).standard_normal((*prob.q.shape[:3], Ev))
    with _modules.module_factory(factory, max_dynamic_smem=MAX_DYNAMIC_SMEM):
        kw = dict(prob.options, scale=prob.scale, compute_dtype="float64",
                  batch_shape=prob.q.shape[:1])
        out, lse = flash_attention(prob.q, prob.k, prob.v, need_lse=True, **kw)
        dq, dk, dv, dbias = flash_attention_backward(dout, prob.q, prob.k, prob.v, out, lse,
                                                     need_dbias=True, **kw)
    _, _, ref = prob.reference(dout)
    tols = backward_tolerance(prob, dout, "float64")
    dbias = dbias.sum(axis=(0, 2), keepdims=True)[0]  # to the bias's (H, 1, S)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), ref, tols,
                             strict=True):
        problem = mismatch(name, g, w, t)
        if problem is not None:
            return problem
    return None


BACKWARD_MUTANTS = {
    # The output-gradient rows overwrite the query rows while other warps still score.
    "dK/dV: no barrier before loading dO": (
        mutate_bwd("            __syncthreads();\n"
                   "            for (int i = tid; i < BLOCK_M * Ev; i += THREADS) {",
                   "            for (int i = tid; i < BLOCK_M * Ev; i += THREADS) {"),
        "uniform"),
    # A key head's gradient written after its first query head: the group's sum is lost.
    "dK written before the group is summed": (
        mutate_bwd("if (h % group_k == group_k - 1) {", "if (h % group_k == 0) {"), "uniform"),
    "softcap's slope missing": (
        mutate_bwd("g.ds_raw = (flags & FLASH_SOFTCAP) ? g.ds * (T(1) - cap * cap) : g.ds;",
                   "g.ds_raw = g.ds;"), "uniform"),
    "dropout not applied to dP": (
        mutate_bwd("dpd = kept ? dp * keep_scale : T(0);", "dpd = dp;"), "uniform"),
    # A fully masked row's dS is 0 under "zero" / "uniform" (its weights are constants).
    "dS of a fully masked row not zeroed": (
        mutate_bwd("    if (empty && masked_rows != FLASH_ROWS_NAN) g.ds = T(0);\n", ""),
        "uniform"),
    # Under "nan" such a row's dQ is NaN, though no key is in its window.
    "dQ: nan rows stay inside the window": (
        mutate_bwd("        n_begin = 0;\n        n_end = S;\n", ""), "nan"),
    # Under "uniform" such a row passes dO / S to every value, however far away.
    "dK/dV: query tiles outside the window always skipped": (
        mutate_bwd("if (!__syncthreads_or(row < L && row_lse == NEG_INF)) continue;",
                   "if (!__syncthreads_or(false)) continue;"), "uniform"),
}


@pytest.mark.parametrize("masked_rows", ["uniform", "nan"])
def test_unmutated_backward_passes_the_same_checks(masked_rows: str) -> None:
    assert backward_run(BWD_SOURCE, backward_problem(masked_rows), schedule="forward") is None


@pytest.mark.parametrize("mutant", sorted(BACKWARD_MUTANTS))
def test_backward_mutant_is_caught(mutant: str) -> None:
    code, masked_rows = BACKWARD_MUTANTS[mutant]
    # The forward schedule lets one warp run ahead to the next barrier (see above).
    assert backward_run(code, backward_problem(masked_rows), schedule="forward") is not None


def test_backward_shuffle_in_divergent_code_is_reported() -> None:
    code = mutate_bwd("const T p_i = __shfl_sync(0xffffffffu, p_drop, i);",
                      "const T p_i = (lane < 31) ? __shfl_sync(0xffffffffu, p_drop, i) "
                      ": p_drop;")
    with pytest.raises(SyncError):
        backward_run(code, backward_problem("zero"))


def test_backward_out_of_bounds_read_needs_the_sanitizer(asan) -> None:
    # Reads output-gradient row L (45) of the last head: past the end; lane 13 of the
    # last query tile holds it, and rows past L weigh nothing.
    code = mutate_bwd("row_buf[r * row_stride + e] = (m0 + r < L) ? do_bh",
                      "row_buf[r * row_stride + e] = (m0 + r <= L) ? do_bh")
    assert backward_run(code, backward_problem("zero")) is None
    with pytest.raises(SanitizerError, match="heap-buffer-overflow"):
        backward_run(code, backward_problem("zero"), sanitize=True)
