"""Structure-aware fuzzing of the GGUF container reader and the GGUF model frontend.

A valid small file is decoded into its fields (header counts, keys and their length prefixes,
value types, array item types and counts, tensor names, dimension counts, dimensions, GGML
types, offsets, padding, data); a few fields are mutated, groups of fields deleted, repeated or
swapped, values re-encoded with another type or nested deeper; then the file is encoded again,
sometimes cut short or bit-flipped, and read. The model frontend is also fed files that are
valid containers carrying lying metadata or tensors, written with kiln's own writer.

See tests/fuzzing.py for the outcome rules and the child-process limits.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

import fuzzing
from conftest import HF_FIXTURES
from kiln.errors import KilnError
from kiln.frontends.gguf_file import ValueType, read_gguf, typed, write_gguf
from kiln.weights import Weight

# ==========================================================================================
# the field codec
# ==========================================================================================

_CODES = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
          ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.UINT64: "<Q",
          ValueType.INT64: "<q", ValueType.FLOAT64: "<d", ValueType.BOOL: "<B"}


class Field:
    """One field of a GGUF file: a packed number (``code`` a struct code) or raw bytes
    (``code`` None). ``group`` says which key/value or tensor entry it belongs to."""
    __slots__ = ("code", "value", "role", "group")

    def __init__(self, code, value, role, group=None):
        self.code, self.value, self.role, self.group = code, value, role, group

    def encode(self) -> bytes:
        return self.value if self.code is None else struct.pack(self.code, self.value)

    def __repr__(self):
        return f"{self.role}={self.value!r}"


def decode(data: bytes) -> list[Field]:
    """A valid GGUF file as its list of fields (the inverse of ``encode``)."""
    out: list[Field] = []
    pos = 0

    def num(code, role, group=None):
        nonlocal pos
        v = struct.unpack_from(code, data, pos)[0]
        pos += struct.calcsize(code)
        out.append(Field(code, v, role, group))
        return v

    def raw(n, role, group=None):
        nonlocal pos
        out.append(Field(None, data[pos:pos + n], role, group))
        pos += n

    def value(vt, group):
        if vt == ValueType.STRING:
            raw(num("<Q", "str_len", group), "str", group)
        elif vt == ValueType.ARRAY:
            item = num("<I", "item_type", group)
            for _ in range(num("<Q", "count", group)):
                value(item, group)
        else:
            num(_CODES[ValueType(vt)], "value", group)

    raw(4, "magic")
    num("<I", "version")
    n_tensors = num("<Q", "n_tensors")
    n_kv = num("<Q", "n_kv")
    alignment = 32
    for i in range(n_kv):
        g = ("kv", i)
        n = num("<Q", "key_len", g)
        key = data[pos:pos + n]
        raw(n, "key", g)
        vt = num("<I", "value_type", g)
        value(vt, g)
        if key == b"general.alignment":
            alignment = out[-1].value
    for i in range(n_tensors):
        g = ("tensor", i)
        raw(num("<Q", "name_len", g), "name", g)
        for _ in range(num("<I", "n_dims", g)):
            num("<Q", "dim", g)
        num("<I", "ggml_type", g)
        num("<Q", "offset", g)
    raw(-pos % alignment, "pad")
    raw(len(data) - pos, "data")
    return out


def encode(fields: list[Field]) -> bytes:
    return b"".join(f.encode() for f in fields)


# ==========================================================================================
# mutations
# ==========================================================================================

_BITS = {"<B": 8, "<b": 8, "<H": 16, "<h": 16, "<I": 32, "<i": 32, "<Q": 64, "<q": 64}
_TYPE_IDS = list(range(0, 46)) + [2**31, 2**32 - 1]


def _floats(code):
    fits = [v for v in fuzzing.INTERESTING_FLOATS if code == "<d" or not abs(v) < math.inf or abs(v) < 3.4e38]
    return st.sampled_from(fits) | st.floats(width=32 if code == "<f" else 64)


def _new_number(f: Field, draw):
    if f.code in ("<f", "<d"):
        return draw(_floats(f.code))
    if f.role in ("value_type", "item_type", "ggml_type") and draw(st.booleans()):
        return draw(st.sampled_from(_TYPE_IDS))
    bits = _BITS[f.code]
    if f.code.islower():
        return draw(fuzzing.interesting_sint(bits, f.value))
    return draw(fuzzing.interesting_uint(bits, f.value))


def _groups(fields, kind):
    seen = {}
    for i, f in enumerate(fields):
        if f.group and f.group[0] == kind:
            seen.setdefault(f.group, []).append(i)
    return [(g, idx[0], idx[-1] + 1) for g, idx in seen.items()]


def _bump(fields, kind, delta):
    """A copy of the header count of ``kind`` changed by ``delta`` (fields are shared: never edited)."""
    i = next(i for i, f in enumerate(fields) if f.role == ("n_kv" if kind == "kv" else "n_tensors"))
    fields[i] = Field("<Q", (fields[i].value + delta) % 2**64, fields[i].role)


def _value_fields(draw, group, depth=0):
    """A well-formed value of a random type: (type id, fields)."""
    vt = draw(st.sampled_from(list(ValueType)))
    if vt == ValueType.ARRAY and depth > 10:
        vt = ValueType.UINT8
    if vt == ValueType.STRING:
        s = draw(fuzzing.hostile_bytes())
        return vt, [Field("<Q", len(s), "str_len", group), Field(None, s, "str", group)]
    if vt == ValueType.ARRAY:
        nest = draw(st.integers(0, 12)) if depth == 0 and draw(st.booleans()) else 0
        if nest:   # arrays of arrays, ``nest`` deep, of one item type
            fields = [Field("<I", ValueType.UINT8, "item_type", group), Field("<Q", 0, "count", group)]
            for _ in range(nest):
                fields = [Field("<I", ValueType.ARRAY, "item_type", group), Field("<Q", 1, "count", group)] + fields
            return vt, fields
        item, one = _value_fields(draw, group, depth + 1)
        count = draw(st.integers(0, 4))
        fields = [Field("<I", item, "item_type", group), Field("<Q", count, "count", group)]
        for _ in range(count):
            if item == ValueType.ARRAY:
                fields += one          # the same inner array again: one item type for all
            else:
                fields += _value_fields_of(item, draw, group)
        return vt, fields
    return vt, _value_fields_of(vt, draw, group)


def _value_fields_of(vt, draw, group):
    if vt == ValueType.STRING:
        s = draw(fuzzing.hostile_bytes())
        return [Field("<Q", len(s), "str_len", group), Field(None, s, "str", group)]
    code = _CODES[vt]
    if vt == ValueType.BOOL:
        v = draw(st.sampled_from([0, 1, 2, 255]))
    elif code in ("<f", "<d"):
        v = draw(_floats(code))
    elif code.islower():
        v = draw(fuzzing.interesting_sint(_BITS[code]))
    else:
        v = draw(fuzzing.interesting_uint(_BITS[code]))
    return [Field(code, v, "value", group)]


def mutate(fields: list[Field], draw) -> tuple[list[Field], str]:
    fields = list(fields)
    op = draw(st.sampled_from(["number", "number", "value", "text", "type", "group", "kv_value", "kv_value",
                               "alignment", "data", "flip_data"]))
    if op in ("number", "value"):
        roles = sorted({f.role for f in fields if f.code is not None})
        role = draw(st.sampled_from(roles)) if op == "number" else "value"
        i = draw(st.sampled_from([i for i, f in enumerate(fields) if f.role == role]))
        old = fields[i]
        fields[i] = Field(old.code, _new_number(old, draw), old.role, old.group)
        return fields, f"{old.role} {old.value!r} -> {fields[i].value!r} in {old.group}"
    if op == "text":
        choices = [i for i, f in enumerate(fields) if f.role in ("key", "str", "name", "magic")]
        i = draw(st.sampled_from(choices))
        old = fields[i]
        new = draw(fuzzing.hostile_bytes() | st.just(old.value + draw(fuzzing.hostile_bytes())))
        fields[i] = Field(None, new, old.role, old.group)
        consistent = old.role != "magic" and draw(st.booleans())
        if consistent:
            fields[i - 1] = Field("<Q", len(new), fields[i - 1].role, old.group)
        return fields, f"{old.role} {old.value[:20]!r} -> {new[:20]!r}{' (length fixed)' if consistent else ''}"
    if op == "type":
        choices = [i for i, f in enumerate(fields) if f.role in ("value_type", "item_type", "ggml_type")]
        i = draw(st.sampled_from(choices))
        old = fields[i]
        fields[i] = Field(old.code, draw(st.sampled_from(_TYPE_IDS)), old.role, old.group)
        return fields, f"{old.role} {old.value} -> {fields[i].value} in {old.group}"
    if op == "group":
        kind = draw(st.sampled_from(["kv", "tensor"]))
        groups = _groups(fields, kind)
        if not groups:
            return fields, "no group"
        action = draw(st.sampled_from(["delete", "repeat", "swap"]))
        g, a, b = draw(st.sampled_from(groups))
        if action == "delete":
            fields[a:b] = []
        elif action == "repeat":
            fields[b:b] = [Field(f.code, f.value, f.role, (kind, 1000 + len(fields))) for f in fields[a:b]]
        else:
            g2, c, d = draw(st.sampled_from(groups))
            if (c, d) != (a, b):
                (a, b), (c, d) = sorted([(a, b), (c, d)])
                fields = fields[:a] + fields[c:d] + fields[b:c] + fields[a:b] + fields[d:]
        fix = action != "swap" and draw(st.booleans())
        if fix:
            _bump(fields, kind, -1 if action == "delete" else 1)
        return fields, f"{action} {g}{' (count fixed)' if fix else ''}"
    if op == "kv_value":
        groups = _groups(fields, "kv")
        g, a, b = draw(st.sampled_from(groups))
        vt, new = _value_fields(draw, g)
        at = a + 3          # key_len, key, value_type, then the value
        fields[at - 1] = Field("<I", vt, "value_type", g)
        fields[at:b] = new
        return fields, f"{g} re-encoded as {ValueType(vt).name} ({len(new)} fields)"
    if op == "alignment":
        vt = draw(st.sampled_from([ValueType.UINT32, ValueType.UINT32, ValueType.UINT64, ValueType.INT32,
                                   ValueType.STRING]))
        value = draw(st.sampled_from([0, 1, 2, 3, 8, 16, 32, 64, 4096, 2**31, 2**32 - 1]))
        key = b"general.alignment"
        if vt == ValueType.STRING:
            body = [Field("<Q", 2, "str_len"), Field(None, b"64", "str")]
        else:
            body = [Field(_CODES[vt], value if vt != ValueType.INT32 else min(value, 2**31 - 1), "value")]
        new = [Field("<Q", len(key), "key_len"), Field(None, key, "key"), Field("<I", vt, "value_type")] + body
        where = next(i for i, f in enumerate(fields) if f.role == "n_kv") + 1
        for f in new:
            f.group = ("kv", -2)
        fields[where:where] = new
        _bump(fields, "kv", 1)
        return fields, f"general.alignment = {value} as {vt.name}"
    i = next(i for i, f in enumerate(fields) if f.role == "data")
    if op == "flip_data":      # the values change, the layout does not
        data = bytearray(fields[i].value)
        for _ in range(draw(st.integers(1, 8))):
            if data:
                data[draw(fuzzing.position(len(data)))] = draw(st.integers(0, 255))
        fields[i] = Field(None, bytes(data), "data")
        return fields, "data bytes changed"
    # data: shrink or grow the data section
    data = fields[i].value
    n = draw(fuzzing.position(len(data) + 64))
    fields[i] = Field(None, data[:n] + bytes(max(0, n - len(data))), "data")
    return fields, f"data section {len(data)} -> {n} bytes"


# ==========================================================================================
# valid small files
# ==========================================================================================

def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def gpt2_vocab_metadata(n: int = 256) -> dict:
    """A byte-level BPE vocabulary of ``n`` tokens as GGUF tokenizer metadata."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pieces = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    tokens = _byte_chars()[: n - len(pieces) - len(specials)] + pieces + specials
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (n - 3) + [3, 3, 3],
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"],
        "tokenizer.ggml.bos_token_id": typed(n - 3, "uint32"),
        "tokenizer.ggml.eos_token_id": typed(n - 1, "uint32"),
        "tokenizer.ggml.padding_token_id": typed(n - 3, "uint32"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }


def _all_types_file(path: Path) -> None:
    rng = np.random.default_rng(7)
    meta = {
        "general.architecture": "llama", "general.name": "fuzz é ▁",
        "t.u8": typed(200, "uint8"), "t.i8": typed(-5, "int8"), "t.u16": typed(60000, "uint16"),
        "t.i16": typed(-300, "int16"), "t.u32": typed(7, "uint32"), "t.i32": typed(-7, "int32"),
        "t.f32": typed(0.5, "float32"), "t.bool": True, "t.u64": typed(2**40, "uint64"),
        "t.i64": typed(-2**40, "int64"), "t.f64": typed(1e-300, "float64"),
        "t.bytes": typed([1, 2, 3], "array[uint8]"), "t.strings": ["a", "", "é", "\udcff\udcfe"],
        "t.nested": typed([[1, 2], [3]], "array[array[int32]]"), "t.empty": typed([], "array[float32]"),
        "t.bools": [True, False],
    }
    tensors = []
    for name, fmt, shape in [("a.f32", "f32", (3, 4)), ("b.f16", "f16", (8,)), ("c.q8_0", "q8_0", (2, 32)),
                             ("d.q4_0", "q4_0", (1, 64)), ("e.q4_k", "q4_k", (1, 256)), ("f.bf16", "bf16", (2, 2)),
                             ("g.q6_k", "q6_k", (1, 256)), ("h.i32", "i32", (5,)), ("i.q5_1", "q5_1", (2, 32))]:
        w = Weight.from_array(rng.standard_normal(shape).astype(np.float32), fmt, name=name)
        tensors.append((name, w))
    write_gguf(path, meta, tensors, alignment=64)


def _model_file(path: Path, work: Path) -> None:
    from kiln.driver import convert
    plain = work / "plain.gguf"
    convert(HF_FIXTURES / "llama", plain, to="gguf", quant="q8_0")
    f = read_gguf(plain)
    meta = {k: typed(v, f.metadata_types[k]) for k, v in f.metadata.items() if not k.startswith("tokenizer.")}
    meta.update(gpt2_vocab_metadata(f.metadata["llama.vocab_size"]))
    write_gguf(path, meta, list(f.tensors.items()))


_BASES: dict[str, bytes] = {}
_DECODED: dict[str, list[Field]] = {}     # decoded once; mutations copy the list, never a Field


def prepare(work: Path) -> None:
    bases(work)


def bases(work: Path) -> dict[str, bytes]:
    if not _BASES:
        work.mkdir(parents=True, exist_ok=True)
        _all_types_file(work / "types.gguf")
        _model_file(work / "model.gguf", work)
        for name in ("types", "model"):
            _BASES[name] = (work / f"{name}.gguf").read_bytes()
    return _BASES


# ==========================================================================================
# targets
# ==========================================================================================

def touch_container(f) -> None:
    """Every tensor's bytes, and the values of a few."""
    for i, w in enumerate(f.tensors.values()):
        raw = w.raw()
        assert raw.size == w.nbytes
        if i < 4:
            with np.errstate(all="ignore"):
                w.numpy()


def touch_model(model) -> None:
    for i, w in enumerate(model.weights.values()):
        w.raw()
        if i < 3:
            with np.errstate(all="ignore"):
                w.numpy()
    if model.tokenizer is not None:
        ids = model.tokenizer.tokenizer.encode("the cat in a hat").ids
        model.tokenizer.tokenizer.decode(ids)


def mutated_container(ws, data, which=None) -> Path:
    base = bases(ws.root / "bases")
    name = which or data.draw(st.sampled_from(sorted(base)), label="base")
    if name not in _DECODED:
        _DECODED[name] = decode(base[name])
    fields = _DECODED[name]
    notes = [name]
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]), label="edits")):
        fields, note = mutate(fields, data.draw)
        notes.append(note)
    raw = encode(fields)
    if data.draw(st.integers(0, 5), label="raw edit?") == 0:
        raw, note = fuzzing.edit_bytes(raw, data.draw)
        notes.append(note)
    ws.note(" | ".join(notes))
    path = ws.path("case.gguf")
    path.write_bytes(raw)
    return path


@fuzzing.target(data=st.data())
def fuzz_container(ws, data):
    path = mutated_container(ws, data)
    fuzzing.expect(ws, lambda: touch_container(read_gguf(path)), path)


@fuzzing.target(data=st.data())
def fuzz_model_fields(ws, data):
    """The model frontend over field-level mutations of the tiny llama GGUF."""
    from kiln.frontends import gguf as frontend
    path = mutated_container(ws, data, "model")
    with _quiet():
        fuzzing.expect(ws, lambda: touch_model(frontend.read(path)), path)


_MODEL_KEYS = ["general.architecture", "llama.vocab_size", "llama.context_length", "llama.embedding_length",
               "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
               "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
               "llama.rope.dimension_count", "llama.attention.key_length", "llama.rope.scaling.type",
               "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
               "llama.attention.sliding_window", "tokenizer.ggml.model", "tokenizer.ggml.pre",
               "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
               "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "kiln.rope.scaling",
               "llama.rope.scaling.attn_factor", "llama.rope.scaling.yarn_beta_fast"]

# kiln's own record of the rope scaling is JSON inside a string value
_ROPE_JSON = ['{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, '
              '"original_max_position_embeddings": 64}', '{"rope_type": "yarn", "factor": 4.0}',
              '{"rope_type": "linear", "factor": 0}', '{"rope_type": "longrope"}', '{"rope_type": "dynamic", "factor": 2}',
              '{"rope_type": "linear", "factor": 1e400}', '{"rope_type": "default"}', "[]", "{}", "null", "NaN", "{",
              "[" * 100000 + "]" * 100000, "9" * 5000, '{"rope_type": "llama3", "factor": "x"}',
              '{"rope_type": "freq_factors", "freq_factors": [1, 2]}']


def gguf_values(current=None):
    """Values a GGUF file can hold, with their types."""
    ints = [0, 1, 2, 3, 4, 7, 8, 16, 63, 64, 65, 128, 255, 256, 257, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
    if isinstance(current, int) and not isinstance(current, bool):
        ints += [max(0, current - 1), current + 1, current * 2, current // 2]
    return st.one_of(
        st.tuples(st.sampled_from(ints), st.sampled_from(["uint32", "uint64", "int32", "uint8", "uint16"])).map(
            lambda t: typed(t[0] % (2**31) if t[1] == "int32" else t[0] % 256 if t[1] == "uint8"
                            else t[0] % 65536 if t[1] == "uint16" else t[0], t[1])),
        st.sampled_from([typed(-1, "int32"), typed(-2**63, "int64"), typed(2**64 - 1, "uint64"),
                         typed(2**63, "uint64")]),
        st.sampled_from(fuzzing.INTERESTING_FLOATS).map(lambda v: typed(v, "float32")),
        st.sampled_from(fuzzing.INTERESTING_FLOATS).map(lambda v: typed(v, "float64")),
        st.booleans(),
        st.sampled_from(["", "llama", "gpt2", "mistral", "none", "linear", "yarn", "llama3", "dynamic",
                         "t5", "default", "\udcff", "smollm", "llama-bpe"]),
        st.lists(st.integers(0, 300), max_size=5).map(lambda v: typed(v, "array[uint32]")),
        st.lists(st.text(max_size=4), max_size=5),
        st.lists(st.floats(allow_nan=True, width=32), max_size=5).map(lambda v: typed(v, "array[float32]")),
        st.just(typed([[1], [2, 3]], "array[array[int32]]")),
        st.sampled_from(["x" * 5000, ["llama"] * 300, list(range(300))]),
        st.sampled_from(_ROPE_JSON),
    )


def _tensor_edit(tensors: list, draw) -> tuple[list, str]:
    tensors = list(tensors)
    i = draw(st.integers(0, len(tensors) - 1))
    name, w = tensors[i]
    op = draw(st.sampled_from(["drop", "rename", "reshape", "retype", "swap", "repeat_layer"]))
    if op == "drop":
        del tensors[i]
        return tensors, f"drop {name}"
    if op == "rename":
        new = draw(st.sampled_from(["blk.2.attn_q.weight", "blk.99.ffn_up.weight", "output.weight",
                                    "token_embd.weight", "x", "blk.0.attn_qkv.weight", "blk.-1.attn_k.weight",
                                    "blk.1.attn_norm.weight", "rope_freqs.weight", "rope_factors_long.weight",
                                    "rope_factors_short.weight"]))
        if any(n == new for n, _ in tensors):
            return tensors, "rename skipped"
        tensors[i] = (new, w)
        return tensors, f"rename {name} -> {new}"
    if op == "reshape":
        dims = [d for d in w.shape]
        k = draw(st.integers(0, len(dims) - 1))
        dims[k] = draw(st.sampled_from([1, 2, 32, 63, 64, 65, 96, 128, 256, 257, 512]))
        fmt = w.format.name if dims[-1] % w.format.block_size == 0 else "f32"
        arr = np.resize(w.numpy().reshape(-1), math.prod(dims)).reshape(dims)
        tensors[i] = (name, Weight.from_array(arr, fmt, name=name))
        return tensors, f"reshape {name} {w.shape} -> {tuple(dims)} ({fmt})"
    if op == "retype":
        fmt = draw(st.sampled_from(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q2_k", "q4_k", "q6_k",
                                    "i8", "i32", "f64"]))
        if w.shape[-1] % __import__("kiln").formats.get(fmt).block_size:
            return tensors, "retype skipped"
        tensors[i] = (name, Weight.from_array(w.numpy(), fmt, name=name))
        return tensors, f"retype {name} -> {fmt}"
    if op == "swap":
        j = draw(st.integers(0, len(tensors) - 1))
        tensors[i], tensors[j] = (name, tensors[j][1]), (tensors[j][0], w)
        return tensors, f"swap the data of {name} and {tensors[i][0]}"
    extra = [(n.replace("blk.1.", "blk.2."), t) for n, t in tensors if n.startswith("blk.1.")]
    return tensors + extra, "add a layer 2"


@fuzzing.target(data=st.data())
def fuzz_model_values(ws, data):
    """The model frontend over valid containers whose metadata and tensors lie."""
    from kiln.frontends import gguf as frontend
    bases(ws.root / "bases")
    src = ws.root / "bases" / "model.gguf"
    f = read_gguf(src)
    meta = {k: typed(v, f.metadata_types[k]) for k, v in f.metadata.items()}
    tensors = list(f.tensors.items())
    notes = []
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        what = data.draw(st.sampled_from(["set", "set", "delete", "tensor"]))
        if what == "tensor":
            tensors, note = _tensor_edit(tensors, data.draw)
        else:
            key = data.draw(st.sampled_from(_MODEL_KEYS))
            if what == "delete":
                meta.pop(key, None)
                note = f"delete {key}"
            else:
                current = meta.get(key)
                meta[key] = data.draw(gguf_values(getattr(current, "value", current)))
                note = f"{key} = {meta[key]!r}"[:160]
        notes.append(note)
    ws.note(" | ".join(notes))
    path = ws.path("case.gguf")
    try:
        write_gguf(path, meta, tensors)
    except KilnError:
        return          # kiln's writer refused the combination: nothing to read
    with _quiet():
        fuzzing.expect(ws, lambda: touch_model(frontend.read(path)), path)


class _quiet:
    """Warnings (unknown pre-tokenizer, ids out of range) are fine: they are not errors."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


# ==========================================================================================
# the tests
# ==========================================================================================

@pytest.fixture(scope="module")
def model_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf_bases")
    bases(folder)
    return folder / "model.gguf"


def _rewrite(src: Path, dst: Path, set_=None, drop_tensors=()) -> Path:
    f = read_gguf(src)
    meta = {k: typed(v, f.metadata_types[k]) for k, v in f.metadata.items()}
    meta.update(set_ or {})
    write_gguf(dst, meta, [(n, w) for n, w in f.tensors.items() if n not in drop_tensors])
    return dst


def _refused(path: Path, match: str) -> KilnError:
    from kiln.frontends import gguf as frontend
    with pytest.raises(KilnError, match=match) as e:
        frontend.read(path)
    fuzzing.check_error(e.value, [path])
    assert e.value.path == str(path)
    return e.value


def test_regression_tokenizer_errors_name_the_gguf_file(model_base, tmp_path):
    # found by fuzz_model_fields: tokenizer metadata errors came with no file (path None)
    p = _rewrite(model_base, tmp_path / "m.gguf", {"tokenizer.ggml.model": "gpt3"})
    _refused(p, "tokenizer model 'gpt3'")


@pytest.mark.parametrize("key", ["llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                                 "llama.vocab_size", "llama.context_length", "llama.attention.sliding_window"])
@pytest.mark.parametrize("value", [typed(math.inf, "float32"), typed(2.5, "float32"), typed(1e30, "float32"),
                                   typed(2**64 - 1, "uint64")])
def test_regression_counts_that_are_not_whole_numbers(model_base, tmp_path, key, value):
    # found by fuzz_model_values: a count stored as float inf raised OverflowError (int(inf));
    # a sliding window of 1e30 or 2**64-1 raised OverflowError in the graph builder
    p = _rewrite(model_base, tmp_path / "m.gguf", {key: value})
    _refused(p, key.replace(".", r"\.") + " is .*(not a whole number|out of range)")


@pytest.mark.parametrize("tensor", ["output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight",
                                    "blk.0.ffn_gate.weight"])
def test_regression_missing_norm_or_gate_tensor(model_base, tmp_path, tensor):
    # found by fuzz_model_values: the builder met None (AttributeError in type inference)
    p = _rewrite(model_base, tmp_path / "m.gguf", drop_tensors=[tensor])
    _refused(p, f"tensor {tensor} is missing")


@pytest.mark.parametrize("key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"])
def test_regression_token_id_of_inf(model_base, tmp_path, key):
    # found by fuzz_model_values: int(inf) raised OverflowError in the tokenizer reader
    p = _rewrite(model_base, tmp_path / "m.gguf", {key: typed(math.inf, "float32")})
    _refused(p, f"{key} (should be int|is inf, not a token id)")


@pytest.mark.parametrize("key", ["general.architecture", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.model",
                                 "llama.attention.layer_norm_rms_epsilon", "llama.rope.scaling.type"])
def test_regression_long_hostile_values_stay_out_of_messages(model_base, tmp_path, key):
    # found by fuzz_model_values: messages echoed a 5000-character value in full
    p = _rewrite(model_base, tmp_path / "m.gguf", {key: "x" * 5000})
    assert len(_refused(p, None).message) < 300

def test_codec_round_trips(tmp_path):
    for name, data in bases(tmp_path / "bases").items():
        assert encode(decode(data)) == data, name
        (tmp_path / f"{name}.gguf").write_bytes(data)
        touch_container(read_gguf(tmp_path / f"{name}.gguf"))


@pytest.mark.parametrize("raw", ["[" * 100000 + "]" * 100000, "9" * 5000])
def test_regression_rope_record_that_python_cannot_parse(model_base, tmp_path, raw):
    # found by the long run of fuzz_model_values: kiln's own rope record (kiln.rope.scaling, JSON
    # in a string) nested 100000 deep raised RecursionError (a 5000-digit number, ValueError)
    p = _rewrite(model_base, tmp_path / "m.gguf", {"kiln.rope.scaling": raw})
    _refused(p, "kiln.rope.scaling is not a JSON object")


def test_regression_head_size_that_would_fill_memory(model_base, tmp_path):
    # found by the HF config fuzzer (check_config is shared): a head size of 2**31 with as many
    # rotary dimensions made the rotary check allocate 8 GiB before any tensor shape was checked
    p = _rewrite(model_base, tmp_path / "m.gguf", {"llama.attention.key_length": typed(2**31, "uint32"),
                                                   "llama.rope.dimension_count": typed(2**31, "uint32")})
    _refused(p, "llama.attention.key_length is 2147483648; kiln handles heads of up to 65536")


@pytest.mark.parametrize("name", ["fuzz_container", "fuzz_model_fields", "fuzz_model_values"])
def test_fuzz(name, tmp_path):
    fuzzing.run_target(__file__, name, tmp_path)
