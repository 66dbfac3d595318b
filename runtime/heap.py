"""Giving freed C-heap memory back to the system."""
from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np


def release_free_heap() -> None:
    """Return memory the C heap holds freed to the system; glibc keeps it otherwise. Loading a
    tokenizer parses a few MB of JSON into some 30 MB of short-lived objects, and without
    this they stay in the process's resident memory for its whole life. (No-op where the C
    library has no ``malloc_trim``.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: arrays below this come from the heap, not from a fresh mmap: a token's vocabulary-sized
#: temporaries (1 MB for 131k float64 logits), many times a step
MMAP_THRESHOLD = 8 << 20
#: freed memory the heap keeps for the next allocation before giving it back to the system
TRIM_THRESHOLD = 64 << 20


def keep_freed_buffers() -> None:
    """Let the C heap reuse the buffers a decode step frees instead of mapping fresh pages.

    glibc maps an allocation of 128 KB or more (a threshold that grows only as such blocks
    are freed) and unmaps it when freed, and trims the top of the heap as soon as 128 KB+ are
    free there. A sampler's temporaries (SmolLM2: 49k logits, 192 KB in float32 and 384 KB in
    float64, several per token) then each cost ~100 faulted pages: sampling one row at
    temperature 0.8 took 0.67-0.75 ms on a 2-core EPYC, and 0.29-0.32 ms with these settings.
    The memory kept is bounded by TRIM_THRESHOLD; :func:`release_free_heap` still gives back
    everything free when asked. (No-op where the C library has no ``mallopt``.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def mapped_zeros(shape, dtype) -> np.ndarray:
    """An array of zeros in its own anonymous memory map: its pages become resident only when
    written, and go back to the system as soon as the array is freed, where the next map can
    take them (memory from the C heap would be kept by the heap, and a fresh map would fault in
    pages the VM's host may not have backed yet). KV caches are made of these."""
    count = math.prod(shape)
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=count).reshape(shape)
