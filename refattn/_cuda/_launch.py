"""Launch arithmetic for the CUDA kernels: tiles, grid, block and shared memory.

Plain Python with no CuPy, so that it is unit-tested everywhere and shared by the CuPy
path, the CPU shim and the NVRTC compile gate (which compiles exactly the
instantiations listed here).

Shape legend: B batch, H query heads, L query length, S key length, E head dim of q/k,
Ev head dim of v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BLOCK_N",
    "DEFAULT_DYNAMIC_SMEM",
    "KERNEL_NAMES",
    "MAX_HEAD_DIM",
    "FlashConfig",
    "LaunchPlan",
    "UnsupportedLaunch",
    "all_flash_configs",
    "backward_config",
    "flash_config",
    "flash_shared_mem",
    "heads_per_block",
    "max_flash_shared_mem",
    "plan_flash_backward",
    "plan_flash_forward",
]

WARP_SIZE = 32
#: Keys per tile of the forward and dQ kernels (one key per lane of a warp), and query
#: rows per tile of the dK/dV kernel (one row per lane).
BLOCK_N = 32
#: Largest E and Ev the kernels take.
MAX_HEAD_DIM = 256
#: Dynamic shared memory a kernel may use without raising its
#: ``max_dynamic_shared_size_bytes`` attribute first.
DEFAULT_DYNAMIC_SMEM = 48 * 1024
#: The largest grid.x a launch may have (2**31 - 1).
MAX_GRID_X = 2**31 - 1

_ITEMSIZE = {"float32": 4, "float64": 8}
_CTYPE = {"float32": "float", "float64": "double"}
_DIM_BUCKETS = (32, 64, 128, 256)
#: The kernels, by C++ name. The forward's register accumulator is sized by Ev, dQ's
#: by E, dK/dV's (one for each) by max(E, Ev): each is a template over that bucket.
KERNEL_NAMES = ("flash_fwd", "flash_bwd_dq", "flash_bwd_dkdv")

# (warps, rows per warp) by kernel, compute dtype and head-dim bucket; for dK/dV "rows"
# are keys. Chosen so that ptxas reports no spill for sm_80 and sm_90 (the compile gate
# enforces it) and so that every launch, fp64 with E = Ev = 256 included, stays under
# the 99 KiB a block gets on consumer GPUs (hence 8 rows for dQ in fp64 even at
# E <= 32: its output-gradient tile may still be 256 wide).
_TILES = {
    "flash_fwd": {
        ("float32", 32): (4, 4),
        ("float32", 64): (4, 4),
        ("float32", 128): (4, 4),
        ("float32", 256): (4, 4),
        ("float64", 32): (4, 4),
        ("float64", 64): (4, 2),
        ("float64", 128): (4, 2),
        ("float64", 256): (4, 2),
    },
    "flash_bwd_dq": {
        ("float32", 32): (4, 4),
        ("float32", 64): (4, 4),
        ("float32", 128): (4, 4),
        ("float32", 256): (4, 4),
        ("float64", 32): (4, 2),
        ("float64", 64): (4, 2),
        ("float64", 128): (4, 2),
        ("float64", 256): (4, 2),
    },
    "flash_bwd_dkdv": {
        ("float32", 32): (4, 4),
        ("float32", 64): (4, 4),
        ("float32", 128): (4, 4),
        ("float32", 256): (4, 4),
        ("float64", 32): (4, 4),
        ("float64", 64): (4, 2),
        ("float64", 128): (4, 2),
        ("float64", 256): (4, 2),
    },
}


class UnsupportedLaunch(ValueError):
    """The kernel cannot run this problem (head dim too large, shared memory, grid)."""


@dataclass(frozen=True)
class FlashConfig:
    """One compiled instantiation of ``kernel<T, DIM_MAX, WARPS, ROWS>``.

    `dv_max` is the head-dim bucket that sizes the kernel's per-lane accumulators (Ev
    for the forward, E for dQ, max(E, Ev) for dK/dV).

    Examples
    --------
    >>> cfg = flash_config("float64", 48)
    >>> cfg.name_expression, cfg.block_m, cfg.threads
    ('flash_fwd<double, 64, 4, 2>', 8, 128)
    """

    dtype: str
    dv_max: int
    warps: int
    rows: int
    kernel: str = "flash_fwd"

    @property
    def block_m(self) -> int:
        """Rows per block: query rows (forward, dQ) or keys (dK/dV)."""
        return self.warps * self.rows

    @property
    def threads(self) -> int:
        """Threads per block."""
        return self.warps * WARP_SIZE

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def name_expression(self) -> str:
        """The C++ name CuPy's ``name_expressions`` and ``get_function`` take."""
        return (f"{self.kernel}<{_CTYPE[self.dtype]}, {self.dv_max}, {self.warps}, "
                f"{self.rows}>")


def _check_dtype(dtype: str) -> None:
    if dtype not in _ITEMSIZE:
        raise UnsupportedLaunch(
            f"compute dtype {dtype!r} is not supported by the CUDA kernels; "
            "use 'float32' or 'float64'"
        )


def _config(kernel: str, dtype: str, dim: int, what: str) -> FlashConfig:
    _check_dtype(dtype)
    if dim < 0:
        raise UnsupportedLaunch(f"{what} must be >= 0, got {dim}")
    for bucket in _DIM_BUCKETS:
        if dim <= bucket:
            warps, rows = _TILES[kernel][(dtype, bucket)]
            return FlashConfig(dtype, bucket, warps, rows, kernel)
    raise UnsupportedLaunch(
        f"{what}={dim} exceeds {MAX_HEAD_DIM}, the largest the CUDA kernel takes"
    )


def flash_config(dtype: str, value_head_dim: int) -> FlashConfig:
    """The forward instantiation that serves Ev = `value_head_dim` in `dtype`.

    Examples
    --------
    >>> flash_config("float32", 16).name_expression
    'flash_fwd<float, 32, 4, 4>'
    >>> flash_config("float64", 257)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    UnsupportedLaunch: value head dim Ev=257 exceeds 256, the largest the kernel takes
    """
    return _config("flash_fwd", dtype, value_head_dim, "value head dim Ev")


def backward_config(kernel: str, dtype: str, head_dim: int,
                    value_head_dim: int) -> FlashConfig:
    """The instantiation of backward `kernel` ("flash_bwd_dq" or "flash_bwd_dkdv").

    dQ's accumulator is sized by E; dK/dV's two by max(E, Ev), one bucket for both
    (which keeps the instantiations to eight per kernel).

    Examples
    --------
    >>> backward_config("flash_bwd_dq", "float64", 64, 200).name_expression
    'flash_bwd_dq<double, 64, 4, 2>'
    >>> backward_config("flash_bwd_dkdv", "float32", 64, 200).name_expression
    'flash_bwd_dkdv<float, 256, 4, 4>'
    """
    if kernel == "flash_bwd_dq":
        return _config(kernel, dtype, head_dim, "head dim E")
    if kernel == "flash_bwd_dkdv":
        for what, dim in (("head dim E", head_dim), ("value head dim Ev", value_head_dim)):
            if not 0 <= dim <= MAX_HEAD_DIM:
                _config(kernel, dtype, dim, what)  # raises with the dim named
        return _config(kernel, dtype, max(head_dim, value_head_dim), "head dim max(E, Ev)")
    raise ValueError(f"no backward kernel {kernel!r}; known: flash_bwd_dq, flash_bwd_dkdv")


def all_flash_configs(kernel: str = "flash_fwd") -> tuple[FlashConfig, ...]:
    """Every instantiation `kernel` is compiled for, in a fixed order.

    Examples
    --------
    >>> len(all_flash_configs()), len(all_flash_configs("flash_bwd_dkdv"))
    (8, 8)
    """
    if kernel not in _TILES:
        raise ValueError(f"no kernel {kernel!r}; known: {', '.join(KERNEL_NAMES)}")
    return tuple(
        FlashConfig(dtype, bucket, *_TILES[kernel][(dtype, bucket)], kernel)
        for dtype in ("float32", "float64")
        for bucket in _DIM_BUCKETS
    )


def flash_shared_mem(cfg: FlashConfig, head_dim: int, value_head_dim: int) -> int:
    """Dynamic shared memory in bytes of one block of `cfg` for E and Ev.

    Forward: the query tile, rows of E + 1, and one key-or-value tile (the keys and
    then the values of the same 32 positions) as wide as the wider of the two, rounded
    up to an odd stride so that 32 lanes reading 32 different rows hit 32 different
    banks. dQ: the query and output-gradient tiles (read by broadcast, unpadded) and
    the same key-or-value tile. dK/dV: one 32-row buffer for queries, then output
    gradients (odd stride), and the block's key and value tiles.

    Examples
    --------
    >>> flash_shared_mem(flash_config("float64", 64), 64, 64)
    20800
    """
    E, Ev = head_dim, value_head_dim
    kv_stride = max(E + 1, Ev) | 1
    if cfg.kernel == "flash_fwd":
        elements = cfg.block_m * (E + 1) + BLOCK_N * kv_stride
    elif cfg.kernel == "flash_bwd_dq":
        elements = cfg.block_m * (E + Ev) + BLOCK_N * kv_stride
    else:
        elements = BLOCK_N * (max(E, Ev) | 1) + cfg.block_m * (E + Ev)
    return elements * cfg.itemsize


def max_flash_shared_mem(cfg: FlashConfig) -> int:
    """The most dynamic shared memory `cfg` can ask for (both head dims at their most).

    Examples
    --------
    >>> max_flash_shared_mem(flash_config("float64", 256))
    82240
    """
    if cfg.kernel == "flash_fwd":
        return flash_shared_mem(cfg, MAX_HEAD_DIM, cfg.dv_max)
    if cfg.kernel == "flash_bwd_dq":
        return flash_shared_mem(cfg, cfg.dv_max, MAX_HEAD_DIM)
    return flash_shared_mem(cfg, cfg.dv_max, cfg.dv_max)


def heads_per_block(heads: int, key_heads: int, value_heads: int) -> int:
    """Query heads one dK/dV block loops over: lcm(H / K, H / Kv).

    The smallest run of consecutive query heads that holds every query head of each
    key head and of each value head it touches, so that one block sums a key (value)
    head's gradient over its whole group, without atomics.

    Examples
    --------
    >>> heads_per_block(6, 3, 2)  # key groups of 2, value groups of 3
    6
    >>> heads_per_block(8, 2, 2)
    4
    """
    if heads == 0:
        return 1
    return math.lcm(heads // key_heads, heads // value_heads)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch of one kernel needs besides the arrays."""

    config: FlashConfig
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    m_tiles: int
    """Tiles along the block's own axis: query tiles (forward, dQ) or key tiles (dK/dV)."""
    heads_per_block: int = 1
    """dK/dV only: the query heads one block loops over (see :func:`heads_per_block`)."""

    @property
    def needs_smem_opt_in(self) -> bool:
        """True when the kernel's dynamic shared memory attribute must be raised first."""
        return self.shared_mem > DEFAULT_DYNAMIC_SMEM


def _check_problem(batch: int, heads: int, query_len: int, key_len: int,
                   head_dim: int) -> None:
    for name, value in (
        ("batch", batch), ("heads", heads), ("query_len", query_len), ("key_len", key_len)
    ):
        if value < 0:
            raise UnsupportedLaunch(f"{name} must be >= 0, got {value}")
    if head_dim < 0 or head_dim > MAX_HEAD_DIM:
        raise UnsupportedLaunch(
            f"head dim E={head_dim} is outside [0, {MAX_HEAD_DIM}], "
            "the range the CUDA kernel takes"
        )
    # The kernels index rows and keys of a tile with 32-bit ints.
    if max(query_len, key_len) >= 2**31 - BLOCK_N:
        raise UnsupportedLaunch(
            f"sequence length {max(query_len, key_len)} is too long for the CUDA kernel"
        )


def _plan(cfg: FlashConfig, *, outer: int, length: int, head_dim: int, value_head_dim: int,
          max_dynamic_smem: int, what: str, heads_per_block: int = 1) -> LaunchPlan:
    m_tiles = -(-length // cfg.block_m)
    blocks = outer * m_tiles
    if blocks > MAX_GRID_X:
        raise UnsupportedLaunch(
            f"{what}*ceil({length}/{cfg.block_m}) = {blocks} blocks exceed the grid limit "
            f"{MAX_GRID_X}"
        )
    smem = flash_shared_mem(cfg, head_dim, value_head_dim)
    if smem > max_dynamic_smem:
        raise UnsupportedLaunch(
            f"E={head_dim}, Ev={value_head_dim} in {cfg.dtype} needs {smem} bytes of shared "
            f"memory per block ({cfg.kernel}); the device allows {max_dynamic_smem}"
        )
    return LaunchPlan(cfg, (blocks, 1, 1), (cfg.threads, 1, 1), smem, m_tiles,
                      heads_per_block)


def plan_flash_forward(
    *,
    batch: int,
    heads: int,
    query_len: int,
    key_len: int,
    head_dim: int,
    value_head_dim: int,
    dtype: str,
    max_dynamic_smem: int,
) -> LaunchPlan:
    """Grid, block and shared memory for one forward launch.

    The grid is one-dimensional: block x handles query tile ``x % m_tiles`` of the
    (batch, head) pair ``x // m_tiles``, so B * H is not bounded by grid.y's 65535.
    Callers skip the launch when the grid would be empty (B, H or L zero).

    Examples
    --------
    >>> p = plan_flash_forward(batch=2, heads=3, query_len=70, key_len=5, head_dim=16,
    ...                        value_head_dim=24, dtype="float32",
    ...                        max_dynamic_smem=48 * 1024)
    >>> p.grid, p.block, p.shared_mem, p.m_tiles
    ((30, 1, 1), (128, 1, 1), 4288, 5)
    """
    _check_problem(batch, heads, query_len, key_len, head_dim)
    cfg = flash_config(dtype, value_head_dim)
    return _plan(cfg, outer=batch * heads, length=query_len, head_dim=head_dim,
                 value_head_dim=value_head_dim, max_dynamic_smem=max_dynamic_smem,
                 what="B*H")


def plan_flash_backward(
    *,
    batch: int,
    heads: int,
    key_heads: int,
    value_heads: int,
    query_len: int,
    key_len: int,
    head_dim: int,
    value_head_dim: int,
    dtype: str,
    max_dynamic_smem: int,
) -> tuple[LaunchPlan, LaunchPlan]:
    """The dQ and the dK/dV launches of one backward pass.

    dQ's grid is the forward's (query tiles of each (batch, head) pair). dK/dV's block
    x handles key tile ``x % m_tiles`` of (batch, head run) ``x // m_tiles``, a run being
    ``heads_per_block`` consecutive query heads. Callers skip a launch whose grid would
    be empty.

    Examples
    --------
    >>> dq, dkdv = plan_flash_backward(batch=2, heads=8, key_heads=2, value_heads=2,
    ...                                query_len=70, key_len=40, head_dim=64,
    ...                                value_head_dim=64, dtype="float64",
    ...                                max_dynamic_smem=99 * 1024)
    >>> dq.grid, dq.m_tiles, dkdv.grid, dkdv.m_tiles, dkdv.heads_per_block
    ((144, 1, 1), 9, (20, 1, 1), 5, 4)
    """
    _check_problem(batch, heads, query_len, key_len, head_dim)
    if heads and (key_heads <= 0 or value_heads <= 0 or heads % key_heads
                  or heads % value_heads):
        raise UnsupportedLaunch(
            f"key heads ({key_heads}) and value heads ({value_heads}) must divide query "
            f"heads ({heads})"
        )
    dq_cfg = backward_config("flash_bwd_dq", dtype, head_dim, value_head_dim)
    dkdv_cfg = backward_config("flash_bwd_dkdv", dtype, head_dim, value_head_dim)
    run = heads_per_block(heads, key_heads, value_heads)
    common = dict(head_dim=head_dim, value_head_dim=value_head_dim,
                  max_dynamic_smem=max_dynamic_smem)
    dq = _plan(dq_cfg, outer=batch * heads, length=query_len, what="B*H", **common)
    dkdv = _plan(dkdv_cfg, outer=batch * (heads // run), length=key_len,
                 what=f"B*H/{run}", heads_per_block=run, **common)
    return dq, dkdv
