"""The ``refattn check`` command and the audit behind it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refattn import _check, _cli

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def test_python_dash_m_runs_the_default_check(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "refattn", "check", "--examples", "3", "--json", str(report)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "group" in out and "verdict" in out
    for group in _check.GROUPS:
        assert group in out
    assert "0 unexplained disagreements" in out
    rows = json.loads(report.read_text())
    assert {r["backend"] for r in rows} == {"math", "default"}
    assert {r["dtype"] for r in rows} == {"float64", "float32"}


def test_known_deviations_of_the_fused_cpu_path_are_reported(capsys):
    status = _cli.main(["check", "--examples", "8", "--group", "mask + causal",
                        "--group", "NaN query rows", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert status == 0
    assert "known deviation: explicit mask ANDed with is_causal" in out
    strict = _cli.main(["check", "--examples", "8", "--group", "mask + causal",
                        "--dtype", "float64", "--strict"])
    assert strict == 1


def _broken(kind):
    def run(case, dtype):
        import torch.nn.functional as F

        a = _check._torch_args(case, dtype)
        scale = case.scale if case.scale is not None else case.query.shape[-1] ** -0.5
        if kind == "scale":
            scale = scale * 1.01
        mask = a["attn_mask"]
        if kind == "mask":
            mask = None
        return F.scaled_dot_product_attention(a["query"], a["key"], a["value"], attn_mask=mask,
                                              is_causal=case.is_causal, scale=scale,
                                              enable_gqa=case.enable_gqa)
    return run


@pytest.mark.parametrize("kind,group,status", [("scale", "plain", "precision"),
                                               ("mask", "fully masked rows", "precision")])
def test_a_broken_implementation_fails_the_audit(kind, group, status):
    reports = _check.audit([_check.Backend("broken", _broken(kind))], groups=[group],
                           dtypes=["float64"], examples=6, seed=0)
    assert reports[0].verdict.startswith("FAIL")
    assert any(f.status == status for f in reports[0].failures)


def test_an_exception_where_the_oracle_succeeds_is_semantic():
    def crash(case, dtype):
        raise RuntimeError("kernel exploded")

    rep = _check.audit([_check.Backend("crash", crash)], groups=["plain"], dtypes=["float64"],
                       examples=2, seed=0)[0]
    assert rep.verdict == "FAIL (semantic)"
    assert "kernel exploded" in rep.failures[0].detail


def test_cases_are_deterministic_in_the_seed():
    a, b = _check.make_case("GQA", 5, 3), _check.make_case("GQA", 5, 3)
    np.testing.assert_array_equal(a.query, b.query)
    assert not np.array_equal(a.query, _check.make_case("GQA", 6, 3).query) or \
        a.query.shape != _check.make_case("GQA", 6, 3).query.shape


@pytest.mark.parametrize("argv,message", [
    (["check", "--dtype", "float8"], "--dtype must list some of"),
    (["check", "--examples", "0"], "--examples must be at least 1"),
    (["check", "--group", "nope"], "unknown --group 'nope'"),
])
def test_bad_arguments_exit_with_status_two(argv, message, capsys):
    assert _cli.main(argv) == 2
    assert message in capsys.readouterr().err
