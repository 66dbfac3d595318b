"""Device presets: what a target name means and which backends can serve it."""
from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    device: str            # cpu | cuda | metal
    isa: str | None        # avx512 | avx2 | neon | sm80 ...
    backends: tuple
    default_backend: str


def host_isa() -> str:
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "neon"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "avx2"
    if " avx512f" in flags:
        return "avx512"
    if " avx2" in flags:
        return "avx2"
    return "sse4"


PRESETS = {
    "cpu-avx2": Preset("cpu-avx2", "cpu", "avx2", ("onnxrt",), "onnxrt"),
    "cpu-avx512": Preset("cpu-avx512", "cpu", "avx512", ("onnxrt",), "onnxrt"),
    "cpu-neon": Preset("cpu-neon", "cpu", "neon", ("onnxrt",), "onnxrt"),
    "cuda": Preset("cuda", "cuda", None, ("onnxrt",), "onnxrt"),
}


def resolve(name: str) -> Preset:
    if name == "cpu":
        isa = host_isa()
        base = PRESETS.get(f"cpu-{isa}", PRESETS["cpu-avx2"])
        return Preset("cpu", "cpu", isa, base.backends, base.default_backend)
    if name not in PRESETS:
        raise ValueError(f"unknown target {name!r}; known: cpu, {', '.join(PRESETS)}")
    return PRESETS[name]
