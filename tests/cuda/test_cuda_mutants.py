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
        "        }\n        __syncthreads();\n\n        const int n = n0 + lane;",
        "        }\n\n        const int n = n0 + lane;",
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
        mutate("last_row + causal_offset + 1;", "last_row + causal_offset;"),
        (True, "top_left"),
    ),
    "last partial tile one key short": (
        mutate("? (S - n0) : BLOCK_N;", "? (S - n0 - 1) : BLOCK_N;"),
        (False, "top_left"),
    ),
    "causal mask off by one": (
        mutate("(long long)n <= (long long)(m0 + row_local) + causal_offset",
               "(long long)n < (long long)(m0 + row_local) + causal_offset"),
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
