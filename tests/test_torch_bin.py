"""PyTorch checkpoint reader: values against torch's own (saved) output, laziness, hostile files.

The fixtures in tests/data/torch_bin/ were written by torch (scripts/make_torch_bin_fixtures.py);
torch itself is not needed here. Hostile checkpoints are built in the tests from hand-written
pickle opcodes, or from ``pickle.dumps`` of objects whose ``__reduce__`` names a dangerous
callable, which is exactly what an attacker would ship.
"""
from __future__ import annotations

import io
import os
import pickle
import secrets
import subprocess
import time
import zipfile

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.frontends import torch_bin
from kiln.frontends.torch_bin import read_torch_bin

DATA = os.path.join(os.path.dirname(__file__), "data", "torch_bin")
EXPECTED = np.load(os.path.join(DATA, "expected.npz"))
FIXTURES = ["basic", "legacy", "nested", "param"]


def _assert_clean_error(exc: KilnError, path, *fragments):
    assert exc.path == os.fspath(path)
    text = str(exc)
    assert text.startswith(os.fspath(path) + ": ") and "\n" not in text
    for frag in fragments:
        assert frag in exc.message, (frag, exc.message)
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def _check_against_expected(stem: str, ck) -> None:
    names = sorted(k[len(stem) + 1:] for k in EXPECTED.files if k.startswith(stem + "."))
    assert sorted(ck) == names
    for name, w in ck.items():
        want = EXPECTED[f"{stem}.{name}"]
        assert w.shape == want.shape, name
        if w.numel == 0:
            assert w.nbytes == 0
            continue
        got = w.numpy()
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), err_msg=name)


# ---- real checkpoints written by torch ---------------------------------------------------------

@pytest.mark.parametrize("stem", FIXTURES)
def test_fixture_values(stem):
    ck = read_torch_bin(os.path.join(DATA, f"{stem}.bin"))
    _check_against_expected(stem, ck)


@pytest.mark.parametrize("stem", ["basic", "legacy"])
def test_fixture_formats_and_order(stem):
    ck = read_torch_bin(os.path.join(DATA, f"{stem}.bin"))
    assert list(ck)[:8] == ["linear.weight", "linear.bias", "emb", "f64", "steps", "i32", "i16", "i8"]
    fmts = {k: w.format.name for k, w in ck.items()}
    assert fmts["linear.weight"] == "f32" and fmts["linear.bias"] == "f16" and fmts["emb"] == "bf16"
    assert fmts["f64"] == "f64" and fmts["steps"] == "i64" and fmts["i8"] == "i8"
    assert ck["scalar"].shape == () and ck["transposed"].shape == (5, 3)
    # ints survive exactly (numpy() is float32, so compare raw)
    assert ck["steps"].raw().reshape(-1).view(np.int64).tolist() == [-2, -1, 0, 1, 2, 3]
    assert ck["linear.weight"].origin.endswith(f"{stem}.bin")


def test_nested_checkpoint_skips_non_tensors():
    ck = read_torch_bin(os.path.join(DATA, "nested.bin"))
    assert list(ck) == ["model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias", "history.0"]
    assert ck.skipped == {"epoch": "int", "config.lr": "float", "config.name": "str",
                          "config.betas.0": "float", "config.betas.1": "float"}


def test_storages_are_memory_mapped_and_shared():
    ck = read_torch_bin(os.path.join(DATA, "basic.bin"))
    a, b = ck["shared_a"]._load_raw(), ck["shared_b"]._load_raw()
    assert isinstance(a.base, np.memmap) or isinstance(a, np.memmap)
    assert a.base is b.base                       # one map for the whole file
    assert np.shares_memory(a, ck["linear.weight"]._load_raw()) is False
    # shared_b starts right where shared_a (row 0 of the same 3x4 storage) ends
    whole = np.concatenate([ck["shared_a"].numpy()[None], ck["shared_b"].numpy()])
    np.testing.assert_array_equal(ck["shared_col"].numpy(), whole[:, 1])


def test_header_only_read_maps_nothing(monkeypatch):
    monkeypatch.setattr(np, "memmap", lambda *a, **k: (_ for _ in ()).throw(AssertionError("mapped early")))
    ck = read_torch_bin(os.path.join(DATA, "basic.bin"))
    assert ck["linear.weight"].shape == (4, 3)
    with pytest.raises(AssertionError, match="mapped early"):
        ck["linear.weight"].numpy()


def test_compressed_members_still_load(tmp_path):
    src = zipfile.ZipFile(os.path.join(DATA, "basic.bin"))
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
    ck = read_torch_bin(path)
    _check_against_expected("basic", ck)
    assert not isinstance(ck["linear.weight"]._load_raw(), np.memmap)


def test_checkpoint_converts_to_safetensors(tmp_path):
    import safetensors.numpy as stn
    from kiln.frontends.safetensors_file import write_safetensors
    ck = read_torch_bin(os.path.join(DATA, "basic.bin"))
    out = tmp_path / "basic.safetensors"
    write_safetensors(out, [(k, w) for k, w in ck.items() if w.format.name != "bf16"])
    loaded = stn.load_file(str(out))
    np.testing.assert_array_equal(loaded["transposed"], EXPECTED["basic.transposed"].astype(np.float32))
    np.testing.assert_array_equal(loaded["steps"], EXPECTED["basic.steps"])


# ---- building hostile checkpoints -----------------------------------------------------------

def G(module: str, name: str) -> bytes:            # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def U(text: str) -> bytes:                          # BINUNICODE
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def I(n: int) -> bytes:                             # BININT (or LONG1 when large)
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def T(*parts: bytes) -> bytes:                      # MARK ... TUPLE
    return b"(" + b"".join(parts) + b"t"


def tensor(key: str, numel: int, size, stride, offset: int = 0, storage: str = "FloatStorage") -> bytes:
    pid = T(U("storage"), G("torch", storage), U(key), U("cpu"), I(numel))
    args = (pid + b"Q" + I(offset) + T(*map(I, size)) + T(*map(I, stride)) + b"\x89"
            + G("collections", "OrderedDict") + b")R")
    return G("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def state_dict(**tensors: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(U(k) + v for k, v in tensors.items()) + b"u."


def torch_zip(path, pkl: bytes, storages: dict[str, bytes] | None = None, byteorder: str = "little") -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return str(path)


def _f32(*values) -> bytes:
    return np.array(values, dtype=np.float32).tobytes()


def test_hand_built_checkpoint_loads(tmp_path):
    # the control: the builder above makes a checkpoint the reader accepts
    path = torch_zip(tmp_path / "ok.bin", state_dict(w=tensor("0", 6, (2, 3), (3, 1)), t=tensor("0", 6, (3, 2), (1, 3))),
                     {"0": _f32(1, 2, 3, 4, 5, 6)})
    ck = read_torch_bin(path)
    np.testing.assert_array_equal(ck["w"].numpy(), [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(ck["t"].numpy(), [[1, 4], [2, 5], [3, 6]])


class _Reduce:
    """Pickles as a call of ``fn(*args)``: what a hostile checkpoint contains."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture
def marker():
    path = f"/tmp/kiln_pwned_{secrets.token_hex(8)}"
    yield path
    assert not os.path.exists(path), "the hostile pickle ran"


def test_malicious_fixture_os_system():
    path = os.path.join(DATA, "malicious_os_system.bin")
    with open(os.path.join(DATA, "malicious_marker.txt")) as fh:
        mark = fh.read().strip()
    if os.path.exists(mark):
        os.unlink(mark)
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "refusing to load: the pickle references os.system, which is not a tensor")
    assert not os.path.exists(mark)


_DANGEROUS = {
    "os.system": lambda m: _Reduce(os.system, f"touch {m}"),
    "builtins.eval": lambda m: _Reduce(eval, f"__import__('os').system('touch {m}')"),
    "builtins.exec": lambda m: _Reduce(exec, f"open('{m}', 'w')"),
    "subprocess.Popen": lambda m: _Reduce(subprocess.Popen, ["touch", m]),
    "subprocess.run": lambda m: _Reduce(subprocess.run, ["touch", m]),
    "functools.partial": lambda m: _Reduce(__import__("functools").partial, os.system, f"touch {m}"),
    "builtins.getattr": lambda m: _Reduce(getattr, _Reduce(__import__, "os"), "system"),
    "builtins.open": lambda m: _Reduce(open, m, "w"),
}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("target", sorted(_DANGEROUS))
def test_dangerous_global_in_zip_is_refused(tmp_path, marker, target, protocol):
    pkl = pickle.dumps({"weight": _DANGEROUS[target](marker)}, protocol=protocol)
    path = torch_zip(tmp_path / "evil.bin", pkl)
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    # the module as pickled: posix for os.system, io for open, __builtin__ under protocols 0-2
    _assert_clean_error(info.value, path, "refusing to load: the pickle references ",
                        f".{target.rsplit('.', 1)[1]}, which is not a tensor")


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_dangerous_plain_pickle_is_refused(tmp_path, marker, protocol):
    # not a zip: the legacy path unpickles it, with the same restrictions
    path = tmp_path / "evil_legacy.bin"
    path.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=protocol))
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, f"references {os.system.__module__}.system")


def test_posix_system_by_hand(tmp_path, marker):
    path = tmp_path / "posix.bin"
    path.write_bytes(b"cposix\nsystem\n(Vtouch " + marker.encode() + b"\ntR.")
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "references posix.system")


def test_inst_opcode_is_refused(tmp_path, marker):
    path = torch_zip(tmp_path / "inst.bin", b"(S'touch " + marker.encode() + b"'\nios\nsystem\n.")
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "references os.system")


def test_evil_global_inside_legacy_checkpoint(tmp_path, marker):
    legacy = open(os.path.join(DATA, "legacy.bin"), "rb").read()
    # swap the sys-info pickle (3rd) for a hostile one: reached after two harmless pickles
    f = io.BytesIO(legacy)
    for _ in range(2):
        pickle.load(f)
    path = tmp_path / "legacy_evil.bin"
    path.write_bytes(legacy[: f.tell()] + pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "refusing to load")


def test_stand_ins_cannot_be_tampered_with(tmp_path):
    # BUILD on a whitelisted callable: pickle would setattr __defaults__/__dict__ on a real function
    pkl = b"\x80\x02" + G("torch._utils", "_rebuild_tensor_v2") + b"N}" + U("__defaults__") + b"(I1\nts\x86b."
    path = torch_zip(tmp_path / "tamper.bin", pkl)
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "tries to set state")
    # and the reader still works afterwards
    _check_against_expected("basic", read_torch_bin(os.path.join(DATA, "basic.bin")))


def test_module_persistent_id_is_refused(tmp_path):
    pkl = b"\x80\x02(" + U("module") + G("torch.nn", "Linear") + U("src.py") + U("source") + b"tQ."
    path = torch_zip(tmp_path / "module.bin", pkl)
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    _assert_clean_error(info.value, path, "refusing to load: the pickle references torch.nn.Linear")


_ONE = {"0": _f32(1, 2, 3, 4)}
_HOSTILE = {
    "storage larger than its member": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 100, (100,), (1,))), _ONE),
        "storage 0 should hold 100 float32 elements (400 bytes) but its member holds 16 bytes"),
    "storage smaller than its member": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 2, (2,), (1,))), _ONE), "but its member holds 16 bytes"),
    "storage member missing": (
        lambda p: torch_zip(p, state_dict(w=tensor("7", 4, (4,), (1,))), _ONE), "storage 7 has no member archive/data/7"),
    "tensor past its storage": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (2, 3), (3, 1))), _ONE),
        "tensor w reaches byte 24 of storage 0, which holds only 16"),
    "offset past its storage": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (2,), (1,), offset=3)), _ONE), "tensor w reaches byte 20"),
    "huge stride": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (2, 2), (2 ** 62, 1))), _ONE), "tensor w reaches byte"),
    "negative size": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (-1,), (1,))), _ONE), "tensor w: size is not a list of non-negative integers"),
    "negative stride": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (2,), (-1,), offset=3)), _ONE), "stride is not a list"),
    "size and stride disagree": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (2, 2), (1,))), _ONE), "size has 2 dimensions but stride has 1"),
    "unsupported dtype": (
        lambda p: torch_zip(p, state_dict(mask=tensor("0", 16, (16,), (1,), storage="BoolStorage")), _ONE),
        "tensor mask has dtype bool, which kiln does not support"),
    "storage is not a storage": (
        lambda p: torch_zip(p, b"\x80\x02" + G("torch._utils", "_rebuild_tensor_v2") + T(I(1), I(0), T(), T(), b"\x89N") + b"R."),
        "was given int where a storage belongs"),
    "wrong argument count": (
        lambda p: torch_zip(p, b"\x80\x02" + G("torch._utils", "_rebuild_tensor_v2") + T(I(1)) + b"R."),
        "called with 1 arguments, expected 6 to 7"),
    "quantized tensor": (
        lambda p: torch_zip(p, b"\x80\x02" + G("torch._utils", "_rebuild_qtensor") + T() + b"R."),
        "torch._utils._rebuild_qtensor (a quantized tensor), which kiln cannot read"),
    "big-endian": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (4,), (1,))), _ONE, byteorder="big"), "kiln reads little-endian only"),
    "no data.pkl": (
        lambda p: zipfile.ZipFile(p, "w").close() or str(p), "no data.pkl"),
    "zip without data.pkl": (
        lambda p: (zipfile.ZipFile(p, "w").writestr("readme.txt", "hi"), str(p))[1], "no data.pkl: not a PyTorch checkpoint"),
    "two data.pkl": (
        lambda p: _two_pkls(p), "2 data.pkl members"),
    "duplicate member": (
        lambda p: _duplicate_member(p), "lists member archive/data/0 twice"),
    "data.pkl not a pickle": (
        lambda p: torch_zip(p, b"\x80\x02garbage"), "data.pkl is not a valid pickle"),
    "data.pkl truncated": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (4,), (1,)))[:-20], _ONE), "data.pkl: malformed global name"),
    "data.pkl cut short": (
        lambda p: torch_zip(p, state_dict(w=tensor("0", 4, (4,), (1,)))[:-1], _ONE), "data.pkl is truncated"),
    "two tensors with one name": (
        lambda p: torch_zip(p, b"\x80\x02}(" + U("a") + b"}(" + U("b") + tensor("0", 4, (4,), (1,)) + b"u" + U("a.b")
                            + tensor("0", 4, (4,), (1,)) + b"u.", _ONE), "two tensors are both named a.b"),
    "nested too deep": (
        lambda p: torch_zip(p, b"\x80\x02" + b"]" * 101 + b"a" * 100 + b"."),
        "nested more than 64 levels deep"),
    "not a zip, not a pickle": (
        lambda p: (p.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64)), str(p))[1],
        "not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
    "empty file": (lambda p: (p.write_bytes(b""), str(p))[1], "empty file"),
    "plain pickle, no magic": (
        lambda p: (p.write_bytes(pickle.dumps({"a": 1}, protocol=2)), str(p))[1], "without torch's magic number"),
    "tar checkpoint": (lambda p: _tar(p), "tar-format checkpoint"),
    "truncated zip": (
        lambda p: (p.write_bytes(open(os.path.join(DATA, "basic.bin"), "rb").read()[:2000]), str(p))[1],
        "not a valid zip archive"),
    "truncated legacy": (
        lambda p: (p.write_bytes(open(os.path.join(DATA, "legacy.bin"), "rb").read()[:-30]), str(p))[1],
        "runs past the end of the file"),
    "legacy without storages": (
        lambda p: (p.write_bytes(open(os.path.join(DATA, "legacy.bin"), "rb").read()[:_legacy_data_start()]), str(p))[1],
        "file ends before storage"),
}


def _two_pkls(p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a/data.pkl", state_dict())
        z.writestr("b/data.pkl", state_dict())
    return str(p)


def _duplicate_member(p):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("archive/data.pkl", state_dict(w=tensor("0", 4, (4,), (1,))))
            z.writestr("archive/data/0", _f32(1, 2, 3, 4))
            z.writestr("archive/data/0", _f32(1, 2, 3, 4, 5))
    return str(p)


def _tar(p):
    import tarfile
    with tarfile.open(p, "w") as t:
        info = tarfile.TarInfo("sys_info")
        info.size = 2
        t.addfile(info, io.BytesIO(b"{}"))
    return str(p)


def _legacy_data_start() -> int:
    import pickletools
    with open(os.path.join(DATA, "legacy.bin"), "rb") as f:
        for _ in range(5):      # walk the five pickles' opcodes without unpickling them
            for _op in pickletools.genops(f):
                pass
        return f.tell()


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_checkpoint(tmp_path, case):
    build, fragment = _HOSTILE[case]
    path = build(tmp_path / "bad.bin")
    t0 = time.perf_counter()
    with pytest.raises(KilnError) as info:
        read_torch_bin(path)
    assert time.perf_counter() - t0 < 2.0
    _assert_clean_error(info.value, path, fragment)


def test_memo_bomb_is_cheap(tmp_path):
    # C pickle would size its memo table from the index: one PUT at 2**31 - 1 costs gigabytes
    pkl = b"\x80\x02}r\xff\xff\xff\x7f."
    path = torch_zip(tmp_path / "memo.bin", pkl)
    t0 = time.perf_counter()
    assert dict(read_torch_bin(path)) == {}
    assert time.perf_counter() - t0 < 1.0


def test_shared_containers_are_walked_once(tmp_path):
    # 40 levels of [x, x]: 2**40 paths if repeats were followed
    body = b"]K\x01a"                          # [1]
    for _ in range(40):
        body = body + b"q\x00h\x00h\x00\x86"   # x = memo; (x, x)
    path = torch_zip(tmp_path / "dag.bin", b"\x80\x02" + body + b".")
    t0 = time.perf_counter()
    ck = read_torch_bin(path)
    assert time.perf_counter() - t0 < 1.0
    assert dict(ck) == {} and sum(v.startswith("repeat of") for v in ck.skipped.values()) == 40


def test_cycle_is_harmless(tmp_path):
    # l = []; l.append(l)
    path = torch_zip(tmp_path / "cycle.bin", b"\x80\x02]q\x00h\x00a.")
    ck = read_torch_bin(path)
    assert dict(ck) == {} and ck.skipped == {"0": "repeat of an earlier list"}


def test_missing_file(tmp_path):
    with pytest.raises(KilnError) as info:
        read_torch_bin(tmp_path / "nope.bin")
    _assert_clean_error(info.value, tmp_path / "nope.bin", "cannot read")


def test_extra_globals_are_only_the_tensor_ones():
    allowed = set(torch_bin._GLOBALS)
    modules = {m for m, _ in allowed}
    assert modules <= {"collections", "torch", "torch.cuda", "torch._utils", "torch._tensor", "torch.storage",
                       "torch.nn", "torch.nn.parameter"}
    assert ("collections", "OrderedDict") in allowed and ("torch._utils", "_rebuild_tensor_v2") in allowed
    for bad in [("os", "system"), ("builtins", "eval"), ("torch", "load"), ("torch", "save"),
                ("torch.serialization", "load"), ("collections", "defaultdict"), ("torch._utils", "_rebuild_qtensor")]:
        assert bad not in allowed
