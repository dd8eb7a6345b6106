"""The code examples of README.md and the docs pages run and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Pages whose python blocks are complete programs. A page joins this list when its
# examples are written to run as they stand.
PAGES = ["README.md", "docs/index.rst", "docs/checking.rst", "docs/accuracy.rst",
         "docs/variants.rst", "docs/conventions.rst",
         "docs/performance.rst"]


def _blocks(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".md":
        return re.findall(r"```python\n(.*?)```", text, flags=re.S)
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:[ ]{3}.*\n|\n)+)", text):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[3:] for line in lines))
    return blocks


EXAMPLES = [(page, i, code) for page in PAGES for i, code in enumerate(_blocks(ROOT / page))]


def test_every_listed_page_has_examples():
    assert {page for page, _, _ in EXAMPLES} == set(PAGES)


@pytest.mark.parametrize("page,index,code", EXAMPLES,
                         ids=[f"{p}#{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    if "torch" in code:
        pytest.importorskip("torch")
    exec(compile(code, f"{page}#{index}", "exec"), {"__name__": "__example__"})
