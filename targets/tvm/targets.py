"""kiln presets as TVM targets, and how each one's library is exported."""
from __future__ import annotations

from dataclasses import dataclass

#: cuda-smXX presets and the architectures --arch accepts
CUDA_ARCHS = ("sm80", "sm86", "sm89", "sm90")


@dataclass(frozen=True)
class TVMTarget:
    target: dict            # TVM's target dict (device code)
    host: dict | None       # the host's, for GPU targets
    gpu: bool
    library: str            # file name of the exported library in the artifact
    cross: str | None       # the machine a cross-compiled CPU library runs on (aarch64), else None


def host_cpu() -> str:
    from tvm.target import codegen
    return codegen.llvm_get_system_cpu()


def for_preset(device: str, isa: str | None, arch: str | None = None, *, host: bool = False) -> TVMTarget:
    """The TVM target of a kiln preset: cpu (host ISA), cpu-avx2, cpu-avx512, cpu-neon
    (aarch64, cross-compiled: exported as objects to link there), cuda[-smXX], metal.
    ``host``: the plain ``cpu`` preset, compiled for exactly this machine's CPU."""
    import os
    import platform
    if device == "cpu":
        cores = os.cpu_count() or 1
        machine = platform.machine().lower()
        if isa == "neon":
            native = machine in ("arm64", "aarch64")
            target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": cores}
            if native:
                target = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores}
            return TVMTarget(target, None, False, "model.so" if native else "model.tar", None if native else "aarch64")
        mcpu = host_cpu() if host else {"avx2": "haswell", "avx512": "skylake-avx512"}.get(isa or "")
        target = {"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": cores}
        return TVMTarget(target, None, False, "model.so", None)
    if device == "cuda":
        sm = (arch or "sm80").replace("sm_", "sm")
        return TVMTarget({"kind": "cuda", "arch": f"sm_{sm[2:]}"}, {"kind": "llvm"}, True, "model.so", None)
    if device == "metal":
        return TVMTarget({"kind": "metal"}, {"kind": "llvm", "mtriple": "arm64-apple-macos"}, True, "model.tar", None)
    raise ValueError(f"the TVM backend has no target for device {device!r}")
