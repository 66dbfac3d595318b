"""Importance-matrix files, as llama.cpp's ``llama-imatrix`` writes and ``llama-quantize`` reads.

An importance matrix holds, for each matrix a quantizer touches (by its GGUF tensor name,
``blk.3.attn_q.weight``), the sum of the squared activations that reached each input column
over a calibration text, and how many activation rows were summed. The quantizers weight
their error by the mean (``sum / count``), so columns that carry large activations are kept
more precisely.

Two layouts: the GGUF one (``general.type = imatrix``; per matrix an F32 tensor
``<name>.in_sum2`` of shape [n_mat, columns] and ``<name>.counts`` [n_mat, 1]; keys
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``; 1-D when n_mat is 1),
which kiln writes (byte for byte as llama-imatrix does),
and the legacy ``.dat`` one (int32 entry count; per entry its name, the number of chunks
``ncall`` and the values, already ``mean * ncall``; then the chunk count and the dataset),
which kiln also reads. llama.cpp's ``common/imatrix-loader.cpp`` and
``tools/quantize/quantize.cpp`` define how each turns into importance.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import KilnError

SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class Entry:
    sums: np.ndarray      # float32 [n_mat * columns]: summed squared activations
    counts: np.ndarray    # float [n_mat]: activation rows summed (GGUF); [ncall] for .dat


@dataclass
class ImportanceMatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False       # read from a .dat file: sums are mean * ncall

    def importance(self, name: str) -> np.ndarray | None:
        """The per-column weights llama-quantize gives tensor ``name`` (None: no entry):
        sums / count in float32, 1 where nothing was counted."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0]) if len(e.counts) else 0
            return e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
        per = e.sums.reshape(len(e.counts), -1)
        counts = np.asarray(e.counts, dtype=np.float32)[:, None]
        out = np.where(counts > 0, per / np.where(counts > 0, counts, np.float32(1)), np.float32(1))
        return out.astype(np.float32).reshape(-1)


def write(path, im: ImportanceMatrix) -> None:
    """Write the GGUF layout, entries in name order as llama-imatrix does."""
    from kiln.frontends.gguf_file import typed
    from kiln.frontends.gguf_writer import write_gguf
    from kiln.weights import Weight
    meta = {"general.type": "imatrix",
            "imatrix.datasets": typed(list(im.datasets), "array[string]"),
            "imatrix.chunk_count": typed(int(im.chunk_count), "uint32"),
            "imatrix.chunk_size": typed(int(im.chunk_size), "uint32")}
    tensors = []
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = len(e.counts)
        # ggml drops trailing dimensions of 1: one matrix gives 1-D tensors, as llama.cpp writes
        sums = np.asarray(e.sums, dtype=np.float32).reshape((n_mat, -1) if n_mat > 1 else (-1,))
        counts = np.asarray(e.counts, dtype=np.float32).reshape((n_mat, 1) if n_mat > 1 else (1,))
        tensors.append((name + SUM2, Weight.from_array(sums, name=name + SUM2)))
        tensors.append((name + COUNTS, Weight.from_array(counts, name=name + COUNTS)))
    write_gguf(path, meta, tensors)


def read(path) -> ImportanceMatrix:
    """Either layout, by its first bytes; anything else is a one-line KilnError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise KilnError(path, f"cannot read the importance matrix: {e.strerror or e}") from None
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_dat(path)


def _read_gguf(path: str) -> ImportanceMatrix:
    from kiln.frontends.gguf_file import read_gguf
    f = read_gguf(path)
    kind = f.metadata.get("general.type")
    if kind not in (None, "imatrix"):
        raise KilnError(path, f"is a GGUF {kind}, not an importance matrix (make one with kiln imatrix)")
    pairs: dict[str, dict] = {}
    for tname, w in f.tensors.items():
        for suffix in (SUM2, COUNTS):
            if tname.endswith(suffix):
                pairs.setdefault(tname[:-len(suffix)], {})[suffix] = w
    if not pairs:
        raise KilnError(path, "holds no importance-matrix entries (<tensor>.in_sum2 / <tensor>.counts)")
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in f.metadata:
            raise KilnError(path, f"is missing the importance-matrix key {key}")
    im = ImportanceMatrix(datasets=[str(d) for d in f.metadata["imatrix.datasets"]],
                          chunk_count=int(f.metadata["imatrix.chunk_count"]),
                          chunk_size=int(f.metadata["imatrix.chunk_size"]))
    for name, pair in sorted(pairs.items()):
        if set(pair) != {SUM2, COUNTS}:
            raise KilnError(path, f"entry {name} has {'sums' if SUM2 in pair else 'counts'} but not "
                                  f"{'counts' if SUM2 in pair else 'sums'}")
        if any(w.format.name != "f32" for w in pair.values()):
            raise KilnError(path, f"entry {name}: sums and counts must be F32")
        sums = pair[SUM2].numpy().reshape(-1)
        counts = np.rint(pair[COUNTS].numpy().reshape(-1))
        if counts.size == 0 or sums.size % counts.size:
            raise KilnError(path, f"entry {name}: {sums.size} sums do not split into {counts.size} matrices")
        im.entries[name] = Entry(sums.astype(np.float32), counts)
    return im


def _read_dat(path: str) -> ImportanceMatrix:
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise KilnError(path, f"is neither a GGUF nor a legacy .dat importance matrix (ends inside {what})")
        pos += n
        return data[pos - n:pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise KilnError(path, f"is neither a GGUF nor a legacy .dat importance matrix ({n_entries} entries)")
    im = ImportanceMatrix(legacy=True)
    for i in range(n_entries):
        length = i32(f"entry {i + 1}'s name")
        if length < 0:
            raise KilnError(path, f"entry {i + 1}: negative name length")
        name = take(length, f"entry {i + 1}'s name").decode("utf-8", "replace")
        ncall, nval = i32(f"entry {name}"), i32(f"entry {name}")
        if nval < 1:
            raise KilnError(path, f"entry {name}: {nval} values")
        sums = np.frombuffer(take(4 * nval, f"entry {name}'s values"), dtype="<f4").astype(np.float32)
        im.entries[name] = Entry(sums, np.array([ncall], dtype=np.float64))
    if pos + 4 <= len(data):
        im.chunk_count = i32("the chunk count")
        if pos + 4 <= len(data):
            length = i32("the dataset name")
            if length > 0 and pos + length <= len(data):
                im.datasets.append(take(length, "the dataset name").decode("utf-8", "replace"))
    return im
