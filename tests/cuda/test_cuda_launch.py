"""The CUDA layer's plain-Python parts: launch arithmetic, option support, module cache.

None of this needs a compiler or a GPU.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from refattn._cuda import (
    SUPPORTED_OPTIONS,
    UnsupportedLaunch,
    _launch,
    _modules,
    flash_forward,
    supported_options,
    unsupported_option,
)


# ------------------------------------------------------------------ _launch
@pytest.mark.parametrize(("ev", "bucket"), [(0, 32), (1, 32), (32, 32), (33, 64), (64, 64),
                                            (65, 128), (128, 128), (129, 256), (256, 256)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_value_head_dim_picks_the_smallest_bucket(dtype: str, ev: int, bucket: int) -> None:
    cfg = _launch.flash_config(dtype, ev)
    assert cfg.dv_max == bucket and cfg.dtype == dtype
    assert cfg in _launch.all_flash_configs()


def test_configs_are_distinct_and_named_for_cupy() -> None:
    configs = _launch.all_flash_configs()
    names = [c.name_expression for c in configs]
    assert len(set(names)) == len(names) == 8
    assert names[0] == "flash_fwd<float, 32, 4, 4>"
    assert all(c.threads % 32 == 0 and c.threads <= 1024 for c in configs)
    assert all(c.block_m == c.warps * c.rows for c in configs)


@pytest.mark.parametrize("bad", [("float16", 64), ("float64", 257), ("float32", -1)])
def test_unsupported_configs_raise(bad: tuple[str, int]) -> None:
    with pytest.raises(UnsupportedLaunch):
        _launch.flash_config(*bad)


def test_shared_memory_formula() -> None:
    cfg = _launch.flash_config("float64", 64)  # 8 query rows
    # Query tile 8 x (E+1), key/value tile 32 x max(E+1, Ev) made odd, 8 bytes each.
    assert _launch.flash_shared_mem(cfg, 64, 64) == (8 * 65 + 32 * 65) * 8
    assert _launch.flash_shared_mem(cfg, 16, 64) == (8 * 17 + 32 * 65) * 8
    assert _launch.flash_shared_mem(cfg, 63, 40) == (8 * 64 + 32 * 65) * 8
    assert _launch.flash_shared_mem(cfg, 0, 0) == (8 * 1 + 32 * 1) * 8


def test_every_config_fits_a_consumer_gpu_block() -> None:
    # 99 KiB (sm_86 / sm_89) is the smallest opt-in limit of the GPUs with fp64 users.
    for cfg in _launch.all_flash_configs():
        assert _launch.max_flash_shared_mem(cfg) <= 99 * 1024, cfg


@pytest.mark.parametrize(("L", "m_tiles"), [(0, 0), (1, 1), (16, 1), (17, 2), (70, 5)])
def test_plan_grid_covers_every_query_tile(L: int, m_tiles: int) -> None:
    plan = _launch.plan_flash_forward(batch=3, heads=5, query_len=L, key_len=7, head_dim=16,
                                      value_head_dim=16, dtype="float32",
                                      max_dynamic_smem=48 * 1024)
    assert plan.config.block_m == 16
    assert plan.m_tiles == m_tiles
    assert plan.grid == (3 * 5 * m_tiles, 1, 1) and plan.block == (128, 1, 1)
    assert not plan.needs_smem_opt_in


def test_plan_asks_for_the_smem_opt_in_above_48_kib() -> None:
    plan = _launch.plan_flash_forward(batch=1, heads=1, query_len=4, key_len=4, head_dim=256,
                                      value_head_dim=256, dtype="float32",
                                      max_dynamic_smem=100 * 1024)
    assert plan.shared_mem == (16 * 257 + 32 * 257) * 4 > 48 * 1024
    assert plan.needs_smem_opt_in


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"head_dim": 257}, "head dim E=257"),
    ({"head_dim": -1}, "head dim E=-1"),
    ({"value_head_dim": 300}, "Ev=300"),
    ({"batch": -1}, "batch must be >= 0"),
    ({"max_dynamic_smem": 1000}, "needs .* bytes of shared memory"),
    ({"batch": 2**20, "heads": 2**12}, "exceed the grid limit"),
    ({"query_len": 2**31}, "too long"),
])
def test_plan_rejects_what_the_kernel_cannot_run(kwargs: dict, match: str) -> None:
    args = dict(batch=1, heads=1, query_len=16, key_len=16, head_dim=64, value_head_dim=64,
                dtype="float64", max_dynamic_smem=48 * 1024)
    args.update(kwargs)
    with pytest.raises(UnsupportedLaunch, match=match):
        _launch.plan_flash_forward(**args)


# ------------------------------------------------------------------ _support
def test_supported_options() -> None:
    assert supported_options() == SUPPORTED_OPTIONS
    assert {"scale", "causal", "alignment", "return_lse", "compute_dtype"} == SUPPORTED_OPTIONS


@pytest.mark.parametrize(("options", "expected"), [
    ({}, None),
    ({"mask": None, "dropout_p": 0.0, "masked_rows": "zero", "return_weights": False}, None),
    ({"causal": True, "alignment": "bottom_right", "scale": -0.5}, None),
    ({"mask": np.ones((2, 2), bool)}, "mask"),
    ({"bias": np.zeros((2, 2))}, "bias"),
    ({"window": (4, 0)}, "window"),
    ({"softcap": 30.0}, "softcap=30.0"),
    ({"alibi_slopes": np.ones(2)}, "alibi_slopes"),
    ({"score_mod": lambda s, *i: s}, "score_mod"),
    ({"mask_mod": lambda *i: True}, "mask_mod"),
    ({"dropout_p": 0.1}, "dropout_p=0.1"),
    ({"dropout_mask": np.ones((2, 2), bool)}, "dropout_mask"),
    ({"rng": 3}, "rng=3"),
    ({"masked_rows": "nan"}, "masked_rows='nan'"),
    ({"precision": "compensated"}, "precision='compensated'"),
    ({"return_weights": True}, "return_weights=True"),
    ({"return_dropout_mask": True}, "return_dropout_mask=True"),
    ({"alignment": "center"}, "alignment='center'"),
    ({"compute_dtype": "float16"}, "compute_dtype='float16'"),
    ({"head_dim": 512}, "head dim E=512 (the kernel takes at most 256)"),
    ({"value_head_dim": 257}, "value head dim Ev=257 (the kernel takes at most 256)"),
])
def test_unsupported_option(options: dict, expected: str | None) -> None:
    assert unsupported_option(**options) == expected


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(TypeError, match="unknown attention option 'new_thing'"):
        unsupported_option(new_thing=1)


# ------------------------------------------------------------------ _modules
def test_kernel_sources_are_package_data() -> None:
    src = _modules.kernel_source("flash_fwd.cu")
    assert "template <typename T, int DV_MAX, int WARPS, int ROWS>" in src
    with pytest.raises(KeyError):
        _modules.kernel_source("missing.cu")


class _RecordingFactory:
    max_dynamic_shared_memory = 12345

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return object()


def test_modules_are_built_lazily_once_per_factory() -> None:
    factory = _RecordingFactory()
    with _modules.module_factory(factory):
        assert factory.calls == []
        first = _modules.get_module("flash_fwd.cu")
        assert _modules.get_module("flash_fwd.cu") is first
        assert _modules.max_dynamic_shared_memory() == 12345
        other = _RecordingFactory()
        with _modules.module_factory(other, max_dynamic_smem=777):
            assert _modules.get_module("flash_fwd.cu") is not first
            assert _modules.max_dynamic_shared_memory() == 777
        # Restoring the factory drops the cache: its modules are rebuilt.
        assert _modules.get_module("flash_fwd.cu") is not first
    assert len(factory.calls) == 2
    call = factory.calls[0]
    assert call["code"] == _modules.kernel_source("flash_fwd.cu")
    assert call["options"] == _modules.NVRTC_OPTIONS
    assert list(call["name_expressions"]) == [c.name_expression
                                              for c in _launch.all_flash_configs()]


def test_importing_the_cuda_layer_imports_no_cuda_library() -> None:
    code = (
        "import sys\n"
        "import refattn._cuda, refattn._cuda._nvrtc_gate, refattn._cuda_shim\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cuda', 'cupyx'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ flash_forward checks
def _never_called(**kwargs):
    raise AssertionError("no module should be built")


def _inputs(B=1, H=2, K=1, Kv=2, L=5, S=6, E=8, Ev=4, dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((B, H, L, E)).astype(dtype),
            rng.standard_normal((B, K, S, E)).astype(dtype),
            rng.standard_normal((B, Kv, S, Ev)).astype(dtype))


def _call(q, k, v, **kw):
    args = dict(scale=0.5, causal=False, alignment="top_left", compute_dtype="float64",
                need_lse=True)
    args.update(kw)
    return flash_forward(q, k, v, **args)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q.astype(np.float32), k, v), "q has dtype float32"),
    (lambda q, k, v: (q, np.asfortranarray(k), v), "k must be C-contiguous"),
    (lambda q, k, v: (q, np.ascontiguousarray(k[:, :, :5]), v), "k and v lengths differ"),
    (lambda q, k, v: (q, np.ascontiguousarray(k[..., :4]), v), "q and k head dims differ"),
    (lambda q, k, v: (q, np.concatenate([k, k]), v), "batch dims differ"),
    (lambda q, k, v: (q[:, :1], k, v), r"value heads \(2\) must divide query heads \(1\)"),
])
def test_inputs_breaking_the_contract_are_refused(mutate, match: str) -> None:
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        with pytest.raises(ValueError, match=match):
            _call(*mutate(*_inputs()))


def test_bad_alignment_and_dtype_are_refused() -> None:
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        with pytest.raises(ValueError, match="alignment"):
            _call(*_inputs(), alignment="center")
        with pytest.raises(UnsupportedLaunch, match="compute_dtype"):
            _call(*_inputs(dtype=np.float16), compute_dtype="float16")


@pytest.mark.parametrize("empty", [{"B": 0}, {"H": 0, "K": 0, "Kv": 0}, {"L": 0}])
def test_empty_problems_launch_nothing(empty: dict) -> None:
    q, k, v = _inputs(**empty)
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        out, lse = _call(q, k, v)
    assert out.shape == (*q.shape[:3], v.shape[3]) and lse.shape == q.shape[:3]
