"""Bit-level helpers shared by the GGUF block formats.

The GGUF reference quantizers are defined by float32 C code; to reproduce them byte for byte
every step here stays in float32 and performs the same operations in the same order.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

F32 = np.float32
QK_K = 256  # elements in a K-quant super-block

# The reference lets infinities and NaNs run through (a half scale overflowing to inf, 0 * inf
# in a cast); block functions reproduce that quietly rather than warn on every odd block.
# Only ever used as a decorator: that form is re-entrant and thread-safe, ``with`` is not.
quiet = np.errstate(all="ignore")

CHUNK_ELEMENTS = 1 << 17  # measured: a few cache-sized chunks beat one tensor-sized pass

# The block quantizers run their chunks on a pool of threads: numpy releases the GIL inside
# its ufuncs, which is where a quantizer spends its time. Each chunk is quantized on its own,
# so the bytes do not depend on the thread count, and results are joined in chunk order.
_threads: int | None = None              # None: one per core
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker = threading.local()


def set_threads(n: int | None) -> None:
    """How many threads the block quantizers use; None (the default) is one per core."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1, not {n}")
    _threads = n


def threads() -> int:
    return _threads or os.cpu_count() or 1


def _pool_of(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="kiln-quant", initializer=_mark_worker)
        return _pool


def _mark_worker() -> None:
    _worker.busy = True


def map_chunks(fn, starts) -> list:
    """[fn(a) for a in starts], on the quantizer threads when there are several chunks. A call
    from inside a worker (a quantizer nested in another) runs in place: waiting on the pool
    from one of its own threads could wait forever."""
    starts = list(starts)
    n = threads()
    if n == 1 or len(starts) < 2 or getattr(_worker, "busy", False):
        return [fn(a) for a in starts]
    return list(_pool_of(n).map(fn, starts))


def chunked(method):
    """Run a block function over slices of about CHUNK_ELEMENTS values (inputs and temporaries
    then stay cache-sized, and a huge tensor does not need many tensor-sized temporaries),
    the slices spread over the quantizer threads."""
    @functools.wraps(method)
    def run(self, data):
        rows = max(1, CHUNK_ELEMENTS // self.block_size)
        if len(data) <= rows:
            return method(self, data)
        return np.concatenate(map_chunks(lambda i: method(self, data[i:i + rows]), range(0, len(data), rows)))
    return run


def f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [n, 1] -> the IEEE half bytes [n, 2] (round to nearest even, like ggml)."""
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The half stored at byte ``offset`` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def f16_round(x: np.ndarray) -> np.ndarray:
    """What a float32 becomes after a trip through a half field."""
    return x.astype(np.float16).astype(np.float32)


def reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, F32(0), F32(1) / d).astype(np.float32)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``. The fraction ``x - trunc(x)`` is exact, so this is exact too (and, like
    the reference, turns infinities into NaN)."""
    whole = np.trunc(x)
    return whole + np.trunc(F32(2) * (x - whole))


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` (the 1.5 * 2**23 trick): round half to even, as int32."""
    return np.rint(x).astype(np.int32)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the element of largest magnitude with its sign; the first one on ties.
    [n, k] -> [n, 1]."""
    idx = np.abs(x).argmax(axis=-1)[:, None]
    return np.take_along_axis(x, idx, axis=-1)


def pack_nibbles(q: np.ndarray, group: int | None = None) -> np.ndarray:
    """uint8 [n, 2m] -> [n, m]: in each run of ``group`` bytes of output (default: the whole
    row), the first half of the matching inputs goes to the low nibbles, the second half to
    the high ones."""
    n, m = q.shape[0], q.shape[-1] // 2
    q = q.astype(np.uint8).reshape(-1, 2 * (group or m))
    half = q.shape[-1] // 2
    return ((q[:, :half] & 0x0F) | (q[:, half:] << 4)).reshape(n, m)


def unpack_nibbles(qs: np.ndarray, group: int | None = None) -> np.ndarray:
    """Inverse of ``pack_nibbles``, applied to each run of ``group`` bytes (default: the whole
    row): uint8 [n, m] -> [n, 2m]."""
    n, m = qs.shape
    qs = qs.reshape(-1, group or m)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, 2 * m)


def bits_to_u32_bytes(bits: np.ndarray) -> np.ndarray:
    """[n, 32] of 0/1 -> the little-endian uint32 holding bit i at position i, as [n, 4]."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def u32_bytes_to_bits(qh: np.ndarray) -> np.ndarray:
    """Inverse of ``bits_to_u32_bytes``: uint8 [n, 4] -> [n, 32] of 0/1."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def crumbs(qs: np.ndarray, width: int) -> np.ndarray:
    """Split the bytes [n, groups * 32] into fields of ``width`` bits (lowest first), giving
    [n, groups * (8 // width) * 32] in K-quant order: byte l of a 32-byte group carries
    element l of each of the group's consecutive runs of 32."""
    n, m = qs.shape
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    mask = np.uint8((1 << width) - 1)
    return ((qs.reshape(n, m // 32, 1, 32) >> shifts) & mask).reshape(n, m * (8 // width))


def pack_crumbs(q: np.ndarray, width: int) -> np.ndarray:
    """Inverse of ``crumbs``: [n, groups * (8 // width) * 32] -> [n, groups * 32] bytes."""
    per_byte = 8 // width
    n, groups = q.shape[0], q.shape[1] // (per_byte * 32)
    q = q.reshape(n, groups, per_byte, 32).astype(np.uint8)
    out = np.zeros((n, groups, 32), dtype=np.uint8)
    for k in range(per_byte):
        out |= q[:, :, k, :] << np.uint8(width * k)
    return out.reshape(n, groups * 32)

