"""The fuzz harness itself (tests/fuzzing.py): each kind of crash it exists to catch is caught.

Targets here misbehave on purpose; run_target must fail the calling test for each, so a fuzz
suite that passes means its reader really had none of these.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import fuzzing
from kiln.errors import KilnError


@fuzzing.target(n=st.integers(0, 3))
def uses_too_much_memory(ws, n):
    block = np.ones(400 << 20, dtype=np.uint8)        # 400 MB, touched: over the test's RSS limit of 300
    fuzzing.expect(ws, lambda: int(block[::4096].sum()), ws.path("x"))


@fuzzing.target(n=st.integers(0, 3))
def uses_more_than_the_address_space(ws, n):
    block = np.ones(2 << 30, dtype=np.uint8)          # 2 GiB: past RLIMIT_AS, so MemoryError
    fuzzing.expect(ws, lambda: int(block[0]), ws.path("x"))


@fuzzing.target(n=st.integers(0, 3))
def spins(ws, n):
    while True:
        pass


@fuzzing.target(n=st.integers(0, 3))
def raises_another_type(ws, n):
    fuzzing.expect(ws, lambda: int("x"), ws.path("x"))


@fuzzing.target(n=st.integers(0, 3))
def names_no_file(ws, n):
    def read():
        raise KilnError(None, "something is wrong")
    fuzzing.expect(ws, read, ws.path("x"))


@fuzzing.target(n=st.integers(0, 3))
def two_line_message(ws, n):
    def read():
        raise KilnError(ws.path("x"), "first line\nsecond line")
    fuzzing.expect(ws, read, ws.path("x"))


@pytest.fixture(autouse=True)
def few_quick_cases(monkeypatch):
    monkeypatch.setenv("KILN_FUZZ_EXAMPLES", "3")
    monkeypatch.setenv("KILN_FUZZ_CASE_SECONDS", "0.5")
    monkeypatch.delenv("KILN_FUZZ_STATS", raising=False)


def test_memory_past_the_limit_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(fuzzing, "RSS_LIMIT", 300 << 20)
    monkeypatch.setenv("KILN_FUZZ_CASE_SECONDS", "30")
    with pytest.raises(AssertionError, match="peak RSS"):
        fuzzing.run_target(__file__, "uses_too_much_memory", tmp_path)


@pytest.mark.parametrize("name,match", [("spins", "hang: case used more than 0.5 s of CPU"),
                                        ("uses_more_than_the_address_space", "MemoryError"),
                                        ("raises_another_type", "ValueError"),
                                        ("names_no_file", "KilnError names no file"),
                                        ("two_line_message", "KilnError is not one line")])
def test_crashes_fail(tmp_path, name, match):
    with pytest.raises(pytest.fail.Exception, match=match):
        fuzzing.run_target(__file__, name, tmp_path)
