"""Write tests/data/imatrix/quant_cases.npz: llama.cpp's own bytes for importance-weighted
quantization, so an always-on test can hold kiln's quantizers to them.

    python scripts/make_imatrix_quant_cases.py /path/to/libggml-base.so

The library is any build of the vendored llama.cpp (llama-cpp-python's wheel build or a cmake
build of /work/peers/llama.cpp-src); its ``ggml_quantize_chunk`` with an importance array runs
the ``quantize_row_*_impl`` functions that ``llama-quantize --imatrix`` runs. The inputs are
seeded random rows with the awkward cases the searches branch on (zero runs, a constant row,
an all-zero row, tiny and huge rows, zero importance for some columns).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "imatrix" / "quant_cases.npz"
TYPES = {"q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}
ROW_BYTES_PER_256 = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210,
                     "q4_0": 144, "q4_1": 160, "q5_0": 176, "q5_1": 192}


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    x = (rng.standard_normal((12, 768)) * rng.random((12, 1)) * 0.1).astype(np.float32)
    x[0, :40] = 0
    x[1] = 0.5
    x[2, ::7] *= 30
    x[3] = 0
    x[4] *= np.float32(1e-20)
    x[5] *= np.float32(1e4)
    imp = ((rng.random(768) * 2) ** 3).astype(np.float32)
    imp[:5] = 0
    return {"x": x, "importance": imp}


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    data = cases()
    x, imp = data["x"], data["importance"]
    rows, n = x.shape
    for name, type_id in TYPES.items():
        out = np.zeros(rows * n // 256 * ROW_BYTES_PER_256[name], dtype=np.uint8)
        lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, n, imp.ctypes.data)
        data[name] = out
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
