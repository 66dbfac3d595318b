"""The GGUF container: agreement with the gguf package, exact round trips, atomic writes, and
hostile files that must each end in one KilnError naming the file and the problem."""
from __future__ import annotations

import filecmp
import math
import os
import random
import re
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest

from kiln import formats
from kiln.errors import KilnError
from kiln.frontends.gguf_file import (GGML_TYPE_NAMES, ArrayType, ValueType, parse_type,
                                      read_gguf, typed, write_gguf)
from kiln.weights import Weight

BLOCK_FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _gguf_types(t) -> list[int]:
    """Our type as the gguf package lists it: ArrayType(STRING) -> [ARRAY, STRING]."""
    return [ValueType.ARRAY, *_gguf_types(t.item)] if isinstance(t, ArrayType) else [t]


def _raw_weight(name: str, shape, fmt, rng) -> Weight:
    nbytes = fmt.nbytes(shape)
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    return Weight(shape, fmt, lambda: data, name=name)


def _assert_matches_gguf_package(path, f):
    r = gguf.GGUFReader(path)
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(f.metadata)
    for key, field in fields.items():
        # the gguf package lists no item type for an empty array
        expected_types = _gguf_types(f.metadata_types[key])
        if f.metadata[key] == []:
            expected_types = expected_types[:1]
        assert [int(t) for t in field.types] == expected_types, key
        assert field.contents() == f.metadata[key], key
    assert [t.name for t in r.tensors] == list(f.tensors)
    for t in r.tensors:
        w = f.tensors[t.name]
        assert w.format.gguf_type == int(t.tensor_type), t.name
        assert w.shape == tuple(int(d) for d in t.shape[::-1]), t.name
        assert f.tensor_offsets[t.name] == t.data_offset, t.name
        assert w.nbytes == t.n_bytes
        ours = w.raw().reshape(-1)
        assert np.array_equal(ours, r.data[t.data_offset:t.data_offset + t.n_bytes]), t.name


# ---- (a) the real model against gguf.GGUFReader -------------------------------------------

def test_real_model_matches_gguf_package(smollm2_gguf):
    f = read_gguf(smollm2_gguf)
    assert f.version == 3 and f.alignment == 32
    assert f.tensors["token_embd.weight"].shape == (49152, 576)
    assert f.metadata["llama.block_count"] == 30
    assert f.metadata_types["llama.block_count"] == ValueType.UINT32 == gguf.GGUFValueType.UINT32
    assert f.metadata_types["tokenizer.ggml.tokens"] == ArrayType(ValueType.STRING)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    _assert_matches_gguf_package(smollm2_gguf, f)


# ---- (b) write many types, read back with both readers ------------------------------------

def _rich_metadata():
    return {
        "general.architecture": "llama",
        "general.name": "tëst ✓ 模型",
        "general.alignment": typed(64, "uint32"),
        "x.u8": typed(255, "uint8"), "x.i8": typed(-128, "int8"),
        "x.u16": typed(65535, "uint16"), "x.i16": typed(-32768, "int16"),
        "x.u32": typed(2**32 - 1, "uint32"), "x.i32": typed(-2**31, "int32"),
        "x.u64": typed(2**64 - 1, "uint64"), "x.i64": typed(-2**63, "int64"),
        "x.f32": typed(1.5, "float32"), "x.f64": typed(math.pi, "float64"),
        "x.bool_t": True, "x.bool_f": False,
        "x.empty_string": "",
        "x.arr_u8": typed([0, 1, 255], "array[uint8]"),
        "x.arr_i8": typed([-128, 0, 127], "array[int8]"),
        "x.arr_u16": typed([0, 65535], "array[uint16]"),
        "x.arr_i16": typed([-32768, 32767], "array[int16]"),
        "x.arr_u32": typed([0, 2**32 - 1], "array[uint32]"),
        "x.arr_i32": [-(2**31), 0, 2**31 - 1],
        "x.arr_u64": typed([0, 2**64 - 1], "array[uint64]"),
        "x.arr_i64": [-(2**63), 2**63 - 1],
        "x.arr_f32": [0.5, -1.25, 3.0],
        "x.arr_f64": typed([math.e, -0.0], "array[float64]"),
        "x.arr_bool": [True, False, True],
        "x.arr_str": ["a", "", "ünïcode", "日本"],
        "x.arr_empty": typed([], "array[uint32]"),
        "tokenizer.ggml.tokens": ["<s>", "</s>", "Ġhello", "é"],
        "tokenizer.ggml.token_type": [3, 3, 1, 1],
        "tokenizer.ggml.scores": [0, 0, -1.5, -2.0],
        "tokenizer.ggml.bos_token_id": 0,
    }


def test_write_then_read_many_types(tmp_path):
    rng = np.random.default_rng(0)
    tensors = [
        ("t.f32", Weight.from_array(rng.standard_normal((3, 5)), "f32")),
        ("t.f16", Weight.from_array(rng.standard_normal((2, 3, 7)), "f16")),
        ("t.bf16", Weight.from_array(rng.standard_normal((4,)), "bf16")),
        ("t.i32", _raw_weight("t.i32", (2, 2, 2, 3), formats.get("i32"), rng)),
        ("t.f64", _raw_weight("t.f64", (5,), formats.get("f64"), rng)),
    ]
    out = tmp_path / "many.gguf"
    seen = []
    write_gguf(out, _rich_metadata(), tensors, progress=lambda n, b: seen.append((n, b)))
    assert seen == [(n, w.nbytes) for n, w in tensors]

    f = read_gguf(out)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    expected = {k: (v.value if hasattr(v, "type") else v) for k, v in _rich_metadata().items()}
    expected["tokenizer.ggml.scores"] = [0.0, 0.0, -1.5, -2.0]
    assert f.metadata == expected
    assert f.metadata_types["x.u64"] == ValueType.UINT64
    assert f.metadata_types["x.arr_empty"] == ArrayType(ValueType.UINT32)
    for name, w in tensors:
        assert f.tensors[name].shape == w.shape and f.tensors[name].format is w.format
        assert np.array_equal(f.tensors[name].raw(), w.raw())
        assert f.tensor_offsets[name] % 64 == 0
    _assert_matches_gguf_package(out, f)


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_write_then_read_block_formats(tmp_path, name):
    fmt = formats.get(name)        # a format kiln lacks fails here, it is not skipped
    rng = np.random.default_rng(1)
    tensors = [(f"blk.{i}.w", _raw_weight(f"blk.{i}.w", shape, fmt, rng))
               for i, shape in enumerate([(3, fmt.block_size * 2), (fmt.block_size,), (2, 2, fmt.block_size)])]
    out = tmp_path / f"{name}.gguf"
    write_gguf(out, {"general.architecture": "llama"}, tensors)
    f = read_gguf(out)
    for n, w in tensors:
        assert f.tensors[n].format is fmt and f.tensors[n].shape == w.shape
        assert np.array_equal(f.tensors[n].raw(), w.raw())
    _assert_matches_gguf_package(out, f)


def test_inferred_types_follow_llama_cpp(tmp_path):
    out = tmp_path / "types.gguf"
    write_gguf(out, {
        "llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3, "llama.rope.dimension_count": 64,
        "llama.vocab_size": 49152, "general.file_type": 3, "general.quantization_version": 2,
        "tokenizer.ggml.eos_token_id": 2, "llama.rope.freq_base": 100000.0,
        "general.sampling.top_k": 40, "x.negative": -5, "x.big": 2**40, "x.huge": 2**63,
        "x.count_but_negative": -1, "x.bytes": b"\x00\xff", "x.np_u16": np.uint16(7),
        "x.np_arr": np.arange(3, dtype=np.int16), "x.nested": [[1, 2], [3]],
        "tokenizer.ggml.token_type": [1, 1], "tokenizer.ggml.scores": [0, 1],
        "tokenizer.ggml.merges": ["a b"], "x.np_i64": np.int64(3), "x.np_f64": np.float64(0.5),
        "x.np_f64_arr": np.array([0.5, 1.0]), "x.np_f32_arr": np.array([0.5], dtype=np.float32),
        "llama.np_count": np.int64(7),
    }, [])
    t = read_gguf(out).metadata_types
    U32 = ValueType.UINT32
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.vocab_size",
                "general.file_type", "general.quantization_version", "tokenizer.ggml.eos_token_id"):
        assert t[key] == U32, key
    assert t["llama.rope.freq_base"] == ValueType.FLOAT32
    assert t["general.sampling.top_k"] == ValueType.INT32
    assert t["x.negative"] == ValueType.INT32 and t["x.count_but_negative"] == ValueType.INT32
    assert t["x.big"] == ValueType.INT64 and t["x.huge"] == ValueType.UINT64
    assert t["x.bytes"] == ArrayType(ValueType.UINT8)
    assert t["x.np_u16"] == ValueType.UINT16 and t["x.np_arr"] == ArrayType(ValueType.INT16)
    assert t["x.nested"] == ArrayType(ArrayType(ValueType.INT32))
    assert t["tokenizer.ggml.token_type"] == ArrayType(ValueType.INT32)
    assert t["tokenizer.ggml.scores"] == ArrayType(ValueType.FLOAT32)
    assert t["tokenizer.ggml.merges"] == ArrayType(ValueType.STRING)
    # numpy's default dtypes count as plain numbers; chosen dtypes are kept
    assert t["x.np_i64"] == ValueType.INT32 and t["x.np_f64"] == ValueType.FLOAT32
    assert t["llama.np_count"] == U32
    assert t["x.np_f64_arr"] == ArrayType(ValueType.FLOAT32)
    assert t["x.np_f32_arr"] == ArrayType(ValueType.FLOAT32)
    assert read_gguf(out).metadata["x.nested"] == [[1, 2], [3]]


def test_parse_type_spellings():
    assert parse_type("UINT32") is ValueType.UINT32
    assert parse_type(gguf.GGUFValueType.FLOAT64) is ValueType.FLOAT64
    assert parse_type("array[array[string]]") == ArrayType(ArrayType(ValueType.STRING))
    for bad in ("array", "uint128", ValueType.ARRAY, 99, 1.5):
        with pytest.raises(ValueError):
            parse_type(bad)


def test_strings_keep_their_bytes(tmp_path):
    # tokens that are not UTF-8 alone, including two that are only valid when joined
    tokens = [b"\xff", b"\xc3", b"\xa9", "é".encode(), b"ok", b""]
    out = tmp_path / "bytes.gguf"
    write_gguf(out, {"tokenizer.ggml.tokens": typed(tokens, "array[string]"), "x.s": b"\x80"}, [])
    f = read_gguf(out)
    assert [t.encode("utf-8", "surrogateescape") for t in f.metadata["tokenizer.ggml.tokens"]] == tokens
    assert f.metadata["tokenizer.ggml.tokens"][3] == "é"
    again = tmp_path / "again.gguf"
    write_gguf(again, f.metadata, [], metadata_types=f.metadata_types)
    assert filecmp.cmp(out, again, shallow=False)


def test_version_2_reads(tmp_path):
    data = _file([_kv("general.architecture", 8, _s("llama"))], [_ti("w", [4], 0, 0)],
                 np.arange(4, dtype="<f4").tobytes(), version=2)
    f = read_gguf(_put(tmp_path, data))
    assert f.version == 2 and f.tensors["w"].numpy().tolist() == [0, 1, 2, 3]


def test_vocabulary_parses_fast(tmp_path):
    rnd = random.Random(2)
    alphabet = "abcdefghijklmnopqrstuvwxyzĠĊéü日本"
    tokens = ["".join(rnd.choices(alphabet, k=rnd.randint(1, 11))) for _ in range(150_000)]
    out = tmp_path / "vocab.gguf"
    write_gguf(out, {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * len(tokens),
                     "tokenizer.ggml.token_type": [1] * len(tokens)}, [])
    start = time.perf_counter()
    f = read_gguf(out)
    elapsed = time.perf_counter() - start
    assert f.metadata["tokenizer.ggml.tokens"] == tokens
    assert elapsed < 0.5, f"150k-token vocabulary took {elapsed:.3f}s"


# ---- (c) read -> write of the real model is byte-identical --------------------------------

def test_real_model_round_trip_is_byte_identical(smollm2_gguf, tmp_path):
    f = read_gguf(smollm2_gguf)
    out = tmp_path / "copy.gguf"
    write_gguf(out, f.metadata, f.tensors, metadata_types=f.metadata_types)
    assert filecmp.cmp(smollm2_gguf, out, shallow=False)


# ---- (d) interrupted writes leave nothing -------------------------------------------------

class Boom(RuntimeError):
    pass


def _failing_tensors():
    def explode():
        raise Boom("disk on fire")
    ok = Weight.from_array(np.ones((4, 4)), "f32")
    return [("a", ok), ("b", Weight((4, 4), "f32", explode)), ("c", ok)]


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(Boom):
        write_gguf(out, {"general.architecture": "llama"}, _failing_tensors())
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(Boom):
        write_gguf(out, {}, _failing_tensors())
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]


def test_progress_interrupt_leaves_nothing(tmp_path):
    def stop(name, nbytes):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tmp_path / "m.gguf", {}, [("a", Weight.from_array(np.ones(3)))], progress=stop)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata, tensors, message", [
    ({"x.v": typed(256, "uint8")}, [], "256 does not fit uint8"),
    ({"x.v": typed([1, -1], "array[uint32]")}, [], "-1 does not fit uint32"),
    ({"x.v": typed(1.5, "int32")}, [], "needs an integer"),
    ({"x.v": typed(1e39, "float32")}, [], "does not fit float32"),
    ({"x.v": {"a": 1}}, [], "cannot store a dict"),
    ({"x.v": [1, "a"]}, [], "mixes"),
    ({"x.v": typed("s", "array[string]")}, [], "needs a list"),
    ({"x.v": "\ud800"}, [], "UTF-8"),
    ({"": 1}, [], "non-empty string"),
    ({"general.alignment": 48}, [], "not a power of two"),
    ({}, [("a", "ones"), ("a", "ones")], "tensor a is given twice"),
    ({}, [("x" * 64, "ones")], "llama.cpp reads names of at most 63"),
    ({}, [("a", "5d")], "5 dimensions"),
])
def test_write_refuses_bad_input(tmp_path, metadata, tensors, message):
    made = {"ones": Weight.from_array(np.ones(4)), "5d": Weight.from_array(np.ones((1, 1, 1, 1, 2)))}
    out = tmp_path / "bad.gguf"
    with pytest.raises(KilnError) as e:
        write_gguf(out, metadata, [(n, made[w]) for n, w in tensors])
    assert message in str(e.value) and str(out) in str(e.value)
    assert os.listdir(tmp_path) == []


def test_write_refuses_missing_folder(tmp_path):
    with pytest.raises(KilnError, match="cannot write"):
        write_gguf(tmp_path / "nope" / "m.gguf", {}, [])


def test_alignment_argument(tmp_path):
    out = tmp_path / "a.gguf"
    write_gguf(out, {}, [("w", Weight.from_array(np.ones(3)))], alignment=128)
    f = read_gguf(out)
    assert f.alignment == 128 and f.metadata["general.alignment"] == 128 and f.data_offset % 128 == 0
    with pytest.raises(KilnError, match="contradicts"):
        write_gguf(out, {"general.alignment": 64}, [], alignment=128)


# ---- (e) hostile and broken files ---------------------------------------------------------

def _s(text) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name, dims, ttype: int, offset: int) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ttype, offset))


def _file(kvs=(), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
          align=32) -> bytes:
    head = (magic + struct.pack("<I", version)
            + struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors))
    return head + bytes(-len(head) % align) + data


def _put(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


ARCH = _kv("general.architecture", 8, _s("llama"))
F32_4 = np.arange(4, dtype="<f4").tobytes()
U32 = 4
ARRAY = 9


def _array(item: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", item, count) + payload


def _nested(depth: int) -> bytes:
    payload = _array(5, 1, struct.pack("<i", 7))
    for _ in range(depth):
        payload = _array(ARRAY, 1, payload)
    return payload


def _unsupported_type_id():
    for tid in sorted(GGML_TYPE_NAMES):
        if formats.from_gguf_type(tid) is None:
            return tid, GGML_TYPE_NAMES[tid]
    return None


HOSTILE = {
    "empty file": (b"", "too small to be a GGUF file"),
    "bad magic": (b"PK\x03\x04" + bytes(40), "not a GGUF file"),
    "version 1": (_file([ARCH], version=1), "GGUF version 1 is not supported"),
    "version 99": (_file([ARCH], version=99), "GGUF version 99 is not supported"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "truncated header": (_file([ARCH])[:30], "header claims 1 metadata entries, more than the 6 bytes left"),
    "truncated inside a key": (_file([ARCH])[:38], "metadata key #0 runs past the end of the file"),
    "kv count huge": (_file([ARCH], n_kv=2**63), "claims 9223372036854775808 metadata entries"),
    "tensor count huge": (_file([ARCH], n_tensors=2**64 - 1), "claims 18446744073709551615 tensors"),
    "tensor count lies after kvs": (_file([ARCH, _kv("x.pad", 8, _s("p" * 100))], n_tensors=4),
                                    "claims 4 tensors"),
    "lying key length": (_file([struct.pack("<Q", 2**63) + b"k" * 16]), "metadata key #0 runs past"),
    "lying string length": (_file([_kv("a.b", 8, struct.pack("<Q", 2**63) + b"xx")]),
                            "the value of metadata key a.b runs past"),
    "lying array count": (_file([_kv("a.b", ARRAY, _array(U32, 2**62, b"\0" * 8))]),
                          "claims 4611686018427387904 uint32 items"),
    "lying string array count": (_file([_kv("a.b", ARRAY, _array(8, 2**40, _s("x")))]),
                                 "claims 1099511627776 string items"),
    "string array truncated": (_file([_kv("a.b", ARRAY, _array(8, 3, _s("x") + _s("y") + struct.pack("<Q", 50)))]),
                               "metadata key a.b[2] runs past"),
    "unknown value type": (_file([_kv("a.b", 13, b"\0" * 8)]), "metadata key a.b has unknown value type 13"),
    "unknown array item type": (_file([_kv("a.b", ARRAY, _array(77, 1, b"\0" * 8))]),
                                "metadata key a.b is an array of unknown value type 77"),
    "nested arrays too deep": (_file([_kv("a.b", ARRAY, _nested(20))]), "nests arrays more than 8 deep"),
    "nested arrays of mixed types": (
        _file([_kv("a.b", ARRAY, _array(ARRAY, 2, _array(5, 1, b"\0" * 4) + _array(8, 1, _s("x"))))]),
        "mixes inner arrays"),
    "bool not 0 or 1": (_file([_kv("a.b", 7, b"\x02")]), "bool stored as 2"),
    "duplicate key": (_file([ARCH, ARCH]), "metadata key general.architecture appears twice"),
    "empty key": (_file([_kv("", U32, b"\0" * 4)]), "metadata key #0 is empty"),
    "invalid UTF-8 key": (_file([_kv(b"a\xffb", U32, b"\0" * 4)]), "metadata key #0 is not valid UTF-8"),
    "alignment not power of two": (_file([_kv("general.alignment", U32, struct.pack("<I", 48))]),
                                   "general.alignment is 48, not a power of two"),
    "alignment zero": (_file([_kv("general.alignment", U32, struct.pack("<I", 0))]),
                       "general.alignment is 0"),
    "alignment wrong type": (_file([_kv("general.alignment", 8, _s("32"))]),
                             "general.alignment is a string"),
    "unknown tensor type": (_file([ARCH], [_ti("w", [4], 200, 0)], F32_4),
                            "tensor w has unknown GGML type id 200"),
    "n_dims 0": (_file([ARCH], [_ti("w", [], 0, 0)], F32_4), "tensor w has 0 dimensions"),
    "n_dims 9": (_file([ARCH], [_ti("w", [1] * 9, 0, 0)], F32_4), "tensor w has 9 dimensions"),
    "zero dim": (_file([ARCH], [_ti("w", [4, 0], 0, 0)], F32_4), "tensor w has an empty dimension"),
    "size overflow": (_file([ARCH], [_ti("w", [2**32, 2**32], 0, 0)], F32_4),
                      "more than a 64-bit size can hold"),
    "dim beyond int64": (_file([ARCH], [_ti("w", [2**64 - 1], 0, 0)], F32_4),
                         "more than a 64-bit size can hold"),
    "misaligned offset": (_file([ARCH], [_ti("w", [4], 0, 0), _ti("v", [4], 0, 33)], F32_4 * 4),
                          "tensor v data offset 33 is not a multiple of the alignment 32"),
    "overlapping tensors": (_file([ARCH], [_ti("w", [16], 0, 0), _ti("v", [4], 0, 32)], F32_4 * 4),
                            "tensors w (bytes"),
    "tensor past EOF": (_file([ARCH], [_ti("blk.3.attn_q.weight", [64], 0, 0)], F32_4),
                        "tensor blk.3.attn_q.weight ends past the end of the file (needs 256 bytes at offset"),
    "truncated in tensor data": (_file([ARCH], [_ti("w", [4], 0, 0), _ti("v", [8], 0, 32)], F32_4 * 3),
                                 "tensor v ends past the end of the file"),
    "huge offset": (_file([ARCH], [_ti("w", [4], 0, 2**64 - 32)], F32_4), "tensor w ends past the end"),
    "duplicate tensor name": (_file([ARCH], [_ti("w", [4], 0, 0), _ti("w", [4], 0, 32)], F32_4 * 8),
                              "tensor w appears twice"),
    "empty tensor name": (_file([ARCH], [_ti("", [4], 0, 0)], F32_4), "the name of tensor #0 is empty"),
    "invalid UTF-8 tensor name": (_file([ARCH], [_ti(b"\xc3(", [4], 0, 0)], F32_4),
                                  "the name of tensor #0 is not valid UTF-8"),
    "truncated tensor info": (_file([ARCH], [_ti("token_embd.weight", [4], 0, 0)], align=1)[:-6],
                              "the data offset of tensor token_embd.weight runs past the end of the file"),
    "lying tensor name length": (_file([ARCH], [struct.pack("<Q", 2**63) + bytes(40)]),
                                 "the name of tensor #0 runs past"),
}


def _check_hostile(path, message, *, trace=True):
    """The read fails fast, allocates little (a lying length must not be believed) and says why."""
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KilnError) as e:
            read_gguf(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 20_000_000, f"reading allocated {peak} bytes"
    text = str(e.value)
    assert text.startswith(str(path) + ": "), text
    assert message in text, text
    assert "\n" not in text
    return text


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file(tmp_path, case):
    data, message = HOSTILE[case]
    _check_hostile(_put(tmp_path, data), message)


def test_row_not_whole_blocks(tmp_path):
    fmt = formats.get("q8_0")
    data = _file([ARCH], [_ti("w", [fmt.block_size + 1, 2], fmt.gguf_type, 0)], bytes(4096))
    _check_hostile(_put(tmp_path, data), f"tensor w rows of {fmt.block_size + 1} elements are not a whole number of q8_0 blocks of 32")


# What kiln reads of the GGML types GGUF defines; the rest must be refused by name. A type
# that stops being read, or a new one, fails here until this list says so.
READ_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
              "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"}


def test_read_types_are_the_registered_formats():
    read = {name for tid, name in GGML_TYPE_NAMES.items() if formats.from_gguf_type(tid) is not None}
    assert read == READ_TYPES
    assert _unsupported_type_id() == (4, "Q4_2")     # the first refused id, which test_hostile_files uses


@pytest.mark.parametrize("tid", sorted(GGML_TYPE_NAMES), ids=lambda t: GGML_TYPE_NAMES[t])
def test_every_ggml_type_is_read_or_refused_by_name(tmp_path, tid):
    name = GGML_TYPE_NAMES[tid]
    fmt = formats.from_gguf_type(tid)
    if name not in READ_TYPES:
        assert fmt is None
        data = _file([ARCH], [_ti("w", [256], tid, 0)], bytes(4096))
        _check_hostile(_put(tmp_path, data), f"tensor w has GGML type {name} (id {tid}), which kiln does not support")
        return
    # a tensor of two rows of two blocks reads back with its format and its bytes
    assert fmt.gguf_type == tid
    raw = np.random.default_rng(tid).integers(0, 256, 4 * fmt.type_size, dtype=np.uint8).tobytes()
    path = _put(tmp_path, _file([ARCH], [_ti("w", [2 * fmt.block_size, 2], tid, 0)], raw))
    w = read_gguf(path).tensors["w"]
    assert w.format is fmt and w.shape == (2, 2 * fmt.block_size)
    assert w.raw().tobytes() == raw


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(KilnError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(KilnError, match="is a folder"):
        read_gguf(tmp_path)


def test_truncations_of_the_real_header(smollm2_gguf, tmp_path):
    data_offset = read_gguf(smollm2_gguf).data_offset
    with open(smollm2_gguf, "rb") as fh:
        head = fh.read(data_offset + 4096)
    rng = np.random.default_rng(3)
    # each cut is reported as what it is: too short, a read past the end of this file's length,
    # or a count that the bytes left after it cannot hold
    past_end = re.compile(r"(runs|ends) past the end of the file \(needs (\d+) bytes at offset (\d+), file has (\d+)\)$")
    too_many = re.compile(r"claims (\d+) (metadata entries|\w+ items), more than the (\d+) bytes left (in the file )?can hold$")
    for cut in sorted({0, 3, 10, 23, 24, 100, data_offset - 1, data_offset + 100,
                       *rng.integers(24, data_offset, 20).tolist()}):
        # untraced: a long prefix legitimately holds ~100k parsed strings before the cut
        path = _put(tmp_path, head[:cut], f"cut{cut}.gguf")
        text = _check_hostile(path, "", trace=False)[len(str(path)) + 2:]
        if cut < 24:
            assert text == f"file is {cut} bytes, too small to be a GGUF file"
        elif m := past_end.search(text):
            need, offset, size = map(int, m.group(2, 3, 4))
            assert size == cut and offset + need > cut, text
        else:
            m = too_many.search(text)
            assert m and int(m.group(3)) < cut, text
            assert int(m.group(1)) in (33, 49152, 48900), text   # the header's real counts


def test_random_corruption_never_escapes_as_another_error(tmp_path):
    good = _file([ARCH, _kv("x.arr", ARRAY, _array(8, 2, _s("ab") + _s("cd"))),
                  _kv("x.n", U32, struct.pack("<I", 5))],
                 [_ti("w", [4], 0, 0), _ti("v", [2, 2], 1, 32)], F32_4 + bytes(16) + bytes(8))
    read_gguf(_put(tmp_path, good, "good.gguf"))
    rng = np.random.default_rng(4)
    header_len = len(good) - 56
    for i in range(300):
        data = bytearray(good)
        for pos in rng.integers(0, header_len, rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256) if rng.random() < 0.7 else 0xFF
        p = _put(tmp_path, bytes(data), "fuzz.gguf")
        try:
            read_gguf(p)
        except KilnError as e:
            assert str(e).startswith(str(p))
