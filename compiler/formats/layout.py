"""A block format's layout, described once: where its codes and scales sit in a block and how
they make a value. Each format module that has one sets ``layout`` on its class; the numpy
codec (``WeightFormat.dequantize_blocks``), ONNX Runtime's repack (``targets/onnxrt/quant.py``)
and TVM's stored arrays and kernels (``targets/tvm/quant_layout.py``) all read it, so a format's
bytes are decoded in one place.

Every value is ``scale · (code − offset) [± bias]`` in float32, with one scale (and bias) per
``group`` consecutive elements, as ``gguf.quants.dequantize`` computes it (the K-quants
subtract their min, ``dmin · mn``; Q4_1 and Q5_1 add their ``m``: the order matters only to
the sign of a NaN, which the numpy codec keeps bit for bit):

* ``unpack(blocks)``: uint8 [B, type_size] -> (codes, params). ``codes`` are unsigned, uint8
  [B, block_size], element order; ``params`` are the scales as stored (float16 halves, integer
  sub-block scales unpacked to a byte each), name -> [B, block_size / span].
* ``planes``: the codes' bit widths, low bits first (how TVM splits them into bit planes).
* ``params``: (name, dtype, span) of each entry of ``params``: ``span`` elements share it.
* ``scale(get, f32)`` and ``bias(get, f32)``: a group's scale and bias from ``get(name)``
  (its params) and ``f32`` (a cast to float32); written once, evaluated on numpy arrays here and
  on TIR expressions by the TVM kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._blocks import quiet


def f32(x):
    """float32 cast of numpy arrays (the ``f32`` the numpy evaluations pass)."""
    return np.asarray(x).astype(np.float32)


@dataclass(frozen=True)
class BlockLayout:
    group: int
    planes: tuple
    offset: int
    params: tuple
    unpack: Callable
    scale: Callable
    bias: Callable | None = None
    subtract_bias: bool = False

    @property
    def bits(self) -> int:
        return sum(self.planes)

    def added_bias(self, get, f32):
        """A group's bias as a term added to ``scale · (code − offset)``; None without one."""
        if self.bias is None:
            return None
        return -self.bias(get, f32) if self.subtract_bias else self.bias(get, f32)

    def group_scales(self, params: dict, *, added: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(scale, bias or None) of every group, float32 [B, groups], from unpacked params; the
        bias as added (``added``) or as the layout states it."""
        groups = {name: np.repeat(params[name], span // self.group, axis=1) for name, _, span in self.params}
        scale = self.scale(groups.__getitem__, f32)
        if self.bias is None:
            return scale, None
        return scale, (self.added_bias if added else self.bias)(groups.__getitem__, f32)

    @quiet
    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 [B, type_size] -> float32 [B, block_size]: every value from the description."""
        codes, params = self.unpack(blocks)
        n, size = codes.shape
        scale, bias = self.group_scales(params, added=False)
        q = codes.astype(np.int16)
        if self.offset:
            q = q - np.int16(self.offset)
        values = scale[:, :, None] * q.astype(np.float32).reshape(n, size // self.group, self.group)
        if bias is not None:
            values = values - bias[:, :, None] if self.subtract_bias else values + bias[:, :, None]
        return values.reshape(n, size)


def f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The half stored at byte ``at`` of every block, as float16 [B, 1]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)


def scale_d(get, f32):
    """A 32-element format's scale: its half d."""
    return f32(get("d"))


def bias_m(get, f32):
    """Q4_1's and Q5_1's bias: their half m."""
    return f32(get("m"))


def scale_d_sc(get, f32):
    """A K-quant's scale: the half super-scale d times the sub-block's integer scale."""
    return f32(get("d")) * f32(get("sc"))


def min_dmin_mn(get, f32):
    """Q4_K's and Q5_K's min (subtracted): the half super-min dmin times the sub-block's min."""
    return f32(get("dmin")) * f32(get("mn"))


#: the params of the 32-element formats: a half scale d [and a half bias m] per block
LEGACY_D = (("d", "float16", 32),)
LEGACY_DM = (("d", "float16", 32), ("m", "float16", 32))
#: Q4_K and Q5_K: 6-bit scales and mins per 32 under half d and dmin per 256
AFFINE_K = (("sc", "uint8", 32), ("mn", "uint8", 32), ("d", "float16", 256), ("dmin", "float16", 256))
