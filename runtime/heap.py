"""Giving freed C-heap memory back to the system."""
from __future__ import annotations

import ctypes


def release_free_heap() -> None:
    """Return memory the C heap holds freed to the system; glibc keeps it otherwise. Loading a
    tokenizer parses a few MB of JSON into some 30 MB of short-lived objects, and without
    this they stay in the process's resident memory for its whole life. (No-op where the C
    library has no ``malloc_trim``.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
