"""The x86 vector instruction sets a CPU has, as Linux names them in /proc/cpuinfo.

A TVM library compiled for one CPU (``--target cpu`` takes this machine's exact model) runs
that CPU's instructions unconditionally, so on a CPU without them it dies of SIGILL. The
compiler records the instruction sets an artifact needs; the runtime refuses, with a one-line
error, a machine that lacks one.
"""
from __future__ import annotations

#: The flags that matter to compiled kernels: what LLVM's -mcpu may use for vector code.
SIMD_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx_vnni",
})

#: What kiln's fixed x86 presets compile for (LLVM's haswell and skylake-avx512).
PRESET_FLAGS = {
    "avx2": frozenset({"avx", "avx2", "fma", "f16c", "bmi2"}),
    "avx512": frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
                         "avx512dq", "avx512cd"}),
}


def host_flags() -> frozenset | None:
    """This CPU's vector flags, or None where they cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()) & SIMD_FLAGS
    except OSError:
        pass
    return None


def missing(required) -> list[str]:
    """The required flags this CPU lacks (none when its flags cannot be read)."""
    have = host_flags()
    return [] if have is None else sorted(set(required) - have)
