"""refattn's fused CUDA kernels against torch's SDPA and refattn's array-API path on a GPU.

For each shape (B, H, L, S, E), causal and not, in float64 and float32, forward and
backward, prints the median time of

* refattn's kernels (``refattn.attention`` / ``attention_backward`` with
  ``implementation="cuda"``, the backward given the saved output and LSE, as an autograd
  backward has them);
* refattn's array-API path on the same CuPy arrays (``implementation="direct"``), the
  code the kernels replace;
* torch's ``scaled_dot_product_attention`` on the same GPU (whatever backend torch picks:
  for float64 only its math path exists on CUDA), the backward ``torch.autograd.grad`` of
  an output computed outside the timed region;

each as the median of CUDA-event timings (CuPy events for refattn, torch events for
torch) after a warm-up call, which also compiles the kernels; the ratios of the others'
times to the kernels'; and the kernels' achieved FLOP rate as a fraction of the device's
fp64 or fp32 peak. FLOPs are counted as 4 B H L S E for the forward (two matmuls of
2 L S E each per head; halved for causal) and 2.5 times that for the backward (five such
matmuls, the recomputation of the scores included). Peaks are the non-tensor-core
(CUDA core) rates, which is what the kernels use, from a table by device name
(H100, H200, A100, ...), or given with ``--peak-fp64`` / ``--peak-fp32`` in TFLOP/s.

Run from the repository root on a machine with a GPU (``pip install -e '.[cuda12]'`` and
a CUDA build of torch for the torch columns)::

    python benchmarks/gpu.py             # the full table
    python benchmarks/gpu.py --quick     # one small shape, three repeats
    python benchmarks/gpu.py --shapes 0 --dtypes float64 --no-xp --repeats 20

Without a GPU it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

SHAPES = [(2, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64), (4, 16, 512, 512, 128)]
QUICK_SHAPE = (1, 4, 512, 512, 64)

#: Dense non-tensor-core peaks in TFLOP/s, (fp64, fp32), by a substring of the device
#: name; the first match wins, so the more specific names come first. From NVIDIA's
#: data sheets (boost clocks).
PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 25.6, 51.2),
    ("H100 NVL", 30.0, 60.0),
    ("H100", 33.5, 66.9),  # SXM5
    ("H200", 33.5, 66.9),
    ("GH200", 33.5, 66.9),
    ("A100", 9.7, 19.5),
    ("A30", 5.2, 10.3),
    ("V100", 7.8, 15.7),
    ("L40S", 1.43, 91.6),
    ("L4", 0.47, 30.3),
    ("RTX 4090", 1.29, 82.6),
    ("RTX 3090", 0.56, 35.6),
]


def _no_gpu(reason: str) -> int:
    print(f"benchmarks/gpu.py needs a CUDA GPU: {reason}", file=sys.stderr)
    return 2


def device_peak(name: str, fp64: float | None, fp32: float | None) -> tuple[float | None, ...]:
    """(fp64, fp32) peak TFLOP/s for device `name`: the flags, else the table, else None."""
    for key, p64, p32 in PEAKS:
        if key.lower() in name.lower():
            return (fp64 if fp64 is not None else p64, fp32 if fp32 is not None else p32)
    return fp64, fp32


def flops(shape: tuple[int, ...], causal: bool, backward: bool) -> float:
    """4 B H L S E forward (halved for causal), 2.5 times that backward."""
    B, H, L, S, E = shape
    f = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
    return 2.5 * f if backward else f


def _median_ms(fn: Callable[[], Any], repeats: int, events: Callable[[], tuple[Any, Any]],
               elapsed: Callable[[Any, Any], float]) -> float:
    fn()  # warm-up: compilation, allocator pools
    times = []
    for _ in range(repeats):
        start, end = events()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return statistics.median(times)


class Timers:
    """CUDA-event timing for CuPy and (when it has CUDA) torch."""

    def __init__(self, cupy: Any, torch: Any, repeats: int) -> None:
        self.cupy, self.torch, self.repeats = cupy, torch, repeats

    def cupy_ms(self, fn: Callable[[], Any]) -> float:
        cp = self.cupy
        return _median_ms(fn, self.repeats, lambda: (cp.cuda.Event(), cp.cuda.Event()),
                          cp.cuda.get_elapsed_time)

    def torch_ms(self, fn: Callable[[], Any]) -> float:
        t = self.torch
        return _median_ms(fn, self.repeats,
                          lambda: (t.cuda.Event(enable_timing=True),
                                   t.cuda.Event(enable_timing=True)),
                          lambda a, b: a.elapsed_time(b))


def _try(fn: Callable[[], float]) -> float | None:
    # A path that cannot run a shape (out of memory, unsupported) gets no number.
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported, and the table goes on
        print(f"    ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})")
        return None


def bench_shape(shape, causal: bool, dtype: str, timers: Timers, *, xp_path: bool,
                backward: bool) -> dict[str, dict[str, float | None]]:
    """Median milliseconds per path, {"fwd": {...}, "bwd": {...}}."""
    import refattn

    cp, torch = timers.cupy, timers.torch
    B, H, L, S, E = shape
    rng = cp.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, E)).astype(dtype) for n in (L, S, S))
    dout = rng.standard_normal((B, H, L, E)).astype(dtype)
    kw = dict(causal=causal, compute_dtype=dtype)
    res: dict[str, dict[str, float | None]] = {"fwd": {}, "bwd": {}}

    saved = refattn.attention(q, k, v, implementation="cuda", return_lse=True, **kw)
    res["fwd"]["refattn cuda"] = _try(lambda: timers.cupy_ms(
        lambda: refattn.attention(q, k, v, implementation="cuda", return_lse=True, **kw)))
    if backward:
        res["bwd"]["refattn cuda"] = _try(lambda: timers.cupy_ms(
            lambda: refattn.attention_backward(dout, q, k, v, output=saved.out,
                                               lse=saved.lse, implementation="cuda", **kw)))
    if xp_path:
        res["fwd"]["refattn xp"] = _try(lambda: timers.cupy_ms(
            lambda: refattn.attention(q, k, v, implementation="direct", **kw)))
        if backward:
            res["bwd"]["refattn xp"] = _try(lambda: timers.cupy_ms(
                lambda: refattn.attention_backward(dout, q, k, v, output=saved.out,
                                                   lse=saved.lse, implementation="direct",
                                                   **kw)))
        cp.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        tdt = getattr(torch, dtype)
        # DLPack shares the device memory: torch sees the very same inputs.
        tq, tk, tv, tdo = (torch.from_dlpack(x).to(tdt) for x in (q, k, v, dout))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        res["fwd"]["torch"] = _try(lambda: timers.torch_ms(
            lambda: sdpa(tq, tk, tv, is_causal=causal)))
        if backward:
            leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]
            out = sdpa(*leaves, is_causal=causal)
            res["bwd"]["torch"] = _try(lambda: timers.torch_ms(
                lambda: torch.autograd.grad(out, leaves, tdo, retain_graph=True)))
            del out, leaves
        torch.cuda.empty_cache()
    return res


def _fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(x, spec) if x is not None else "-".rjust(width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (10)")
    parser.add_argument("--shapes", type=str, default=None,
                        help="comma-separated indices into the shape list")
    parser.add_argument("--dtypes", type=str, default="float64,float32")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--no-xp", action="store_true",
                        help="skip refattn's array-API path (it materialises the scores)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch's SDPA")
    parser.add_argument("--peak-fp64", type=float, default=None, help="TFLOP/s")
    parser.add_argument("--peak-fp32", type=float, default=None, help="TFLOP/s")
    args = parser.parse_args(argv)

    try:
        import cupy
    except ImportError:
        return _no_gpu("CuPy is not installed (pip install -e '.[cuda12]' or '.[cuda13]')")
    try:
        available = bool(cupy.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - a broken driver install is "no GPU" here
        return _no_gpu(f"CuPy cannot reach a device ({exc})")
    if not available:
        return _no_gpu("cupy.cuda.is_available() is False (no device or driver)")

    torch = None
    if not args.no_torch:
        try:
            import torch as _torch

            torch = _torch if _torch.cuda.is_available() else None
        except ImportError:
            pass
        if torch is None:
            print("torch with CUDA not found: no torch columns")

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    peak64, peak32 = device_peak(name, args.peak_fp64, args.peak_fp32)
    print(f"device: {name}; peaks (TFLOP/s, CUDA cores): fp64 {peak64}, fp32 {peak32}"
          + ("" if peak64 and peak32 else " (unknown: pass --peak-fp64 / --peak-fp32)"))
    shapes = [QUICK_SHAPE] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    repeats = args.repeats or (3 if args.quick else 10)
    timers = Timers(cupy, torch, repeats)
    dtypes = [d.strip() for d in args.dtypes.split(",")]

    header = (f"{'(B, H, L, S, E)':>24} {'causal':>6} {'dtype':>7} {'pass':>4} "
              f"{'cuda ms':>9} {'xp ms':>9} {'torch ms':>9} {'xp/cuda':>8} "
              f"{'torch/cuda':>10} {'TFLOP/s':>8} {'of peak':>8}")
    print(header)
    for shape in shapes:
        for causal in (False, True):
            for dtype in dtypes:
                res = bench_shape(shape, causal, dtype, timers, xp_path=not args.no_xp,
                                  backward=not args.no_backward)
                for what, times in res.items():
                    if not times:
                        continue
                    t = times.get("refattn cuda")
                    xp_t, torch_t = times.get("refattn xp"), times.get("torch")
                    fl = flops(shape, causal, what == "bwd")
                    rate = fl / (t * 1e-3) / 1e12 if t else None
                    peak = peak64 if dtype == "float64" else peak32
                    print(f"{str(shape):>24} {str(causal):>6} {dtype:>7} {what:>4} "
                          f"{_fmt(t, '9.3f')} {_fmt(xp_t, '9.3f')} {_fmt(torch_t, '9.3f')} "
                          f"{_fmt(xp_t / t if xp_t and t else None, '8.2f')} "
                          f"{_fmt(torch_t / t if torch_t and t else None, '10.2f')} "
                          f"{_fmt(rate, '8.3f')} "
                          f"{_fmt(rate / peak if rate and peak else None, '8.1%')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
