"""The compile gate: build every kernel instantiation to CUBINs with NVRTC, no GPU needed.

PTX alone would let register spills and shared-memory overruns through: only ptxas,
which turns PTX into machine code for a real architecture, allocates registers and
lays out shared memory. So each source is compiled to a CUBIN for each architecture
with ``--ptxas-options=-v``, and the resource report ptxas prints is parsed and held
against the architecture's limits.

Uses the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels (``from cuda.bindings import
nvrtc``), imported on first use only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "ARCH_LIMITS",
    "ArchLimits",
    "GateCompileError",
    "GateResult",
    "KernelReport",
    "check",
    "compile_cubin",
    "nvrtc_available",
    "parse_ptxas_log",
]


@dataclass(frozen=True)
class ArchLimits:
    """Per-block limits of one architecture."""

    static_smem: int
    """Static shared memory a kernel may declare (48 KiB on every architecture)."""
    smem_optin: int
    """Static plus dynamic shared memory a block may have once opted in."""
    registers: int = 65536
    """32-bit registers a block may use."""


#: sm_80 (A100): 163 KiB per block; sm_90 (H100): 227 KiB.
ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits(static_smem=48 * 1024, smem_optin=163 * 1024),
    "sm_90": ArchLimits(static_smem=48 * 1024, smem_optin=227 * 1024),
}


class GateCompileError(RuntimeError):
    """NVRTC (or ptxas behind it) rejected the source; the message is its log."""


@dataclass(frozen=True)
class KernelReport:
    """What ptxas reported for one function."""

    name: str
    registers: int = 0
    barriers: int = 0
    static_smem: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass
class GateResult:
    """One compilation: the CUBIN, the log and the per-kernel reports."""

    arch: str
    cubin: bytes
    log: str
    lowered: dict[str, str]
    """Name expression -> mangled name."""
    reports: dict[str, KernelReport] = field(default_factory=dict)
    """Mangled name -> report, for entry kernels and any non-inlined function."""

    def report(self, name_expression: str) -> KernelReport:
        return self.reports[self.lowered[name_expression]]


def nvrtc_available() -> bool:
    """True when NVRTC can be loaded from the installed wheels."""
    try:
        from cuda.bindings import nvrtc

        err, _, _ = nvrtc.nvrtcVersion()
        return int(err) == 0
    except Exception:
        return False


def _check(result: tuple, what: str) -> tuple:
    err = result[0]
    if int(err) != 0:
        raise GateCompileError(f"{what} failed: {err!r}")
    return result[1:]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)


def parse_ptxas_log(log: str) -> dict[str, KernelReport]:
    """Per-function resource usage from ptxas's ``-v`` output.

    Examples
    --------
    >>> log = '''ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
    ... ptxas info    : Function properties for _Z1kPf
    ... ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
    ... ptxas info    : Used 32 registers, used 1 barriers, 1024 bytes smem, 364 bytes cmem[0]'''
    >>> r = parse_ptxas_log(log)['_Z1kPf']
    >>> r.registers, r.barriers, r.static_smem, r.spill_stores, r.spill_loads
    (32, 1, 1024, 4, 4)
    """
    fields: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line) or _PROPERTIES.search(line)
        if m:
            current = m.group(1)
            fields.setdefault(current, {})
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            fields[current].update(
                stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)),
            )
            continue
        m = _USED.search(line)
        if m:
            fields[current]["registers"] = int(m.group(1))
            for key, pattern in (("barriers", _BARRIERS), ("static_smem", _SMEM)):
                found = pattern.search(line)
                if found:
                    fields[current][key] = int(found.group(1))
    return {name: KernelReport(name, **values) for name, values in fields.items()}


def compile_cubin(
    code: str,
    name_expressions: Iterable[str],
    arch: str,
    *,
    options: Iterable[str] = ("-std=c++17",),
    filename: str = "kernel.cu",
) -> GateResult:
    """Compile `code` to a CUBIN for `arch` (e.g. "sm_80") with ptxas's report.

    Raises GateCompileError with NVRTC's log when the source does not compile.
    """
    from cuda.bindings import nvrtc

    names = list(name_expressions)
    (prog,) = _check(nvrtc.nvrtcCreateProgram(code.encode(), filename.encode(), 0, [], []),
                     "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *options]
        (compiled,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        (size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if int(compiled) != 0:
            raise GateCompileError(f"NVRTC could not compile {filename} for {arch}:\n{log}")
        (size,) = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {}
        for name in names:
            (mangled,) = _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()),
                                "nvrtcGetLoweredName")
            lowered[name] = mangled.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return GateResult(arch, cubin, log, lowered, parse_ptxas_log(log))


def check(
    result: GateResult,
    *,
    threads: Mapping[str, int],
    max_dynamic_smem: Mapping[str, int],
) -> list[str]:
    """Every way `result` breaks the gate, as messages; empty when it passes.

    `threads` and `max_dynamic_smem` give, per name expression, the block size and the
    most dynamic shared memory its launches can request.
    """
    limits = ARCH_LIMITS[result.arch]
    problems = []
    if not result.cubin.startswith(b"\x7fELF"):
        problems.append(f"{result.arch}: NVRTC returned no CUBIN (an ELF image)")
    for line in result.log.splitlines():
        if _WARNING.search(line):
            problems.append(f"{result.arch}: compiler warning: {line.strip()}")
    for report in result.reports.values():
        if report.spill_stores or report.spill_loads:
            problems.append(
                f"{result.arch}: {report.name} spills registers ({report.spill_stores} bytes "
                f"stored, {report.spill_loads} loaded)"
            )
    for name, mangled in result.lowered.items():
        found = result.reports.get(mangled)
        if found is None or found.registers == 0:
            problems.append(f"{result.arch}: ptxas reported nothing for {name} ({mangled})")
            continue
        report = found
        if report.static_smem > limits.static_smem:
            problems.append(
                f"{result.arch}: {name} declares {report.static_smem} bytes of static shared "
                f"memory (limit {limits.static_smem})"
            )
        total = report.static_smem + max_dynamic_smem[name]
        if total > limits.smem_optin:
            problems.append(
                f"{result.arch}: {name} may need {total} bytes of shared memory per block "
                f"({report.static_smem} static + {max_dynamic_smem[name]} dynamic; "
                f"limit {limits.smem_optin})"
            )
        if report.registers * threads[name] > limits.registers:
            problems.append(
                f"{result.arch}: {name} uses {report.registers} registers x {threads[name]} "
                f"threads, over the {limits.registers} a block may have"
            )
    return problems
