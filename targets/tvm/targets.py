"""kiln presets as TVM targets, and how each one's library is exported."""
from __future__ import annotations

from dataclasses import dataclass

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


def for_preset(preset) -> TVMTarget:
    """The TVM target of a kiln preset (``kiln.targets.presets``): cpu (this machine's CPU),
    cpu-avx2, cpu-avx512, cpu-neon (aarch64, cross-compiled: exported as objects to link
    there), cuda[-smXX], metal."""
    import os
    import platform
    device, isa = preset.device, preset.isa
    if device == "cpu":
        cores = os.cpu_count() or 1
        machine = platform.machine().lower()
        if isa == "neon":
            native = machine in ("arm64", "aarch64")
            target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": cores}
            if native:
                target = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores}
            return TVMTarget(target, None, False, "model.so" if native else "model.tar", None if native else "aarch64")
        target = {"kind": "llvm", "mcpu": preset.llvm_cpu or host_cpu(), "num-cores": cores}
        return TVMTarget(target, None, False, "model.so", None)
    if device == "cuda":
        return TVMTarget({"kind": "cuda", "arch": f"sm_{isa[2:]}"}, {"kind": "llvm"}, True, "model.so", None)
    if device == "metal":
        return TVMTarget({"kind": "metal"}, {"kind": "llvm", "mtriple": "arm64-apple-macos"}, True, "model.tar", None)
    raise ValueError(f"the TVM backend has no target for device {device!r}")
