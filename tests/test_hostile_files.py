"""Broken and hostile inputs, end to end through the ``kiln`` command.

Every reader (GGUF, safetensors single and sharded, HF folders, torch .bin, bare safetensors,
compiled artifacts and their ONNX external data) gets files that are malformed or that lie,
and each must end the same way (DESIGN.md, 'Errors'): exit code 2, exactly one stderr line
``kiln: PATH: PROBLEM`` naming the offending file and what is wrong with it, no traceback, and
for convert/compile nothing at the destination: no file, no folder, no temporary leftovers.

The file builders of the component suites (test_gguf_file, test_safetensors_file,
test_torch_bin) are reused; the model-level cases start from the tiny llama fixture.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.numpy as stn

from conftest import HF_FIXTURES
from test_gguf_file import ARCH, ARRAY, F32_4, U32, _array, _kv, _ti, _unsupported_type_id
from test_gguf_file import _file as gguf_bytes
from test_safetensors_file import _t
from test_safetensors_file import _file as st_bytes
from test_torch_bin import _ONE, _Reduce, state_dict, tensor, torch_zip

from kiln.cli import main

LLAMA = HF_FIXTURES / "llama"     # in the repository; Bases fails loudly if it is missing
SECONDS = 5.0


# ---- shared bases, built once per session -----------------------------------------------------

class Bases:
    """A valid GGUF and a valid compiled artifact of the tiny llama, made on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._gguf = self._artifact = None

    @property
    def gguf(self) -> Path:
        if self._gguf is None:
            from kiln.driver import convert
            self._gguf = self.root / "base.gguf"
            convert(LLAMA, self._gguf, to="gguf")
        return self._gguf

    @property
    def artifact(self) -> Path:
        if self._artifact is None:
            from kiln.driver import compile as kiln_compile
            # ONNX Runtime: the artifact cases edit its files (model.onnx, model.onnx.data)
            self._artifact = kiln_compile(LLAMA, output=self.root / "base.kiln", backend="onnxrt")
        return self._artifact


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return Bases(tmp_path_factory.mktemp("bases"))


# ---- builders ---------------------------------------------------------------------------------

def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _hf(tmp: Path, config: dict | None = None, *, weights: bool = True) -> Path:
    """A writable copy of the llama fixture; ``config`` entries replace (None: remove) keys."""
    d = tmp / "llama"
    d.mkdir()
    for f in LLAMA.iterdir():
        # model-0000N-of-00004.safetensors and model.safetensors.index.json are the weights
        if f.name != "reference.npz" and (weights or not f.name.startswith("model")):
            shutil.copyfile(f, d / f.name)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _hf_with_bin(tmp: Path, data: bytes | Callable[[Path], object]) -> tuple[Path, Path]:
    """An HF folder whose only weights are ``pytorch_model.bin``."""
    d = _hf(tmp, weights=False)
    b = d / "pytorch_model.bin"
    if callable(data):
        data(b)
    else:
        b.write_bytes(data)
    return d, b


def _gguf_lie(bases: Bases, tmp: Path, meta: dict, drop=()) -> Path:
    """The base GGUF rewritten with changed metadata (None: remove a key) or without tensors."""
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    f = read_gguf(bases.gguf)
    m = dict(f.metadata)
    for k, v in meta.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    types = {k: t for k, t in f.metadata_types.items() if k not in meta}
    out = tmp / "model.gguf"
    write_gguf(out, m, [(n, w) for n, w in f.tensors.items() if n not in drop], metadata_types=types)
    return out


def _typed(v, t):
    from kiln.frontends.gguf_file import typed
    return typed(v, t)


def _truncated_gguf(bases: Bases, tmp: Path) -> Path:
    data = bases.gguf.read_bytes()
    return _put(tmp / "model.gguf", data[: len(data) - 1000])


def _bare(tmp: Path, arrays: dict, metadata=None) -> Path:
    d = tmp / "bare"
    d.mkdir()
    p = d / "model.safetensors"
    stn.save_file({k: np.asarray(v, np.float32) for k, v in arrays.items()}, str(p), metadata=metadata)
    return p


def _llama_like_arrays():
    z = np.zeros
    a = {"model.embed_tokens.weight": z((256, 64)), "model.norm.weight": z(64),
         "model.layers.0.self_attn.q_proj.weight": z((64, 64)), "model.layers.0.self_attn.k_proj.weight": z((32, 64)),
         "model.layers.0.self_attn.v_proj.weight": z((32, 64)), "model.layers.0.self_attn.o_proj.weight": z((64, 64)),
         "model.layers.0.mlp.up_proj.weight": z((128, 64)), "model.layers.0.mlp.down_proj.weight": z((64, 128))}
    return a


def _shard_append(tmp: Path, shard: str, extra: bytes) -> tuple[Path, Path]:
    d = _hf(tmp)
    with open(d / shard, "ab") as f:
        f.write(extra)
    return d, d / shard


def _index_edit(tmp: Path, fn) -> tuple[Path, Path]:
    d = _hf(tmp)
    idx = d / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    fn(doc["weight_map"])
    idx.write_text(json.dumps(doc))
    (tmp / "outside.safetensors").write_bytes((d / "model-00004-of-00004.safetensors").read_bytes())  # bait
    return d, idx


def _hf_single(tmp: Path, data: bytes) -> tuple[Path, Path]:
    """An HF folder whose weights are one (broken) model.safetensors."""
    d = _hf(tmp, weights=False)
    return d, _put(d / "model.safetensors", data)


# artifacts

def _artifact(bases: Bases, tmp: Path) -> Path:
    d = tmp / "model.kiln"
    shutil.copytree(bases.artifact, d)
    return d


def _manifest_edit(bases, tmp, fn) -> tuple[Path, Path]:
    d = _artifact(bases, tmp)
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d, d / "manifest.json"


def _relist(d: Path, rel: str) -> None:
    """Make the manifest agree with a file we changed, so only the file's content is wrong."""
    from kiln.artifact import sha256_file
    mp = d / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"][rel] = {"bytes": (d / rel).stat().st_size, "sha256": sha256_file(d / rel)}
    mp.write_text(json.dumps(m))


def _external_data_edit(bases, tmp, **changes) -> tuple[Path, Path]:
    """Point the first external initializer of model.onnx somewhere else."""
    import onnx
    d = _artifact(bases, tmp)
    path = d / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in t.external_data}
    for k, v in changes.items():
        entries[k] = v(entries) if callable(v) else v
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=str(v))
    path.write_bytes(model.SerializeToString())
    _relist(d, "model.onnx")
    (tmp / "outside.bin").write_bytes(bytes(1 << 20))            # bait for the escapes
    return d, path


def _data_symlink_outside(tmp, bases) -> tuple[Path, Path]:
    d = _artifact(bases, tmp)
    data = d / "model.onnx.data"
    outside = tmp / "elsewhere.bin"
    outside.write_bytes(data.read_bytes())
    data.unlink()
    os.symlink(outside, data)
    return d, data


def _deflated_checkpoint(tmp: Path, corrupt: str) -> tuple[Path, Path]:
    """The llama fixture as a valid, deflate-compressed torch zip whose storage for one late
    tensor is damaged: the header reads fine, the damage shows only when the writer gets there."""
    import zipfile

    from test_torch_bin import U

    from kiln.frontends.safetensors_file import read_sharded
    weights = read_sharded(LLAMA)
    late = list(weights).index("model.layers.1.mlp.down_proj.weight")
    entries, storages = [], {}
    for i, (name, w) in enumerate(weights.items()):
        a = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        stride = [int(np.prod(a.shape[j + 1:])) for j in range(a.ndim)]
        entries.append(U(name) + tensor(str(i), a.size, a.shape, stride))
        storages[str(i)] = a.tobytes()
    d = _hf(tmp, weights=False)
    path = d / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}(" + b"".join(entries) + b"u.")
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        info = z.getinfo(f"archive/data/{late}")
    data = bytearray(path.read_bytes())
    local = data[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    if corrupt == "crc":
        data[start + info.compress_size // 2] ^= 0xFF       # inflates, but to other bytes
    else:
        data[start] = 0x07                                   # deflate block type 3: no such type
    path.write_bytes(bytes(data))
    return d, path


def _invalid_graph(tmp, bases) -> tuple[Path, Path]:
    """A well-formed ONNX protobuf that ONNX Runtime refuses (an operator nobody defines)."""
    from onnx import TensorProto, helper
    d = _artifact(bases, tmp)
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 256])
    graph = helper.make_graph([helper.make_node("Wobble", ["input_ids"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (d / "model.onnx").write_bytes(model.SerializeToString())
    _relist(d, "model.onnx")
    return d, d / "model.onnx"


def _sparse_header(path: Path, n: int) -> Path:
    """A header length over the reader's cap, in a (sparse) file long enough to hold it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + b"{")
        f.truncate(8 + n + 8)
    return path


# ---- the cases --------------------------------------------------------------------------------

@dataclass
class Case:
    verb: str                     # compile | inspect | run | hf | gguf | safetensors | onnx (convert --to)
    build: Callable               # (tmp, bases) -> path, or (source, offending file)
    phrase: str                   # distinctive words of the one stderr line
    subprocess: bool = False      # run in a child process (pickles: a failure must not run code here)
    marker: bool = False          # the builder gets a marker path the hostile file tries to create
    late: bool = False            # found while writing: compile may have printed its passes' lines


G = Case

# a GGML type id that GGUF knows and kiln does not read (Q4_2 today), as the container suite finds
# it; test_gguf_file.test_read_types_are_the_registered_formats pins which one
_UNSUPPORTED_TYPE = _unsupported_type_id()
assert _UNSUPPORTED_TYPE is not None

CASES: dict[str, Case] = {
    # GGUF container
    "gguf bad magic": G("compile", lambda t, b: _put(t / "model.gguf", b"PK\x03\x04" + bytes(60)),
                        "not a GGUF file"),
    "gguf truncated header": G("hf", lambda t, b: _put(t / "model.gguf", gguf_bytes([ARCH])[:30]),
                               "header claims 1 metadata entries"),
    "gguf truncated tensor data": G("compile", lambda t, b: _truncated_gguf(b, t),
                                    "ends past the end of the file"),
    "gguf lying string length": G("gguf", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH, _kv("general.name", 8, struct.pack("<Q", 2**63) + b"xx")])),
        "the value of metadata key general.name runs past"),
    "gguf lying array length": G("safetensors", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH, _kv("tokenizer.ggml.scores", ARRAY, _array(U32, 2**62, b"\0" * 8))])),
        "claims 4611686018427387904 uint32 items"),
    "gguf unknown tensor type": G("onnx", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH], [_ti("token_embd.weight", [4], 200, 0)], F32_4)),
        "tensor token_embd.weight has unknown GGML type id 200"),
    "gguf unsupported tensor type": G("compile", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH], [_ti("token_embd.weight", [256], _UNSUPPORTED_TYPE[0], 0)], bytes(4096))),
        f"has GGML type {_UNSUPPORTED_TYPE[1]} (id {_UNSUPPORTED_TYPE[0]}), which kiln does not support"),
    "gguf misaligned tensor": G("compile", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH], [_ti("w", [4], 0, 0), _ti("v", [4], 0, 33)], F32_4 * 4)),
        "tensor v data offset 33 is not a multiple of the alignment 32"),
    "gguf overlapping tensors": G("hf", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH], [_ti("w", [16], 0, 0), _ti("v", [4], 0, 32)], F32_4 * 4)),
        "tensors w (bytes 160..224) and v (bytes 192..208) overlap"),
    "gguf tensor outside the file": G("compile", lambda t, b: _put(t / "model.gguf", gguf_bytes(
        [ARCH], [_ti("blk.3.attn_q.weight", [64], 0, 0)], F32_4)),
        "tensor blk.3.attn_q.weight ends past the end of the file"),
    "gguf duplicate key": G("inspect", lambda t, b: _put(t / "model.gguf", gguf_bytes([ARCH, ARCH])),
                            "metadata key general.architecture appears twice"),
    # GGUF metadata that lies about the model
    "gguf heads not dividing": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.attention.head_count_kv": _typed(3, "uint32")}),
        "4 attention heads are not a multiple of 3 key/value heads"),
    "gguf zero heads": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.attention.head_count": _typed(0, "uint32")}), "llama.attention.head_count is 0"),
    "gguf negative heads": G("hf", lambda t, b: _gguf_lie(
        b, t, {"llama.attention.head_count": _typed(-4, "int32"), "llama.attention.head_count_kv": _typed(-2, "int32")}),
        "llama.attention.head_count is -4"),
    "gguf missing block_count": G("hf", lambda t, b: _gguf_lie(b, t, {"llama.block_count": None}),
                                  "metadata key llama.block_count is missing"),
    "gguf block_count not a number": G("compile", lambda t, b: _gguf_lie(b, t, {"llama.block_count": "two"}),
                                       "metadata key llama.block_count is a string"),
    "gguf block_count huge": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.block_count": _typed(2**32 - 1, "uint32")}), "llama.block_count says 4294967295 layers"),
    "gguf block_count too small": G("gguf", lambda t, b: _gguf_lie(
        b, t, {"llama.block_count": _typed(1, "uint32")}), "tensors for layer 1 (e.g. blk.1."),
    "gguf shape not matching metadata": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.feed_forward_length": _typed(96, "uint32")}),
        "tensor blk.0.ffn_up.weight (layers.0.up.weight) has shape [128, 64], the config implies [96, 64]"),
    "gguf rope dimension too big": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.rope.dimension_count": _typed(1000, "uint32")}), "rotary dimension 1000"),
    "gguf rope scaling unknown": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.rope.scaling.type": "wobbly"}), "rope scaling type 'wobbly' is not supported"),
    "gguf sliding window not a number": G("compile", lambda t, b: _gguf_lie(
        b, t, {"llama.attention.sliding_window": "wide"}), "llama.attention.sliding_window is a string"),
    "gguf missing layer tensor": G("safetensors", lambda t, b: _gguf_lie(b, t, {}, drop={"blk.1.ffn_down.weight"}),
                                   "tensor blk.1.ffn_down.weight is missing"),
    "gguf unsupported architecture": G("compile", lambda t, b: _gguf_lie(b, t, {"general.architecture": "mamba"}),
                                       "unsupported architecture 'mamba'"),
    # safetensors, one file
    "safetensors header past the file": G("compile", lambda t, b: _put(
        t / "bare" / "model.safetensors", st_bytes({"a": _t("F32", [2], 0, 8)}, bytes(8), length=10_000)),
        "runs past the end of the file"),
    "safetensors header over the limit": G("hf", lambda t, b: _sparse_header(t / "bare" / "model.safetensors", 200_000_000),
                                           "header length 200000000 is over the"),
    "safetensors header not JSON": G("compile", lambda t, b: _hf_single(t, st_bytes(b"{this is not json")),
                                     "not valid JSON"),
    "safetensors overlap": G("gguf", lambda t, b: _hf_single(t, st_bytes(
        {"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12))), "tensor b overlaps tensor a"),
    "safetensors gap": G("compile", lambda t, b: _hf_single(t, st_bytes(
        {"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12))), "4 unused bytes after tensor a"),
    "safetensors trailing bytes": G("onnx", lambda t, b: _put(t / "bare" / "model.safetensors", st_bytes(
        {"a": _t("F32", [1], 0, 4)}, bytes(8))), "4 trailing bytes after the last tensor"),
    "safetensors unsupported dtype": G("compile", lambda t, b: _hf_single(t, st_bytes(
        {"mask": _t("BOOL", [8], 0, 8)}, bytes(8))), "tensor mask has dtype BOOL, which kiln does not support"),
    # safetensors, sharded
    "index escapes the folder": G("compile", lambda t, b: _index_edit(
        t, lambda wm: wm.update({"lm_head.weight": "../outside.safetensors"})),
        "not a file name inside the model folder"),
    "index absolute shard path": G("hf", lambda t, b: _index_edit(
        t, lambda wm: wm.update({"lm_head.weight": str(t / "outside.safetensors")})),
        "not a file name inside the model folder"),
    "index names a missing shard": G("inspect", lambda t, b: _index_edit(
        t, lambda wm: wm.update({"lm_head.weight": "model-00005-of-00004.safetensors"})),
        "names shard model-00005-of-00004.safetensors, which does not exist"),
    "index puts a tensor in the wrong shard": G("gguf", lambda t, b: _index_edit(
        t, lambda wm: wm.update({"lm_head.weight": "model-00001-of-00004.safetensors"})),
        "puts tensor lm_head.weight in model-00001-of-00004.safetensors, which does not hold it"),
    "shard with trailing bytes": G("compile", lambda t, b: _shard_append(t, "model-00003-of-00004.safetensors", bytes(16)),
                                   "16 trailing bytes after the last tensor"),
    "shard shape not matching config.json": G("compile", lambda t, b: _hf(t, {"intermediate_size": 96}),
                                              "tensor model.layers.0.mlp.up_proj.weight (layers.0.up.weight) has shape "
                                              "[128, 64], the config implies [96, 64]"),
    # HF folders
    "config.json not JSON": G("compile", lambda t, b: (lambda d: (d, _put(d / "config.json", b"{'model_type': llama")))(_hf(t)),
                              "not a readable JSON config"),
    "config.json not an object": G("hf", lambda t, b: (lambda d: (d, _put(d / "config.json", b"[1, 2]")))(_hf(t)),
                                   "config.json is not a JSON object"),
    "config.json missing hidden_size": G("compile", lambda t, b: (lambda d: (d, d / "config.json"))(_hf(t, {"hidden_size": None})),
                                         "config is missing or has a bad value for 'hidden_size'"),
    "config.json hidden_size not a number": G("gguf", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"hidden_size": "sixty-four"})), "hidden_size is \"sixty-four\", not a number"),
    "config.json unsupported model_type": G("compile", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"model_type": "bert"})), "unsupported architecture 'bert'"),
    "config.json unsupported hidden_act": G("compile", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"hidden_act": "relu"})), "hidden_act ('relu' is not supported)"),
    "config.json heads not dividing kv heads": G("safetensors", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"num_key_value_heads": 3})), "4 attention heads are not a multiple of 3 key/value heads"),
    "config.json negative heads": G("compile", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"num_attention_heads": -4, "num_key_value_heads": -2})), "num_attention_heads is -4"),
    "config.json layer count huge": G("compile", lambda t, b: _hf(t, {"num_hidden_layers": 10**9}),
                                      "the config says 1000000000 layers, more than the file's 21 tensors"),
    "config.json rope type unknown": G("inspect", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "wobbly"}})),
        "rope scaling type 'wobbly' is not supported"),
    "config.json rope scaling without factor": G("hf", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear"}})),
        "rope scaling 'linear' has no 'factor'"),
    "config.json rope_parameters not an object": G("compile", lambda t, b: (lambda d: (d, d / "config.json"))(
        _hf(t, {"rope_parameters": [10000.0]})), "rope_parameters is not a JSON object"),
    "generation_config.json not JSON": G("compile", lambda t, b: (lambda d: (d, _put(d / "generation_config.json", b"{")))(_hf(t)),
                                         "not a readable JSON file"),
    "HF folder without weights": G("compile", lambda t, b: _hf(t, weights=False), "no model weights found"),
    # torch .bin (through an HF folder)
    "bin os.system reduce": G("compile", lambda t, b, m: _hf_with_bin(
        t, lambda p: torch_zip(p, __import__("pickle").dumps({"w": _Reduce(os.system, f"touch {m}")}, protocol=2))),
        f"refusing to load: the pickle references {os.system.__module__}.system, which is not a tensor", subprocess=True, marker=True),
    "bin eval reduce": G("hf", lambda t, b, m: _hf_with_bin(
        t, lambda p: torch_zip(p, __import__("pickle").dumps(
            {"w": _Reduce(eval, f"__import__('os').system('touch {m}')")}, protocol=4))),
        "refusing to load: the pickle references builtins.eval, which is not a tensor", subprocess=True, marker=True),
    "bin not a zip": G("compile", lambda t, b: _hf_with_bin(t, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
                       "not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
    "bin storage size lie": G("gguf", lambda t, b: _hf_with_bin(
        t, lambda p: torch_zip(p, state_dict(w=tensor("0", 100, (100,), (1,))), _ONE)),
        "storage 0 should hold 100 float32 elements (400 bytes) but its member holds 16 bytes"),
    **{f"bin storage damaged, found while writing ({verb})": G(
        verb, lambda t, b: _deflated_checkpoint(t, "crc"),
        "cannot read zip member archive/data/12: Bad CRC-32 for file 'archive/data/12'", late=True)
       for verb in ("compile", "hf", "gguf", "safetensors", "onnx")},
    **{f"bin storage not deflate, found while writing ({verb})": G(
        verb, lambda t, b: _deflated_checkpoint(t, "stream"),
        "cannot read zip member archive/data/12: Error -3 while decompressing data: invalid block type", late=True)
       for verb in ("compile", "hf")},
    # bare safetensors
    "bare safetensors ambiguous architecture": G("compile", lambda t, b: _bare(t, _llama_like_arrays()),
                                                 "looks like llama-like, but the number of attention heads cannot be read"),
    "bare safetensors unknown architecture": G("hf", lambda t, b: _bare(t, {"encoder.weight": np.zeros((4, 4))}),
                                               "cannot tell the architecture"),
    "bare safetensors config metadata not JSON": G("compile", lambda t, b: _bare(
        t, {"model.embed_tokens.weight": np.zeros((4, 4))}, metadata={"kiln.hf_config": "{nope"}),
        "the kiln.hf_config metadata entry is not JSON"),
    # compiled artifacts (kiln run)
    "artifact manifest not JSON": G("run", lambda t, b: (lambda d: (d, _put(d / "manifest.json", b"{\"format_version\": 1,")))(
        _artifact(b, t)), "unreadable manifest"),
    "artifact format version wrong": G("run", lambda t, b: _manifest_edit(b, t, lambda m: m.update(format_version=99)),
                                       "artifact format version 99 is not the one this kiln reads"),
    "artifact manifest without backend": G("run", lambda t, b: _manifest_edit(b, t, lambda m: m.pop("backend")),
                                           "the manifest names no backend"),
    "artifact files not an object": G("run", lambda t, b: _manifest_edit(b, t, lambda m: m.update(files=["model.onnx"])),
                                      "'files' is not an object"),
    "artifact model outside the folder": G("run", lambda t, b: _manifest_edit(
        b, t, lambda m: m["backend"].update(model="../base.kiln/model.onnx")), "not a file listed in the manifest"),
    "artifact listed file missing": G("run", lambda t, b: (lambda d: (d.joinpath("model.onnx.data").unlink(), d)[1])(
        _artifact(b, t)), "file model.onnx.data listed in the manifest is missing"),
    "artifact file of the wrong size": G("run", lambda t, b: (lambda d: (open(d / "model.onnx.data", "ab").write(b"\0" * 7), d)[1])(
        _artifact(b, t)), "bytes, the manifest says"),
    "artifact model.onnx not ONNX": G("run", lambda t, b: (lambda d: (_put(d / "model.onnx", b"\xff" * 100), _relist(d, "model.onnx"),
                                                                       (d, d / "model.onnx"))[2])(_artifact(b, t)),
                                      "not a readable ONNX model"),
    "artifact backend entry incomplete": G("run", lambda t, b: _manifest_edit(b, t, lambda m: m["backend"].pop("kv_cache")),
                                           "the manifest's onnxrt backend entry has no 'kv_cache'"),
    "artifact model.onnx an invalid graph": G("run", _invalid_graph, "ONNX Runtime cannot load the model"),
    "onnx external data ../outside.bin": G("run", lambda t, b: _external_data_edit(b, t, location="../outside.bin"),
                                           "points at external data '../outside.bin' outside the model folder"),
    "onnx external data absolute path": G("run", lambda t, b: _external_data_edit(b, t, location=str(t / "outside.bin")),
                                          "outside the model folder"),
    "onnx external data past the end": G("run", lambda t, b: _external_data_edit(
        b, t, offset=lambda e: (t / "model.kiln" / "model.onnx.data").stat().st_size),
        "lie outside model.onnx.data"),
    "onnx external data through a symlink": G("run", _data_symlink_outside,
                                              "is a link that resolves outside the artifact folder"),
}

DESTINATIONS = {"compile": "model.kiln", "hf": "hf-folder", "gguf": "model.gguf",
                "safetensors": "model.safetensors", "onnx": "onnx-folder"}


def _argv(verb: str, src: Path, dest: Path | None) -> list[str]:
    if verb == "compile":
        # ONNX Runtime named: the readers refuse the same whatever the backend, and the cases found
        # while writing weights come after TVM's build (seconds), past the time bound
        return ["compile", str(src), "--backend", "onnxrt", "-o", str(dest)]
    if verb == "run":
        return ["run", str(src), "--prompt", "hello", "-n", "2"]
    if verb == "inspect":
        return ["inspect", str(src)]
    return ["convert", str(src), str(dest), "--to", verb]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses(case, tmp_path, bases, capsys):
    c = CASES[case]
    work = tmp_path / "in"
    work.mkdir()
    marker = tmp_path / "PWNED"
    built = c.build(work, bases, marker) if c.marker else c.build(work, bases)
    src, offending = built if isinstance(built, tuple) else (built, built)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / DESTINATIONS[c.verb] if c.verb in DESTINATIONS else None
    argv = _argv(c.verb, src, dest)

    t0 = time.perf_counter()
    if c.subprocess:
        proc = subprocess.run([sys.executable, "-m", "kiln.cli", *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "KILN_DEBUG": ""})
        code, err = proc.returncode, proc.stderr
    else:
        code = main(argv)
        err = capsys.readouterr().err
    elapsed = time.perf_counter() - t0

    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("kiln: "), line
    assert str(offending) in line, line
    assert c.phrase in line, line
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    if dest is not None:
        assert not dest.exists() and not dest.is_symlink()
        assert os.listdir(out_dir) == [], os.listdir(out_dir)
    assert not marker.exists(), "the hostile pickle ran"


def test_bases_are_valid(bases, tmp_path, capsys):
    """The control: untampered bases pass the same commands, so each case fails for its lie."""
    assert main(["convert", str(bases.gguf), str(tmp_path / "back"), "--to", "hf", "-q"]) == 0
    assert main(["compile", str(bases.gguf), "--backend", "onnxrt", "-o", str(tmp_path / "g.kiln"), "-q"]) == 0
    from kiln import runtime
    model = runtime.load(bases.artifact)
    assert model.logits([[1, 2, 3]]).shape == (1, 3, 256)
    capsys.readouterr()
