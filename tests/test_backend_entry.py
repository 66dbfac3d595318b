"""Device knowledge in one place each: the CPU probe (runtime/cpu_features.py), the preset table
(targets/presets.py) and the manifest's typed backend entry (runtime/backend_entry.py), which a
backend's build writes and its session reads back with the checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.artifact import ArtifactError
from kiln.runtime import cpu_features
from kiln.runtime.backend_entry import KVCache, OnnxrtEntry, TVMEntry
from kiln.targets import presets

ROOT = Path(__file__).resolve().parents[1]


def test_only_cpu_features_reads_proc_cpuinfo():
    readers = [p.relative_to(ROOT).as_posix() for folder in ("compiler", "frontends", "passes", "targets", "runtime")
               for p in (ROOT / folder).rglob("*.py") if "/proc/cpuinfo" in p.read_text()]
    assert readers == ["runtime/cpu_features.py"]


@pytest.mark.parametrize("flags, isa", [(None, "avx2"), (frozenset(), "sse4"), (frozenset({"avx", "avx2"}), "avx2"),
                                        (frozenset({"avx2", "avx512f"}), "avx512")])
def test_host_isa_reads_the_one_probe(monkeypatch, flags, isa):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features, "host_flags", lambda: flags)
    assert cpu_features.host_isa() == isa
    monkeypatch.setattr(presets, "host_isa", cpu_features.host_isa)
    monkeypatch.setattr(presets, "host_flags", cpu_features.host_flags)
    cpu = presets.resolve("cpu")
    assert (cpu.isa, cpu.cpu_flags, cpu.llvm_cpu) == (isa, flags or frozenset(), None)


def test_one_preset_table():
    assert [n for n in presets.names() if n.startswith("cuda-")] == [f"cuda-{sm}" for sm in presets.CUDA_ARCHS]
    assert presets.resolve("cuda").isa == presets.CUDA_ARCHS[0]
    assert presets.resolve("cuda", "sm_89").name == "cuda-sm89"
    with pytest.raises(ValueError, match=", ".join(presets.CUDA_ARCHS)):
        presets.resolve("cuda", "sm70")
    avx2, avx512 = presets.PRESETS["cpu-avx2"], presets.PRESETS["cpu-avx512"]
    assert (avx2.llvm_cpu, avx512.llvm_cpu) == ("haswell", "skylake-avx512")
    assert "avx2" in avx2.cpu_flags < avx512.cpu_flags <= cpu_features.SIMD_FLAGS
    assert not any(presets.PRESETS[n].cpu_flags for n in ("cpu-neon", "cuda", "metal"))


def _kv(layout):
    return KVCache(2, 4, 16, layout, "float16" if layout == "rows" else "float32")


ENTRIES = [
    OnnxrtEntry("model.onnx", "logits", ["input_ids"], ["logits"], _kv("shared"), ["onnxruntime==1.31.1"],
                recompute_cache_after=None, max_length=2048),
    OnnxrtEntry("model.onnx", "logits", ["input_ids"], ["logits"], _kv("concat"), ["onnxruntime==1.31.1"],
                recompute_cache_after=4096),
    TVMEntry("model.so", "weights.safetensors", ["a", "b"], _kv("rows"), ["apache-tvm"], max_length=512,
             cpu_features=["avx", "avx2"]),
    TVMEntry("model.tar", "weights.safetensors", ["a"], _kv("uniform"), ["apache-tvm"], recompute_cache_after=64,
             cross_compiled_for="aarch64", why_uniform="learned positions"),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.name}-{e.kv.layout}")
def test_an_entry_reads_back_as_written(entry, tmp_path):
    written = json.loads(json.dumps(entry.manifest()))
    assert written["name"] == entry.name
    assert type(entry).read(tmp_path, {"backend": written}) == entry


@pytest.mark.parametrize("cls, edit, message", [
    (OnnxrtEntry, lambda b: b.pop("logits"), "onnxrt backend entry has no 'logits'"),
    (OnnxrtEntry, lambda b: b["kv_cache"].update(layout="ring"), "has a bad value (unknown KV-cache layout 'ring')"),
    (TVMEntry, lambda b: b["kv_cache"].update(dtype="int8"), "tvm backend entry has a bad value (KV-cache dtype int8)"),
    (TVMEntry, lambda b: b.update(cpu_features="avx2"), "has a bad value (cpu_features is not a list of names)"),
    (TVMEntry, lambda b: b.update(params={"a": 1}), "has a bad value (params is not a list of names)"),
    (TVMEntry, lambda b: b.update(cross_compiled_for=7), "has a bad value (cross_compiled_for is 7)"),
    (TVMEntry, lambda b: b.update(kv_cache=[]), "tvm backend entry has a bad value (kv_cache is not an object)"),
    (OnnxrtEntry, lambda b: b.update(kv_cache=[]), "onnxrt backend entry has a bad value (kv_cache is not an object)"),
])
def test_a_damaged_entry_is_one_line_naming_the_manifest(cls, edit, message, tmp_path):
    written = next(e for e in ENTRIES if isinstance(e, cls)).manifest()
    written = json.loads(json.dumps(written))
    edit(written)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        cls.read(tmp_path, {"backend": written})
    assert str(tmp_path / "manifest.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("backend, cls", [("onnxrt", OnnxrtEntry), ("tvm", TVMEntry)])
def test_the_build_writes_what_its_session_reads(compiled_family, backend, cls, tmp_path):
    """A real artifact: the entry the build wrote is the one its session reads, and a damaged
    one is refused by the session through the same reader."""
    from kiln import runtime
    folder = compiled_family("llama", backend)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = cls.read(folder, manifest)
    assert entry.manifest() == manifest["backend"] and entry.name == backend
    assert entry.kv.layers == manifest["config"]["num_layers"]
    art = tmp_path / "a.kiln"
    shutil.copytree(folder, art)
    manifest["backend"]["kv_cache"]["layers"] = None
    manifest["backend"]["kv_cache"].pop("head_dim")
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"{backend} backend entry has no 'head_dim'"):
        runtime.load(art)


def test_every_backend_has_an_entry():
    assert {cls.name for cls in (OnnxrtEntry, TVMEntry)} == set(presets.BACKENDS)
