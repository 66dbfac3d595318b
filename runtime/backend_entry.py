"""The manifest's backend entry, typed: what a backend's build writes and its session reads.

Each backend has one dataclass here. Its build (``kiln.targets.onnxrt.build``,
``kiln.targets.tvm.build``) returns one, the compiler writes :meth:`manifest` as the
manifest's ``backend``, and the backend's session reads it back with ``read``: the one place
an entry's keys are named and their types checked, so a damaged entry is one ArtifactError
naming the manifest. The numbers that size memory are checked again against the artifact's
own files by :mod:`.manifest_numbers`. ``details`` carries what is only reported (``kiln
inspect``), never read back.

Light on purpose: the runtime imports it for every artifact it opens.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kiln.artifact import MANIFEST, ArtifactError


@dataclass(frozen=True)
class KVCache:
    """The cache a session allocates: ``layers`` x [batch, kv_heads, capacity, head_dim] for
    keys and again for values. ``layout``: onnxrt "shared" (in place) or "concat" (grown);
    tvm "rows" (positions per row) or "uniform" (one length for the batch)."""
    layers: int
    kv_heads: int
    head_dim: int
    layout: str
    dtype: str = "float32"


@contextmanager
def _entry_errors(folder, backend: str):
    """A missing key or a value of the wrong type, as one line naming the manifest."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        what = f"has no {_short(repr(e.args[0]))}" if isinstance(e, KeyError) else f"has a bad value ({_short(str(e))})"
        raise ArtifactError(Path(folder) / MANIFEST, f"the manifest's {backend} backend entry {what}") from None


def _short(text: str, most: int = 120) -> str:
    """A value as the error line shows it: a hostile manifest's megabyte string stays a line."""
    return text if len(text) <= most else text[:most] + "..."


def _names(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of names")
    return list(value)


def _object(entry: dict, key: str) -> dict:
    value = entry[key]
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not an object")
    return value


def _optional(entry: dict, key: str, kind=str):
    value = entry.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{key} is {_short(repr(value))}")
    return value


def _read_kv(entry: dict, layout_key: str, layouts: tuple, default: str | None = None) -> KVCache:
    kv = _object(entry, "kv_cache")
    layout = kv[layout_key] if default is None else kv.get(layout_key, default)
    if layout not in layouts:
        raise ValueError(f"unknown KV-cache {layout_key} {_short(repr(layout))}")
    dtype = kv.get("dtype", "float32")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"KV-cache dtype {_short(str(dtype))}")
    return KVCache(kv["layers"], kv["kv_heads"], kv["head_dim"], layout, dtype)


class _Entry:
    name: str

    def manifest(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from(cls, written: dict):
        raise NotImplementedError

    @classmethod
    def read(cls, folder, manifest: dict):
        """The entry of ``manifest`` (an artifact's at ``folder``), checked; the keys it does not
        read are kept as its details."""
        written = manifest["backend"]
        with _entry_errors(folder, cls.name):
            entry = cls._from(written)
        known = entry.manifest()
        entry.details = {k: v for k, v in written.items() if k not in known}
        return entry


@dataclass
class OnnxrtEntry(_Entry):
    """The ONNX Runtime backend's entry: the graph (``model``, its logits output and the
    inputs and outputs it declares) and its KV cache."""
    model: str
    logits: str
    inputs: list[str]
    outputs: list[str]
    kv: KVCache
    requires: list[str]
    recompute_cache_after: int | None = None      # longrope's switch (concat layout only)
    max_length: int | None = None                 # positions the shared cache's tables hold
    details: dict = field(default_factory=dict)

    name = "onnxrt"

    def manifest(self) -> dict:
        kv = self.kv
        return {"name": self.name, "model": self.model, "logits": self.logits, "inputs": self.inputs,
                "outputs": self.outputs,
                "kv_cache": {"layout": kv.layout, "layers": kv.layers, "kv_heads": kv.kv_heads, "head_dim": kv.head_dim},
                "recompute_cache_after": self.recompute_cache_after, "requires": self.requires,
                **({"max_length": self.max_length} if self.max_length is not None else {}), **self.details}

    @classmethod
    def _from(cls, b: dict) -> OnnxrtEntry:
        return cls(model=b["model"], logits=b["logits"], inputs=b.get("inputs", []), outputs=b.get("outputs", []),
                   kv=_read_kv(b, "layout", ("concat", "shared"), default="concat"),
                   requires=b.get("requires", []), recompute_cache_after=b.get("recompute_cache_after"),
                   max_length=b.get("max_length"))


@dataclass
class TVMEntry(_Entry):
    """The TVM backend's entry: the compiled library, the weights it is passed (``params``, in
    order) and its KV cache; on a CPU, what the library needs of the machine that runs it."""
    library: str
    weights: str
    params: list[str]
    kv: KVCache
    requires: list[str]
    max_length: int | None = None
    recompute_cache_after: int | None = None      # longrope's switch ("uniform" artifacts)
    cpu_features: list[str] = field(default_factory=list)    # x86 flags the library uses
    cross_compiled_for: str | None = None         # the machine a cross-compiled library links on
    why_uniform: str | None = None                # why positions are not per row
    details: dict = field(default_factory=dict)

    name = "tvm"

    def manifest(self) -> dict:
        kv = self.kv
        return {"name": self.name, **({"cross_compiled_for": self.cross_compiled_for} if self.cross_compiled_for else {}),
                **({"cpu_features": self.cpu_features} if self.cpu_features else {}),
                "recompute_cache_after": self.recompute_cache_after, "requires": self.requires,
                "library": self.library, "weights": self.weights, "params": self.params,
                "kv_cache": {"mode": kv.layout, "dtype": kv.dtype, "layers": kv.layers, "kv_heads": kv.kv_heads,
                             "head_dim": kv.head_dim, **({"why_uniform": self.why_uniform} if self.why_uniform else {})},
                "max_length": self.max_length, **self.details}

    @classmethod
    def _from(cls, b: dict) -> TVMEntry:
        return cls(library=b["library"], weights=b["weights"], params=_names(b["params"], "params"),
                   kv=_read_kv(b, "mode", ("rows", "uniform")), requires=b.get("requires", []),
                   max_length=b.get("max_length"), recompute_cache_after=b.get("recompute_cache_after"),
                   cpu_features=_names(b.get("cpu_features", []), "cpu_features"),
                   cross_compiled_for=_optional(b, "cross_compiled_for"),
                   why_uniform=_optional(b["kv_cache"], "why_uniform"))
