"""The mutation study: the documented test catches plausible kernel bugs quickly.

Each mutant of tests/helpers/mutant_kernels.py carries one bug people write. The
documented test of docs/testing.rst (its strategy call, its body, its assertion) must
catch it within 25 examples, the CI profile's count, drawn deterministically
(derandomized, no shrinking). Caught means: the forward test fails in float64 *and* in
float32 (float64's budget is tight and data-derived; float32's is the baseline rule).
Only ``float64_in_float32`` is exempt in float32, where it computes exactly as the
correct kernel does. The correct kernel must pass the same tests over more examples
(four and two times as many), so that the study is not won by a test that fails
everything. docs/testing.rst records
how many examples each mutant took (``benchmarks/edge_study.py``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from tests.helpers.mutant_kernels import MUTANTS, examples_to_catch  # noqa: E402

BUDGET = 25
# Identical to the correct kernel wherever the correct one computes in float32.
FLOAT64_ONLY = {"float64_in_float32"}


@pytest.fixture(autouse=True)
def _repro_files_in_tmp(tmp_path, monkeypatch):
    # Every caught mutant makes the assertion save a repro file; keep them out of the
    # shared temporary directory.
    monkeypatch.setenv("REFATTN_REPRO_DIR", str(tmp_path))


def test_there_are_at_least_twenty_mutants():
    assert len(MUTANTS) >= 20


@pytest.mark.parametrize("bug", sorted(MUTANTS))
def test_the_documented_test_catches_the_mutant(bug):
    dtypes = ["float64"] if bug in FLOAT64_ONLY else ["float64", "float32"]
    for dtype in dtypes:
        n = examples_to_catch(bug, dtype, max_examples=BUDGET)
        assert n is not None, f"{bug} ({MUTANTS[bug]}) escaped {BUDGET} {dtype} examples"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_float64_only_mutant_is_the_correct_kernel_in_low_precision(dtype):
    # Why it is exempt: in these dtypes both compute in float32, bit for bit.
    assert examples_to_catch("float64_in_float32", dtype, max_examples=BUDGET) is None


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_the_correct_kernel_passes_the_forward_test(dtype):
    assert examples_to_catch(None, dtype, max_examples=4 * BUDGET) is None


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_the_correct_kernel_passes_the_gradient_test(dtype):
    assert examples_to_catch(None, dtype, "gradients", max_examples=2 * BUDGET) is None


def test_an_unknown_bug_is_refused():
    from tests.helpers.mutant_kernels import attention

    with pytest.raises(ValueError, match="unknown bug"):
        attention(None, None, None, bug="typo")
