"""Launch arithmetic for the CUDA kernels: tiles, grid, block and shared memory.

Plain Python with no CuPy, so that it is unit-tested everywhere and shared by the CuPy
path, the CPU shim and the NVRTC compile gate (which compiles exactly the
instantiations listed here).

Shape legend: B batch, H query heads, L query length, S key length, E head dim of q/k,
Ev head dim of v.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BLOCK_N",
    "DEFAULT_DYNAMIC_SMEM",
    "MAX_HEAD_DIM",
    "FlashConfig",
    "LaunchPlan",
    "UnsupportedLaunch",
    "all_flash_configs",
    "flash_config",
    "flash_shared_mem",
    "plan_flash_forward",
]

WARP_SIZE = 32
#: Keys per tile: one key per lane of a warp.
BLOCK_N = 32
#: Largest E and Ev the forward kernel takes.
MAX_HEAD_DIM = 256
#: Dynamic shared memory a kernel may use without raising its
#: ``max_dynamic_shared_size_bytes`` attribute first.
DEFAULT_DYNAMIC_SMEM = 48 * 1024
#: The largest grid.x a launch may have (2**31 - 1).
MAX_GRID_X = 2**31 - 1

_ITEMSIZE = {"float32": 4, "float64": 8}
_CTYPE = {"float32": "float", "float64": "double"}
_DV_BUCKETS = (32, 64, 128, 256)

# (warps, rows per warp) by compute dtype and Ev bucket. Chosen so that ptxas reports no
# spill for sm_80 and sm_90 (the compile gate enforces it; ptxas spills on a few nearby
# choices, e.g. double with 4 rows at Ev <= 64 on sm_80) and so that fp64 with E = 256
# stays under the 99 KiB a block gets on consumer GPUs.
_TILES = {
    ("float32", 32): (4, 4),
    ("float32", 64): (4, 4),
    ("float32", 128): (4, 4),
    ("float32", 256): (4, 4),
    ("float64", 32): (4, 4),
    ("float64", 64): (4, 2),
    ("float64", 128): (4, 2),
    ("float64", 256): (4, 2),
}


class UnsupportedLaunch(ValueError):
    """The kernel cannot run this problem (head dim too large, shared memory, grid)."""


@dataclass(frozen=True)
class FlashConfig:
    """One compiled instantiation of ``flash_fwd<T, DV_MAX, WARPS, ROWS>``.

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

    @property
    def block_m(self) -> int:
        """Query rows per block."""
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
        return f"flash_fwd<{_CTYPE[self.dtype]}, {self.dv_max}, {self.warps}, {self.rows}>"


def _check_dtype(dtype: str) -> None:
    if dtype not in _ITEMSIZE:
        raise UnsupportedLaunch(
            f"compute dtype {dtype!r} is not supported by the CUDA kernels; "
            "use 'float32' or 'float64'"
        )


def flash_config(dtype: str, value_head_dim: int) -> FlashConfig:
    """The instantiation that serves Ev = `value_head_dim` in `dtype`.

    Examples
    --------
    >>> flash_config("float32", 16).name_expression
    'flash_fwd<float, 32, 4, 4>'
    >>> flash_config("float64", 257)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    UnsupportedLaunch: value head dim Ev=257 exceeds 256, the largest the kernel takes
    """
    _check_dtype(dtype)
    if value_head_dim < 0:
        raise UnsupportedLaunch(f"value head dim must be >= 0, got {value_head_dim}")
    for bucket in _DV_BUCKETS:
        if value_head_dim <= bucket:
            warps, rows = _TILES[(dtype, bucket)]
            return FlashConfig(dtype, bucket, warps, rows)
    raise UnsupportedLaunch(
        f"value head dim Ev={value_head_dim} exceeds {MAX_HEAD_DIM}, "
        "the largest the CUDA kernel takes"
    )


def all_flash_configs() -> tuple[FlashConfig, ...]:
    """Every instantiation the forward kernel is compiled for, in a fixed order.

    Examples
    --------
    >>> len(all_flash_configs())
    8
    """
    return tuple(
        FlashConfig(dtype, bucket, *_TILES[(dtype, bucket)])
        for dtype in ("float32", "float64")
        for bucket in _DV_BUCKETS
    )


def flash_shared_mem(cfg: FlashConfig, head_dim: int, value_head_dim: int) -> int:
    """Dynamic shared memory in bytes: the query tile and one key-or-value tile.

    The query tile's rows are E + 1 elements; the key-or-value tile (one buffer, used for
    the keys and then the values of the same 32 positions) is as wide as the wider of
    the two, rounded up to an odd stride so that 32 lanes reading 32 different rows hit
    32 different banks.

    Examples
    --------
    >>> flash_shared_mem(flash_config("float64", 64), 64, 64)
    20800
    """
    q_stride = head_dim + 1
    kv_stride = max(head_dim + 1, value_head_dim) | 1
    return (cfg.block_m * q_stride + BLOCK_N * kv_stride) * cfg.itemsize


def max_flash_shared_mem(cfg: FlashConfig) -> int:
    """The most dynamic shared memory `cfg` can ask for (E = MAX_HEAD_DIM, Ev = DV_MAX).

    Examples
    --------
    >>> max_flash_shared_mem(flash_config("float64", 256))
    82240
    """
    return flash_shared_mem(cfg, MAX_HEAD_DIM, cfg.dv_max)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch of the forward kernel needs besides the arrays."""

    config: FlashConfig
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    m_tiles: int

    @property
    def needs_smem_opt_in(self) -> bool:
        """True when the kernel's dynamic shared memory attribute must be raised first."""
        return self.shared_mem > DEFAULT_DYNAMIC_SMEM


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
    cfg = flash_config(dtype, value_head_dim)
    # The kernel indexes rows and keys with 32-bit ints.
    if max(query_len, key_len) >= 2**31 - BLOCK_N:
        raise UnsupportedLaunch(
            f"sequence length {max(query_len, key_len)} is too long for the CUDA kernel"
        )
    m_tiles = -(-query_len // cfg.block_m)
    blocks = batch * heads * m_tiles
    if blocks > MAX_GRID_X:
        raise UnsupportedLaunch(
            f"B*H*ceil(L/{cfg.block_m}) = {blocks} blocks exceed the grid limit {MAX_GRID_X}"
        )
    smem = flash_shared_mem(cfg, head_dim, value_head_dim)
    if smem > max_dynamic_smem:
        raise UnsupportedLaunch(
            f"E={head_dim}, Ev={value_head_dim} in {dtype} needs {smem} bytes of shared "
            f"memory per block; the device allows {max_dynamic_smem}"
        )
    return LaunchPlan(cfg, (blocks, 1, 1), (cfg.threads, 1, 1), smem, m_tiles)
