"""The x86 vector instruction sets a CPU has, as Linux names them in /proc/cpuinfo: the one
place kiln reads them (the compiler's ``cpu`` preset asks :func:`host_isa` and :func:`host_flags`).

A TVM library compiled for one CPU (``--target cpu`` takes this machine's exact model) runs
that CPU's instructions unconditionally, so on a CPU without them it dies of SIGILL. The
compiler records the instruction sets an artifact needs; the runtime refuses, with a one-line
error, a machine that lacks one.
"""
from __future__ import annotations

import platform

#: The flags that matter to compiled kernels: what LLVM's -mcpu may use for vector code.
SIMD_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx_vnni",
})


def _cpuinfo(field: str) -> str | None:
    """The first CPU's ``field`` line in /proc/cpuinfo, None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_flags() -> frozenset | None:
    """This CPU's vector flags, or None where they cannot be read (not Linux)."""
    flags = _cpuinfo("flags")
    return None if flags is None else frozenset(flags.split()) & SIMD_FLAGS


def host_model() -> str | None:
    """This CPU's model name (for notes under benchmark pictures), None where unknown."""
    return _cpuinfo("model name")


def host_isa() -> str:
    """The preset instruction set this machine's CPU runs: neon, avx512, avx2 or sse4 (avx2
    where the flags cannot be read)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "neon"
    flags = host_flags()
    if flags is None:
        return "avx2"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "sse4"


def missing(required) -> list[str]:
    """The required flags this CPU lacks (none when its flags cannot be read)."""
    have = host_flags()
    return [] if have is None else sorted(set(required) - have)
