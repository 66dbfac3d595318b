"""Safetensors reader/writer: agreement with the safetensors package, laziness, hostile files."""
from __future__ import annotations

import json
import os
import time
from unittest import mock

import numpy as np
import pytest
import safetensors
import safetensors.numpy as stn

from kiln.errors import KilnError
from kiln.formats import WeightFormat
from kiln.frontends import safetensors_file as sf
from kiln.frontends.safetensors_file import read_safetensors, read_sharded, read_sharded_index, write_safetensors
from kiln.weights import Weight
from conftest import HF_FIXTURES

LLAMA = os.fspath(HF_FIXTURES / "llama")


def _assert_clean_error(exc: KilnError, path, *fragments):
    """One line naming the file and the problem, and no chained traceback behind it."""
    assert exc.path == os.fspath(path)
    text = str(exc)
    assert text.startswith(os.fspath(path) + ": ")
    assert "\n" not in text
    for frag in fragments:
        assert frag in exc.message, (frag, exc.message)
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def _file(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if length is None else length
    return n.to_bytes(8, "little") + blob + data


def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ---- agreement with the safetensors package -------------------------------------------------

def _sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "i16": np.array([[1, -2]], dtype=np.int16),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i64": np.array([-(2 ** 40), 2 ** 40], dtype=np.int64),
        "scalar": np.array(1.5, dtype=np.float32),
    }


_NP_TO_FMT = {"float32": "f32", "float16": "f16", "float64": "f64", "int8": "i8",
              "int16": "i16", "int32": "i32", "int64": "i64"}


def _weight_of(arr: np.ndarray, name: str) -> Weight:
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).copy()
    return Weight(arr.shape, _NP_TO_FMT[arr.dtype.name], lambda: raw, name=name)


def test_read_matches_safetensors_package(tmp_path):
    arrays = _sample_arrays()
    path = tmp_path / "ref.safetensors"
    stn.save_file(arrays, str(path), metadata={"format": "pt", "note": "ünïcode"})
    f = read_safetensors(path)
    assert f.metadata == {"format": "pt", "note": "ünïcode"}
    assert set(f.tensors) == set(arrays)
    for name, arr in arrays.items():
        w = f.tensors[name]
        assert w.shape == arr.shape and w.format.name == _NP_TO_FMT[arr.dtype.name]
        assert w.name == name and w.origin == str(path)
        assert bytes(w.raw()) == arr.tobytes()


def test_round_trip_through_safetensors_package(tmp_path):
    arrays = _sample_arrays()
    path = tmp_path / "out.safetensors"
    write_safetensors(path, [(k, _weight_of(v, k)) for k, v in arrays.items()], metadata={"format": "pt"})
    loaded = stn.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, arr in arrays.items():
        assert loaded[name].dtype == arr.dtype and loaded[name].shape == arr.shape
        np.testing.assert_array_equal(loaded[name], arr)
    with safetensors.safe_open(str(path), framework="numpy") as h:
        assert h.metadata() == {"format": "pt"}
    again = read_safetensors(path)
    for name, arr in arrays.items():
        assert bytes(again.tensors[name].raw()) == arr.tobytes()
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_bf16_written_as_BF16(tmp_path):
    # safetensors.numpy cannot load BF16 (numpy has no bfloat16), so ask the package's own parser
    values = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -7.0]], dtype=np.float32)
    w = Weight.from_array(values, "bf16", name="b")
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, [("b", w), ("f", Weight.from_array(values, "f16"))])
    parsed = dict(safetensors.deserialize(path.read_bytes()))
    assert parsed["b"]["dtype"] == "BF16" and parsed["b"]["shape"] == [2, 3]
    assert bytes(parsed["b"]["data"]) == bytes(w.raw())
    assert parsed["f"]["dtype"] == "F16"
    back = read_safetensors(path).tensors["b"]
    assert back.format.name == "bf16"
    np.testing.assert_array_equal(back.numpy(), w.numpy())


def test_reads_bf16_from_package(tmp_path):
    import ml_dtypes      # onnx depends on it: present wherever kiln is installed
    values = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    path = tmp_path / "b.safetensors"
    stn.save_file({"x": values.astype(ml_dtypes.bfloat16)}, str(path))
    w = read_safetensors(path).tensors["x"]
    assert w.format.name == "bf16"
    np.testing.assert_array_equal(w.numpy(), values)


def test_lenient_where_the_package_is(tmp_path):
    # extra entry fields and a null __metadata__ are accepted by the safetensors package too
    header = {"__metadata__": None, "a": dict(_t("F32", [2], 0, 8), parameter_kind="weight")}
    path = tmp_path / "lenient.safetensors"
    path.write_bytes(_file(header, _f32(1, 2)))
    f = read_safetensors(path)
    assert f.metadata == {}
    np.testing.assert_array_equal(f.tensors["a"].numpy(), [1, 2])
    assert dict(safetensors.deserialize(path.read_bytes()))["a"]["shape"] == [2]


def _f32(*values) -> bytes:
    return np.array(values, dtype=np.float32).tobytes()


def test_empty_and_zero_tensor_files(tmp_path):
    p = tmp_path / "none.safetensors"
    write_safetensors(p, [])
    assert stn.load_file(str(p)) == {}
    assert read_safetensors(p).tensors == {}
    q = tmp_path / "zero.safetensors"
    stn.save_file({"z": np.zeros((0, 3), np.float32), "a": np.ones(2, np.float32)}, str(q))
    f = read_safetensors(q)
    assert f.tensors["z"].shape == (0, 3) and f.tensors["z"].nbytes == 0
    np.testing.assert_array_equal(f.tensors["a"].numpy(), np.ones(2, np.float32))
    r = tmp_path / "zero_out.safetensors"
    write_safetensors(r, list(f.tensors.items()))
    assert stn.load_file(str(r))["z"].shape == (0, 3)


def test_llama_shards_match_package():
    index = read_sharded_index(LLAMA)
    with open(os.path.join(LLAMA, "model.safetensors.index.json")) as fh:
        assert index == json.load(fh)["weight_map"]
    weights = read_sharded(LLAMA)
    assert list(weights) == list(index)
    for shard in sorted(set(index.values())):
        ref = stn.load_file(os.path.join(LLAMA, shard))
        ours = read_safetensors(os.path.join(LLAMA, shard))
        assert set(ours.tensors) == set(ref)
        for name, arr in ref.items():
            w = weights[name]
            assert index[name] == shard and w.shape == arr.shape
            np.testing.assert_array_equal(w.numpy(), arr.astype(np.float32))
            assert bytes(ours.tensors[name].raw()) == arr.tobytes()


def test_llama_rewrite_loads_in_package(tmp_path):
    weights = read_sharded(LLAMA)
    out = tmp_path / "model.safetensors"
    seen = []
    write_safetensors(out, weights.items(), metadata={"format": "pt"},
                      progress=lambda name, done, total: seen.append((name, done, total)))
    total = sum(w.nbytes for w in weights.values())
    assert [s[0] for s in seen] == list(weights) and seen[-1][1:] == (total, total)
    loaded = stn.load_file(str(out))
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded[name], w.numpy())


# ---- laziness ------------------------------------------------------------------------------

def test_header_read_does_not_touch_data(tmp_path):
    # A 3 GB file (sparse, so it costs no disk): parsing must read only the header.
    big = 3 * 1024 ** 3
    header = json.dumps({"huge": _t("F32", [big // 4], 0, big)}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + big)
    opened_reads = []
    real_open = open

    def spy_open(*args, **kwargs):
        fh = real_open(*args, **kwargs)
        real_read = fh.read
        fh_proxy = mock.Mock(wraps=fh)
        fh_proxy.read = lambda n=-1: (opened_reads.append(n), real_read(n))[1]
        fh_proxy.__enter__ = lambda *a: fh_proxy
        fh_proxy.__exit__ = lambda *a: fh.close()
        return fh_proxy

    t0 = time.perf_counter()
    with mock.patch("builtins.open", spy_open), mock.patch.object(np, "memmap", side_effect=AssertionError("mapped")):
        f = read_safetensors(path)
    assert time.perf_counter() - t0 < 1.0
    assert sum(n for n in opened_reads) == 8 + len(header)
    w = f.tensors["huge"]
    assert w.shape == (big // 4,)


def test_weights_of_one_file_share_one_descriptor(tmp_path):
    # tensors are read on demand into their own buffers (bounded memory when converting),
    # through one shared reader per file
    path = tmp_path / "two.safetensors"
    stn.save_file({"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, str(path))
    f = read_safetensors(path)
    la, lb = f.tensors["a"]._load_raw, f.tensors["b"]._load_raw
    assert la.__closure__ and lb.__closure__
    reader_a = [c.cell_contents for c in la.__closure__ if hasattr(c.cell_contents, "read")]
    reader_b = [c.cell_contents for c in lb.__closure__ if hasattr(c.cell_contents, "read")]
    assert reader_a and reader_a[0] is reader_b[0]
    np.testing.assert_array_equal(f.tensors["a"].numpy(), np.ones(4, np.float32))


def test_rewrite_in_place_of_the_file_being_read(tmp_path):
    path = tmp_path / "m.safetensors"
    stn.save_file({"a": np.arange(4, dtype=np.float32)}, str(path))
    f = read_safetensors(path)
    write_safetensors(path, [("a", f.tensors["a"]), ("b", f.tensors["a"].astype("f16"))])
    loaded = stn.load_file(str(path))
    np.testing.assert_array_equal(loaded["a"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(loaded["b"], np.arange(4, dtype=np.float16))


# ---- writer errors --------------------------------------------------------------------------

class _FakeBlock(WeightFormat):   # no name: not registered anywhere
    pass


def test_block_format_is_refused_by_name(tmp_path):
    fmt = _FakeBlock()
    fmt.name, fmt.block_size, fmt.type_size = "q_fake", 32, 18
    w = Weight((2, 32), fmt, lambda: np.zeros(36, np.uint8), name="blk.0.w")
    with pytest.raises(ValueError, match="blk.0.w"):
        write_safetensors(tmp_path / "x.safetensors", [("ok", Weight.from_array(np.ones(2))), ("blk.0.w", w)])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("items, metadata, match", [
    ([("a", None), ("a", None)], None, "twice"),
    ([("__metadata__", None)], None, "__metadata__"),
    ([], {"k": 1}, "strings"),
])
def test_writer_rejects_bad_arguments(tmp_path, items, metadata, match):
    items = [(n, Weight.from_array(np.ones(2))) for n, _ in items]
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "x.safetensors", items, metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old contents")

    def boom():
        raise KilnError("src.gguf", "tensor x ends past the end of the file")
    items = [("a", Weight.from_array(np.ones(3))), ("b", Weight((3,), "f32", boom))]
    with pytest.raises(KilnError, match="ends past"):
        write_safetensors(path, items)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(ValueError, match="bytes"):
        write_safetensors(tmp_path / "n.safetensors", [("c", Weight((3,), "f32", lambda: np.zeros(5, np.uint8)))])
    assert os.listdir(tmp_path) == ["m.safetensors"]


# ---- hostile files ------------------------------------------------------------------------

_OK = _t("F32", [2], 0, 8)
_HOSTILE = {
    "empty file": (b"", "too short"),
    "shorter than 8 bytes": (b"\x05\x00\x00", "too short"),
    "header length beyond file": (_file({"a": _OK}, b"\0" * 8, length=10_000), "runs past the end of the file"),
    "header length 2**64-1": (b"\xff" * 8 + b"{}", "runs past the end of the file"),
    "not JSON": (_file(b"{this is not json"), "not valid JSON"),
    "JSON list": (_file(b"[1, 2, 3]"), "JSON list, not an object"),
    "JSON string": (_file(b'"hello"'), "not an object"),
    "invalid UTF-8": (_file(b'{"\xff\xfe": {}}'), "not valid UTF-8"),
    "NaN literal": (_file(b'{"a": NaN}'), "not valid JSON"),
    "nested too deep": (_file(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "int with 10000 digits": (_file(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 4]}}'), "not valid JSON"),
    "duplicate tensor": (_file(b'{"a": ' + json.dumps(_OK).encode() + b', "a": ' + json.dumps(_OK).encode() + b"}", b"\0" * 8), "key a twice"),
    "entry not an object": (_file({"a": 5}), "tensor a: header entry is a int"),
    "missing dtype": (_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor a: header entry has no 'dtype'"),
    "missing data_offsets": (_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "no 'data_offsets'"),
    "dtype not a string": (_file({"a": dict(_OK, dtype=7)}, b"\0" * 8), "dtype is not a string"),
    "shape not a list": (_file({"a": dict(_OK, shape="2")}, b"\0" * 8), "shape is not a list of integers"),
    "shape holds a bool": (_file({"a": dict(_OK, shape=[True, 2])}, b"\0" * 8), "shape is not a list of integers"),
    "shape holds a float": (_file({"a": dict(_OK, shape=[2.0])}, b"\0" * 8), "shape is not a list of integers"),
    "negative dim": (_file({"a": _t("F32", [-2, -1], 0, 8)}, b"\0" * 8), "negative dimension"),
    "size overflow": (_file({"a": _t("F32", [2 ** 62, 4], 0, 16)}, b"\0" * 16), "needs 73786976294838206464 bytes but data_offsets span 16"),
    "size mismatch": (_file({"a": _t("F32", [3], 0, 8)}, b"\0" * 8), "needs 12 bytes"),
    "offsets not a pair": (_file({"a": dict(_OK, data_offsets=[0, 8, 9])}, b"\0" * 8), "not a pair of integers"),
    "offsets are floats": (_file({"a": dict(_OK, data_offsets=[0.0, 8.0])}, b"\0" * 8), "not a pair of integers"),
    "offsets reversed": (_file({"a": _t("F32", [0], 8, 4)}, b"\0" * 8), "not an increasing pair"),
    "negative offset": (_file({"a": _t("F32", [2], -8, 0)}, b"\0" * 8), "not an increasing pair"),
    "offsets out of bounds": (_file({"a": _t("F32", [4], 0, 16)}, b"\0" * 8), "tensor a ends past the end of the file"),
    "offsets far out of bounds": (_file({"a": _t("I8", [8], 2 ** 63, 2 ** 63 + 8)}, b"\0" * 8), "ends past the end"),
    "overlap": (_file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, b"\0" * 12), "tensor b overlaps tensor a"),
    "same range twice": (_file({"a": _OK, "b": _OK}, b"\0" * 8), "overlaps"),
    "gap": (_file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\0" * 12), "4 unused bytes after tensor a"),
    "gap at start": (_file({"a": _t("F32", [1], 4, 8)}, b"\0" * 8), "unused bytes at the start of the data section"),
    "trailing bytes": (_file({"a": _t("F32", [1], 0, 4)}, b"\0" * 8), "4 trailing bytes after the last tensor"),
    "no tensors, some data": (_file({}, b"\0" * 3), "3 trailing bytes"),
    "unsupported dtype BOOL": (_file({"mask": _t("BOOL", [8], 0, 8)}, b"\0" * 8), "tensor mask has dtype BOOL, which kiln does not support"),
    "unsupported dtype F8": (_file({"w8": _t("F8_E4M3", [8], 0, 8)}, b"\0" * 8), "tensor w8 has dtype F8_E4M3"),
    "unknown dtype": (_file({"a": _t("F33", [1], 0, 4)}, b"\0" * 4), "unknown dtype F33"),
    "metadata value not a string": (_file({"__metadata__": {"epoch": 3}}), "__metadata__ value for epoch is a int"),
    "metadata a list": (_file({"__metadata__": ["a"]}), "__metadata__ is a list"),
    "hostile tensor name": (_file({"a\nb": _t("BOOL", [1], 0, 1)}, b"\0"), "tensor 'a\\nb' has dtype BOOL"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_file(tmp_path, case):
    content, fragment = _HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(KilnError) as info:
        read_safetensors(path)
    assert time.perf_counter() - t0 < 2.0
    _assert_clean_error(info.value, path, fragment)


def test_header_over_limit(tmp_path):
    path = tmp_path / "big_header.safetensors"
    n = sf.MAX_HEADER_BYTES + 1
    with open(path, "wb") as fh:
        fh.write(n.to_bytes(8, "little") + b"{")
        fh.truncate(8 + n + 8)   # sparse: the header would fit in the file but is over the cap
    with pytest.raises(KilnError) as info:
        read_safetensors(path)
    _assert_clean_error(info.value, path, f"header length {n} is over the")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(KilnError) as info:
        read_safetensors(tmp_path / "nope.safetensors")
    _assert_clean_error(info.value, tmp_path / "nope.safetensors", "cannot read")
    with pytest.raises(KilnError):
        read_safetensors(tmp_path)


def test_file_shrunk_after_reading_header(tmp_path):
    path = tmp_path / "m.safetensors"
    stn.save_file({"a": np.ones(4, np.float32)}, str(path))
    w = read_safetensors(path).tensors["a"]
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 4)
    with pytest.raises(KilnError, match="file changed"):
        w.numpy()


# Files the safetensors package itself accepts that kiln refuses: duplicate keys (the package
# keeps the last; two readers could disagree on which tensor a name means) and dtypes kiln
# does not compute with. Every other hostile file is refused by both.
STRICTER_THAN_THE_PACKAGE = {"duplicate tensor", "unsupported dtype BOOL", "unsupported dtype F8",
                             "hostile tensor name"}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_kiln_refuses_what_the_package_refuses(tmp_path, case):
    """kiln is never more lenient than the ecosystem's own parser, and stricter only where
    listed above."""
    content, fragment = _HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(KilnError) as info:
        read_safetensors(path)
    _assert_clean_error(info.value, path, fragment)
    try:
        safetensors.deserialize(content)
        package_refuses = False
    except Exception:
        package_refuses = True
    assert package_refuses == (case not in STRICTER_THAN_THE_PACKAGE)


# ---- sharded index ------------------------------------------------------------------------

def _sharded(tmp_path, weight_map, shards=None):
    folder = tmp_path / "model"
    folder.mkdir()
    shards = shards if shards is not None else {"s1.safetensors": {"a": np.ones(2, np.float32)}}
    for name, arrays in shards.items():
        stn.save_file(arrays, str(folder / name))
    index = weight_map if isinstance(weight_map, (bytes, str)) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_bytes(index.encode() if isinstance(index, str) else index)
    return folder


def test_index_ok_and_symlinked_shards(tmp_path):
    folder = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                      {"s1.safetensors": {"a": np.ones(2, np.float32)}, "blob": {"b": np.zeros(3, np.float16)}})
    os.symlink(folder / "blob", folder / "s2.safetensors")   # as the Hugging Face cache lays shards out
    assert read_sharded_index(folder) == {"a": "s1.safetensors", "b": "s2.safetensors"}
    w = read_sharded(folder)
    np.testing.assert_array_equal(w["b"].numpy(), np.zeros(3, np.float32))


_HOSTILE_INDEX = {
    "escape with ..": ({"a": "../s1.safetensors"}, "not a file name inside the model folder"),
    "escape in subfolder": ({"a": "sub/../../x.safetensors"}, "not a file name inside"),
    "absolute path": ({"a": "/etc/passwd"}, "not a file name inside"),
    "backslash": ({"a": "..\\s1.safetensors"}, "not a file name inside"),
    "empty name": ({"a": ""}, "not a file name inside"),
    "missing shard": ({"a": "s9.safetensors"}, "names shard s9.safetensors, which does not exist"),
    "tensor not in shard": ({"a": "s1.safetensors", "zz": "s1.safetensors"}, "puts tensor zz in s1.safetensors, which does not hold it"),
    "filename not a string": ({"a": 1}, "weight_map entry for a is a int"),
    "weight_map a list": (["s1.safetensors"], "weight_map is a list"),
    "index not JSON": (b"{oops", "index is not valid JSON"),
    "index a list": (b"[]", "index is a JSON list"),
    "no weight_map": (b'{"metadata": {}}', "index has no 'weight_map'"),
    "duplicate tensor in index": (b'{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}', "key a twice"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_INDEX))
def test_hostile_index(tmp_path, case):
    weight_map, fragment = _HOSTILE_INDEX[case]
    folder = _sharded(tmp_path, weight_map)
    (tmp_path / "s1.safetensors").write_bytes((folder / "s1.safetensors").read_bytes())   # bait for '../'
    with pytest.raises(KilnError) as info:
        read_sharded_index(folder)
    _assert_clean_error(info.value, folder / "model.safetensors.index.json", fragment)


def test_index_missing(tmp_path):
    with pytest.raises(KilnError) as info:
        read_sharded_index(tmp_path)
    _assert_clean_error(info.value, tmp_path / "model.safetensors.index.json", "no such file")


def test_index_with_broken_shard_names_the_shard(tmp_path):
    folder = _sharded(tmp_path, {"a": "s1.safetensors"})
    (folder / "s1.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    with pytest.raises(KilnError) as info:
        read_sharded_index(folder)
    _assert_clean_error(info.value, folder / "s1.safetensors", "not an object")
