"""Dropout a target draws itself: checked on a probe, not skipped (refattn._audit.dropout)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from refattn import _cli
from refattn._audit import dropout, make_case
from refattn._audit.conventions import CONVENTIONS
from refattn._audit.judging import _oracle

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

KERNELS = "tests.helpers.audit_kernels"


def _check(argv, capsys, tmp_path):
    report = tmp_path / "report.json"
    status = _cli.main(["check", *argv, "--group", "dropout", "--json", str(report)])
    out = capsys.readouterr().out
    return status, out, json.loads(report.read_text())["cells"]


def test_torchs_default_backend_is_checked_not_skipped(capsys, tmp_path):
    status, out, cells = _check(["--examples", "4", "--dtype", "float64,float32"], capsys,
                                tmp_path)
    assert status == 0, out
    for cell in cells:
        assert cell["verdict"] == "ok" and cell["cases"] == 4
        assert all(r["errors"] for r in cell["results"])
    default = [r for c in cells if c["backend"] == "default" for r in c["results"]]
    # Judged on the probe: 16 queries and keys.
    assert all("q(" in r["case"] and ", 16, " in r["case"] for r in default)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_correct_dropout_passes(library, capsys, tmp_path):
    # NumPy: an unseeded generator of the kernel's own; torch: F.dropout.
    status, out, cells = _check([f"{KERNELS}:dropout_correct", "--library", library,
                                 "--examples", "10", "--dtype", "float64,float32,bfloat16"],
                                capsys, tmp_path)
    assert status == 0, out
    assert all(c["verdict"] == "ok" for c in cells)


def test_ignoring_dropout_p_fails_by_name(capsys, tmp_path):
    status, out, cells = _check([f"{KERNELS}:dropout_ignored", "--examples", "3",
                                 "--dtype", "float32"], capsys, tmp_path)
    assert status == 1
    (cell,) = cells
    assert cell["verdict"] == "FAIL (semantic): 3 of 3 cases"
    assert cell["worst_note"] == "dropout_p is ignored"
    assert all(r["detail"].startswith("dropout_p is ignored") for r in cell["results"])


def test_refusing_dropout_is_not_a_failure(capsys, tmp_path):
    status, out, cells = _check([f"{KERNELS}:dropout_refused", "--examples", "2",
                                 "--dtype", "float32"], capsys, tmp_path)
    assert status == 0, out
    assert cells[0]["verdict"] == "unsupported (not supported by the target)"


@pytest.mark.parametrize("kernel,why", [
    # Every call wrong by the factor 1 - p against its own keep-mask: over 10 budgets.
    ("dropout_not_rescaled", "gross disagreement"),
    # Every call right for its own keep-mask: the number kept gives it away.
    ("dropout_wrong_rate", "kept "),
])
def test_a_wrong_dropout_fails(kernel, why, capsys, tmp_path):
    status, out, cells = _check([f"{KERNELS}:{kernel}", "--examples", "6",
                                 "--dtype", "float64"], capsys, tmp_path)
    assert status == 1
    (cell,) = cells
    assert cell["verdict"].startswith("FAIL (semantic)")
    failed = [r for r in cell["results"] if r["status"] == "semantic"]
    assert any(r["detail"].startswith(why) for r in failed), failed


def _tails(n, q, k):
    # P(X < k) and P(X > k) for X ~ Binomial(n, q), in exact rational arithmetic.
    q = Fraction(q).limit_denominator(1000)
    pmf = [math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(n + 1)]
    return sum(pmf[:k]), sum(pmf[k + 1:])


@pytest.mark.parametrize("n,q", [(40, 0.5), (256, 0.9), (300, 0.1), (1024, 0.5)])
def test_the_binomial_interval_is_the_tightest_at_its_level(n, q):
    alpha = 1e-9
    lo, hi = dropout.binomial_interval(n, q, alpha)
    # Each tail outside the interval is within alpha / 2, and one step in is not.
    assert _tails(n, q, lo)[0] <= alpha / 2 < _tails(n, q, lo + 1)[0]
    assert _tails(n, q, hi)[1] <= alpha / 2 < _tails(n, q, hi - 1)[1]


def _probe_outputs(p, rescale_from, draws, seed):
    # A correct dropout on a probe's weights, drawn here; calls from `rescale_from` on
    # forget the 1 / (1 - p).
    case = dropout.probe_case(make_case("dropout", seed, 0))
    case.dropout_p = p
    inputs = CONVENTIONS["torch"].inputs(case, "float64")
    expected = _oracle(inputs, {})
    S = case.k.shape[-2]
    rng = np.random.default_rng(seed)
    outs = []
    for i in range(draws):
        keep = rng.random(expected.shape[:-1] + (S,)) >= p
        w = np.where(keep, expected[..., :S] / ((1 - p) if i < rescale_from else 1), 0.0)
        outs.append(w @ inputs["v"])
    return case, inputs, expected, outs


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_correct_draws_pass_every_check(p):
    for seed in range(20):
        case, inputs, expected, outs = _probe_outputs(p, dropout.DRAWS, dropout.DRAWS, seed)
        finding = dropout.judge_draws(case, inputs, expected, outs, "float64")
        assert finding.brief == "", finding.detail
        np.testing.assert_array_equal(finding.keep, outs[0][..., :16] != 0)


def test_a_mean_off_the_no_dropout_output_is_caught():
    # The first call right, the three others not rescaled: kept counts and the first
    # call's values pass, the mean (1 - 3p/4 times the output) does not. At p = 0.5 the
    # bias, 3/8 sum|oracle|, is about twice the Hoeffding bound on these probes; at p = 0.9
    # the bound (from the terms' range, 1 / (1 - p)) is too loose to see it.
    for seed in range(5):
        case, inputs, expected, outs = _probe_outputs(0.5, 1, dropout.DRAWS, seed)
        finding = dropout.judge_draws(case, inputs, expected, outs, "float64")
        assert finding.brief == "biased mean", finding.detail
        assert finding.detail.startswith("the mean of 4 calls with dropout_p=0.5 is not")
