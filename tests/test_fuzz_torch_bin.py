"""Structure-aware fuzzing of the restricted unpickler for PyTorch ``.bin`` checkpoints.

Valid checkpoints (tests/data/torch_bin and the llama_bin variant; zip and legacy containers)
are decoded at two levels. The pickle becomes its list of opcodes with their arguments: an
argument is changed (memo indices, sizes, strides, offsets, storage keys, dtype names, the
module and name of a GLOBAL, including code that must never run), opcodes are removed,
repeated, swapped or inserted, the stream is cut; or it is replaced by a nesting or memo bomb.
The zip becomes its members: data.pkl, byteorder, the storages (cut, grown, compressed,
renamed, dropped, repeated). The legacy file becomes its five pickles and its storages.
Every case must read correctly (every tensor's bytes and values then read) or fail with a
one-line KilnError; and no global outside the unpickler's table may ever be called.
"""
from __future__ import annotations

import io
import pickletools
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

import fuzzing
from conftest import REPO
from kiln.errors import KilnError
from kiln.frontends.torch_bin import read_torch_bin

BASE_FILES = {"basic": "tests/data/torch_bin/basic.bin", "nested": "tests/data/torch_bin/nested.bin",
              "param": "tests/data/torch_bin/param.bin", "legacy": "tests/data/torch_bin/legacy.bin",
              "llama": "tests/data/hf_variants/llama_bin/pytorch_model.bin"}

# ==========================================================================================
# the pickle as opcodes
# ==========================================================================================

OPS = {op.name: op for op in pickletools.opcodes}


class Op:
    """One opcode: its name, its argument and its bytes (re-encoded when the argument changes)."""
    __slots__ = ("name", "arg", "raw")

    def __init__(self, name, arg=None, raw=None):
        self.name, self.arg = name, arg
        self.raw = raw if raw is not None else encode_op(name, arg)

    def __repr__(self):
        return f"{self.name}({self.arg!r})" if self.arg is not None else self.name


def decode_pickle(data: bytes) -> list[Op]:
    """The opcodes of a pickle; a stream already broken by an earlier edit stays one raw piece."""
    try:
        items = list(pickletools.genops(data))
    except Exception:
        return [Op("RAW", None, data)]
    if not items:
        return [Op("RAW", None, data)]
    ends = [pos for _, _, pos in items[1:]] + [items[-1][2] + 1]
    return [Op(op.name, arg, data[pos:end]) for (op, arg, pos), end in zip(items, ends)]


def encode_pickle(ops: list[Op]) -> bytes:
    return b"".join(op.raw for op in ops)


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def encode_op(name: str, arg) -> bytes:
    code = OPS[name].code.encode("latin-1")
    kind = OPS[name].arg.name if OPS[name].arg else None
    if kind is None:
        return code
    if kind == "uint1":
        return code + struct.pack("<B", arg % 256)
    if kind == "uint2":
        return code + struct.pack("<H", arg % 65536)
    if kind == "int4":
        return code + struct.pack("<i", (arg + 2**31) % 2**32 - 2**31)
    if kind == "uint4":
        return code + struct.pack("<I", arg % 2**32)
    if kind == "uint8":
        return code + struct.pack("<Q", arg % 2**64)
    if kind in ("unicodestring1", "bytes1", "string1"):
        b = _utf8(arg) if isinstance(arg, str) else bytes(arg)
        return code + struct.pack("<B", len(b) % 256) + b
    if kind in ("unicodestring4", "bytes4", "string4"):
        b = _utf8(arg) if isinstance(arg, str) else bytes(arg)
        return code + struct.pack("<I", len(b)) + b
    if kind in ("unicodestring8", "bytes8", "bytearray8"):
        b = _utf8(arg) if isinstance(arg, str) else bytes(arg)
        return code + struct.pack("<Q", len(b)) + b
    if kind == "stringnl_noescape_pair":
        mod, _, name_ = arg.partition(" ")
        return code + _utf8(mod) + b"\n" + _utf8(name_) + b"\n"
    if kind in ("long1", "long4"):
        n = int(arg)
        b = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "little", signed=True) if n else b""
        return code + (struct.pack("<B", len(b)) if kind == "long1" else struct.pack("<i", len(b))) + b
    if kind == "float8":
        return code + struct.pack(">d", arg)
    if kind in ("decimalnl_short", "decimalnl_long"):
        return code + str(arg).encode() + (b"L\n" if kind == "decimalnl_long" else b"\n")
    if kind in ("stringnl_noescape", "stringnl"):
        return code + _utf8(str(arg)) + b"\n"
    raise ValueError(f"no encoder for {name} ({kind})")


# globals a hostile pickle may name: the unpickler's own table, near misses, and code
GLOBALS = ["collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor",
           "torch._utils _rebuild_tensor_v3", "torch._utils _rebuild_parameter", "torch FloatStorage",
           "torch HalfStorage", "torch BFloat16Storage", "torch LongStorage", "torch ByteStorage",
           "torch BoolStorage", "torch UntypedStorage", "torch float32", "torch bfloat16", "torch uint8",
           "torch._tensor _rebuild_from_type_v2", "torch Size", "torch Tensor", "torch.nn.parameter Parameter",
           "torch._utils _rebuild_qtensor", "torch._utils _rebuild_sparse_tensor", "torch device",
           "os system", "posix system", "builtins eval", "builtins exec", "builtins getattr", "builtins __import__",
           "subprocess Popen", "numpy.core.multiarray _reconstruct", "test_fuzz_torch_bin tripwire",
           "fuzzing tripwire", "collections defaultdict", "torch._utils ", " ", "a\x00b c", "torch.cuda FloatStorage"]

STRINGS = ["0", "1", "cpu", "cuda:0", "weight", "", "storage", "module", "little", "x" * 300, "\udcff",
           "model.0.weight", "../data/0", "data/0", "0\x00"]

INTS = [0, 1, 2, 3, 4, 8, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, -1, -2**31, 2**63, 2**64 + 5,
        -2**63, 10**30]

# opcodes to insert: each a short, self-contained sequence
SNIPPETS = {
    "MARK": [Op("MARK")], "POP": [Op("POP")], "POP_MARK": [Op("POP_MARK")], "DUP": [Op("DUP")],
    "STOP": [Op("STOP")], "NONE": [Op("NONE")], "TUPLE": [Op("TUPLE")], "TUPLE2": [Op("TUPLE2")],
    "EMPTY_DICT": [Op("EMPTY_DICT")], "EMPTY_LIST": [Op("EMPTY_LIST")], "APPEND": [Op("APPEND")],
    "SETITEM": [Op("SETITEM")], "SETITEMS": [Op("SETITEMS")], "REDUCE": [Op("REDUCE")], "BUILD": [Op("BUILD")],
    "NEWOBJ": [Op("NEWOBJ")], "BINPERSID": [Op("BINPERSID")], "STACK_GLOBAL": [Op("STACK_GLOBAL")],
    "get_far": [Op("LONG_BINGET", 2**31)], "put_far": [Op("LONG_BINPUT", 2**31)], "memoize": [Op("MEMOIZE")],
    "int": [Op("BININT", 2**31 - 1)], "long": [Op("LONG1", 2**70)], "str": [Op("BINUNICODE", "x")],
    "code": [Op("GLOBAL", "test_fuzz_torch_bin tripwire"), Op("EMPTY_TUPLE"), Op("REDUCE")],
    "os_system": [Op("GLOBAL", "os system"), Op("BINUNICODE", "true"), Op("TUPLE1"), Op("REDUCE")],
    "build_state": [Op("GLOBAL", "torch float32"), Op("EMPTY_DICT"), Op("BUILD")],
    "setstate_dict": [Op("GLOBAL", "collections OrderedDict"), Op("EMPTY_TUPLE"), Op("REDUCE"),
                      Op("EMPTY_DICT"), Op("BUILD")],
    "kwargs": [Op("GLOBAL", "torch Size"), Op("EMPTY_TUPLE"), Op("EMPTY_DICT"), Op("NEWOBJ_EX")],
    "float": [Op("BINFLOAT", float("nan"))], "bytes": [Op("SHORT_BINBYTES", b"\x00" * 8)],
    "frame": [Op("FRAME", 2**40)], "persid_module": [Op("BINUNICODE", "module"), Op("TUPLE1"), Op("BINPERSID")],
}


def tripwire(*args):
    """Named by hostile pickles: if any unpickler ever called it, the case fails."""
    tripwire.called = True
    return None


tripwire.called = False


def _bomb(kind: str, n: int) -> list[Op]:
    """Whole pickles that strain the reader: deep nesting, repeated references, many entries.
    Built as bytes (one raw piece): 100000 Op objects would cost more than the read itself."""
    out = [b"\x80\x02"]                                           # PROTO 2
    if kind == "deep":           # a list inside a list ... n deep
        out += [b"]" * n, b"a" * (n - 1)]
    elif kind == "laughs":       # L[i] = [L[i-1], L[i-1]]: 2**n paths through n objects
        out += [b"]r" + struct.pack("<I", 0)]
        for i in range(1, n + 1):
            get = b"j" + struct.pack("<I", i - 1)
            out += [b"]", get, b"a", get, b"a", b"r" + struct.pack("<I", i)]
    elif kind == "wide":         # one dict with n entries
        out += [b"}(", b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(n)), b"u"]
    elif kind == "cycle":        # a list that contains itself
        out += [b"]q\x00h\x00a"]
    return [Op("RAW", None, b"".join(out) + b".")]


def mutate_pickle(ops: list[Op], draw) -> tuple[list[Op], str]:
    ops = list(ops)
    if not ops:                 # cut to nothing by an earlier edit
        return [Op("STOP")], "a lone STOP"
    kind = draw(st.sampled_from(["arg", "arg", "arg", "pair", "global", "delete", "repeat", "swap", "insert", "cut",
                                 "bomb"]))
    if kind == "bomb":
        b = draw(st.sampled_from(["deep", "laughs", "wide", "cycle"]))
        n = draw(st.sampled_from([10, 64, 65, 1000, 100000])) if b != "laughs" else draw(st.sampled_from([5, 30, 62]))
        return _bomb(b, n), f"bomb {b} {n}"
    if kind in ("arg", "global"):
        if kind == "global":
            idx = [i for i, op in enumerate(ops) if op.name == "GLOBAL"]
        else:
            idx = [i for i, op in enumerate(ops) if op.arg is not None and op.name not in ("PROTO", "FRAME")]
        if not idx:
            return ops, "nothing to change"
        i = draw(st.sampled_from(idx))
        op = ops[i]
        if op.name == "GLOBAL":
            new = draw(st.sampled_from(GLOBALS))
        elif isinstance(op.arg, str):
            new = draw(st.sampled_from(STRINGS) | st.text(max_size=8))
        elif isinstance(op.arg, (bytes, bytearray)):
            new = draw(fuzzing.hostile_bytes())
        elif isinstance(op.arg, float):
            new = draw(st.sampled_from(fuzzing.INTERESTING_FLOATS))
        else:
            new = draw(st.sampled_from(INTS + [op.arg + 1, op.arg - 1, op.arg * 2]))
        try:
            ops[i] = Op(op.name, new)
        except (ValueError, struct.error, OverflowError):
            return ops, "argument not encodable"
        return ops, f"{op!r} -> {ops[i]!r}"[:120]
    if kind == "pair":
        # two neighbouring integers (a size or stride tuple): one 0, the other huge, so a tensor
        # may have no elements yet dimensions past what sizes can hold
        idx = [i for i, op in enumerate(ops) if op.name in ("BININT1", "BININT2", "BININT")]
        if len(idx) < 2:
            return ops, "no integers"
        k = draw(st.integers(0, len(idx) - 2))
        i, j = idx[k], idx[k + 1]
        if draw(st.booleans()):
            i, j = j, i
        ops[i] = Op(ops[i].name, 0)
        ops[j] = Op("LONG1", draw(st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64 + 1, 2**70])))
        return ops, f"integers at {i}, {j} -> 0, {ops[j].arg}"
    i = draw(st.integers(0, len(ops) - 1))
    if kind == "delete":
        return ops[:i] + ops[i + 1:], f"delete {ops[i]!r}"
    if kind == "repeat":
        return ops[:i + 1] + ops[i:], f"repeat {ops[i]!r}"
    if kind == "swap":
        j = min(len(ops) - 1, i + 1)
        ops[i], ops[j] = ops[j], ops[i]
        return ops, f"swap {ops[j]!r} and {ops[i]!r}"
    if kind == "insert":
        name = draw(st.sampled_from(sorted(SNIPPETS)))
        return ops[:i] + SNIPPETS[name] + ops[i:], f"insert {name} at {i}"
    return ops[:i], f"cut before op {i}"


# ==========================================================================================
# the containers
# ==========================================================================================

def decode_zip(data: bytes) -> list[tuple[str, bytes, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]


def encode_zip(members) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # zipfile warns about repeated member names
        with zipfile.ZipFile(out, "w") as z:
            for name, data, compress in members:
                z.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return out.getvalue()


def mutated_zip(data: bytes, draw) -> tuple[bytes, str]:
    members = decode_zip(data)
    pkl = next(i for i, (n, _, _) in enumerate(members) if n.endswith("data.pkl"))
    prefix = members[pkl][0][:-len("data.pkl")]
    notes = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        what = draw(st.sampled_from(["pickle", "pickle", "pickle", "storage", "member", "byteorder", "compress"]))
        if what == "pickle":
            name, blob, c = members[pkl]
            ops, note = mutate_pickle(decode_pickle(blob), draw)
            members[pkl] = (name, encode_pickle(ops), c)
        elif what == "storage":
            idx = [i for i, (n, _, _) in enumerate(members) if n.startswith(prefix + "data/")]
            if not idx:
                continue
            i = draw(st.sampled_from(idx))
            name, blob, c = members[i]
            n = draw(st.sampled_from([0, 1, len(blob) - 1, len(blob) + 1, len(blob) * 2]) | fuzzing.position(len(blob)))
            members[i] = (name, (blob * 3)[:max(0, n)], c)
            note = f"{name}: {len(blob)} -> {n} bytes"
        elif what == "member":
            i = draw(st.integers(0, len(members) - 1))
            op = draw(st.sampled_from(["drop", "repeat", "rename", "second_pkl"]))
            name, blob, c = members[i]
            if op == "drop":
                del members[i]
                if i == pkl:
                    return encode_zip(members), f"drop {name}"
                pkl -= i < pkl
            elif op == "repeat":
                members.append((name, blob, c))
            elif op == "rename":
                members[i] = (draw(st.sampled_from(["data.pkl", "a/b/data.pkl", "../data.pkl", prefix + "data/99",
                                                    prefix + "data/0", "/abs", "x" * 300, prefix + "byteorder"])),
                              blob, c)
            else:
                members.append(("other/data.pkl", members[pkl][1], c))
            note = f"{op} member {name}"
        elif what == "byteorder":
            i = next((i for i, (n, _, _) in enumerate(members) if n.endswith("byteorder")), None)
            value = draw(st.sampled_from([b"big", b"", b"little\n", b"LITTLE", b"\xff" * 20, b"little" * 10]))
            if i is None:
                members.append((prefix + "byteorder", value, 0))
            else:
                members[i] = (members[i][0], value, members[i][2])
            note = f"byteorder {value[:12]!r}"
        else:
            i = draw(st.integers(0, len(members) - 1))
            name, blob, _ = members[i]
            members[i] = (name, blob, zipfile.ZIP_DEFLATED)
            note = f"deflate {name}"
        notes.append(note)
    raw = encode_zip(members)
    if draw(st.integers(0, 5)) == 0:
        raw, note = fuzzing.edit_bytes(raw, draw)
        notes.append(note)
    return raw, " | ".join(notes)


def decode_legacy(data: bytes) -> tuple[list[list[Op]], bytes]:
    f = io.BytesIO(data)
    pickles = []
    for _ in range(5):
        start = f.tell()
        for _ in pickletools.genops(f):      # walks to this pickle's STOP
            pass
        pickles.append(decode_pickle(data[start:f.tell()]))
    return pickles, data[f.tell():]


def mutated_legacy(data: bytes, draw) -> tuple[bytes, str]:
    pickles, tail = decode_legacy(data)
    notes = []
    for _ in range(draw(st.sampled_from([1, 1, 2]))):
        what = draw(st.sampled_from(["pickle", "pickle", "tail", "count"]))
        if what == "pickle":
            k = draw(st.integers(0, 4))
            pickles[k], note = mutate_pickle(pickles[k], draw)
            note = f"pickle {k}: {note}"
        elif what == "count":       # the 8-byte element count before the first storage
            n = draw(fuzzing.interesting_uint(64, struct.unpack_from("<Q", tail)[0] if len(tail) >= 8 else 0))
            tail = struct.pack("<Q", n) + tail[8:]
            note = f"first storage count -> {n}"
        else:
            n = draw(fuzzing.position(len(tail) + 16))
            tail = (tail + b"\x00" * 16)[:n]
            note = f"storages {len(tail)} bytes"
        notes.append(note)
    return b"".join(encode_pickle(p) for p in pickles) + tail, " | ".join(notes)


# ==========================================================================================
# target
# ==========================================================================================

_BASES: dict[str, bytes] = {}


def prepare(work: Path) -> None:
    for name, rel in BASE_FILES.items():
        _BASES[name] = (REPO / rel).read_bytes()


def touch(ckpt) -> int:
    for w in ckpt.values():
        raw = w.raw()
        assert raw.size == w.nbytes
        with np.errstate(all="ignore"):
            w.numpy()
    return len(ckpt)


@fuzzing.target(data=st.data())
def fuzz_checkpoint(ws, data):
    prepare(ws.root)
    name = data.draw(st.sampled_from(sorted(_BASES)), label="base")
    base = _BASES[name]
    raw, note = (mutated_legacy if name == "legacy" else mutated_zip)(base, data.draw)
    ws.note(f"{name} | {note}")
    path = ws.path("case.bin")
    path.write_bytes(raw)
    tripwire.called = False
    fuzzing.expect(ws, lambda: touch(read_torch_bin(path)), path)
    assert not tripwire.called, "the unpickler called a global outside its table"


# ==========================================================================================
# the tests
# ==========================================================================================

def test_codecs_round_trip():
    prepare(REPO)
    for name, data in _BASES.items():
        if name == "legacy":
            pickles, tail = decode_legacy(data)
            assert b"".join(encode_pickle(p) for p in pickles) + tail == data
        else:
            for member, blob, _ in decode_zip(data):
                if member.endswith("data.pkl"):
                    ops = decode_pickle(blob)
                    assert encode_pickle(ops) == blob
                    # every argument re-encodes to the bytes it came from
                    assert b"".join(encode_op(op.name, op.arg) for op in ops) == blob


def test_tripwire_is_reachable_by_a_permissive_unpickler():
    """The tripwire works: an unrestricted unpickler would call it (so the check means something)."""
    import pickle
    ops = [Op("PROTO", 2)] + SNIPPETS["code"] + [Op("STOP")]
    tripwire.called = False
    pickle.loads(encode_pickle(ops))
    assert tripwire.called
    tripwire.called = False


def _one_tensor(tmp_path, size, stride, offset=0) -> Path:
    from test_torch_bin import state_dict, tensor, torch_zip
    return Path(torch_zip(tmp_path / "t.bin", state_dict(w=tensor("0", 4, size, stride, offset)),
                          {"0": np.arange(4, dtype=np.float32).tobytes()}))


def _refused(path: Path, match: str) -> KilnError:
    with pytest.raises(KilnError, match=match) as e:
        touch(read_torch_bin(path))
    fuzzing.check_error(e.value, [path])
    return e.value


@pytest.mark.parametrize("size,stride", [((0, 2**70), (1, 1)), ((0, 2**64 + 1), (1, 1)), ((2**62, 0), (0, 1)),
                                         ((2**40, 2**40, 0), (0, 0, 1))])
def test_regression_empty_tensor_with_huge_size(tmp_path, size, stride):
    # found by fuzz_checkpoint: an empty tensor whose other dimensions pass 64 bits read fine,
    # then its bytes raised OverflowError (np.prod) or ValueError (numpy's maximum dimension)
    _refused(_one_tensor(tmp_path, size, stride), "too large for 64-bit sizes")


@pytest.mark.parametrize("size,stride", [((2**31,), (0,)), ((2**20, 4), (0, 1)), ((3, 2), (1, 1))])
def test_regression_overlapping_strides_claim_more_than_the_storage(tmp_path, size, stride):
    # found by fuzz_checkpoint: size (2**31,) stride (0,) over a 4-element storage read fine, then
    # copying the view out raised MemoryError (8 GiB) under the fuzzer's address-space limit
    _refused(_one_tensor(tmp_path, size, stride), "overlapping strides")


def test_strided_views_within_their_storage_still_read(tmp_path):
    w = read_torch_bin(_one_tensor(tmp_path, (2, 2), (1, 2)))["w"]      # a transpose
    np.testing.assert_array_equal(w.numpy(), [[0, 2], [1, 3]])
    w = read_torch_bin(_one_tensor(tmp_path, (1, 4), (0, 1)))["w"]      # stride 0 on a dimension of 1
    np.testing.assert_array_equal(w.numpy(), [[0, 1, 2, 3]])


def test_regression_huge_strides_and_offsets_stay_out_of_messages(tmp_path):
    # found by review of the cases above: 600-digit strides went into 'reaches byte N' messages
    for size, stride, offset in [((2,), (10**300,), 0), ((2,), (1,), 10**300)]:
        e = _refused(_one_tensor(tmp_path, size, stride, offset), "stride|offset")
        assert len(e.message) < 200


@pytest.mark.parametrize("name", ["fuzz_checkpoint"])
def test_fuzz(name, tmp_path):
    fuzzing.run_target(__file__, name, tmp_path)
