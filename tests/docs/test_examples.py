"""Every example a user might copy from README.md and the docs pages runs as copied.

Each python block is written to a file in an empty temporary directory and run there by a
fresh interpreter: nothing of the repository is on the path (its ``conftest.py``, its
``tests`` package, its working directory), only the installed refattn, as for a user who
pastes the block into a file of their own. Blocks written as interactive sessions
(``>>>``) are run through ``python -m doctest``, and the complete test file that
docs/testing.rst includes is run through pytest, with hypothesis's default settings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import cuda_available

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.rst"))]
# A run that takes this long has hung (the slowest block takes a few seconds).
TIMEOUT_S = 600

_MD_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
_RST_BLOCK = re.compile(r"\.\. code-block:: python\n\n((?:[ ]+.*\n|\n)+)")


@dataclass(frozen=True)
class Example:
    """One python block of a page."""

    page: str
    index: int
    code: str

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")

    @property
    def needs_gpu(self) -> bool:
        return "import cupy" in self.code

    @property
    def name(self) -> str:
        return f"{self.page}#{self.index}"


def _blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text()
    if page.endswith(".md"):
        return _MD_BLOCK.findall(text)
    return [textwrap.dedent(block) for block in _RST_BLOCK.findall(text)]


EXAMPLES = [Example(page, i, code) for page in PAGES for i, code in enumerate(_blocks(page))]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH could point back into the repository; a user's shell has its own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n" \
           f"--- stderr\n{proc.stderr[-6000:]}"


def test_every_python_block_is_found():
    # The extraction must see each block the page declares, or a block could drift
    # untested (an odd indentation, a missing blank line after the directive).
    for page in PAGES:
        text = (ROOT / page).read_text()
        declared = text.count("```python") if page.endswith(".md") \
            else text.count(".. code-block:: python")
        assert len(_blocks(page)) == declared, page
    assert {e.page for e in EXAMPLES} >= {"README.md", "docs/index.rst", "docs/checking.rst",
                                          "docs/gradients.rst", "docs/multihead.rst"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_as_copied(example, tmp_path):
    if example.needs_gpu and not cuda_available():
        pytest.skip("the example runs CuPy arrays: it needs a CUDA device")
    if example.doctest:
        (tmp_path / "example.txt").write_text(example.code)
        proc = _run([sys.executable, "-m", "doctest", "-o", "NORMALIZE_WHITESPACE",
                     "example.txt"], tmp_path)
    else:
        (tmp_path / "example.py").write_text(example.code)
        proc = _run([sys.executable, "example.py"], tmp_path)
    assert proc.returncode == 0, f"{example.name} fails as copied: {_explain(proc)}"


def test_the_complete_test_file_runs_as_copied(tmp_path):
    # docs/testing.rst shows a whole test file for users to copy: copied alone into an
    # empty directory (no conftest.py of ours, hypothesis's default profile with its
    # 100 examples), every test in it must pass.
    text = (ROOT / "docs" / "testing.rst").read_text()
    included = re.findall(r"\.\. literalinclude:: \.\./(\S+)", text)
    assert included == ["tests/docs/test_user_example.py"]
    shutil.copy(ROOT / included[0], tmp_path / "test_my_attention.py")
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "test_my_attention.py"], tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert re.search(r"\b7 passed\b", proc.stdout), proc.stdout[-2000:]
