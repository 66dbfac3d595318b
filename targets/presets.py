"""Device presets: what a target name means and which backends can serve it."""
from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.runtime.cpu_features import host_flags, host_isa

BACKENDS = ("onnxrt", "tvm")


#: the CUDA architectures there is a cuda-smXX preset for, and that --arch accepts
CUDA_ARCHS = ("sm80", "sm86", "sm89", "sm90")

#: the vector flags LLVM's haswell and skylake-avx512 (the fixed x86 presets) may use
_HASWELL = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})
_SKYLAKE_AVX512 = _HASWELL | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


@dataclass(frozen=True)
class Preset:
    name: str
    device: str            # cpu | cuda | metal
    isa: str | None        # avx512 | avx2 | neon | sm80 ...
    backends: tuple
    default_backend: str
    # x86 only: the CPU LLVM compiles for (None: this machine's own) and the vector flags a
    # machine needs to run what it compiled (recorded in a TVM artifact's manifest)
    llvm_cpu: str | None = None
    cpu_flags: frozenset = frozenset()


# TVM is every target's default: on this CPU it decodes 1.7-1.8x faster than ONNX Runtime with
# ~30% less memory (docs/design-notes.md); ONNX Runtime stays for a portable model.onnx and
# where TVM is not installed (choose_backend falls back to it then)
_BOTH = ("onnxrt", "tvm")
PRESETS = {
    "cpu-avx2": Preset("cpu-avx2", "cpu", "avx2", _BOTH, "tvm", "haswell", _HASWELL),
    "cpu-avx512": Preset("cpu-avx512", "cpu", "avx512", _BOTH, "tvm", "skylake-avx512", _SKYLAKE_AVX512),
    "cpu-neon": Preset("cpu-neon", "cpu", "neon", _BOTH, "tvm"),
    "cuda": Preset("cuda", "cuda", CUDA_ARCHS[0], _BOTH, "tvm"),
    **{f"cuda-{sm}": Preset(f"cuda-{sm}", "cuda", sm, _BOTH, "tvm") for sm in CUDA_ARCHS},
    "metal": Preset("metal", "metal", None, ("tvm",), "tvm"),
}


def names() -> list[str]:
    return ["cpu", *PRESETS]


def resolve(name: str, arch: str | None = None) -> Preset:
    """The preset called ``name``; ``arch`` (one of CUDA_ARCHS) picks a CUDA architecture.
    ``cpu`` is this machine's CPU: its instruction set's preset, compiled for its exact model."""
    if name == "cpu":
        isa = host_isa()
        base = PRESETS.get(f"cpu-{isa}", PRESETS["cpu-avx2"])
        flags = (host_flags() or frozenset()) if isa != "neon" else frozenset()
        return Preset("cpu", "cpu", isa, base.backends, base.default_backend, None, flags)
    if name not in PRESETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(names())}")
    preset = PRESETS[name]
    if arch is not None:
        arch = arch.replace("_", "").lower()
        if preset.device != "cuda" or arch not in CUDA_ARCHS:
            raise ValueError(f"--arch {arch} does not fit target {name!r} (CUDA architectures: {', '.join(CUDA_ARCHS)})")
        preset = replace(preset, name=f"cuda-{arch}", isa=arch)
    return preset


def backend_for(preset: Preset, backend: str | None) -> str:
    """The backend asked for, or the preset's default; a one-line error when it cannot serve it."""
    if backend is None:
        return preset.default_backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend not in preset.backends:
        raise ValueError(f"target {preset.name!r} has no {backend} backend; it has {', '.join(preset.backends)}")
    return backend


TVM_MISSING = ("the TVM backend needs Apache TVM: pip install 'kiln[tvm]' "
               "(apache-tvm==0.27.0.post1 with apache-tvm-ffi==0.1.14.post0), or use --backend onnxrt")
TVM_FALLBACK = ("Apache TVM is not installed, so this builds with ONNX Runtime (--backend onnxrt); "
                "pip install 'kiln[tvm]' for the default backend, which decodes faster")


def tvm_installed() -> bool:
    """Whether TVM's compiler (the ``tvm`` package) is installed here: found, not imported, so a
    model that fails to read does not wait for TVM's import first."""
    import importlib.util
    return importlib.util.find_spec("tvm") is not None


def choose_backend(preset: Preset, backend: str | None, tvm_here=tvm_installed) -> tuple[str, str | None]:
    """The backend to build with, and a notice when the default fell back to ONNX Runtime because
    TVM is not installed. Asked for by name, a missing TVM is a one-line error instead: the user
    wanted that backend, not any. ``tvm_here`` is only called when TVM is chosen."""
    chosen = backend_for(preset, backend)
    if chosen != "tvm" or tvm_here():
        return chosen, None
    if backend is None and "onnxrt" in preset.backends:
        return "onnxrt", TVM_FALLBACK
    raise ValueError(TVM_MISSING)
