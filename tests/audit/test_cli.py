"""The ``refattn check`` command and the audit behind it."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refattn import _audit, _cli

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "tests.helpers.example_kernels"


def _run(argv, capsys):
    status = _cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_python_dash_m_runs_the_default_check(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "refattn", "check", "--examples", "2", "--json", str(report)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "group" in out and "verdict" in out
    for group in _audit.CONVENTIONS["torch"].groups:
        assert group in out
    assert re.search(r"\d+ rows \(group x backend x dtype\): \d+ ok, 0 FAIL, ", out)
    data = json.loads(report.read_text())
    assert {c["backend"] for c in data["cells"]} == {"math", "default"}
    assert {c["dtype"] for c in data["cells"]} == {"float64", "float32", "bfloat16"}
    assert data["summary"]["semantic"] == data["summary"]["precision"] == 0
    assert data["summary"]["rows"]["fail"] == 0
    # The progress bar goes to a terminal only: a pipe gets none.
    assert "[#" not in result.stderr


def test_known_deviations_of_the_fused_cpu_path_are_reported(capsys):
    status, out, _ = _run(["check", "--examples", "6", "--group", "mask + causal",
                           "--group", "NaN query rows", "--dtype", "float64"], capsys)
    assert status == 0
    assert re.search(r"known deviation \(\d+ of 6 cases[^)]*\): explicit mask ANDed with "
                     r"is_causal", out)
    strict, _, _ = _run(["check", "--examples", "6", "--group", "mask + causal",
                         "--dtype", "float64", "--strict"], capsys)
    assert strict == 1


def test_a_correct_user_kernel_passes_in_every_dtype(capsys, tmp_path):
    report = tmp_path / "r.json"
    status, out, _ = _run(["check", f"{KERNELS}:correct", "--examples", "3",
                           "--dtype", "float64,float32,float16,bfloat16", "--group", "plain",
                           "--group", "bool mask", "--group", "fully masked rows",
                           "--group", "causal", "--group", "GQA", "--json", str(report)], capsys)
    assert status == 0, out
    data = json.loads(report.read_text())
    assert data["library"] == "numpy" and data["convention"] == "torch"
    assert {c["dtype"] for c in data["cells"]} == {"float64", "float32", "float16", "bfloat16"}
    assert all(c["verdict"] == "ok" and c["cases"] == 3 for c in data["cells"])


@pytest.mark.parametrize("kernel,group,dtype,why", [
    ("wrong_scale", "plain", "float32", "gross disagreement"),
    ("off_by_one_causal", "causal", "bfloat16", "gross disagreement"),
    ("ignores_mask", "bool mask", "float64", "the mask is ignored"),
    ("nan_for_masked_rows", "fully masked rows", "float32", "wrong value on fully masked"),
])
def test_broken_user_kernels_fail_with_a_shrunk_runnable_repro(kernel, group, dtype, why,
                                                                capsys, tmp_path):
    report = tmp_path / "r.json"
    status, out, _ = _run(["check", f"{KERNELS}:{kernel}", "--examples", "4", "--group", group,
                           "--dtype", dtype, "--json", str(report)], capsys)
    assert status == 1
    assert "FAIL (semantic)" in out and why in out
    cell = json.loads(report.read_text())["cells"][0]
    shrunk = [r for r in cell["results"] if r["snippet"]]
    assert len(shrunk) == 1
    # The repro prints the implementation's output and the oracle's: they disagree.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        with np.errstate(all="ignore"):
            exec(compile(shrunk[0]["snippet"], "repro", "exec"), {"__name__": "__repro__"})
    lines = dict(line.split(": ", 1) for line in buffer.getvalue().splitlines())
    actual = np.array(eval(lines["actual"], {"nan": np.nan}))  # noqa: S307 - our own output
    expected = np.array(eval(lines["oracle"], {"nan": np.nan}))  # noqa: S307
    assert actual.shape == expected.shape
    assert not np.allclose(actual, expected, equal_nan=True)
    # Shrunk: the repro's q is at most a few entries (a single query row suffices for
    # these bugs; the 4 drawn cases have up to 2 x 4 x 16 x 32).
    q_shape = [int(n) for n in re.match(r"q\(([^)]*)\)", shrunk[0]["case"]).group(1).split(",")]
    assert np.prod(q_shape) <= 8, shrunk[0]["case"]


def test_a_crashing_kernel_is_a_semantic_failure(capsys):
    status, out, _ = _run(["check", f"{KERNELS}:crashes", "--examples", "2", "--group",
                           "plain", "--dtype", "float32"], capsys)
    assert status == 1
    assert "raised RuntimeError('kernel exploded')" in out


def test_an_option_the_target_does_not_take_is_reported_unsupported(capsys):
    status, out, _ = _run(["check", f"{KERNELS}:no_gqa", "--examples", "2", "--group", "GQA",
                           "--group", "plain", "--dtype", "float32"], capsys)
    assert status == 0
    assert "unsupported (the target does not take it)" in out


def test_gradients_through_autograd(capsys, tmp_path):
    report = tmp_path / "r.json"
    status, out, _ = _run(["check", f"{KERNELS}:correct", "--library", "torch", "--grad",
                           "--examples", "3", "--group", "plain", "--group", "causal",
                           "--dtype", "float64,bfloat16", "--json", str(report)], capsys)
    assert status == 0, out
    results = [r for c in json.loads(report.read_text())["cells"] for r in c["results"]]
    assert all(set(r["errors"]) == {"out", "dq", "dk", "dv"} for r in results)
    status, out, _ = _run(["check", f"{KERNELS}:detached_normaliser", "--library", "torch",
                           "--grad", "--examples", "3", "--group", "plain",
                           "--dtype", "float32"], capsys)
    # The forward is right: what fails is a gradient.
    assert status == 1
    assert "FAIL (semantic)" in out and re.search(r"\(d[qkv]: error \S+ > budget", out)


def test_the_torch_target_with_gradients_on_a_few_groups(capsys):
    status, out, _ = _run(["check", "--grad", "--examples", "2", "--group", "plain",
                           "--group", "dropout", "--dtype", "float32"], capsys)
    assert status == 0, out
    # The default backend draws its own dropout: checked on a probe, with gradients.
    assert "skipped" not in out


def test_flash_convention_passes_refattns_own_front_end_and_catches_top_left(capsys):
    # The dropout group reads the kernel's own keep-mask back from S_dmask's signs.
    status, out, _ = _run(["check", f"{KERNELS}:flash_drawing_dropout",
                           "--convention", "flash", "--examples", "3",
                           "--dtype", "float64,float32"], capsys)
    assert status == 0, out
    for group in _audit.CONVENTIONS["flash"].groups:
        assert group in out
    assert "skipped" not in out
    status, out, _ = _run(["check", f"{KERNELS}:flash_top_left", "--convention", "flash",
                           "--examples", "6", "--group", "causal", "--dtype", "float32"],
                          capsys)
    assert status == 1
    assert "wrong alignment: matches the top_left causal/window alignment" in out


def test_jax_convention_passes_refattns_own_front_end(capsys):
    # NumPy arrays: the front end's float64 too (JAX arrays, inferred from its code, are
    # float32 without x64; test_cli_start checks that inference).
    status, out, _ = _run(["check", "refattn.compat.jax:dot_product_attention",
                           "--convention", "jax", "--library", "numpy", "--examples", "3",
                           "--dtype", "float64,float32"], capsys)
    assert status == 0, out
    assert "fully masked rows" in out


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "errors.png"
    status, _, _ = _run(["check", f"{KERNELS}:correct", "--examples", "2", "--group", "plain",
                         "--group", "causal", "--dtype", "float32,bfloat16", "--plot",
                         str(path)], capsys)
    assert status == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    argv = ["check", f"{KERNELS}:correct", "--examples", "1", "--group", "plain",
            "--dtype", "float32,float64"]
    _cli.main(argv)
    assert "[" not in capsys.readouterr().err
    # rich, where installed, draws its own bar; the plain one is what this checks.
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    # Drawn from the start here: the two cells end long before the usual delay.
    monkeypatch.setattr(_cli._Progress, "delay", 0.0)
    _cli.main(argv)
    assert "2/2 plain" in terminal.getvalue() and "[####" in terminal.getvalue()


def test_cases_are_deterministic_in_the_seed():
    a, b = _audit.make_case("GQA", 5, 3), _audit.make_case("GQA", 5, 3)
    np.testing.assert_array_equal(a.q, b.q)
    c = _audit.make_case("GQA", 6, 3)
    assert a.q.shape != c.q.shape or not np.array_equal(a.q, c.q)


def test_shrink_cuts_dimensions_while_the_failure_holds():
    case = _audit.make_case("causal", 0, 0)
    small = _audit.shrink(case, lambda c: c.q.shape[-2] >= 3 and c.k.shape[-2] >= 2)
    assert small.q.shape[-2] == 3 and small.k.shape[-2] == 2
    assert small.q.shape[0] == 1 and small.q.shape[1] == 1


@pytest.mark.parametrize("argv,message", [
    (["check", "--dtype", "float8"], "--dtype must list some of"),
    (["check", "--examples", "0"], "--examples must be at least 1"),
    (["check", "--group", "nope"], "unknown --group 'nope'"),
    (["check", "--group", "softcap"], "unknown --group 'softcap' for the torch convention"),
    (["check", "--convention", "flex", "--group", "window", f"{KERNELS}:correct"],
     "unknown --group 'window' for the flex convention"),
    (["check", "--convention", "flash"], "TARGET torch is torch's SDPA"),
    (["check", f"{KERNELS}:correct", "--grad"], "--grad differentiates through autograd"),
    (["check", "nocolon"], "TARGET must be 'torch' or 'package.module:function'"),
    (["check", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["check", f"{KERNELS}:nothing"], "has no attribute 'nothing'"),
    (["check", f"{KERNELS}:math"], "is not callable"),
])
def test_bad_arguments_exit_with_status_two(argv, message, capsys):
    status, _, err = _run(argv, capsys)
    assert status == 2
    assert message in err


def test_flex_convention_audits_a_flex_attention_function(capsys):
    # refattn's own flex front-end is a correct flex-convention kernel.
    ok = _cli.main(["check", "refattn.compat.flex:flex_attention", "--convention", "flex",
                    "--library", "torch", "--examples", "3", "--dtype", "float64,float32"])
    assert ok == 0, capsys.readouterr().out
    capsys.readouterr()
    broken = _cli.main(["check", f"{KERNELS}:flex_ignores_block_mask", "--convention", "flex",
                        "--library", "numpy", "--examples", "3", "--dtype", "float64",
                        "--group", "bool mask", "--group", "causal"])
    out = capsys.readouterr().out
    assert broken == 1
    assert "FAIL (semantic)" in out
