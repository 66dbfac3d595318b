"""The manifest's numbers that size memory, checked before anything is allocated.

A session allocates its KV cache from the manifest's ``kv_cache`` entry (layers x kv_heads x
capacity x head_dim per row) and grows it up to ``max_length``. The manifest is text anyone
can edit, so each number must be a whole JSON number in a sane range and agree with what the
artifact's files hold: on ONNX Runtime the graph's cache inputs give the layers and their
shape exactly; on TVM the weights bound them (every layer has weights of its own, and a
layer's keys are a projection at least kv_heads x head_dim wide) and the rotary tables bound
the positions a sequence may reach (a kernel reading a table past its end would read outside
it). A number out of range is an ArtifactError naming the manifest, not a multi-gigabyte
allocation, an OSError from mmap, or a read past a table.
"""
from __future__ import annotations

import re
from pathlib import Path

from kiln.artifact import MANIFEST, ArtifactError

#: No released model reaches 16M positions; a max_length past it is a damaged manifest.
MAX_LENGTH_CEILING = 1 << 24
_LAYER = re.compile(r"layers\.(\d+)\.")


def whole(folder, value, what: str, *, low: int = 1, high: int = MAX_LENGTH_CEILING) -> int:
    """``value`` as an int in [low, high]: a JSON integer, not a bool, float or string."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's {what} is {shown}, not a whole number "
                                                     f"from {low} to {high}")
    return value


def max_length(folder, limit, config: dict, *, table_rows: int | None = None) -> int | None:
    """The most positions a sequence may hold: the backend entry's ``max_length`` (``limit``),
    else the model's ``max_position_embeddings`` (None when neither is given), never past
    ``table_rows``."""
    for value, what in ((limit, "backend max_length"), (config.get("max_position_embeddings"), "config max_position_embeddings")):
        if value is not None:
            n = whole(folder, value, what)
            break
    else:
        n = None
    if table_rows is not None and (n is None or n > table_rows):
        if n is not None:
            raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's max_length {n} is past the "
                                                         f"{table_rows} positions its rotary tables hold")
        n = table_rows
    return n


def check_onnx_cache(folder, layers, kv_heads, head_dim, inputs: dict) -> tuple[int, int, int]:
    """The kv_cache numbers against the ONNX graph's cache inputs (``past_key.N``, shaped
    [batch, kv_heads, past, head_dim]); ``inputs`` maps input names to shapes."""
    present = sorted(int(n.rsplit(".", 1)[1]) for n in inputs if re.fullmatch(r"past_key\.\d+", n))
    layers = whole(folder, layers, "kv_cache layers", low=0, high=max(len(present), 0))
    if present != list(range(layers)):
        raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's kv_cache layers is {layers}, but the "
                                                     f"model has {len(present)} cache inputs")
    kv_heads = whole(folder, kv_heads, "kv_cache kv_heads", high=1 << 16)
    head_dim = whole(folder, head_dim, "kv_cache head_dim", high=1 << 16)
    if layers:
        shape = inputs["past_key.0"]
        for i, (name, value) in ((1, ("kv_heads", kv_heads)), (3, ("head_dim", head_dim))):
            if len(shape) == 4 and isinstance(shape[i], int) and shape[i] != value:
                raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's kv_cache {name} is {value}, but "
                                                             f"the model's cache inputs have {shape[i]}")
    return layers, kv_heads, head_dim


def check_weights_cache(folder, layers, kv_heads, head_dim, index: dict) -> tuple[int, int, int]:
    """The kv_cache numbers against the weights (``safetensors_index.read_index``'s entries)."""
    numbered = {int(m.group(1)) for name in index if (m := _LAYER.match(name))}
    layers = whole(folder, layers, "kv_cache layers", high=max(len(numbered) or len(index), 1))
    widest = max((e.nbytes for e in index.values()), default=0)
    kv_heads = whole(folder, kv_heads, "kv_cache kv_heads", high=1 << 16)
    head_dim = whole(folder, head_dim, "kv_cache head_dim", high=1 << 16)
    if kv_heads * head_dim > widest:
        raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's kv_cache of {kv_heads} heads x {head_dim} "
                                                     f"is wider than any weight the model holds")
    return layers, kv_heads, head_dim


def rotary_rows(index: dict) -> int | None:
    """Positions the weights' rotary tables cover (their first dimension), None without tables."""
    rows = [e.shape[0] for name, e in index.items() if "rotary_cos" in name and e.shape]
    return min(rows) if rows else None
