"""Shared machinery of the structure-aware fuzz suites (tests/test_fuzz_*.py).

Each suite defines *targets*: functions taking a fresh case folder and hypothesis draws, which
build one hostile file (a valid small file, decoded into its fields, mutated, re-encoded) and
read it. Every case must end in one of two ways:

* a correct read, after which the target touches the data (every tensor's bytes, a few
  dequantized, the tokenizer run once), or
* a ``KilnError`` whose message is one short line naming the case's file or folder.

Anything else is a crash: another exception type, a case that uses more than ``CASE_SECONDS``
of CPU (or ``CASE_WALL_SECONDS`` of wall time), or memory past the limits. A target runs in a
child process (``run_target``) under ``RLIMIT_AS`` = ``AS_LIMIT``; the child reports its peak
resident memory (``VmHWM``, the high-water mark of its own address space: ``ru_maxrss`` would
count the pytest worker it was forked from) and the parent fails above ``RSS_LIMIT``. A child
that dies or hangs leaves its last case on disk to inspect. tests/test_fuzz_harness.py checks
that each of these is caught.

``KILN_FUZZ_EXAMPLES`` sets the examples per target (default ``DEFAULT_EXAMPLES``,
derandomized so CI is reproducible); when it is set the run is random, with its seed printed
(``KILN_FUZZ_SEED`` replays one). ``KILN_FUZZ_STATS=FILE`` appends one JSON line per target;
``KILN_FUZZ_CASE_SECONDS`` and ``KILN_FUZZ_RSS_MB`` change the limits. The long run:

    KILN_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -n 2 -k "test_fuzz[" tests/test_fuzz_*.py
"""
from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from kiln.errors import KilnError

DEFAULT_EXAMPLES = 400
# per case, CPU time (SIGPROF): load on a shared machine cannot trip it
CASE_SECONDS = float(os.environ.get("KILN_FUZZ_CASE_SECONDS") or 5.0)
CASE_WALL_SECONDS = 30.0        # per case, wall time (SIGALRM): a case blocked in a system call
STUCK_SECONDS = 60.0            # no new case for this long (start-up included): the parent kills
AS_LIMIT = 1536 << 20           # address space of the child (bytes)
RSS_LIMIT = int(float(os.environ.get("KILN_FUZZ_RSS_MB") or 1024) * 2**20)    # peak resident memory of the child
MAX_MESSAGE = 1000              # a one-line message stays readable

ENV_EXAMPLES, ENV_SEED, ENV_STATS = "KILN_FUZZ_EXAMPLES", "KILN_FUZZ_SEED", "KILN_FUZZ_STATS"


def examples() -> int:
    return int(os.environ.get(ENV_EXAMPLES) or DEFAULT_EXAMPLES)


def long_run() -> bool:
    return bool(os.environ.get(ENV_EXAMPLES) or os.environ.get(ENV_SEED))


# ==========================================================================================
# targets and the per-case workspace (child side)
# ==========================================================================================

def target(**strategies):
    """Mark ``fn(ws, **draws)`` as a fuzz target over the given hypothesis strategies."""
    def deco(fn):
        fn.fuzz_strategies = strategies
        return fn
    return deco


class CaseTimeout(BaseException):
    """Raised by SIGPROF/SIGALRM inside a case. A BaseException so that no reader's ``except
    Exception`` can turn a hang into an ordinary error."""


class Workspace:
    """The case folder (emptied before each case) and the tallies of the run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "case"
        self.cases = self.ok = self.errors = 0
        self.slowest = (0.0, "")        # CPU seconds, the case's notes
        self.slowest_wall = 0.0
        self.note_text = ""
        self.messages: collections.Counter = collections.Counter()

    def fresh(self) -> None:
        if self.dir.exists():
            for p in self.dir.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        else:
            self.dir.mkdir(parents=True)
        self.note_text = ""

    def path(self, name: str) -> Path:
        return self.dir / name

    def note(self, text: str) -> None:
        """What this case did (mutations), kept for the slowest case's report."""
        self.note_text = (self.note_text + "; " if self.note_text else "") + text[:300]

    def stats(self) -> dict:
        return {"cases": self.cases, "ok": self.ok, "errors": self.errors,
                "slowest_s": round(self.slowest[0], 4), "slowest_case": self.slowest[1],
                "slowest_wall_s": round(self.slowest_wall, 4),
                "top_errors": self.messages.most_common(12)}


def check_error(e: KilnError, roots) -> None:
    """A KilnError fit for a user: one short line that names a file of this case."""
    text = str(e)
    assert e.path is not None, f"KilnError names no file: {text!r}"
    where = os.path.normpath(os.path.abspath(e.path))
    inside = [os.path.normpath(os.path.abspath(r)) for r in roots]
    assert any(where == r or where.startswith(r + os.sep) for r in inside), \
        f"KilnError names {e.path!r}, not the case's file: {text!r}"
    assert e.message and e.message.strip(), f"KilnError with an empty message: {text!r}"
    assert len(text.splitlines()) == 1 and text == text.strip(), f"KilnError is not one line: {text!r}"
    assert len(e.message) <= MAX_MESSAGE, f"KilnError message of {len(e.message)} characters: {text[:300]!r}..."


def expect(ws: Workspace, read, *roots):
    """Run ``read()`` (the read and the touching of its data): returns its result, or None
    after a KilnError that names one of ``roots``. Anything else propagates as a crash."""
    try:
        result = read()
    except KilnError as e:
        check_error(e, roots)
        ws.errors += 1
        ws.messages[_shape_of(e.message)] += 1
        return None
    ws.ok += 1
    return result


def _shape_of(message: str) -> str:
    """A message with its particulars blanked, to tally which checks the fuzzer reached."""
    m = re.sub(r"'[^']*'|\"[^\"]*\"|\b\d+\b", "_", message)
    return re.sub(r"tensor \S+", "tensor _", m)[:90]


def _peak_rss() -> int:
    """Bytes: the high-water mark of this process's resident memory since it was exec'd."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # elsewhere: an upper bound


def _alarm(signum, frame):
    if signum == signal.SIGPROF:
        raise CaseTimeout(f"case used more than {CASE_SECONDS} s of CPU")
    raise CaseTimeout(f"case ran more than {CASE_WALL_SECONDS} s")


def _run_child(test_file: str, name: str, root: str, stats_path: str) -> int:
    tests = os.path.dirname(os.path.abspath(test_file))
    if tests not in sys.path:
        sys.path.insert(0, tests)
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, name)
    ws = Workspace(Path(root))
    if hasattr(module, "prepare"):      # build the valid base files outside the timed cases
        module.prepare(ws.root / "bases")
    signal.signal(signal.SIGPROF, _alarm)
    signal.signal(signal.SIGALRM, _alarm)
    n = examples()
    run_seed = int(os.environ.get(ENV_SEED) or int.from_bytes(os.urandom(4), "little")) if long_run() else None
    started = time.perf_counter()
    status = {"target": f"{Path(test_file).stem}::{name}", "examples": n, "seed": run_seed,
              "derandomized": run_seed is None}

    heartbeat = ws.root / "heartbeat"

    def one_case(**draws):
        ws.fresh()
        ws.cases += 1
        os.utime(heartbeat)          # the parent's watchdog: a case stuck in C code never sees a signal
        signal.setitimer(signal.ITIMER_PROF, CASE_SECONDS)
        signal.setitimer(signal.ITIMER_REAL, CASE_WALL_SECONDS)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            fn(ws, **draws)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            if cpu > ws.slowest[0]:
                ws.slowest = (cpu, ws.note_text)
            ws.slowest_wall = max(ws.slowest_wall, wall)

    test = given(**fn.fuzz_strategies)(one_case)
    test = settings(max_examples=n, derandomize=run_seed is None, database=None, deadline=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))(test)
    if run_seed is not None:
        test = seed(run_seed)(test)
    rc = 0
    try:
        test()
        status["result"] = "passed"
    except CaseTimeout as e:
        traceback.print_exception(e)
        status["result"] = f"hang: {e}"
        rc = 3
    except BaseException as e:
        traceback.print_exception(e)      # with hypothesis's notes: the falsifying examples
        status["result"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        rc = 1
    status.update(ws.stats())
    status["wall_s"] = round(time.perf_counter() - started, 2)
    status["peak_rss_mb"] = round(_peak_rss() / 2**20, 1)
    Path(stats_path).write_text(json.dumps(status) + "\n")
    return rc


# ==========================================================================================
# the parent side: one child process per target
# ==========================================================================================

def _limit_child():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_target(test_file: str, name: str, tmp_path: Path) -> dict:
    """Run one target in a child process and fail the calling test on any crash."""
    import pytest
    root = Path(tmp_path) / f"fuzz-{name}"
    root.mkdir(parents=True, exist_ok=True)
    stats_path, log_path = root / "stats.json", root / "log.txt"
    n = examples()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    heartbeat = root / "heartbeat"
    heartbeat.touch()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), os.path.abspath(test_file), name,
                                 str(root), str(stats_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_limit_child)
        killed, done = threading.Event(), threading.Event()

        def watchdog():
            # signals end a slow case that runs Python; one stuck in C code (or a child that
            # stops making progress at all) is killed here and reported with its case on disk
            while not done.wait(0.5):
                if time.time() - heartbeat.stat().st_mtime > STUCK_SECONDS:
                    killed.set()
                    proc.kill()
                    return
        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            guard.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    stats.update(child_wall_s=round(wall, 2),
                 child_cpu_s=round(usage.ru_utime + usage.ru_stime, 2), rc=proc.returncode)
    if os.environ.get(ENV_STATS):
        with open(os.environ[ENV_STATS], "a") as f:
            f.write(json.dumps(stats) + "\n")
    print(f"\n{name}: {json.dumps(stats)}")
    case = root / "case"
    if killed.is_set() or proc.returncode != 0:
        why = (f"killed: no new case for {STUCK_SECONDS} s (a hang outside Python?)" if killed.is_set()
               else f"exit status {proc.returncode}" + (" (signal: memory limit or crash)" if proc.returncode < 0 else ""))
        pytest.fail(f"fuzz target {name}: {why}; {stats.get('result', 'no result')}\n"
                    f"last case left in {case}\n--- child output (tail) ---\n{log_text[-8000:]}", pytrace=False)
    assert stats["peak_rss_mb"] * 2**20 < RSS_LIMIT, f"fuzz target {name}: peak RSS {stats['peak_rss_mb']} MB"
    assert stats["slowest_s"] < CASE_SECONDS
    assert stats["cases"] >= min(n, 50), stats
    assert stats["ok"] and stats["errors"], f"fuzz target {name} reached only one outcome: {stats}"
    return stats


# ==========================================================================================
# strategies shared by the suites
# ==========================================================================================

def interesting_uint(bits: int, current: int | None = None):
    top = (1 << bits) - 1
    picks = {0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 255, 256, 4095, 65535, 65536, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1}
    if current is not None:
        picks |= {current - 2, current - 1, current + 1, current + 2, current * 2, current // 2,
                  current + 2**32, current | 2**63}
    picks = sorted(p for p in picks if 0 <= p <= top)
    return st.one_of(st.sampled_from(picks), st.integers(0, top), st.integers(0, min(300, top)))


def interesting_sint(bits: int, current: int | None = None):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return interesting_uint(bits, None if current is None else current % (1 << bits)).map(
        lambda u: u - (1 << bits) if u > hi else u).filter(lambda v: lo <= v <= hi)


INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 3.4e38, -3.4e38, 1e308,
                      math.inf, -math.inf, math.nan, 2.0**31, 2.0**63, 2.0**64]

# byte strings that break text in different ways
HOSTILE_TEXT = [b"", b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00",
                b"a\x00b", b"\n", b"a\nb", b"\r", b"\xe2\x80\xa8", b"\x1b[31m", b" ", b"\t",
                "é".encode(), "\u2581".encode(), b"../../etc/passwd", b"/etc/passwd", b"a" * 64,
                b"a" * 65, b"x" * 4096, b"\xef\xbb\xbf", b"__metadata__"]


def hostile_bytes():
    return st.one_of(st.sampled_from(HOSTILE_TEXT), st.binary(max_size=24),
                     st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass")))


def hostile_str():
    """Strings a JSON file can hold: odd unicode, lone surrogates, control characters."""
    return st.one_of(st.sampled_from(["", " ", "\x00", "\n", "\u2028", "\ud800", "\udcff", "é",
                                      "../x", "/abs", "a\\b", "a" * 300, "__metadata__", "NaN"]),
                     st.text(max_size=12))


def position(n: int):
    """An index into n bytes, spread over all of them (plain st.integers favours the start)."""
    return st.one_of(st.integers(0, max(0, n - 1)), st.integers(0, 2**32).map(lambda v: v % max(1, n)))


def edit_bytes(data: bytes, draw) -> tuple[bytes, str]:
    """One raw edit: truncation, a flipped or set byte, inserted or removed bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "append"]))
    n = len(data)
    if kind == "append":
        extra = draw(st.binary(min_size=1, max_size=64))
        return data + extra, f"append {len(extra)} bytes"
    if n == 0:
        return data, "nothing to edit"
    at = draw(position(n))
    if kind == "truncate":
        return data[:at], f"truncate to {at}"
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:], f"flip bit {bit} of byte {at}"
    if kind == "set":
        v = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        return data[:at] + bytes([v]) + data[at + 1:], f"byte {at} = {v}"
    if kind == "insert":
        extra = draw(hostile_bytes())
        return data[:at] + extra + data[at:], f"insert {extra[:16]!r} at {at}"
    k = draw(st.integers(1, 16))
    return data[:at] + data[at + k:], f"delete {k} bytes at {at}"


# ---- JSON ---------------------------------------------------------------------------------

class Pairs(list):
    """A JSON object written from a list of (key, value): it may repeat a key."""


class Raw(str):
    """JSON text written as is: NaN, Infinity, a 5000-digit number, a lone-surrogate escape."""


def _jstr(s: str) -> str:
    # non-ASCII text as is, as real files hold it; lone surrogates as \u escapes
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(s)
    return json.dumps(s, ensure_ascii=False)


def dumps(doc) -> str:
    """JSON text of ``doc``, honouring ``Pairs`` and ``Raw``; ``Raw`` text is written as is."""
    if isinstance(doc, Raw):
        return str(doc)
    if isinstance(doc, Pairs):
        return "{" + ", ".join(f"{_jstr(str(k))}: {dumps(v)}" for k, v in doc) + "}"
    if isinstance(doc, dict):
        return "{" + ", ".join(f"{_jstr(str(k))}: {dumps(v)}" for k, v in doc.items()) + "}"
    if isinstance(doc, list):
        return "[" + ", ".join(dumps(v) for v in doc) + "]"
    if isinstance(doc, str):
        return _jstr(doc)
    return json.dumps(doc)


def json_paths(doc, prefix=()):
    """Every path into ``doc`` (tuples of keys and indices), the root first."""
    yield prefix
    if isinstance(doc, Pairs):
        return
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from json_paths(v, prefix + (i,))


def json_get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def json_set(doc, path, value):
    """A copy of ``doc`` with ``path`` set (copies only along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        out = dict(doc)
        out[head] = json_set(doc[head], rest, value)
        return out
    out = list(doc)
    out[head] = json_set(doc[head], rest, value)
    return out


def json_delete(doc, path):
    parent = json_get(doc, path[:-1])
    if isinstance(parent, dict):
        new = {k: v for k, v in parent.items() if k != path[-1]}
    else:
        new = parent[:path[-1]] + parent[path[-1] + 1:]
    return json_set(doc, path[:-1], new)


def deep(n: int, kind: str = "list"):
    return Raw(("[" * n + "]" * n) if kind == "list" else ('{"a":' * n + "1" + "}" * n))


def json_values(near=None):
    """JSON values of every type, and ones that strain a parser; ``near`` biases numbers."""
    numbers = [0, 1, -1, 2, 3, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -2**63,
               0.5, 1.5, -0.5, 1e-300, 1e300]
    if isinstance(near, (int, float)) and not isinstance(near, bool) and abs(near) < 2**64:   # not inf, NaN, 10**4000
        numbers += [near + 1, near - 1, near * 2, -near, near * 1000, float(near) + 0.5, near * 2**32]
    return st.one_of(
        st.sampled_from(numbers), st.integers(), st.floats(allow_nan=False),
        st.sampled_from([None, True, False, [], {}, "", [None], {"": None}]),
        hostile_str(),
        st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"),
                         Raw("9" * 5000), Raw("7" * 4000), Raw('"\\ud800"'), Raw('"\\u0000"'), deep(50), deep(5000),
                         deep(100000), deep(2000, "dict")]),
        st.lists(st.integers(-5, 300), max_size=4),
        st.dictionaries(hostile_str(), st.integers(-1, 3), max_size=3),
    )


def mutate_json(doc, draw, *, focus=()):
    """One structure-aware edit of a JSON document -> (new doc, description).

    ``focus`` lists paths (or path prefixes) worth extra attention: half the edits land there."""
    paths = list(json_paths(doc))
    focused = [p for p in paths if any(p[:len(f)] == tuple(f) for f in focus)]
    pool = focused if focused and draw(st.booleans()) else paths
    path = draw(st.sampled_from(pool))
    here = json_get(doc, path)
    kind = draw(st.sampled_from(["replace", "replace", "delete", "insert", "wrap", "duplicate_key", "swap_type"]))
    if kind == "delete" and path:
        return json_delete(doc, path), f"delete {path}"
    if kind == "insert" and isinstance(here, (dict, list)):
        value = draw(json_values())
        if isinstance(here, dict):
            key = draw(hostile_str() | st.sampled_from(list(here) or ["x"]))
            new = dict(here)
            new[key] = value
        else:
            new = list(here)
            new.insert(draw(st.integers(0, len(here))), value)
        return json_set(doc, path, new), f"insert into {path}"
    if kind == "wrap":
        new = draw(st.sampled_from(["list", "dict"]))
        return json_set(doc, path, [here] if new == "list" else {"value": here}), f"wrap {path} in a {new}"
    if kind == "duplicate_key" and isinstance(here, dict) and here:
        key = draw(st.sampled_from(list(here)))
        other = draw(json_values())
        return json_set(doc, path, Pairs(list(here.items()) + [(key, other)])), f"repeat key {key!r} at {path}"
    if kind == "swap_type":
        swapped = {int: str, float: str, str: lambda s: len(s), bool: int, type(None): str,
                   list: lambda v: dict(enumerate(v)), dict: lambda v: list(v.values())}
        conv = swapped.get(type(here), str)
        value = conv(here)
        if isinstance(value, dict):
            value = {str(k): v for k, v in value.items()}
        return json_set(doc, path, value), f"retype {path}"
    return json_set(doc, path, draw(json_values(here))), f"replace {path}"


def mutate_json_text(text: str, draw) -> tuple[bytes, str]:
    """Edits below the structure: bytes that are not UTF-8, truncation, a BOM, junk around."""
    raw = text.encode("utf-8", "surrogatepass")
    kind = draw(st.sampled_from(["bytes", "truncate", "bom", "trailing", "nul", "invalid_utf8"]))
    if kind == "truncate":
        at = draw(position(len(raw)))
        return raw[:at], f"JSON text cut at {at}"
    if kind == "bom":
        return b"\xef\xbb\xbf" + raw, "BOM"
    if kind == "trailing":
        return raw + draw(st.sampled_from([b" ", b"\n", b"x", b"{}", b"\x00", b"]"])), "trailing text"
    if kind == "nul":
        return raw + b"\x00" * draw(st.integers(1, 8)), "NUL padding"
    if kind == "invalid_utf8":
        at = draw(position(len(raw) + 1))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))
        return raw[:at] + bad + raw[at:], f"{bad!r} at {at}"
    return edit_bytes(raw, draw)


def json_case(doc, draw, *, focus=(), max_edits: int = 3) -> tuple[bytes, str]:
    """A mutated JSON file: 1..max_edits structural edits, sometimes one textual edit."""
    notes = []
    for _ in range(draw(st.integers(1, max_edits))):
        doc, note = mutate_json(doc, draw, focus=focus)
        notes.append(note)
    text = dumps(doc)
    if draw(st.integers(0, 4)) == 0:
        raw, note = mutate_json_text(text, draw)
        notes.append(note)
    else:
        raw = text.encode("utf-8", "surrogatepass")
    return raw, "; ".join(notes)


if __name__ == "__main__":
    sys.exit(_run_child(*sys.argv[1:5]))
