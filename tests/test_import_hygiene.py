"""``import refattn`` pulls in numpy and array_api_compat only (docs/contributing.rst)."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("torch", "cupy", "hypothesis", "mpmath", "matplotlib", "jax", "rich",
            "array_api_strict", "threadpoolctl")


def test_import_refattn_imports_no_optional_library():
    code = (
        "import sys, refattn\n"
        "import numpy as np\n"
        "refattn.attention(np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 2)), causal=True)\n"
        f"loaded = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"imported eagerly: {result.stdout.strip()}"


def test_the_check_shows_when_a_library_is_loaded():
    # The probe above must be able to fail: importing torch first is seen.
    code = ("import sys, torch, refattn\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        import pytest

        pytest.skip("torch is not installed")
    assert result.stdout.strip() == "True"
