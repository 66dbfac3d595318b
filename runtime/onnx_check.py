"""Validation of an ONNX file's external-data references before ONNX Runtime follows them.

A location must be a plain relative path inside the model's folder, and every (offset,
length) must lie inside the referenced file. Used when the runtime loads an artifact and when
kiln reads an ONNX file; it raises ``kiln.errors.KilnError`` (a light module).
"""
from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import KilnError


def check_external_data(path) -> None:
    import onnx
    from onnx import TensorProto
    path = Path(path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:                         # protobuf raises its own DecodeError
        raise KilnError(path, f"not a readable ONNX model ({e.__class__.__name__})") from None
    folder = path.parent.resolve()
    sizes: dict[Path, int] = {}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts or "\\" in loc or "\0" in loc:
            raise KilnError(path, f"initializer {t.name} points at external data {loc!r} outside the model folder")
        target = (folder / p).resolve()
        if folder not in target.parents:
            raise KilnError(path, f"initializer {t.name} points at external data {loc!r} outside the model folder")
        if not target.is_file():
            raise KilnError(path, f"initializer {t.name}: external data file {loc} is missing")
        size = sizes.setdefault(target, target.stat().st_size)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise KilnError(path, f"initializer {t.name}: offset/length are not numbers") from None
        if offset < 0 or length < -1 or offset + max(length, 0) > size:
            raise KilnError(path, f"initializer {t.name}: bytes {offset}..{offset + length} lie outside {loc} ({size} bytes)")
