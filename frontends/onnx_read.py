"""ONNX decoder models as a source: kiln's own exports (either I/O layout) and optimum-style
exports (with or without past KV), a ``model.onnx`` (+ external data) in a folder or a bare
``.onnx`` file.

The graph is not translated op by op: its initializers are mapped back onto the family's
weight roles and kiln's builder makes the IR, as for every other source (docs/design-notes.md,
"Reading ONNX"). Where the roles come from:

* kiln's export (``kiln_io.json`` beside it): initializers are named by role, ``.T`` for a
  weight stored transposed, ``.plus_X`` for a norm weight stored with its offset added; the
  exact config is kiln_io.json's.
* any other export: config.json beside it (optimum writes one) gives the family and sizes;
  an initializer keeps its Hugging Face name, or is named after the module that reads it —
  torch's exporter names a ``Linear``'s pre-transposed weight ``onnx::MatMul_123`` and the
  MatMul node ``/model/layers.0/self_attn/q_proj/MatMul``.

Every mapped weight is then checked against the config's shapes, and a matrix the graph reads
that maps onto no role is an error naming it, so a graph of another structure is refused
rather than half read.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np

from kiln.errors import KilnError, load_json_object
from kiln.ir import ModelIR
from kiln.weights import Weight

from . import arch as A
from . import hf
from .builder import build_graph

_FORMATS = {1: "f32", 10: "f16", 16: "bf16"}       # ONNX TensorProto float types kiln reads
_PLUS = re.compile(r"(.+)\.plus_(-?[0-9.eE+-]+)$")
# ops whose weight input names the module it belongs to
_WEIGHT_READERS = ("MatMul", "Gemm", "Gather", "Mul", "Add", "LayerNormalization",
                   "SimplifiedLayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization")


def model_file(path) -> Path:
    p = Path(path)
    return p / "model.onnx" if p.is_dir() else p


def is_onnx_folder(path) -> bool:
    """A folder holding model.onnx and no Hugging Face checkpoint (optimum writes config.json
    beside its model.onnx; a folder with safetensors too is read as the checkpoint)."""
    p = Path(path)
    if not (p / "model.onnx").is_file() or (p / "manifest.json").is_file():    # a kiln artifact
        return False
    return not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin"))


def _open(path):
    """(file, the ONNX model without its data, family, ArchConfig, raw config.json or None,
    kiln_io.json or None, role -> Weight)."""
    import onnx

    from kiln.runtime.onnx_check import check_external_data
    file = model_file(path)
    if not file.is_file():
        raise KilnError(path, "no model.onnx in the folder")
    folder = file.parent
    check_external_data(file)
    model = onnx.load(os.fspath(file), load_external_data=False)
    _check_decoder_io(file, model)
    tensors = {t.name: t for t in model.graph.initializer}
    io_path = folder / "kiln_io.json"
    io = load_json_object(io_path, unreadable="not a readable JSON file", not_object="not a JSON object") \
        if io_path.is_file() and model.producer_name == "kiln" else None
    if io is not None and isinstance(io.get("config"), dict):
        cfg = A.ArchConfig.from_dict(io["config"])
        family = A.FAMILIES[cfg.family]
        return file, model, family, cfg, None, io, _kiln_roles(file, tensors, family, cfg)
    folder = _model_folder(file)
    if not (folder / "config.json").is_file():
        raise KilnError(file, "not an ONNX export kiln can map: no config.json beside it (optimum writes one; "
                              "it names the family and the sizes the weights are checked against)")
    raw_cfg = hf.read_config(folder)
    family, cfg = hf.arch_config(raw_cfg, folder)
    named = _hf_names(file, model, tensors, family, cfg)
    return file, model, family, cfg, raw_cfg, None, hf.map_weights(file, named, family, cfg)


def _model_folder(file: Path) -> Path:
    """Where config.json and the tokenizer are: beside the model, or one level up for a Hub
    repository's ``onnx/model.onnx`` (optimum and transformers.js publish them so)."""
    folder = file.parent
    if not (folder / "config.json").is_file() and folder.name == "onnx" and (folder.parent / "config.json").is_file():
        return folder.parent
    return folder


def read(path) -> ModelIR:
    file, _, family, cfg, raw_cfg, _, weights = _open(path)
    folder = _model_folder(file)
    graph = build_graph(cfg, weights, name=family.name)
    tokenizer, gen = hf.folder_extras(folder, cfg)
    source_cfg = raw_cfg if raw_cfg is not None else hf.hf_config(cfg, family, "f32")
    return ModelIR(graph=graph, config=cfg.to_dict(), weights=weights,
                   source={"format": "onnx", "path": os.fspath(file), "config": source_cfg,
                           "name": (raw_cfg or {}).get("_name_or_path") or folder.resolve().name},
                   tokenizer=tokenizer, generation=gen)


def describe(path) -> dict:
    """What ``kiln inspect`` shows of an ONNX model: its I/O layout and the weights kiln maps."""
    file, model, family, cfg, _, io, weights = _open(path)
    inputs = [v.name for v in model.graph.input]
    if io is not None:
        layout = f"kiln's export, {io.get('layout', 'kiln')} layout"
    else:
        layout = "optimum layout, with past KV" if any(n.startswith("past_key_values.") for n in inputs) \
            else "optimum layout, without past KV"
    return {"layout": layout, "architecture": family.name, "config": cfg.to_dict(), "inputs": inputs,
            "outputs": [v.name for v in model.graph.output], "weights": weights}


def _check_decoder_io(file: Path, model) -> None:
    """A decoder takes token ids and returns logits, whatever else it takes."""
    inputs = {v.name for v in model.graph.input}
    outputs = [v.name for v in model.graph.output]
    if "input_ids" not in inputs:
        raise KilnError(file, f"not a decoder kiln recognizes: no input_ids input (inputs: {', '.join(sorted(inputs))[:120]})")
    if not outputs or not any(o == "logits" or o.startswith("logits") for o in outputs):
        raise KilnError(file, f"not a decoder kiln recognizes: no logits output (outputs: {', '.join(outputs)[:120]})")


def _weight(file: Path, t, name: str | None = None) -> Weight | None:
    """An initializer as a lazily read Weight; None for a type that cannot be a weight."""
    from onnx import TensorProto, numpy_helper
    fmt = _FORMATS.get(t.data_type)
    if fmt is None:
        return None
    shape = tuple(t.dims)
    if t.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        where, offset, length = file.parent / ext["location"], int(ext.get("offset", 0)), int(ext["length"])

        def load():
            return np.memmap(where, dtype=np.uint8, mode="r", offset=offset, shape=(length,))
    else:
        def load():         # decoded when read: a model's inline weights are not copied up front
            return np.ascontiguousarray(numpy_helper.to_array(t)).reshape(-1).view(np.uint8)
    return Weight(shape, fmt, load, name=name or t.name, origin=os.fspath(file))


def _kiln_roles(file: Path, tensors: dict, family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    """kiln's export: initializers named by role (``.T`` transposed, ``.plus_X`` offset norms)."""
    # kiln's IR holds fused tensors split (phi3's qkv is q, k and v): any family's role names
    roles = {r for f in A.FAMILIES.values() for r in A.layer_roles(f.hf_names, cfg.num_layers)}
    found: dict[str, Weight] = {}
    stored = {}
    for name, t in tensors.items():
        w = _weight(file, t)
        if w is None:
            continue
        if name.endswith(".T") and len(w.shape) == 2:
            stored.setdefault(name[:-2], w.transpose(name=name[:-2]))
        elif (m := _PLUS.match(name)) is not None:
            offset = np.float32(float(m.group(2)))
            stored.setdefault(m.group(1), w.map_values(lambda a, o=offset: a - o, name=m.group(1)))
        else:
            found[name] = w
    for role, w in stored.items():
        found.setdefault(role, w)       # the plain initializer, where both are stored
    table = {name: name for name in found if name in roles}
    return A.roles_from_file(file, found, table, cfg, layers_key="kiln_io.json's config")


def _module_of(node) -> str | None:
    """The module a node belongs to: torch's TorchScript exporter names the node after it
    (``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``), its
    dynamo exporter records the scopes in the node's metadata (``pkg.torch.onnx.name_scopes``:
    ``['', 'model', ..., 'model.layers.0.self_attn.q_proj', 'linear']``)."""
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")
        return ".".join(parts[:-1]) if len(parts) > 1 else None
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) else None
    return None


def _known_name(name: str, known: set) -> str | None:
    """``name``, or the Hugging Face name it ends with: a model exported inside a wrapper
    module has its parameters prefixed (``m.model.embed_tokens.weight``)."""
    parts = name.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in known:
            return candidate
    return None


def _weight_shapes(cfg: A.ArchConfig) -> set:
    """Every matrix shape a role of this config has, either way round: an initializer of one
    of these shapes that the graph multiplies by or looks up in is a weight kiln must place."""
    H, KV, D, E, F, V = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                         cfg.intermediate_size, cfg.vocab_size)
    shapes = {(V, E), (H * D, E), (KV * D, E), (E, H * D), (F, E), (E, F), ((H + 2 * KV) * D, E), (2 * F, E)}
    return shapes | {s[::-1] for s in shapes}


def _hf_names(file: Path, model, tensors: dict, family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    """An exporter's initializers -> Hugging Face tensor names (see the module docstring)."""
    role_of = {name: role for role, name in A.layer_roles(family.hf_names, cfg.num_layers).items()}
    known = set(role_of)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type in _WEIGHT_READERS:
            for i, x in enumerate(node.input):
                if x in tensors:
                    readers.setdefault(x, []).append((node, i))
    shapes = _weight_shapes(cfg)
    out: dict[str, Weight] = {}
    unmapped = []
    for name, t in tensors.items():
        if t.data_type not in _FORMATS:
            continue
        hf_name = _known_name(name, known)
        if hf_name is not None:
            out.setdefault(hf_name, _weight(file, t, hf_name))
            continue
        for node, i in readers.get(name, ()):
            module = _module_of(node)
            suffix = "bias" if len(t.dims) == 1 and node.op_type in ("Add", "Gemm") else "weight"
            hf_name = _known_name(f"{module}.{suffix}", known) if module else None
            if hf_name is None:
                continue
            w = _weight(file, t, hf_name)
            if len(t.dims) == 2 and node.op_type in ("MatMul", "Gemm"):
                # torch stores a Linear's weight pre-transposed for MatMul ([in, out]); GPT-2's
                # Conv1D is [in, out] in the checkpoint too, which map_weights transposes itself
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                in_out = node.op_type == "MatMul" or not trans_b
                if in_out != family.hf_conv1d:
                    w = w.transpose(name=hf_name)
            elif role_of[hf_name].endswith("norm") and cfg.norm_offset:
                # the exporter folded gemma's ``1 + weight`` into this constant: kiln's norm
                # adds the offset itself
                w = w.map_values(lambda a, o=np.float32(cfg.norm_offset): a - o, name=hf_name)
            out.setdefault(hf_name, w)
            break
        else:
            users = [n for n, _ in readers.get(name, ()) if n.op_type in ("MatMul", "Gemm", "Gather")]
            if users and tuple(t.dims) in shapes:
                unmapped.append(f"{name} {list(t.dims)} (read by {users[0].op_type} {users[0].name or '?'})")
    if unmapped:
        raise KilnError(file, f"cannot map {len(unmapped)} weight(s) onto {family.name}'s tensors, first: {unmapped[0]}")
    if cfg.tie_word_embeddings:
        out.pop(family.hf_names.get("lm_head", ""), None)   # the exporter's copy of the tied table
    return out
