"""``refattn check`` starts where the user is: the working directory's modules, the array
library the target takes, the dtypes and devices this machine has."""

from __future__ import annotations

import configparser
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refattn import _audit, _cli

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "tests.helpers.example_kernels"

# A textbook attention in SDPA's convention on NumPy arrays: enough for the plain group.
NUMPY_ATTENTION = """
import numpy as np

def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    s = (q @ np.swapaxes(k, -1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v
"""

# The same through torch, as a user who writes torch code would: it takes torch tensors.
TORCH_ATTENTION = """
import torch

def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    return torch.nn.functional.scaled_dot_product_attention(
        torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v),
        attn_mask=None if attn_mask is None else torch.as_tensor(attn_mask),
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
"""


def _user_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """The working directory is tmp_path, on sys.path only as the CLI puts it; sys.path
    is restored and the modules imported from tmp_path forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    here = os.path.realpath(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if os.path.realpath(p or os.curdir) != here])
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _run(argv, capsys):
    status = _cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- the working directory --------------------------------------------------------------


def test_the_console_script_imports_a_module_of_the_working_directory(tmp_path):
    # A console script is a file in bin/ whose directory, not the working directory, is
    # sys.path[0]; this launcher is one, so what it finds is what `refattn` finds.
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    _user_module(work, "mymodule", NUMPY_ATTENTION)
    launcher = bin_dir / "refattn"
    launcher.write_text("import sys\nfrom refattn._cli import main\nsys.exit(main())\n")
    # refattn from this checkout, whatever is installed; the working directory stays off.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(
        [sys.executable, str(launcher), "check", "mymodule:attention", "--examples", "2",
         "--group", "plain", "--dtype", "float64,float32"],
        capture_output=True, text=True, cwd=work, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot import" not in result.stderr
    assert result.stdout.startswith("refattn check: mymodule:attention (torch convention, "
                                    "numpy arrays")
    assert ", 0 FAIL, 0 with known deviations" in result.stdout


def test_the_working_directory_goes_on_sys_path_once(in_tmp_dir, capsys):
    _user_module(in_tmp_dir, "cwd_numpy_attention", NUMPY_ATTENTION)
    # An entry standing for the working directory, in another spelling, is enough.
    sys.path.append(str(in_tmp_dir) + os.sep + os.curdir)
    argv = ["check", "cwd_numpy_attention:attention", "--examples", "1", "--group", "plain",
            "--dtype", "float64"]
    before = list(sys.path)
    status, out, _ = _run(argv, capsys)
    assert status == 0, out
    assert sys.path == before
    sys.path.pop()
    status, out, _ = _run(argv, capsys)
    assert status == 0, out
    # First, as `python -m` puts it: the user's module wins over an installed namesake.
    assert sys.path[0] == os.path.realpath(in_tmp_dir)
    assert sys.path.count(sys.path[0]) == 1


def test_the_torch_target_does_not_touch_sys_path(in_tmp_dir, capsys):
    before = list(sys.path)
    status, _, _ = _run(["check", "--examples", "1", "--group", "plain", "--dtype",
                         "float64"], capsys)
    assert status == 0
    assert sys.path == before


# --- the array library ------------------------------------------------------------------


def test_a_torch_function_gets_torch_tensors_and_passes_in_bfloat16(in_tmp_dir, capsys):
    _user_module(in_tmp_dir, "cwd_torch_attention", TORCH_ATTENTION)
    report = in_tmp_dir / "r.json"
    status, out, _ = _run(["check", "cwd_torch_attention:attention", "--examples", "3",
                           "--group", "plain", "--group", "causal", "--json", str(report)],
                          capsys)
    # NumPy bfloat16 arrays, which torch.as_tensor refuses, made every bfloat16 row fail.
    assert status == 0, out
    assert "FAIL (" not in out and ", 0 FAIL," in out
    header = out.splitlines()[0]
    assert ("torch arrays, inferred because the target's code uses torch; --library to "
            "choose") in header
    data = json.loads(report.read_text())
    assert data["library"] == "torch"
    assert {c["dtype"] for c in data["cells"]} == {"float64", "float32", "bfloat16"}


def test_an_explicit_library_wins_over_the_inference(in_tmp_dir, capsys):
    _user_module(in_tmp_dir, "cwd_torch_attention2", TORCH_ATTENTION)
    status, out, _ = _run(["check", "cwd_torch_attention2:attention", "--library", "numpy",
                           "--examples", "1", "--group", "plain", "--dtype", "float64"],
                          capsys)
    # torch.as_tensor takes float64 NumPy arrays: the run itself is fine.
    assert status == 0, out
    assert "(torch convention, numpy arrays)" in out.splitlines()[0]


def _namespace(source: str) -> dict:
    # A module of its own (not this test file, which imports torch itself).
    namespace: dict = {"__name__": "refattn_inference_example"}
    exec(textwrap.dedent(source), namespace)  # noqa: S102 - the test's own source
    return namespace


@pytest.mark.parametrize("source,name,expected,why", [
    ("import torch\ndef f(q, k, v):\n    return torch.softmax(q, -1) @ v\n", "f", "torch",
     "the target's code uses torch"),
    # A helper of the same module decides, and NumPy used alongside does not.
    ("import numpy as np\nimport torch.nn.functional as F\n"
     "def _h(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)\n"
     "def f(q, k, v):\n    np.float32\n    return _h(q, k, v)\n", "f", "torch",
     "the target's code uses torch"),
    ("def f(q, k, v):\n    import jax.numpy as jnp\n    return jnp.exp(q)\n", "f", "jax",
     "the target's code uses jax"),
    ("from torch import softmax\ndef f(q, k, v):\n    return softmax(q, -1) @ v\n", "f",
     "torch", "the target's code uses torch"),
    # Nothing in the code: the module's imports.
    ("import torch\ndef f(q, k, v):\n    return q\n", "f", "torch",
     "the target's module imports torch"),
    ("import numpy as np\ndef f(q, k, v):\n    return np.exp(q)\n", "f", "numpy",
     "the target's code uses numpy"),
    ("import torch\nimport jax\ndef f(q, k, v):\n    return q\n", "f", "numpy",
     "the default: the target's module imports jax and torch, not one of them"),
    ("def f(q, k, v):\n    return q\n", "f", "numpy",
     "the default: nothing in the target names torch, jax or cupy"),
])
def test_infer_library(source, name, expected, why):
    assert _audit.infer_library(_namespace(source)[name]) == (expected, why)


def test_infer_library_sees_through_wrappers():
    f = _namespace("def f(q, k, v):\n    import torch\n    return torch.exp(q)\n")["f"]

    @functools.wraps(f)
    def decorated(*args):
        return f(*args)

    assert _audit.infer_library(decorated)[0] == "torch"
    assert _audit.infer_library(functools.partial(f, k=None))[0] == "torch"
    assert _audit.infer_library(torch.nn.functional.scaled_dot_product_attention) == (
        "torch", "the target is defined in torch._C._nn")

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return q

    # An instance: its class's torch base class decides.
    module = f"{torch.nn.Module.__module__}.{torch.nn.Module.__qualname__}"
    assert _audit.infer_library(Attention()) == ("torch", f"the target is a {module}")


def test_a_jax_function_gets_jax_arrays_and_float64_is_skipped_without_x64(capsys):
    jax = pytest.importorskip("jax")
    if jax.config.read("jax_enable_x64"):
        pytest.skip("x64 is enabled: JAX holds float64 here")
    status, out, _ = _run(["check", "refattn.compat.jax:dot_product_attention",
                           "--convention", "jax", "--examples", "2", "--group", "plain"],
                          capsys)
    assert status == 0, out
    lines = out.splitlines()
    assert "jax arrays, inferred because the target's code uses jax" in lines[0]
    assert lines[1] == ("refattn check: float64 skipped: JAX makes float64 arrays float32 "
                        "unless x64 is enabled (set JAX_ENABLE_X64=1)")
    rows = [line.split() for line in lines if line.startswith("plain")]
    assert sorted(row[2] for row in rows) == ["bfloat16", "float32"]


# --- dtypes this machine cannot hold ----------------------------------------------------


def test_bfloat16_without_ml_dtypes_is_skipped_with_one_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` now fails
    report = tmp_path / "r.json"
    status, out, err = _run(["check", f"{KERNELS}:correct", "--examples", "2",
                             "--group", "plain", "--json", str(report)], capsys)
    assert status == 0, out + err
    notes = [line for line in out.splitlines() if "skipped" in line]
    assert notes == ["refattn check: bfloat16 skipped: NumPy has no bfloat16 without "
                     "ml_dtypes (pip install ml_dtypes)"]
    data = json.loads(report.read_text())
    assert {c["dtype"] for c in data["cells"]} == {"float64", "float32"}
    assert data["dtypes"] == ["float64", "float32"]


def test_asking_only_for_dtypes_that_cannot_run_exits_two(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    status, out, err = _run(["check", f"{KERNELS}:correct", "--dtype", "bfloat16"], capsys)
    assert status == 2
    assert out == ""
    assert ("refattn: error: --dtype bfloat16: nothing here can run: bfloat16: NumPy has "
            "no bfloat16 without ml_dtypes (pip install ml_dtypes)") in err
    # Asked among others, it is skipped and the rest runs.
    status, out, _ = _run(["check", f"{KERNELS}:correct", "--dtype", "float32,bfloat16",
                           "--examples", "1", "--group", "plain"], capsys)
    assert status == 0
    assert "bfloat16 skipped" in out


def test_cupy_has_no_bfloat16():
    assert _audit.Library("cupy").cannot_hold("bfloat16") == (
        "CuPy has no bfloat16 (--library torch or jax has it)")
    assert _audit.Library("cupy").cannot_hold("float32") is None
    assert _audit.Library("torch").cannot_hold("bfloat16") is None


def test_the_extras_refattn_check_runs_from_install_ml_dtypes():
    # The default --dtype has bfloat16 and the default library for a NumPy target is
    # numpy: the README's set-up (`.[torch]`) and the check extra must bring ml_dtypes.
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = config["options.extras_require"]
    for extra in ("torch", "check"):
        names = [line.split(">")[0].split("=")[0].split(";")[0].strip()
                 for line in extras[extra].splitlines() if line.strip()]
        assert "ml_dtypes" in names, (extra, names)


# --- devices this machine does not have -------------------------------------------------


def _one_line_exit_two(argv, capsys, *needles):
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert out == ""  # nothing ran, not even the header
    assert len(err.splitlines()) == 1, err
    assert err.startswith("refattn: error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("argv", [
    ["check", "--device", "cuda"],
    ["check", f"{KERNELS}:correct", "--library", "torch", "--device", "cuda:0"],
])
def test_no_cuda_device_for_torch_is_one_line_and_status_two(argv, capsys):
    _one_line_exit_two(argv, capsys, f"--device {argv[-1]}: torch {torch.__version__} sees "
                       "no CUDA device (torch.cuda.is_available() is False)",
                       "run on a machine with a GPU, or drop --device to check on the CPU")


def test_no_cupy_device_is_one_line_and_status_two(capsys):
    try:
        import cupy
    except ImportError:
        needles = ["--library cupy: CuPy is not installed: pip install 'refattn[cuda12]'"]
    else:
        if cupy.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        needles = ["--library cupy: CuPy", "sees no CUDA device"]
    _one_line_exit_two(["check", f"{KERNELS}:correct", "--library", "cupy"], capsys,
                       *needles, "check on the CPU with --library numpy or torch")


def test_no_jax_gpu_is_one_line_and_status_two(capsys):
    jax = pytest.importorskip("jax")
    try:
        jax.devices("cuda")
    except RuntimeError:
        pass
    else:
        pytest.skip("JAX has a CUDA platform here")
    _one_line_exit_two(["check", f"{KERNELS}:correct", "--library", "jax", "--device",
                        "cuda"], capsys, "--device cuda: JAX", "has no 'cuda' platform",
                       "drop --device")


def test_a_device_numpy_arrays_cannot_be_on_is_one_line_and_status_two(capsys):
    _one_line_exit_two(["check", f"{KERNELS}:correct", "--device", "cuda"], capsys,
                       "--device cuda: NumPy arrays live on the host")
