"""Weight storage formats: plain element types and block-quantized formats.

Each format is one class in one module of this package; defining the class registers it
(``WeightFormat.__init_subclass__``). A tensor in a block format is stored row-major with its
blocks running along the last dimension, as GGUF stores it: a tensor of logical shape
``(..., n)`` holds ``n // block_size`` blocks per row, each ``type_size`` bytes.
"""
from __future__ import annotations

import importlib
import pkgutil

import numpy as np

from ._blocks import set_threads  # noqa: F401  (the quantizers' thread count: kiln convert -t)

_REGISTRY: dict[str, "WeightFormat"] = {}
_BY_GGUF: dict[int, "WeightFormat"] = {}


class WeightFormat:
    """One storage format. Subclasses set the class attributes and the two block functions."""

    name: str = ""             # kiln's name: "f32", "q4_1", "q6_k", ...
    block_size: int = 1        # logical elements per block
    type_size: int = 4         # bytes per block
    gguf_type: int | None = None   # GGML type id, when GGUF has the format
    numpy_dtype: str | None = None  # plain formats only: the element dtype numpy can view
    layout = None              # a BlockLayout (formats/layout.py): the block described once

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return
        inst = cls()
        _REGISTRY[cls.name] = inst
        if cls.gguf_type is not None:
            _BY_GGUF[cls.gguf_type] = inst

    # ---- block functions (vectorised over blocks) -------------------------------------
    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size]; a format with a
        ``layout`` is decoded from it, the others define their own."""
        if self.layout is None:
            raise NotImplementedError(f"{self.name} cannot be dequantized")
        return self.layout.dequantize(blocks)

    def quantize_blocks(self, values: np.ndarray) -> np.ndarray:
        """float32 [n_blocks, block_size] -> uint8 [n_blocks, type_size]."""
        raise NotImplementedError(f"{self.name} cannot be quantized by kiln")

    def quantize_blocks_weighted(self, values: np.ndarray, qw: np.ndarray, row_sigma2: np.ndarray) -> np.ndarray:
        """As ``quantize_blocks``, with each element's importance ``qw`` [n_blocks, block_size]
        (an importance matrix's mean squared activation of its column) and ``row_sigma2``
        [n_blocks, 1], the mean square of the block's whole row (the 32-wide formats use it).
        Formats that llama.cpp quantizes the same way with or without an imatrix (Q8_0, the
        float types) leave this undefined."""
        raise NotImplementedError

    @property
    def takes_importance(self) -> bool:
        return type(self).quantize_blocks_weighted is not WeightFormat.quantize_blocks_weighted

    # ---- whole tensors ----------------------------------------------------------------
    @property
    def is_block(self) -> bool:
        return self.numpy_dtype is None

    def nbytes(self, shape) -> int:
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        if n % self.block_size:
            raise ValueError(f"{n} elements are not a whole number of {self.name} blocks of {self.block_size}")
        return n // self.block_size * self.type_size

    def row_ok(self, shape) -> bool:
        """Whether the last dimension holds whole blocks (required by the block layout)."""
        return self.block_size == 1 or (len(shape) > 0 and shape[-1] % self.block_size == 0)

    def dequantize(self, raw: np.ndarray, shape) -> np.ndarray:
        """Raw bytes (any uint8 array of the right size) -> float32 array of ``shape``."""
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if self.numpy_dtype is not None:
            return _plain_to_f32(raw, self.numpy_dtype).reshape(shape)
        blocks = raw.reshape(-1, self.type_size)
        return self.dequantize_blocks(blocks).reshape(shape)

    def quantize(self, values: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 array -> raw uint8 bytes (flat) in this format. ``importance``: one weight
        per column (an importance matrix's entry for this tensor), used by the formats whose
        llama.cpp quantizer takes one (``takes_importance``) and ignored by the others."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.numpy_dtype is not None:
            return _f32_to_plain(values, self.numpy_dtype).reshape(-1).view(np.uint8)
        if not self.row_ok(values.shape):
            raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of the {self.name} block size {self.block_size}")
        if importance is not None and self.takes_importance:
            return self._quantize_weighted(values.reshape(-1, values.shape[-1]), importance).reshape(-1)
        return self.quantize_blocks(values.reshape(-1, self.block_size)).reshape(-1)

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        from ._blocks import CHUNK_ELEMENTS, map_chunks
        from ._kquant import mean_square
        n = rows.shape[1]
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.size != n:
            raise ValueError(f"the importance has {importance.size} values for rows of {n}")
        per_row = n // self.block_size
        qw_row = importance.reshape(per_row, self.block_size)
        step = max(1, CHUNK_ELEMENTS // n)

        def quantize_rows(a):
            chunk = rows[a:a + step]
            r = chunk.shape[0]
            sigma2 = np.repeat(mean_square(chunk), per_row, axis=0)
            qw = np.broadcast_to(qw_row[None], (r, per_row, self.block_size)).reshape(-1, self.block_size)
            return self.quantize_blocks_weighted(chunk.reshape(-1, self.block_size), qw, sigma2)
        out = map_chunks(quantize_rows, range(0, rows.shape[0], step))
        return np.concatenate(out) if out else np.zeros((0, self.type_size), np.uint8)

    def __repr__(self) -> str:
        return f"<format {self.name}>"


def _plain_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        wide = raw.view(np.uint16).astype(np.uint32)
        wide <<= 16                      # in place: a second full-size temporary would double the peak
        return wide.view(np.float32)
    return raw.view(np.dtype(dtype)).astype(np.float32)


def _f32_to_plain(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        # round to nearest even, as torch and the gguf package do; NaNs stay NaN
        u32 = values.view(np.uint32).astype(np.uint64)
        rounded = ((u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = ((u32[nan] >> 16) | 64).astype(np.uint16)
        return rounded
    return values.astype(np.dtype(dtype))


_loaded = False


def _load_all() -> None:
    # once, whatever is registered already: a format module imported on its own registers
    # only itself, so a non-empty registry does not mean a complete one
    global _loaded
    if _loaded:
        return
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    _loaded = True


def get(name: str) -> WeightFormat:
    _load_all()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown weight format {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def from_gguf_type(type_id: int) -> WeightFormat | None:
    _load_all()
    return _BY_GGUF.get(type_id)


def all_formats() -> dict[str, WeightFormat]:
    _load_all()
    return dict(_REGISTRY)
