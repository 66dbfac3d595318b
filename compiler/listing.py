"""``kiln list``: the targets, backends, quantization types and model short names kiln knows,
read from the registries that define them (presets, formats, quantization schemes, known
models), so the list cannot fall behind them."""
from __future__ import annotations

import importlib.util

# the Python module each backend runs on, to say whether it is installed here
_BACKEND_MODULES = {"onnxrt": "onnxruntime", "tvm": "tvm"}


def bits_per_weight(fmt) -> float:
    return fmt.type_size * 8 / fmt.block_size


def sections() -> dict[str, list[str]]:
    """Section title -> its lines."""
    from kiln import formats, quant_schemes
    from kiln.frontends.known_models import KNOWN
    from kiln.targets import presets

    targets = []
    for name in presets.names():
        p = presets.resolve(name)
        what = f"{p.device}" + (f", {p.isa}" if p.isa else "") + (" (this host)" if name == "cpu" else "")
        targets.append(f"{name:<12} {what:<24} backends {', '.join(p.backends)} (default {p.default_backend})")
    backends = []
    for name in presets.BACKENDS:
        module = _BACKEND_MODULES.get(name)
        here = "installed" if module and importlib.util.find_spec(module) else "not installed"
        backends.append(f"{name:<12} {here}")
    quant = []
    for name in quant_schemes.block_types():
        if name in quant_schemes.MIXTURES:
            continue                    # the name means the mixture (as llama.cpp's file type)
        quant.append(f"{name:<12} {bits_per_weight(formats.get(name)):.2f} bits per weight")
    for name, scheme in quant_schemes.MIXTURES.items():
        more = ", ".join(["output", *scheme.rules])
        quant.append(f"{name:<12} mixture: {scheme.base} ({bits_per_weight(formats.get(scheme.base)):.2f} bits "
                     f"per weight), more bits for {more}")
    models = [f"{name:<12} {filename} (Python package {package})" for name, (package, filename, _) in KNOWN.items()]
    return {"targets (--target)": targets, "backends (--backend)": backends,
            "quantization (--quant)": quant, "model short names": models}


def render(console) -> None:
    for i, (title, lines) in enumerate(sections().items()):
        if i:
            console.print()
        console.print(f"{title}:", markup=False)
        for line in lines:
            console.print(f"  {line}", markup=False)
