"""What ``refattn check`` writes besides its verdicts: no leaked warnings, a plot that
says where it clips, progress only where and when it helps."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refattn import _cli
from refattn._audit import GroupReport, plot
from refattn._audit.judging import CaseResult

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "tests.helpers.example_kernels"


def test_torchs_dropout_hook_warning_never_reaches_the_output(tmp_path):
    # torch warns once per process when its math kernel is handed a keep-mask: a fresh
    # process is the only place the first (and only) warning can be seen.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "refattn", "check", "--group", "dropout", "--examples", "2",
         "--dtype", "float32"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dropout" in result.stdout
    assert "Dropout mask should only be used" not in result.stdout + result.stderr
    assert result.stderr == ""


def test_the_plot_marks_ratios_it_clips(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    drawn = []
    savefig = Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    # Ratios 2e6 (over the 1e4 ceiling), infinite (an error without a budget) and 0.5.
    results = [CaseResult("plain", "mine", "float32", "semantic", errors={"out": 2.0},
                          budgets={"out": 1e-6}),
               CaseResult("plain", "mine", "float32", "semantic", errors={"out": 1.0},
                          budgets={"out": 0.0}),
               CaseResult("plain", "mine", "float32", "ok", errors={"out": 1e-7},
                          budgets={"out": 2e-7})]
    report = GroupReport("plain", "mine", "float32", cases=3, results=results)
    assert plot([report], str(tmp_path / "p.png"), "test") == 2
    (fig,) = drawn
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert any("2 ratios above 1e4 drawn at 1e4" in t for t in texts), texts
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mine: above 1e4, drawn at 1e4 (2)" in labels
    # The clipped points sit at the ceiling, apart from the one drawn where it is.
    (over,) = [c for c in ax.collections if "above" in str(c.get_label())]
    assert over.get_offsets()[:, 1].tolist() == [1e4, 1e4]
    (kept,) = [c for c in ax.collections if c.get_label() == "mine"]
    assert kept.get_offsets()[:, 1].tolist() == [0.5]
    # Nothing clipped: nothing said about it.
    drawn.clear()
    assert plot([GroupReport("plain", "mine", "float32", cases=1, results=results[2:])],
                str(tmp_path / "q.png"), "test") == 0
    assert not any("above" in t.get_text() for t in drawn[0].findobj(matplotlib.text.Text))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_starts_only_after_two_seconds(monkeypatch):
    # The plain bar (rich, where installed, draws its own).
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    clock, terminal = _Clock(), _Terminal()
    progress = _cli._Progress(4, terminal, clock=clock)
    clock.now += 1.9
    progress(1, 4, "plain / mine / float32")
    assert terminal.getvalue() == ""
    clock.now += 0.2
    progress(2, 4, "causal / mine / float32")
    assert "2/4 causal / mine / float32" in terminal.getvalue()
    # Quiet, or not a terminal: never.
    for stream, quiet in ((_Terminal(), True), (io.StringIO(), False)):
        silent = _cli._Progress(4, stream, quiet=quiet, clock=clock)
        clock.now += 10
        silent(3, 4, "x")
        assert stream.getvalue() == ""


def test_quiet_leaves_stderr_empty_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setattr(_cli._Progress, "delay", 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = _cli.main(["check", f"{KERNELS}:correct", "--examples", "1", "--group", "plain",
                        "--dtype", "float32", "--quiet"])
    assert status == 0
    assert terminal.getvalue() == ""
    assert "plain" in capsys.readouterr().out
