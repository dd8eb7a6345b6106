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


@pytest.mark.parametrize("kernel", _launch.KERNEL_NAMES)
def test_every_config_fits_a_consumer_gpu_block(kernel: str) -> None:
    # 99 KiB (sm_86 / sm_89) is the smallest opt-in limit of the GPUs with fp64 users.
    for cfg in _launch.all_flash_configs(kernel):
        assert _launch.max_flash_shared_mem(cfg) <= 99 * 1024, cfg


def test_backward_configs_are_distinct_and_named_for_cupy() -> None:
    names = [c.name_expression for kernel in ("flash_bwd_dq", "flash_bwd_dkdv")
             for c in _launch.all_flash_configs(kernel)]
    assert len(set(names)) == len(names) == 16
    assert names[0] == "flash_bwd_dq<float, 32, 4, 4>"
    assert names[8] == "flash_bwd_dkdv<float, 32, 4, 4>"
    with pytest.raises(ValueError, match="no kernel 'flash_bwd'"):
        _launch.all_flash_configs("flash_bwd")


@pytest.mark.parametrize(("E", "Ev", "dq_bucket", "dkdv_bucket"), [
    (16, 16, 32, 32), (64, 200, 64, 256), (200, 8, 256, 256), (0, 0, 32, 32),
    (33, 32, 64, 64),
])
def test_backward_buckets(E: int, Ev: int, dq_bucket: int, dkdv_bucket: int) -> None:
    # dQ's accumulator has E columns; dK/dV's two share the bucket of max(E, Ev).
    assert _launch.backward_config("flash_bwd_dq", "float64", E, Ev).dv_max == dq_bucket
    assert _launch.backward_config("flash_bwd_dkdv", "float32", E, Ev).dv_max == dkdv_bucket


@pytest.mark.parametrize(("args", "match"), [
    (("flash_bwd_dq", "float64", 257, 8), "head dim E=257"),
    (("flash_bwd_dkdv", "float64", 8, 300), "value head dim Ev=300"),
    (("flash_bwd_dkdv", "float16", 8, 8), "compute dtype 'float16'"),
    (("flash_bwd_dkdv", "float64", -1, 8), "head dim E must be >= 0"),
])
def test_unsupported_backward_configs_raise(args, match: str) -> None:
    with pytest.raises(UnsupportedLaunch, match=match):
        _launch.backward_config(*args)
    with pytest.raises(ValueError, match="no backward kernel 'flash_fwd'"):
        _launch.backward_config("flash_fwd", "float64", 8, 8)


def test_backward_shared_memory_formulas() -> None:
    dq = _launch.backward_config("flash_bwd_dq", "float64", 64, 40)  # 8 rows
    # q and dO tiles (broadcast reads, unpadded), one key-or-value tile of 32 rows of
    # max(E + 1, Ev) made odd.
    assert _launch.flash_shared_mem(dq, 64, 40) == (8 * (64 + 40) + 32 * 65) * 8
    dkdv = _launch.backward_config("flash_bwd_dkdv", "float32", 64, 40)  # 16 keys
    # One 32-row buffer of max(E, Ev) made odd, then the block's key and value tiles.
    assert _launch.flash_shared_mem(dkdv, 64, 40) == (32 * 65 + 16 * (64 + 40)) * 4
    assert _launch.max_flash_shared_mem(dkdv) == (32 * 65 + 16 * 128) * 4


@pytest.mark.parametrize(("H", "K", "Kv", "run"), [
    (8, 8, 8, 1), (8, 2, 2, 4), (8, 1, 8, 8), (6, 3, 2, 6), (12, 4, 6, 6), (0, 0, 0, 1),
])
def test_heads_per_block_is_the_lcm_of_the_groups(H: int, K: int, Kv: int, run: int) -> None:
    assert _launch.heads_per_block(H, K, Kv) == run
    if H:
        # The run holds whole key groups and whole value groups.
        assert run % (H // K) == 0 and run % (H // Kv) == 0 and H % run == 0


def test_plan_backward_grids() -> None:
    dq, dkdv = _launch.plan_flash_backward(
        batch=3, heads=6, key_heads=3, value_heads=2, query_len=17, key_len=70, head_dim=16,
        value_head_dim=16, dtype="float32", max_dynamic_smem=48 * 1024)
    assert dq.config.kernel == "flash_bwd_dq" and dq.config.block_m == 16
    assert dq.grid == (3 * 6 * 2, 1, 1) and dq.m_tiles == 2
    # lcm(2, 3) = 6 heads per block: one run per batch entry, ceil(70 / 16) key tiles.
    assert dkdv.heads_per_block == 6 and dkdv.m_tiles == 5
    assert dkdv.grid == (3 * 1 * 5, 1, 1) and dkdv.block == (128, 1, 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"key_heads": 4}, r"key heads \(4\) and value heads \(2\) must divide"),
    ({"value_heads": 0}, "must divide query heads"),
    ({"head_dim": 300}, "head dim E=300"),
    ({"max_dynamic_smem": 1000}, "needs .* bytes of shared memory per block"),
])
def test_plan_backward_rejects(kwargs: dict, match: str) -> None:
    args = dict(batch=1, heads=6, key_heads=3, value_heads=2, query_len=16, key_len=16,
                head_dim=64, value_head_dim=64, dtype="float64", max_dynamic_smem=99 * 1024)
    args.update(kwargs)
    with pytest.raises(UnsupportedLaunch, match=match):
        _launch.plan_flash_backward(**args)


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
    assert SUPPORTED_OPTIONS == {
        "scale", "causal", "alignment", "return_lse", "compute_dtype", "mask", "bias",
        "window", "softcap", "mask_mod", "dropout_p", "dropout_mask", "rng", "masked_rows",
        "return_dropout_mask", "alibi_slopes",
    }


@pytest.mark.parametrize(("options", "expected"), [
    ({}, None),
    ({"mask": None, "dropout_p": 0.0, "masked_rows": "zero", "return_weights": False}, None),
    ({"causal": True, "alignment": "bottom_right", "scale": -0.5}, None),
    ({"mask": np.ones((2, 2), bool), "bias": np.zeros((2, 2)), "window": (4, 0),
      "softcap": 30.0, "mask_mod": lambda *i: True, "dropout_p": 0.1,
      "dropout_mask": np.ones((2, 2), bool), "rng": 3, "masked_rows": "nan",
      "return_dropout_mask": True, "compute_dtype": np.float32}, None),
    ({"alibi_slopes": np.ones(2)}, None),
    ({"score_mod": lambda s, *i: s}, "score_mod"),
    ({"precision": "compensated"}, "precision='compensated'"),
    ({"return_weights": True}, "return_weights=True"),
    ({"alignment": "center"}, "alignment='center'"),
    ({"compute_dtype": "float16"}, "compute_dtype='float16'"),
    ({"compute_dtype": "not a dtype"}, "compute_dtype='not a dtype'"),
    ({"masked_rows": "mean"}, "masked_rows='mean'"),
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


# ------------------------------------------------------------------ _operands
from refattn._cuda import _operands, flash_backward  # noqa: E402


@pytest.mark.parametrize(("causal", "window", "edges"), [
    (False, None, (-1, -1)), (True, None, (-1, 0)), (False, (3, None), (3, -1)),
    (False, (-1, 2), (-1, 2)), (True, (2, 5), (2, 0)), (True, (None, -1), (-1, 0)),
    (False, (0, 0), (0, 0)),
])
def test_window_edges_merge_causal(causal, window, edges) -> None:
    assert _operands.window_edges(causal, window) == edges


@pytest.mark.parametrize(("causal", "window", "error", "match"), [
    (1, None, TypeError, "causal must be True or False"),
    (False, (1, 2, 3), TypeError, "window must be a pair"),
    (False, (-2, 0), ValueError, "window's left edge"),
    (False, (0, 1.5), ValueError, "window's right edge"),
    (False, (True, 0), ValueError, "window's left edge"),
])
def test_window_edges_refuse(causal, window, error, match) -> None:
    with pytest.raises(error, match=match):
        _operands.window_edges(causal, window)


def _options(**kw):
    args = dict(shape=(2, 3, 4, 5), dtype="float64", scale=0.5, causal=False, window=None,
                alignment="top_left", mask=None, bias=None, dropout_mask=None, dropout_p=0.0,
                masked_rows="zero", softcap=None, xp=np)
    args.update(kw)
    return _operands.kernel_options(**args)


def test_operands_travel_compact_with_zero_strides() -> None:
    mask = np.ones((4, 5), bool)  # (L, S), broadcast over B and H
    bias = np.zeros((3, 1, 5))  # (H, 1, S)
    keep = np.ones((2, 1, 1, 5), bool)  # (B, 1, 1, S): padding style
    opts = _options(mask=mask, bias=bias, dropout_mask=keep, dropout_p=0.25)
    m, *m_strides = opts.operands[0:5]
    b, *b_strides = opts.operands[5:10]
    k, *k_strides = opts.operands[10:15]
    # Element strides of each (B, H, L, S) view: 0 along every broadcast axis.
    assert m.size == 20 and m_strides == [0, 0, 5, 1]
    assert b.size == 15 and b_strides == [0, 5, 0, 1]
    assert k.size == 10 and k_strides == [5, 0, 0, 1]
    assert np.shares_memory(m, mask) and np.shares_memory(b, bias)
    assert opts.flags == _operands.FLAG_MASK | _operands.FLAG_BIAS | _operands.FLAG_KEEP
    assert opts.keep_scale == 1 / 0.75 and not opts.all_dropped


def test_absent_operands_are_flagged_off() -> None:
    opts = _options(softcap=4.0, window=(2, None), causal=True, alignment="bottom_right",
                    masked_rows="uniform")
    assert opts.flags == _operands.FLAG_SOFTCAP
    assert opts.operands[0].dtype == np.bool_ and opts.operands[5].dtype == np.float64
    assert (opts.shift, opts.win_left, opts.win_right) == (5 - 4, 2, 0)
    assert (opts.softcap, opts.inv_softcap, opts.masked_rows) == (4.0, 0.25, 2)
    tail = opts.tail("float32")
    assert [type(x) for x in tail] == [np.float32] * 4 + [np.int32] + [np.int64] * 3 + [
        np.int32]


def test_non_contiguous_operands_are_compacted() -> None:
    mask = np.ones((5, 4), bool).T  # a transposed (L, S) view
    opts = _options(mask=mask)
    assert opts.operands[0].flags.c_contiguous and list(opts.operands[1:5]) == [0, 0, 5, 1]


def test_dropout_p_one_drops_everything() -> None:
    opts = _options(dropout_mask=np.zeros((1, 5), bool), dropout_p=1.0)
    assert opts.all_dropped and opts.keep_scale == 0.0


@pytest.mark.parametrize(("kw", "match"), [
    ({"mask": np.ones((4, 5))}, "mask must be a boolean array; got dtype float64"),
    ({"bias": np.ones((4, 5), np.float32)}, "bias has dtype float32, expected float64"),
    ({"mask": np.ones((4, 4), bool)}, r"mask of shape \(4, 4\) does not broadcast"),
    ({"bias": np.ones((1, 2, 3, 4, 5))}, "bias must have at most 4 dims"),
    ({"dropout_p": 0.5}, "dropout_p > 0 needs a dropout_mask"),
    ({"dropout_mask": np.ones((4, 5), bool)}, "needs dropout_p > 0"),
    ({"dropout_mask": np.ones((4, 5), bool), "dropout_p": 1.5},
     r"dropout_p must be in \[0, 1\]"),
    ({"dropout_mask": np.ones((4, 5), np.int8), "dropout_p": 0.5},
     "dropout_mask must be a boolean"),
    ({"masked_rows": "mean"}, "masked_rows must be one of"),
    ({"softcap": 0.0}, "softcap must be a positive finite number"),
    ({"softcap": float("inf")}, "softcap must be a positive finite number"),
    ({"alignment": "center"}, "alignment must be"),
])
def test_kernel_options_refuse(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _options(**kw)


def test_flatten_batch() -> None:
    # Broadcast along every batch dim or none: reshaped, not copied.
    x = np.ones((2, 3, 1, 4, 5))
    flat = _operands.flatten_batch(x, (2, 3), np)
    assert flat.shape == (6, 1, 4, 5) and np.shares_memory(flat, x)
    assert _operands.flatten_batch(np.ones((4, 5)), (2, 3), np).shape == (1, 1, 4, 5)
    assert _operands.flatten_batch(None, (2,), np) is None
    # Along some only: one stride of the flat batch index cannot address it, so it is
    # expanded over the batch dims alone (never over H, L, S).
    y = np.arange(2 * 20).reshape(2, 1, 1, 4, 5)
    flat = _operands.flatten_batch(y, (2, 3), np)
    assert flat.shape == (6, 1, 4, 5)
    np.testing.assert_array_equal(flat, np.broadcast_to(y, (2, 3, 1, 4, 5)).reshape(6, 1, 4, 5))
    with pytest.raises(ValueError, match="more dims than 5"):
        _operands.flatten_batch(np.ones((1, 1, 1, 1, 4, 5)), (2, 3), np)


# ------------------------------------------------------------------ flash_backward checks
def _grads_call(dout, q, k, v, out, lse, **kw):
    args = dict(scale=0.5, compute_dtype="float64")
    args.update(kw)
    return flash_backward(dout, q, k, v, out, lse, **args)


@pytest.mark.parametrize(("which", "bad", "match"), [
    ("dout", lambda x: np.ascontiguousarray(x[:, :, :3]), r"dout must have shape \(1, 2, 5, 4\)"),
    ("out", lambda x: x.astype(np.float32), "out has dtype float32"),
    ("dout", np.asfortranarray, "dout must be C-contiguous"),
    ("lse", lambda x: x[..., :4], r"lse must be a float64 array of shape \(1, 2, 5\)"),
    ("lse", lambda x: x.astype(np.float32), "lse must be a float64 array"),
    ("lse", lambda x: np.asfortranarray(np.ones((1, 2, 5, 2)))[..., 0], "lse must be C-contiguous"),
])
def test_backward_inputs_breaking_the_contract_are_refused(which, bad, match) -> None:
    q, k, v = _inputs()
    arrays = {"dout": np.ones((1, 2, 5, 4)), "out": np.ones((1, 2, 5, 4)),
              "lse": np.zeros((1, 2, 5))}
    arrays[which] = bad(arrays[which])
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        with pytest.raises(ValueError, match=match):
            _grads_call(arrays["dout"], q, k, v, arrays["out"], arrays["lse"])


@pytest.mark.parametrize("empty", [{"B": 0}, {"H": 0, "K": 0, "Kv": 0}, {"L": 0, "S": 0}])
def test_empty_backward_problems_launch_nothing(empty: dict) -> None:
    q, k, v = _inputs(**empty)
    B, H, L = q.shape[:3]
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        dq, dk, dv, dbias = _grads_call(np.ones((B, H, L, 4)), q, k, v, np.ones((B, H, L, 4)),
                                        np.zeros((B, H, L)))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dbias is None and not dq.any() and not dk.any() and not dv.any()


def test_backward_with_every_weight_dropped_launches_nothing() -> None:
    # dropout_p = 1 makes the output identically 0: every gradient is 0, d bias too.
    q, k, v = _inputs()
    with _modules.module_factory(_never_called, max_dynamic_smem=48 * 1024):
        dq, dk, dv, dbias = _grads_call(
            np.ones((1, 2, 5, 4)), q, k, v, np.zeros((1, 2, 5, 4)), np.zeros((1, 2, 5)),
            dropout_mask=np.zeros((5, 6), bool), dropout_p=1.0, bias=np.ones((5, 6)),
            need_dbias=True)
    assert dbias.shape == (1, 2, 5, 6)
    assert not (dq.any() or dk.any() or dv.any() or dbias.any())
