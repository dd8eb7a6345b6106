"""The compile gate: every kernel instantiation builds to a CUBIN for sm_80 and sm_90.

NVRTC runs from the PyPI wheels, without a driver or a GPU. ptxas's resource report
must show no register spill and shared memory within each architecture's limits; a
compiler warning fails too. The second half shows the gate catching each fault.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from refattn._cuda import _launch, _modules
from refattn._cuda._nvrtc_gate import (
    ARCH_LIMITS,
    GateCompileError,
    GateResult,
    KernelReport,
    check,
    compile_cubin,
    parse_ptxas_log,
)

pytestmark = pytest.mark.usefixtures("nvrtc")

#: Kernel file -> the kernels (template names) it defines.
FILES = {"flash_fwd.cu": ("flash_fwd",), "flash_bwd.cu": ("flash_bwd_dq", "flash_bwd_dkdv")}
CONFIGS = {
    file: {c.name_expression: c for kernel in kernels for c in _launch.all_flash_configs(kernel)}
    for file, kernels in FILES.items()
}
ALL_CONFIGS = {name: c for configs in CONFIGS.values() for name, c in configs.items()}
THREADS = {name: c.threads for name, c in ALL_CONFIGS.items()}
MAX_DYNAMIC = {name: _launch.max_flash_shared_mem(c) for name, c in ALL_CONFIGS.items()}
JOBS = [(file, arch) for file in FILES for arch in sorted(ARCH_LIMITS)]


def _build(job: tuple[str, str]) -> GateResult:
    file, arch = job
    return compile_cubin(_modules.kernel_source(file), _modules.name_expressions(file), arch,
                         options=_modules.NVRTC_OPTIONS, filename=file)


@pytest.fixture(scope="module")
def builds() -> dict[tuple[str, str], GateResult]:
    """Every (kernel file, architecture) compiled, in parallel processes: ptxas on the
    unrolled fp64 instantiations is the longest step of tests/cuda, and the NVRTC
    binding holds the GIL, so threads would run one at a time."""
    workers = min(len(JOBS), os.cpu_count() or 1)
    if workers == 1:
        return {job: _build(job) for job in JOBS}
    # spawn: the test process has threads (forking it could copy a held lock).
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(JOBS, pool.map(_build, JOBS), strict=True))


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[0]}-{j[1]}")
def test_kernels_pass_the_gate(builds, job: tuple[str, str]) -> None:
    problems = check(builds[job], threads=THREADS, max_dynamic_smem=MAX_DYNAMIC)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[0]}-{j[1]}")
def test_every_instantiation_is_a_distinct_entry(builds, job: tuple[str, str]) -> None:
    result = builds[job]
    configs = CONFIGS[job[0]]
    assert sorted(result.lowered) == sorted(configs)
    assert len(set(result.lowered.values())) == len(configs)
    for name in configs:
        report = result.report(name)
        # One barrier id (__syncthreads and __syncthreads_or share barrier 0) and no
        # shared memory but the dynamic buffer.
        assert report.barriers == 1 and report.static_smem == 0, (name, report)
        assert 0 < report.registers <= 255


def test_compile_gate_and_cupy_use_the_same_instantiations() -> None:
    for file, configs in CONFIGS.items():
        assert _modules.name_expressions(file) == tuple(configs)


# ------------------------------------------------------------------ the gate's teeth
SPILLING_KERNEL = r"""
// 64 live floats against the 32 registers that 2 blocks of 1024 threads leave each.
extern "C" __global__ void __launch_bounds__(1024, 2) spill(float* x) {
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = x[threadIdx.x + i * 1024];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + r + 1) & 63] + 1.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) s += acc[i] * (float)(i + 1);
    x[threadIdx.x] = s;
}
"""

STATIC_SMEM_KERNEL = r"""
extern "C" __global__ void tiles(double* x) {
    __shared__ double tile[NWORDS];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = tile[NWORDS - 1 - threadIdx.x];
}
"""


def test_infinity_macro_is_a_compile_error() -> None:
    # nvcc's headers define INFINITY; NVRTC has none, which is why the kernels build
    # their infinities from bit patterns.
    code = 'extern "C" __global__ void k(float* x) { x[0] = INFINITY; }'
    with pytest.raises(GateCompileError, match='identifier "INFINITY" is undefined'):
        compile_cubin(code, [], "sm_80")


def test_host_headers_are_a_compile_error() -> None:
    code = '#include <cmath>\nextern "C" __global__ void k(float* x) { x[0] = 1.0f; }'
    with pytest.raises(GateCompileError, match='could not open source file "cmath"'):
        compile_cubin(code, [], "sm_90")


def test_register_spills_fail_the_gate() -> None:
    result = compile_cubin(SPILLING_KERNEL, [], "sm_80")
    report = result.reports["spill"]
    assert report.spill_stores > 0 and report.spill_loads > 0
    problems = check(result, threads={}, max_dynamic_smem={})
    assert any("spill spills registers" in p for p in problems), problems


def test_static_shared_memory_over_48_kib_is_refused_by_ptxas() -> None:
    with pytest.raises(GateCompileError, match="uses too much shared data"):
        compile_cubin(STATIC_SMEM_KERNEL, [], "sm_80", options=("-DNWORDS=7000",))


@pytest.mark.parametrize(("arch", "dynamic", "fails"), [
    ("sm_80", 163 * 1024 - 40000, False),
    ("sm_80", 163 * 1024 - 40000 + 1, True),
    ("sm_90", 163 * 1024, False),
    ("sm_90", 227 * 1024 - 40000 + 1, True),
])
def test_static_plus_dynamic_shared_memory_is_held_to_the_architecture(
    arch: str, dynamic: int, fails: bool
) -> None:
    result = compile_cubin(STATIC_SMEM_KERNEL, ["tiles"], arch, options=("-DNWORDS=5000",))
    assert result.report("tiles").static_smem == 40000
    problems = check(result, threads={"tiles": 256}, max_dynamic_smem={"tiles": dynamic})
    assert any("bytes of shared memory per block" in p for p in problems) == fails, problems


def test_compiler_warnings_fail_the_gate() -> None:
    code = 'extern "C" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }'
    problems = check(compile_cubin(code, ["k"], "sm_90"), threads={"k": 32},
                     max_dynamic_smem={"k": 0})
    assert any("declared but never referenced" in p for p in problems), problems


def test_register_budget_of_a_block(builds) -> None:
    # The largest float32 instantiation uses over 64 registers: 1024 threads would not fit.
    name = _launch.flash_config("float32", 256).name_expression
    problems = check(builds[("flash_fwd.cu", "sm_80")], threads={**THREADS, name: 1024},
                     max_dynamic_smem=MAX_DYNAMIC)
    assert any(f"{name} uses" in p and "registers" in p for p in problems), problems


def test_static_limit_and_missing_reports_on_a_synthetic_result() -> None:
    result = GateResult(
        "sm_90", b"\x7fELF...", "", {"a": "_a", "b": "_b"},
        {"_a": KernelReport("_a", registers=32, static_smem=50000)},
    )
    problems = check(result, threads={"a": 128, "b": 128}, max_dynamic_smem={"a": 0, "b": 0})
    assert any("50000 bytes of static shared memory" in p for p in problems), problems
    assert any("ptxas reported nothing for b" in p for p in problems), problems
    result.cubin = b"// PTX"
    assert any("no CUBIN" in p for p in check(result, threads={"a": 1, "b": 1},
                                              max_dynamic_smem={"a": 0, "b": 0}))


def test_parse_ptxas_log_reads_entries_and_device_functions() -> None:
    log = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function '_Z4mainPf' for 'sm_90'
ptxas info    : Function properties for _Z4mainPf
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 2 barriers, 4096 bytes smem
"""
    reports = parse_ptxas_log(log)
    assert reports["helper"] == KernelReport("helper", stack_frame=24, spill_stores=8,
                                             spill_loads=12)
    assert reports["_Z4mainPf"] == KernelReport("_Z4mainPf", registers=40, barriers=2,
                                                static_smem=4096)
