"""Reading byte ranges of a model file on demand, without memory-mapping the data.

A conversion touches every tensor once. Through a memory map every touched page stays in the
process's resident set until the map goes away, so peak memory grows with the model; reading
each tensor into its own buffer keeps the peak at the largest tensor. One descriptor per file
is opened on first use and shared (``os.pread`` has no file position to race on).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from kiln.errors import KilnError


class ByteRangeReader:
    def __init__(self, path: str, expected_size: int):
        self.path = path
        self.expected_size = expected_size
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except OSError as e:
                        raise KilnError(self.path, f"cannot read: {e.strerror or e}") from None
                    size = os.fstat(fd).st_size
                    if size != self.expected_size:
                        os.close(fd)
                        raise KilnError(self.path, f"file changed since it was opened ({self.expected_size} bytes then, {size} now)")
                    self._fd = fd
        return self._fd

    def read(self, begin: int, end: int) -> np.ndarray:
        out = np.empty(end - begin, dtype=np.uint8)
        if end == begin:
            return out
        fd = self._open()
        view = memoryview(out)
        done = 0
        while done < len(out):
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise KilnError(self.path, f"file ended early: {begin + done} of {end} bytes readable")
            done += n
        return out

    def slice(self, begin: int, end: int):
        return lambda: self.read(begin, end)

    def rows(self, begin: int, row_bytes: int):
        """Loader of rows [a, b) of a tensor whose data starts at ``begin``."""
        return lambda a, b: self.read(begin + a * row_bytes, begin + b * row_bytes)

    def __del__(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
