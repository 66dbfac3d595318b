"""Which frontend reads a path: by what the path is, not by what it is called."""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError


def resolve_path(path) -> Path:
    """A path, the file behind a known model name such as ``smollm2``, or a Hugging Face hub ID
    (``org/name``, fetched into the hub's cache: :mod:`kiln.frontends.hub`)."""
    p = Path(path)
    if not p.exists():
        from .known_models import resolve
        known = resolve(str(path))
        if known is not None:
            return known
        from . import hub
        if hub.is_hub_id(path):
            return hub.fetch(path)
    return p


def detect_format(path) -> str:
    p = Path(path)
    if not p.exists():
        from .known_models import close_names
        near = close_names(str(path))
        hint = f"; did you mean {' or '.join(near)} (a model short name, see kiln list)?" if near else ""
        raise KilnError(path, f"no such file or folder{hint}")
    if p.is_dir():
        from .onnx_read import is_onnx_folder
        if is_onnx_folder(p):       # before config.json: optimum writes one beside model.onnx
            return "onnx"
        if (p / "config.json").is_file() or (p / "modules.json").is_file():   # sentence-transformers: maybe in a subfolder
            return "hf"
        if (p / "manifest.json").is_file():
            raise KilnError(path, "this is a compiled kiln artifact; use `kiln run` on it")
        raise KilnError(path, "not a model: the folder has no config.json or model.onnx")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise KilnError(path, f"cannot read the file ({e.strerror})") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if p.suffix == ".safetensors":
        return "safetensors"
    if p.suffix == ".onnx":
        return "onnx"
    if p.suffix == ".gguf":
        raise KilnError(path, "not a GGUF file (the magic bytes are not 'GGUF')")
    raise KilnError(path, "not a model file kiln can read (expected a GGUF file, a .safetensors or .onnx file, or a Hugging Face or ONNX folder)")


def read_model(path):
    """Read any supported model into a ModelIR."""
    path = resolve_path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        from . import hf
        return hf.read(path)
    if fmt == "gguf":
        from . import gguf
        return gguf.read(path)
    if fmt == "onnx":
        from . import onnx_read
        return onnx_read.read(path)
    from . import safetensors_model
    return safetensors_model.read(path)
