"""Lazy weights: a tensor that stays in its source file until something asks for its data.

A ``Weight`` knows its logical shape, its storage format and how to produce its raw bytes
(usually a byte range of the source file). Transformations that keep the storage format
(row permutation, row slicing, reshape) stay lazy and stay quantized; transformations that need
values (transpose of a block format, scaling) dequantize to float32 on demand.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import formats as _formats


class Weight:
    def __init__(self, shape, fmt, load_raw: Callable[[], np.ndarray], *, name: str = "", origin: str = "",
                 load_rows: Callable[[int, int], np.ndarray] | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.format = fmt if isinstance(fmt, _formats.WeightFormat) else _formats.get(fmt)
        self._load_raw = load_raw
        # optional: the raw bytes of rows [a, b) alone, so writers can stream a big tensor
        self._load_rows = load_rows
        self.name = name
        self.origin = origin   # where it came from, for error messages and the manifest

    # ---- data -------------------------------------------------------------------------
    def raw(self) -> np.ndarray:
        """The stored bytes, uint8, as rows: shape (rows, row_bytes) with rows = prod(shape[:-1])."""
        data = np.asarray(self._load_raw()).reshape(-1).view(np.uint8)
        expected = self.nbytes
        if data.size != expected:
            raise ValueError(f"weight {self.name or '?'}: {data.size} bytes stored, {expected} expected")
        if not self.shape:
            return data
        return data.reshape(self.rows, self.format.nbytes(self.shape[-1:]) if self.shape[-1] else 0)

    def numpy(self) -> np.ndarray:
        """The values as float32 (dequantized when the format is a block format)."""
        return self.format.dequantize(self.raw(), self.shape)

    @property
    def row_bytes(self) -> int:
        return self.format.nbytes(self.shape[-1:]) if self.shape else self.format.type_size

    def raw_chunks(self, max_bytes: int = 8 << 20):
        """The stored bytes as flat uint8 pieces of whole rows, in order.

        Weights that can load row ranges are streamed, so converting a large tensor needs a
        few chunks of memory rather than the tensor (and its float32 copy) at once.
        """
        if self._load_rows is None or len(self.shape) < 2:
            yield self.raw().reshape(-1)
            return
        per_row = max(self.shape[-1] * 4, self.row_bytes)       # float32 temporaries dominate
        step = max(1, max_bytes // per_row)
        for a in range(0, self.rows, step):
            b = min(self.rows, a + step)
            chunk = np.asarray(self._load_rows(a, b)).reshape(-1).view(np.uint8)
            if chunk.size != (b - a) * self.row_bytes:
                raise ValueError(f"weight {self.name or '?'}: rows {a}..{b} hold {chunk.size} bytes, "
                                 f"{(b - a) * self.row_bytes} expected")
            yield chunk

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.format.nbytes(self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    # ---- lazy transformations ---------------------------------------------------------
    def take_rows(self, index, *, name: str | None = None) -> "Weight":
        """Rows ``index`` (over the flattened leading dims) of a 2-D view; keeps the format."""
        index = np.asarray(index)
        parent = self
        if len(self.shape) == 1:
            if self.format.is_block:
                raise ValueError(f"cannot take elements of the 1-D block-format weight {self.name}")
            new_shape = (len(index),)

            def load():
                return parent.raw().reshape(-1, parent.format.type_size)[index]
            return Weight(new_shape, self.format, load, name=name or self.name, origin=self.origin)
        new_shape = (len(index),) + (self.shape[-1],)

        def load():
            return parent.raw()[index]
        return Weight(new_shape, self.format, load, name=name or self.name, origin=self.origin)

    def reshape(self, shape, *, name: str | None = None) -> "Weight":
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape, dtype=np.int64)) != self.numel or (self.format.is_block and shape[-1] % self.format.block_size):
            raise ValueError(f"cannot view weight {self.name} {self.shape} as {shape}")
        parent = self
        return Weight(shape, self.format, lambda: parent.raw(), name=name or self.name, origin=self.origin)

    def map_values(self, fn: Callable[[np.ndarray], np.ndarray], shape=None, *, name: str | None = None) -> "Weight":
        """A float32 weight computed from this one's values (dequantizes)."""
        parent = self
        shape = tuple(shape) if shape is not None else self.shape
        f32 = _formats.get("f32")

        def load():
            out = np.ascontiguousarray(fn(parent.numpy()), dtype=np.float32)
            assert out.shape == shape, (out.shape, shape)
            return out.view(np.uint8)
        return Weight(shape, f32, load, name=name or self.name, origin=self.origin)

    def transpose(self, *, name: str | None = None) -> "Weight":
        if len(self.shape) != 2:
            raise ValueError("transpose is for 2-D weights")
        if not self.format.is_block:
            parent = self
            dt = self.format.numpy_dtype

            def load():
                raw = parent.raw()
                if dt == "bfloat16":
                    return np.ascontiguousarray(raw.view(np.uint16).reshape(parent.shape).T).view(np.uint8)
                return np.ascontiguousarray(raw.view(np.dtype(dt)).reshape(parent.shape).T).view(np.uint8)
            return Weight(self.shape[::-1], self.format, load, name=name or self.name, origin=self.origin)
        return self.map_values(lambda a: a.T, self.shape[::-1], name=name)

    def astype(self, fmt, importance: np.ndarray | None = None) -> "Weight":
        """The same values stored in another format (quantizes or casts on demand).
        ``importance``: per-column weights for the quantizer (an importance matrix's entry)."""
        fmt = fmt if isinstance(fmt, _formats.WeightFormat) else _formats.get(fmt)
        if fmt is self.format:
            return self
        parent = self
        rows = None
        if parent._load_rows is not None and len(self.shape) >= 2:
            cols = self.shape[-1]

            def rows(a, b):
                values = parent.format.dequantize(parent._load_rows(a, b), (b - a, cols))
                return fmt.quantize(values, importance)
        return Weight(self.shape, fmt, lambda: fmt.quantize(parent.numpy(), importance), name=self.name, origin=self.origin,
                      load_rows=rows)

    @staticmethod
    def from_array(array: np.ndarray, fmt="f32", *, name: str = "") -> "Weight":
        fmt = fmt if isinstance(fmt, _formats.WeightFormat) else _formats.get(fmt)
        arr = np.asarray(array, dtype=np.float32)
        raw = fmt.quantize(arr)
        return Weight(arr.shape, fmt, lambda: raw, name=name, origin="array")

    def __repr__(self) -> str:
        return f"Weight({self.name!r}, {self.format.name}, {list(self.shape)})"


def concat_rows(parts: list[Weight], *, name: str = "") -> Weight:
    """Stack weights of one format along the first axis (fusing q/k/v, gate/up), lazily."""
    fmt = parts[0].format
    if any(p.format is not fmt for p in parts):
        parts = [p.astype("f32") for p in parts]
        fmt = parts[0].format
    tail = parts[0].shape[1:]
    shape = (sum(p.shape[0] for p in parts),) + tail

    def load():
        return np.concatenate([p.raw().reshape(-1) for p in parts])
    return Weight(shape, fmt, load, name=name or parts[0].name, origin=parts[0].origin)
