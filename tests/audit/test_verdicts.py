"""The verdicts of ``refattn check``: never a false one, and a report that says what it
counts."""

from __future__ import annotations

import json
import re

import pytest

from refattn import _cli
from refattn._audit.judging import error_ratio

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

KERNELS = "tests.helpers.audit_kernels"
EXAMPLES = "tests.helpers.example_kernels"


def _run(argv, capsys, tmp_path):
    report = tmp_path / "report.json"
    status = _cli.main([*argv, "--json", str(report)])
    out = capsys.readouterr().out
    return status, out, json.loads(report.read_text())


def _table(out):
    # The table's rows: {(group, backend, dtype): (worst error / budget, verdict)},
    # split at the header's column starts.
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("group "))
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", lines[head])]
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip() or line.startswith("("):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[tuple(cells[:3])] = (cells[4], cells[5])
    return rows


# --- 1. cases the reference semantics refuses -----------------------------------------


def test_anding_mask_and_causal_is_the_documented_fused_path_behaviour(capsys, tmp_path):
    argv = ["check", f"{KERNELS}:anded_causal", "--group", "mask + causal", "--examples", "6",
            "--dtype", "float64,float32"]
    status, out, data = _run(argv, capsys, tmp_path)
    assert status == 0, out
    for cell in data["cells"]:
        assert {r["status"] for r in cell["results"]} == {"known"}
        assert cell["verdict"].startswith("known deviation (6 of 6 cases): explicit mask "
                                          "ANDed with is_causal, as torch's CPU fused path")
    strict, _, _ = _run([*argv, "--strict"], capsys, tmp_path)
    assert strict == 1


def test_refusing_what_the_oracle_refuses_is_right(capsys, tmp_path):
    status, out, data = _run(["check", f"{KERNELS}:refuses_mask_with_causal", "--group",
                              "mask + causal", "--examples", "4", "--dtype", "float32"],
                             capsys, tmp_path)
    assert status == 0, out
    (cell,) = data["cells"]
    assert cell["verdict"] == "ok (refused by both)"
    assert all(r["status"] == "ok" and r["detail"].startswith("refused by both")
               for r in cell["results"])
    assert "0 FAIL" in out


def test_anything_else_on_a_refused_case_is_a_semantic_failure(capsys, tmp_path):
    status, out, data = _run(["check", f"{KERNELS}:garbage_for_mask_with_causal", "--group",
                              "mask + causal", "--examples", "4", "--dtype", "float64"],
                             capsys, tmp_path)
    assert status == 1
    (cell,) = data["cells"]
    assert cell["verdict"].startswith("FAIL (semantic)")
    failed = [r for r in cell["results"] if r["status"] == "semantic"]
    assert failed
    for r in failed:
        assert r["detail"].startswith("the oracle refuses the case (attn_mask and "
                                      "is_causal=True given together) and ")
        assert "returned an output of shape" in r["detail"]


def test_torchs_default_backend_gets_the_same_verdict_as_a_user_function(capsys, tmp_path):
    # The documented alternative belongs to the convention, not to one backend: torch's
    # CPU default backend ANDs where it runs fused and refuses where it falls back to the
    # math path (unequal head dims), and neither is a failure.
    status, out, data = _run(["check", "--group", "mask + causal", "--examples", "6",
                              "--dtype", "float64"], capsys, tmp_path)
    assert status == 0, out
    default = next(c for c in data["cells"] if c["backend"] == "default")
    statuses = {r["status"] for r in default["results"]}
    assert statuses <= {"known", "ok"} and "known" in statuses


# --- 2. a FAIL row shows the failure --------------------------------------------------


def test_a_failing_row_shows_its_worst_failing_error(capsys, tmp_path):
    status, out, data = _run(["check", f"{EXAMPLES}:wrong_scale", "--group", "plain",
                              "--examples", "4", "--dtype", "float32"], capsys, tmp_path)
    assert status == 1
    (cell,) = data["cells"]
    failing = [r for r in cell["results"] if r["status"] == "semantic"]
    # The worst failing case, recomputed from the per-case errors and budgets.
    worst = max(failing, key=lambda r: max(error_ratio(e, r["budgets"][n])
                                           for n, e in r["errors"].items()))
    assert cell["worst_error"] == worst["errors"]["out"]
    assert cell["worst_budget"] == worst["budgets"]["out"]
    # A semantic failure is over ten budgets (judging.SEMANTIC_RATIO's rule).
    assert cell["worst_ratio"] > 10
    shown, verdict = _table(out)[("plain", f"{EXAMPLES}:wrong_scale", "float32")]
    assert shown == f"{worst['errors']['out']:.2e} / {worst['budgets']['out']:.2e}"
    assert verdict == f"FAIL (semantic): {len(failing)} of 4 cases"


def test_a_row_failing_without_an_error_shows_how(capsys, tmp_path):
    status, out, data = _run(["check", f"{EXAMPLES}:crashes", "--group", "plain",
                              "--examples", "2", "--dtype", "float32"], capsys, tmp_path)
    assert status == 1
    (cell,) = data["cells"]
    assert cell["worst_note"] == "raised RuntimeError"
    assert _table(out)[("plain", f"{EXAMPLES}:crashes", "float32")][0] == "raised RuntimeError"
    status, out, data = _run(["check", f"{EXAMPLES}:nan_for_masked_rows", "--group",
                              "fully masked rows", "--examples", "3", "--dtype", "float64"],
                             capsys, tmp_path)
    assert status == 1
    assert data["cells"][0]["worst_note"] == "NaN"


# --- 4. counts that add up ------------------------------------------------------------


def test_the_last_line_counts_rows_and_the_cases_behind_them(capsys, tmp_path):
    status, out, data = _run(["check", "--group", "mask + causal", "--group", "plain",
                              "--group", "NaN query rows", "--examples", "4",
                              "--dtype", "float64,float32"], capsys, tmp_path)
    assert status == 0
    cells = data["cells"]
    # Counted here from the verdicts and the per-case statuses of the JSON report.
    fail = sum(c["verdict"].startswith("FAIL") for c in cells)
    known_rows = sum(c["verdict"].startswith("known") for c in cells)
    known_cases = sum(r["status"] == "known" for c in cells for r in c["results"])
    assert known_rows and known_cases > known_rows
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        f"{len(cells)} rows (group x backend x dtype): {len(cells) - fail - known_rows} ok, "
        f"{fail} FAIL, {known_rows} with known deviations ({known_cases} cases)")
    assert data["summary"]["rows"] == {"total": len(cells), "ok": len(cells) - known_rows,
                                       "fail": 0, "known": known_rows, "not checked": 0}
    assert data["summary"]["known"] == known_cases


def test_rows_without_an_error_to_show_say_why(capsys, tmp_path):
    _, out, _ = _run(["check", "--group", "mask + causal", "--group", "empty sequences",
                      "--examples", "6", "--dtype", "float64"], capsys, tmp_path)
    rows = _table(out)
    assert rows[("mask + causal", "math", "float64")] == ("-", "ok (refused by both)")
    for (_, _, _), (shown, verdict) in rows.items():
        if shown == "-":
            assert verdict != "ok", rows
    empty = rows[("empty sequences", "math", "float64")][1]
    assert re.fullmatch(r"ok \(\d+ compared; \d+ with empty outputs\)", empty), empty
